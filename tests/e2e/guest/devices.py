"""Emulated devices for the test guest: PCIe NVMe SSDs (QEMU ``-device
nvme``) and the QMP monitor that hot-unplugs them.

QEMU's nvme device has no model property: its Identify Controller model is
always "QEMU NVMe Ctrl" (hw/nvme/ctrl.c, ``nvme_init_ctrl``) and firmware is
QEMU's version. ``use-intel-id=on`` changes the PCI ids from Red Hat's
1b36:0010 to Intel's 8086:5845, which is what makes a second SSD class.

Hot-unplug: on QEMU's default i440fx machine every root-bus slot is
hot-pluggable through ACPI (PIIX4); the guest's ``acpiphp`` (the Debian cloud
kernel has HOTPLUG_PCI_ACPI=y) ejects the function, then QEMU reports
``DEVICE_DELETED``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path

QMP_SOCKET = "qmp.sock"


@dataclasses.dataclass(frozen=True)
class NvmeController:
    """An emulated PCIe NVMe SSD: ``-device nvme`` plus one ``-device nvme-ns``
    per namespace, each over its own sparse raw file in the run's work
    directory; bound by the guest kernel's built-in ``nvme`` driver.
    ``slot``: the PCI slot on the root bus, so the guest sees it at
    ``0000:00:<slot>.0``."""

    id: str                                     # QEMU device id (device_del uses it)
    serial: str
    namespaces: tuple[int, ...] = (16 << 20,)   # sizes in bytes
    intel_id: bool = False
    slot: int | None = None

    @property
    def pci_address(self) -> str | None:
        return None if self.slot is None else f"0000:00:{self.slot:02x}.0"


def qemu_nvme_args(work: Path, ctrls: Iterable[NvmeController]) -> list[str]:
    """``-device nvme`` + per namespace ``-drive`` (sparse raw file) and ``-device nvme-ns``."""
    args: list[str] = []
    for c in ctrls:
        dev = f"nvme,id={c.id},serial={c.serial}"
        if c.intel_id:
            dev += ",use-intel-id=on"
        if c.slot is not None:
            dev += f",addr={c.slot:#x}"
        args += ["-device", dev]
        for nsid, size in enumerate(c.namespaces, 1):
            img = work / f"{c.id}-ns{nsid}.img"
            with open(img, "wb") as f:
                f.truncate(int(size))
            drive = f"{c.id}-ns{nsid}"
            args += ["-drive", f"file={img},if=none,id={drive},format=raw,cache=unsafe",
                     "-device", f"nvme-ns,drive={drive},bus={c.id},nsid={nsid}"]
    return args


def qemu_monitor_args(work: Path) -> list[str]:
    return ["-qmp", f"unix:{work / QMP_SOCKET},server=on,wait=off"]


class Monitor:
    """QMP through QEMU's own client library (``qemu.qmp``, legacy sync API)."""

    def __init__(self, work: Path, alive: Callable[[], bool], timeout: float = 30.0) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        sock = work / QMP_SOCKET
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if time.monotonic() > deadline or not alive():
                raise RuntimeError(f"no QMP socket {sock} (GuestOptions(monitor=True)?)")
            time.sleep(0.1)
        self.qmp = QEMUMonitorProtocol(str(sock))
        self.qmp.connect()

    def cmd(self, name: str, **args):
        return self.qmp.cmd(name, **args)

    def pci_devices(self) -> list[dict]:
        """Every PCI function QEMU has (``query-pci``), bus and slot included."""
        return [d for bus in self.cmd("query-pci") for d in bus["devices"]]

    def device_del(self, dev_id: str, timeout: float = 60.0) -> None:
        """Hot-unplug a device; return once QEMU reports DEVICE_DELETED, which
        comes only after the guest has released it."""
        self.cmd("device_del", id=dev_id)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no DEVICE_DELETED for {dev_id} after {timeout:.0f}s")
            ev = self.qmp.pull_event(wait=left)
            if ev and ev.get("event") == "DEVICE_DELETED" and \
                    ev.get("data", {}).get("device") == dev_id:
                return

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
