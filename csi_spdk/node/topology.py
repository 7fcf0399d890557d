"""Local NVMe SSD discovery and the node's topology segments.

Inventory sources:

* kernel-owned SSDs, from sysfs ``/sys/class/nvme/nvme*``: only controllers
  whose ``transport`` is ``pcie`` count (fabrics controllers: tcp, rdma, fc,
  loop, are remote volumes, not local SSDs). PCI address = the name of the
  ``device`` link target; vendor/device id from that PCI device; model,
  serial and firmware_rev from the controller; capacity = the sum of
  ``size`` x 512 over the controller's namespaces (``nvmeXnY``, or the hidden
  per-path ``nvmeXcYnZ`` under native multipath, listed by its head disk's
  name ``nvmeXnZ``, the one in /dev). An SSD without a namespace is listed
  with capacity 0. A controller on its way out (``state`` deleting or dead,
  e.g. during a PCIe hot-unplug) or gone while it was being read is left
  out, so a removed SSD never leaves a half-read entry or a bogus label.
* SPDK-owned SSDs (unbound from the kernel, driven by a local ``spdk_tgt``),
  from ``bdev_nvme_get_controllers`` (PCIe transport ids only) plus
  ``bdev_get_bdevs`` for model/serial/vendor and sizes.

Topology key scheme (``segments``)::

    topology.csi-spdk.io/node = <node id>
    ssd.csi-spdk.io/<vendor slug>-<model class slug> = "true"   (one per SSD class)

* vendor slug: the PCI vendor id looked up in ``VENDORS`` (``samsung``,
  ``intel``, ``micron``, ``wdc``, ``kioxia``, ``skhynix``, ``seagate``,
  ``qemu``, ``redhat``, ...), else the 4-digit lowercase hex id (``1d0f``).
* model class slug: the model string lowercased; every run of characters
  outside ``[a-z0-9.]`` becomes ``-``; a leading token equal to the vendor
  name (``samsung-``, ``intel-``, ``wdc-``, ...) is dropped; tokens that are a
  capacity (``1tb``, ``960gb``, ``3.84t``) are dropped, so capacity variants
  of one model share a class; leading/trailing ``-``/``.`` are stripped.
  An empty result becomes ``unknown``.
* the name part ``<vendor>-<model>`` is cut to 63 characters: when longer,
  the first 54 characters plus ``-`` plus 8 hex digits of the SHA-256 of the
  full name, so keys stay unique, valid Kubernetes label keys
  (``[a-z0-9]([a-z0-9.-]*[a-z0-9])?``, at most 63).

Example: a Samsung "SAMSUNG MZQL21T9HCJR-00A07" gives
``ssd.csi-spdk.io/samsung-mzql21t9hcjr-00a07=true``; a QEMU "QEMU NVMe Ctrl"
gives ``ssd.csi-spdk.io/qemu-nvme-ctrl=true``.

Concurrency: all functions are pure or read-only; safe from any thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from .. import contract
from .sysfs import read_attr as _read

log = logging.getLogger("csi_spdk.topology")

VENDORS = {
    "144d": "samsung", "8086": "intel", "1344": "micron", "15b7": "wdc", "1b96": "wdc",
    "1e0f": "kioxia", "1179": "toshiba", "1c5c": "skhynix", "1bb1": "seagate",
    "1b36": "qemu", "1af4": "redhat", "1987": "phison", "126f": "siliconmotion",
    "1cc1": "adata", "1d97": "shenzhen-longsys", "c0a9": "crucial", "2646": "kingston",
    "1e4b": "maxio", "1d0f": "amazon", "1414": "microsoft", "1c58": "hgst",
    "1dbe": "inspur", "1e3b": "dapustor", "1ed0": "solidigm", "025e": "solidigm",
    "1f03": "memblaze", "1cb0": "shannon", "106b": "apple", "10ec": "realtek",
}
_NAME_MAX = 63
_CAPACITY_TOKEN = re.compile(r"^\d+(\.\d+)?(gb|tb|g|t)$")
_CTRL = re.compile(r"^nvme\d+$")
_NS = re.compile(r"^nvme(\d+)(c\d+)?n(\d+)$")
_PCI_ADDR = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_GOING = ("deleting", "dead")     # also "deleting (no IO)"


@dataclass
class Namespace:
    """One namespace of a local SSD: the block device (kernel) or bdev (SPDK)."""

    name: str
    nsid: int
    size_bytes: int


@dataclass
class Ssd:
    """One local NVMe SSD."""

    owner: str                 # "kernel" or "spdk"
    name: str                  # "nvme0" or the SPDK controller name ("Nvme0")
    pci_address: str
    vendor_id: str             # 4 lowercase hex digits
    device_id: str
    vendor: str                # slug from VENDORS, else vendor_id
    model: str
    serial: str
    firmware: str
    capacity_bytes: int
    namespaces: list[Namespace] = field(default_factory=list)

    @property
    def ssd_class(self) -> str:
        return class_name(self.vendor_id, self.model)


def _hex(value: str) -> str:
    value = (value or "").strip().lower()
    if value.startswith("0x"):
        value = value[2:]
    return value.zfill(4) if value else ""


def vendor_slug(vendor_id: str) -> str:
    vid = _hex(vendor_id)
    return VENDORS.get(vid, vid or "unknown")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower())


def model_slug(model: str, vendor: str = "") -> str:
    tokens = [t for t in _slug(model).split("-") if t]
    names = {vendor, vendor.replace("-", ""), "wd", "western", "sk", "hynix", "hgst"} \
        if vendor else set()
    while tokens and tokens[0] in names:
        tokens.pop(0)
    tokens = [t for t in tokens if not _CAPACITY_TOKEN.match(t)]
    slug = "-".join(tokens).strip("-.")
    slug = re.sub(r"\.+-|-\.+", "-", slug)
    return slug or "unknown"


def class_name(vendor_id: str, model: str) -> str:
    """The label name part ``<vendor>-<model class>``, a valid label name."""
    vendor = vendor_slug(vendor_id)
    name = f"{vendor}-{model_slug(model, vendor)}".strip("-.")
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name[:_NAME_MAX - 9].rstrip("-.") + "-" + digest
    return name


def segments(node_id: str, inventory: Iterable[Ssd] = (),
             extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Topology segments for NodeGetInfo: node key, one key per SSD class, extras."""
    out = {contract.TOPOLOGY_NODE_KEY: node_id}
    for ssd in inventory:
        out[contract.TOPOLOGY_SSD_PREFIX + ssd.ssd_class] = "true"
    out.update(extra or {})
    return out


