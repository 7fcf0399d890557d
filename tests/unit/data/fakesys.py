"""Fake sysfs trees and a fake ``nvme`` executable for the node-side unit tests.

The layout mirrors a real Linux 6.1 kernel with native NVMe multipath (what
Debian's kernels and the e2e guest use): the head disk ``nvmeXnY`` lives under
its ``nvme-subsystem`` directory, the hidden per-path disk ``nvmeXcYnZ`` under
the controller, and ``/sys/class`` and ``/sys/block`` hold symlinks.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys


def _write(path: str, value: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(value + "\n")


def _link(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.relpath(target, os.path.dirname(link)), link)


def _free(root: str, cls: str, prefix: str) -> int:
    used = {int(n[len(prefix):]) for n in os.listdir(os.path.join(root, "class", cls))
            if n[len(prefix):].isdigit()} if os.path.isdir(os.path.join(root, "class", cls)) \
        else set()
    i = 0
    while i in used:
        i += 1
    return i


def add_namespace(root: str, dev_root: str, subsys_dir: str, ctrl_dir: str, ns_uuid: str,
                  nsid: int = 1, sectors: int = 262144) -> str:
    """A namespace head disk (+ hidden path disk); returns the block device name."""
    sub = os.path.basename(subsys_dir)[len("nvme-subsys"):]
    ctrl = os.path.basename(ctrl_dir)[len("nvme"):]
    head = f"nvme{sub}n{nsid}"
    hidden = f"nvme{sub}c{ctrl}n{nsid}"
    for d, name in ((subsys_dir, head), (ctrl_dir, hidden)):
        nsdir = os.path.join(d, name)
        _write(os.path.join(nsdir, "uuid"), ns_uuid)
        _write(os.path.join(nsdir, "nguid"), ns_uuid)
        _write(os.path.join(nsdir, "wwid"), f"uuid.{ns_uuid}")
        _write(os.path.join(nsdir, "nsid"), str(nsid))
        _write(os.path.join(nsdir, "size"), str(sectors))
        _link(nsdir, os.path.join(root, "block", name))
    os.makedirs(dev_root, exist_ok=True)
    with open(os.path.join(dev_root, head), "w", encoding="ascii"):
        pass
    return head


def add_fabrics_subsystem(root: str, dev_root: str, nqn: str, ns_uuids=(),
                          transport: str = "tcp", traddr: str = "10.0.2.2",
                          trsvcid: str = "4420", state: str = "live") -> tuple[str, str]:
    """A connected NVMe-oF subsystem with one controller; returns (subsys, ctrl) dirs."""
    s = _free(root, "nvme-subsystem", "nvme-subsys")
    c = _free(root, "nvme", "nvme")
    subsys_dir = os.path.join(root, "devices/virtual/nvme-subsystem", f"nvme-subsys{s}")
    ctrl_dir = os.path.join(root, "devices/virtual/nvme-fabrics/ctl", f"nvme{c}")
    _write(os.path.join(subsys_dir, "subsysnqn"), nqn)
    _write(os.path.join(ctrl_dir, "subsysnqn"), nqn)
    _write(os.path.join(ctrl_dir, "transport"), transport)
    _write(os.path.join(ctrl_dir, "address"),
           f"traddr={traddr},trsvcid={trsvcid},src_addr=10.0.2.15")
    _write(os.path.join(ctrl_dir, "state"), state)
    _write(os.path.join(ctrl_dir, "model"), "SPDK bdev Controller")
    _write(os.path.join(ctrl_dir, "rescan_controller"), "")
    _link(ctrl_dir, os.path.join(subsys_dir, f"nvme{c}"))
    _link(ctrl_dir, os.path.join(root, "class/nvme", f"nvme{c}"))
    _link(subsys_dir, os.path.join(root, "class/nvme-subsystem", f"nvme-subsys{s}"))
    for i, ns_uuid in enumerate(ns_uuids, start=1):
        add_namespace(root, dev_root, subsys_dir, ctrl_dir, ns_uuid, nsid=i)
    return subsys_dir, ctrl_dir


def remove_subsystem(root: str, dev_root: str, nqn: str) -> int:
    """Remove every controller, subsystem and disk of ``nqn``; returns controllers removed."""
    removed = 0
    sbase = os.path.join(root, "class/nvme-subsystem")
    for s in list(os.listdir(sbase)) if os.path.isdir(sbase) else []:
        link = os.path.join(sbase, s)
        real = os.path.realpath(link)
        with open(os.path.join(real, "subsysnqn"), encoding="utf-8") as f:
            if f.read().strip() != nqn:
                continue
        for entry in os.listdir(real):
            p = os.path.join(real, entry)
            if entry.startswith("nvme") and os.path.islink(p):   # a controller
                ctrl = os.path.realpath(p)
                for ns in os.listdir(ctrl):
                    if os.path.isdir(os.path.join(ctrl, ns)):
                        _unlink(os.path.join(root, "block", ns))
                _unlink(os.path.join(root, "class/nvme", entry))
                shutil.rmtree(ctrl)
                removed += 1
            elif os.path.isdir(p):                                  # a head disk
                _unlink(os.path.join(root, "block", entry))
                _unlink(os.path.join(dev_root, entry))
        shutil.rmtree(real)
        os.unlink(link)
    return removed


def _unlink(path: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)


def add_pcie_ssd(root: str, pci: str, vendor: str, device: str, model: str, serial: str,
                 firmware: str = "1.0", namespaces=(), ctrl: int | None = None,
                 multipath: bool = True) -> str:
    """A local PCIe NVMe SSD (``namespaces``: sizes in 512-byte sectors).
    ``multipath=False``: the namespace disks ``nvmeXnY`` sit directly under
    the controller, as for a single-controller SSD (QEMU's ``-device nvme``
    in the e2e guest shows this layout)."""
    c = _free(root, "nvme", "nvme") if ctrl is None else ctrl
    pci_dir = os.path.join(root, "devices/pci0000:00", pci)
    _write(os.path.join(pci_dir, "vendor"), vendor)
    _write(os.path.join(pci_dir, "device"), device)
    ctrl_dir = os.path.join(pci_dir, "nvme", f"nvme{c}")
    for name, value in (("transport", "pcie"), ("model", model.ljust(40)),
                        ("serial", serial.ljust(20)), ("firmware_rev", firmware.ljust(8)),
                        ("state", "live"), ("address", pci), ("subsysnqn", f"nqn.{serial}")):
        _write(os.path.join(ctrl_dir, name), value)
    # the kernel's form of the link: ../../../<pci address>
    os.symlink(os.path.join("..", "..", "..", pci), os.path.join(ctrl_dir, "device"))
    _link(ctrl_dir, os.path.join(root, "class/nvme", f"nvme{c}"))
    for i, sectors in enumerate(namespaces, start=1):
        ns = os.path.join(ctrl_dir, f"nvme{c}c{c}n{i}" if multipath else f"nvme{c}n{i}")
        _write(os.path.join(ns, "size"), str(sectors))
        _write(os.path.join(ns, "nsid"), str(i))
        _link(ns, os.path.join(root, "block", os.path.basename(ns)))
    return ctrl_dir


def remove_pcie_ssd(root: str, ctrl_dir: str) -> None:
    """What a PCIe hot-unplug leaves: the controller, its disks and links gone."""
    for ns in os.listdir(ctrl_dir):
        _unlink(os.path.join(root, "block", ns))
    _unlink(os.path.join(root, "class/nvme", os.path.basename(ctrl_dir)))
    shutil.rmtree(os.path.dirname(os.path.dirname(ctrl_dir)))   # the PCI function


FAKE_NVME = """#!{python}
# Fake nvme-cli for tests: records argv, simulates connect/disconnect on a fake sysfs.
import json, os, sys
sys.path.insert(0, {here!r})
import fakesys
env = os.environ
with open(env["FAKE_NVME_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
cmd = sys.argv[1] if len(sys.argv) > 1 else ""
if env.get("FAKE_NVME_FAIL") == cmd:
    if env.get("FAKE_NVME_ECHO"):   # like nvme-cli -v: the options string it wrote
        sys.stderr.write("options: " + ",".join(sys.argv[2:]) + "\\n")
    sys.stderr.write("Failed to write to /dev/nvme-fabrics: Connection refused\\n")
    sys.exit(1)
args = sys.argv[2:]
def opt(name):
    return args[args.index(name) + 1] if name in args else ""
root, dev = env["FAKE_NVME_SYSFS"], env["FAKE_NVME_DEV"]
if cmd == "connect":
    nqn = opt("-n")
    exports = json.loads(env.get("FAKE_NVME_EXPORTS", "{{}}"))
    fakesys.add_fabrics_subsystem(root, dev, nqn, exports.get(nqn, []),
                                  traddr=opt("-a"), trsvcid=opt("-s"))
    print("connecting to device: nvme0")
elif cmd == "disconnect":
    n = fakesys.remove_subsystem(root, dev, opt("-n"))
    print(f"NQN:{{opt('-n')}} disconnected {{n}} controller(s)")
"""


def install_fake_nvme(bin_dir: str) -> str:
    """Write the fake ``nvme`` into ``bin_dir``; returns its path."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, "nvme")
    with open(path, "w", encoding="utf-8") as f:
        f.write(FAKE_NVME.format(python=sys.executable,
                                 here=os.path.dirname(os.path.abspath(__file__))))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def read_log(path: str) -> list[list[str]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