def parse_extra(items: Iterable[str]) -> dict[str, str]:
    """``--topology KEY=VALUE`` flags to a dict (ValueError on a malformed one)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--topology {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


# --- kernel-owned SSDs (sysfs) --------------------------------------------------------


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path), key=lambda n: [int(t) if t.isdigit() else t
                                                        for t in re.split(r"(\d+)", n)])
    except OSError:
        return []


def _namespaces(ctrl: str) -> list[Namespace]:
    out = []
    for entry in _listdir(ctrl):
        m = _NS.match(entry)
        if not m:
            continue
        sectors = _read(os.path.join(ctrl, entry, "size"))
        nsid = _read(os.path.join(ctrl, entry, "nsid"))
        out.append(Namespace(f"nvme{m.group(1)}n{m.group(3)}",
                             int(nsid) if nsid.isdigit() else int(m.group(3)),
                             int(sectors) * 512 if sectors.isdigit() else 0))
    return sorted(out, key=lambda n: n.nsid)   # sysfs lists them in no fixed order


def _kernel_ssd(name: str, ctrl: str) -> Ssd | None:
    """The SSD behind ``/sys/class/nvme/<name>``, None when it is not a local
    PCIe controller or is going away."""
    if _read(os.path.join(ctrl, "transport")).lower() != "pcie":
        return None
    if _read(os.path.join(ctrl, "state")).lower().startswith(_GOING):
        return None
    pci = os.path.join(ctrl, "device")
    try:     # "../../../0000:00:10.0": one readlink, where realpath lstat()s every component
        pci_address = os.path.basename(os.readlink(pci))
    except OSError:
        pci_address = ""
    if pci_address and not _PCI_ADDR.match(pci_address):
        pci_address = os.path.basename(os.path.realpath(pci))
    vendor_id = _hex(_read(os.path.join(pci, "vendor")))
    namespaces = _namespaces(ctrl)
    ssd = Ssd("kernel", name, pci_address, vendor_id, _hex(_read(os.path.join(pci, "device"))),
              vendor_slug(vendor_id), _read(os.path.join(ctrl, "model")),
              _read(os.path.join(ctrl, "serial")), _read(os.path.join(ctrl, "firmware_rev")),
              sum(n.size_bytes for n in namespaces), namespaces)
    # Unplugged while we read (attributes of a removed device read as ""):
    # drop it rather than report a half-read SSD under a bogus class.
    if not os.path.exists(os.path.join(ctrl, "transport")) or not vendor_id:
        return None
    return ssd


def sysfs_ssds(sysfs_root: str = "/sys") -> list[Ssd]:
    """Local PCIe NVMe controllers the kernel drives (a few small sysfs reads
    per controller: cheap enough for every NodeGetInfo)."""
    base = os.path.join(sysfs_root, "class", "nvme")
    found = []
    for name in _listdir(base):
        if not _CTRL.match(name) or _virtual(os.path.join(base, name)):
            continue
        ssd = _kernel_ssd(name, os.path.join(base, name))
        if ssd is not None:
            found.append(ssd)
    return found


def _virtual(class_link: str) -> bool:
    """A fabrics controller (tcp, rdma, fc, loop) hangs under
    /sys/devices/virtual/nvme-fabrics: one readlink tells, so the node's own
    NVMe/TCP volumes cost next to nothing per scan."""
    try:
        return "/devices/virtual/" in os.readlink(class_link)
    except OSError:
        return False


# --- SPDK-owned SSDs ---------------------------------------------------------------------
def spdk_ssds(api) -> list[Ssd]:
    """PCIe NVMe controllers attached to a local spdk_tgt (``SpdkApi``-like ``call``)."""
    controllers = api.call("bdev_nvme_get_controllers") or []
    bdevs = api.call("bdev_get_bdevs") or []
    found = []
    for ctrl in controllers:
        name = ctrl.get("name", "")
        trids = [c.get("trid", {}) for c in ctrl.get("ctrlrs", [])] or [ctrl.get("trid", {})]
        pcie = [t for t in trids if str(t.get("trtype", "")).lower() == "pcie"]
        if not pcie:
            continue
        traddr = pcie[0].get("traddr", "")
        info: dict = {}
        namespaces, capacity = [], 0
        for bdev in bdevs:
            for nvme in (bdev.get("driver_specific") or {}).get("nvme") or []:
                addr = nvme.get("pci_address") or (nvme.get("trid") or {}).get("traddr")
                if addr != traddr:
                    continue
                info = nvme.get("ctrlr_data") or info
                size = int(bdev.get("num_blocks", 0)) * int(bdev.get("block_size", 0))
                nsid = int((nvme.get("ns_data") or {}).get("id", 0) or 0)
                namespaces.append(Namespace(bdev.get("name", ""), nsid, size))
                capacity += size
                break
        vendor_id = _hex(str(info.get("vendor_id", "")))
        found.append(Ssd("spdk", name, traddr, vendor_id, "", vendor_slug(vendor_id),
                         str(info.get("model_number", "")).strip(),
                         str(info.get("serial_number", "")).strip(),
                         str(info.get("firmware_revision", "")).strip(), capacity, namespaces))
    return found


def _spdk_inventory(spdk_rpc: str, timeout: float) -> list[Ssd]:
    from ..spdk.api import SpdkApi
    from ..spdk.client import SpdkClient

    with SpdkClient(spdk_rpc, timeout=timeout) as client:
        return spdk_ssds(SpdkApi(client))


def inventory(sysfs_root: str = "/sys", spdk_rpc: str = "",
              strict: bool = True) -> list[Ssd]:
    """Kernel-owned plus (when ``spdk_rpc`` is set) SPDK-owned local SSDs.

    ``strict=False`` reports only the kernel's SSDs when the local spdk_tgt
    cannot be reached.
    """
    from ..spdk.errors import SpdkTransportError

    ssds = sysfs_ssds(sysfs_root)
    if spdk_rpc:
        try:
            ssds += _spdk_inventory(spdk_rpc, 10.0)
        except SpdkTransportError as err:
            if strict:
                raise
            log.warning("no SPDK-owned SSDs listed", extra={"f": {"error": err.message}})
    return ssds


class NodeTopology:
    """The node plugin's topology segments, read afresh on every call
    (NodeGetInfo), so an SSD added or hot-removed while the plugin runs is
    reported, or no longer reported, by the next call.

    Cost: the sysfs scan is a few small reads per controller; with
    ``spdk_rpc``, two JSON-RPC calls to the local spdk_tgt. When that target
    cannot be reached the SSDs it owned at the last successful call are kept
    (a restarting spdk_tgt must not flap the node's labels); a node that
    never reached it reports its kernel SSDs only, so it still starts.
    """

    def __init__(self, node_id: str, sysfs_root: str = "/sys", spdk_rpc: str = "",
                 extra: Mapping[str, str] | None = None, spdk_timeout: float = 5.0) -> None:
        self.node_id = node_id
        self.sysfs_root = sysfs_root
        self.spdk_rpc = spdk_rpc
        self.extra = dict(extra or {})
        self.spdk_timeout = spdk_timeout
        self._spdk_last: list[Ssd] = []

    def inventory(self) -> list[Ssd]:
        from ..spdk.errors import SpdkTransportError

        ssds = sysfs_ssds(self.sysfs_root)
        if self.spdk_rpc:
            try:
                self._spdk_last = _spdk_inventory(self.spdk_rpc, self.spdk_timeout)
            except SpdkTransportError as err:
                log.warning("local spdk_tgt unreachable: keeping the SSDs it owned at the "
                            "last successful look", extra={"f": {
                                "error": err.message,
                                "kept": [s.pci_address for s in self._spdk_last]}})
            ssds = ssds + self._spdk_last
        return ssds

    def segments(self) -> dict[str, str]:
        return segments(self.node_id, self.inventory(), self.extra)


def discover_main(args) -> int:
    """``csi-spdk discover``: print the inventory as JSON or a table."""
    ssds = inventory(args.sysfs_root, args.spdk_rpc)
    if args.format == "json":
        json.dump([{**asdict(s), "class": s.ssd_class} for s in ssds], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header = ("OWNER", "NAME", "PCI", "IDS", "VENDOR", "MODEL", "SERIAL", "FW", "CAPACITY",
              "NAMESPACES", "CLASS")
    rows = [header] + [(s.owner, s.name, s.pci_address, f"{s.vendor_id}:{s.device_id or '-'}",
                        s.vendor, s.model, s.serial, s.firmware, _human(s.capacity_bytes),
                        ",".join(n.name for n in s.namespaces) or "-", s.ssd_class)
                       for s in ssds]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not ssds:
        print("(no local NVMe SSDs)")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
