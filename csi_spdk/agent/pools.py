"""Declarative storage pools: attach the devices, load or create their lvstores.

A pool file (YAML) names each pool (its lvstore's name) and the device under
it::

    pools:
      - name: pool0
        devices:
          - pci: "0000:5e:00.0"        # an NVMe SSD driven by SPDK (bdev_nvme)
            initialize: true           # it may get an lvstore (see below)
        cluster_size: 4MiB             # bytes, or a string with KiB/MiB/GiB
        metadata_ratio: 100            # num_md_pages_per_cluster_ratio
      - name: pool1
        devices:
          - path: /dev/disk/by-id/nvme-foo   # a block device or a file ...
            io: aio                          # ... through bdev_aio (or io_uring)

Never reformat: an lvstore already on a device is loaded by SPDK's examine
(``bdev_wait_for_examine``) and used as it is. An lvstore is created only on
a device that carries none *and* no other signature: a file or block device
is probed with libblkid first (the same low-level probe as ``blkid -p``) and
any filesystem, RAID member or partition table refuses the pool without the
device ever being handed to SPDK. An NVMe SSD owned by SPDK cannot be probed
from the host, so it gets an lvstore only when its entry says
``initialize: true`` (the operator's statement that it is blank).

One device per pool: an lvstore lives on one bdev (several SSDs would need a
RAID bdev under it, not supported yet).

Storage hosts with different devices share one file (the chart's ConfigMap)
through ``nodes``: the list under the host's name (``--node-name``, the
Kubernetes node) replaces ``pools`` on that host; hosts not listed use
``pools``. Every list is validated on every host, so a mistake in one node's
entry is reported everywhere::

    pools: [...]                   # every other storage host
    nodes:
      storage-3:                   # this host's own devices
        - name: pool0
          devices: [{path: /dev/nvme2n1}]
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import blkid, metrics
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkError, SpdkTransportError

log = logging.getLogger("csi_spdk.agent.pools")

BLOBSTORE_SIGNATURE = b"SPDKBLOB"       # struct spdk_bs_super_block, offset 0
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_PCI = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


class PoolConfigError(ValueError):
    """The pool file is wrong; the message names the pool and the field."""


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise PoolConfigError(f"{where}: {value!r} is not a size (bytes, or e.g. '4MiB')")
    return int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].upper()]


@dataclass(frozen=True)
class Device:
    kind: str                 # "nvme" | "aio" | "uring"
    address: str              # PCI address or path
    initialize: bool = False

    @property
    def label(self) -> str:
        return f"NVMe {self.address}" if self.kind == "nvme" else self.address


@dataclass(frozen=True)
class PoolSpec:
    name: str
    device: Device
    cluster_size: int | None = None
    metadata_ratio: int | None = None

    @property
    def bdev_name(self) -> str:
        """The base bdev the agent gives the device (an NVMe namespace 1 bdev)."""
        return f"{self.name}-nvmen1" if self.device.kind == "nvme" else f"{self.name}-dev"


def parse_spec(doc: Any, source: str = "pool file", node: str = "") -> list[PoolSpec]:
    """Validate a pool document (already loaded YAML) into the PoolSpecs of
    ``node``: its ``nodes`` entry when it has one, else ``pools``."""
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("pools", []), list):
        raise PoolConfigError(f"{source}: expected a mapping with a 'pools' list")
    unknown = set(doc) - {"pools", "nodes"}
    if unknown:
        raise PoolConfigError(f"{source}: unknown field(s) {sorted(unknown)} (pools, nodes)")
    nodes = doc.get("nodes") or {}
    if not isinstance(nodes, dict) or not all(
            isinstance(k, str) and isinstance(v, list) for k, v in nodes.items()):
        raise PoolConfigError(f"{source}: nodes must map node names to pool lists")
    default = _pool_list(doc.get("pools") or [], source, "pools")
    chosen = default
    for name, pools in sorted(nodes.items()):
        specs = _pool_list(pools, source, f"nodes.{name}")
        if name == node:
            chosen = specs
    return chosen


def _pool_list(pools: list[Any], source: str, key: str) -> list[PoolSpec]:
    out: list[PoolSpec] = []
    for i, p in enumerate(pools):
        where = f"{source}: {key}[{i}]"
        if not isinstance(p, dict):
            raise PoolConfigError(f"{where}: expected a mapping")
        unknown = set(p) - {"name", "devices", "cluster_size", "metadata_ratio"}
        if unknown:
            raise PoolConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = p.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise PoolConfigError(f"{where}: name must be 1-63 of [A-Za-z0-9_.-] "
                                  "(it is the lvstore's name)")
        where = f"{source}: {'' if key == 'pools' else key + ': '}pool {name}"
        if any(x.name == name for x in out):
            raise PoolConfigError(f"{where}: defined twice")
        devices = p.get("devices")
        if not isinstance(devices, list) or len(devices) != 1:
            raise PoolConfigError(f"{where}: devices must list exactly one device (an "
                                  "lvstore lives on one bdev)")
        cluster = p.get("cluster_size")
        ratio = p.get("metadata_ratio")
        if ratio is not None and (not isinstance(ratio, int) or isinstance(ratio, bool)
                                  or ratio <= 0):
            raise PoolConfigError(f"{where}: metadata_ratio must be a positive integer")
        out.append(PoolSpec(name, _device(devices[0], where),
                            parse_size(cluster, f"{where}: cluster_size") if cluster else None,
                            ratio))
    return out


def _device(d: Any, where: str) -> Device:
    if not isinstance(d, dict):
        raise PoolConfigError(f"{where}: a device is a mapping with 'pci' or 'path'")
    unknown = set(d) - {"pci", "path", "io", "initialize"}
    if unknown:
        raise PoolConfigError(f"{where}: unknown device field(s) {sorted(unknown)}")
    if ("pci" in d) == ("path" in d):
        raise PoolConfigError(f"{where}: a device has exactly one of 'pci' or 'path'")
    if "pci" in d:
        if not _PCI.match(str(d["pci"])):
            raise PoolConfigError(f"{where}: pci {d['pci']!r} is not a PCI address "
                                  "(domain:bus:device.function, e.g. 0000:5e:00.0)")
        return Device("nvme", str(d["pci"]).lower(), bool(d.get("initialize", False)))
    io = d.get("io", "aio")
    if io not in ("aio", "io_uring"):
        raise PoolConfigError(f"{where}: io must be aio or io_uring, not {io!r}")
    path = d["path"]
    if not isinstance(path, str) or not path.startswith("/"):
        raise PoolConfigError(f"{where}: path must be absolute")
    return Device("aio" if io == "aio" else "uring", path)


def load_spec(path_or_spec: str | os.PathLike[str] | dict | list[PoolSpec],
              node: str = "") -> list[PoolSpec]:
    if isinstance(path_or_spec, list):
        return list(path_or_spec)
    if isinstance(path_or_spec, dict):
        return parse_spec(path_or_spec, "pool spec", node)
    path = Path(path_or_spec)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as err:
        raise PoolConfigError(f"pool file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise PoolConfigError(f"pool file {path}: not YAML ({err})") from err
    return parse_spec(doc, f"pool file {path}", node)


def probe_signatures(path: str) -> dict[str, str]:
    """What a low-level probe finds on a file or block device ({} for nothing).

    libblkid in process; the ``blkid -p`` command when the library is missing.
    Raises ``blkid.ProbeError`` when it cannot tell (an ambivalent result is a
    refusal too: never guess on someone's data)."""
    found = blkid.probe(path)
    if found is not None:
        return found
    res = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True,
                         text=True, check=False)
    if res.returncode == 2:
        return {}
    if res.returncode != 0:
        raise blkid.ProbeError(f"blkid -p {path} failed: {res.stderr.strip()}")
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def has_blobstore(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(BLOBSTORE_SIGNATURE)) == BLOBSTORE_SIGNATURE
    except OSError:
        return False


@dataclass
class PoolStatus:
    spec: PoolSpec
    state: str = "pending"          # pending | loaded | created | present | refused | error
    message: str = ""
    lvstore: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state in ("loaded", "created", "present")


class Pools:
    """The pools of one storage host on one spdk_tgt.

    Concurrency: ``attach`` and ``report`` may run from different threads
    (start-up, the supervisor after a restart, the agent's gRPC server); a lock
    serialises them. Idempotency: ``attach`` can run any number of times, on a
    fresh target or one that already has the devices and lvstores; it only
    adds what is missing and never formats a device that carries anything.
    """

    def __init__(self, path_or_spec: str | os.PathLike[str] | dict | list[PoolSpec],
                 api: SpdkApi, node: str = "") -> None:
        self.specs = load_spec(path_or_spec, node)
        self.api = api
        self._lock = threading.Lock()
        self.status: dict[str, PoolStatus] = {s.name: PoolStatus(s) for s in self.specs}
        self._lvs_cache: tuple[float, dict[str, dict[str, Any]]] = (0.0, {})
        self._cache_lock = threading.Lock()
        for spec in self.specs:      # read at scrape time (at most once a second)
            metrics.POOL_CAPACITY.labels(spec.name).set_function(
                lambda n=spec.name: self._capacity(n)[0])
            metrics.POOL_ALLOCATED.labels(spec.name).set_function(
                lambda n=spec.name: self._capacity(n)[1])

    # --- attach ---------------------------------------------------------------
    def attach(self) -> list[PoolStatus]:
        """Attach every pool's device and load or create its lvstore."""
        with self._lock:
            for spec in self.specs:
                st = PoolStatus(spec)
                try:
                    self._attach_one(spec, st)
                except SpdkError as err:
                    st.state, st.message = "error", f"pool {spec.name}: {err}"
                if not st.ready:
                    log.error("%s", st.message)
                else:
                    log.info("pool %s: %s (%s)", spec.name, st.state, st.message)
                self.status[spec.name] = st
                metrics.POOL_READY.labels(spec.name).set(1 if st.ready else 0)
            self._update_capacity()
            return list(self.status.values())

    def _attach_one(self, spec: PoolSpec, st: PoolStatus) -> None:
        dev = spec.device
        lvs = self._lvstore_on(spec.bdev_name)
        if lvs is not None:
            self._use(spec, st, lvs, "present", "already attached")
            return
        if self.api.bdev_get(spec.bdev_name) is None:
            if dev.kind != "nvme" and not self._file_may_hold_pool(spec, st):
                return                      # refused before SPDK ever sees the device
            self._create_bdev(spec)
        self.api.call("bdev_wait_for_examine")
        lvs = self._lvstore_on(spec.bdev_name)
        if lvs is not None:
            self._use(spec, st, lvs, "loaded", f"lvstore {lvs['uuid']} found on the device")
            return
        if dev.kind == "nvme" and not dev.initialize:
            st.state = "refused"
            st.message = (f"pool {spec.name}: {dev.label} carries no lvstore and the agent "
                          "cannot check an SPDK-owned SSD for other data; set "
                          "'initialize: true' on the device to create one")
            return
        if dev.kind != "nvme" and has_blobstore(dev.address):
            st.state = "refused"
            st.message = (f"pool {spec.name}: {dev.address} has a blobstore super block that "
                          "SPDK did not load (damaged, or an lvstore of the same name or "
                          "uuid is loaded already); not formatting it")
            return
        if dev.kind != "nvme" and not self._file_may_hold_pool(spec, st):
            return                          # checked again right before formatting
        params: dict[str, Any] = {"bdev_name": spec.bdev_name, "lvs_name": spec.name}
        if spec.cluster_size:
            params["cluster_sz"] = spec.cluster_size
        if spec.metadata_ratio:
            params["num_md_pages_per_cluster_ratio"] = spec.metadata_ratio
        self.api.call("bdev_lvol_create_lvstore", params)
        lvs = self._lvstore_on(spec.bdev_name) or {}
        self._use(spec, st, lvs, "created", f"new lvstore {lvs.get('uuid')} on {dev.label}")

    def _file_may_hold_pool(self, spec: PoolSpec, st: PoolStatus) -> bool:
        """False (and the reason in ``st``) when a file/block device holds data."""
        path = spec.device.address
        if not os.path.exists(path):
            st.state, st.message = "error", f"pool {spec.name}: {path} does not exist"
            return False
        if has_blobstore(path):
            return True               # SPDK's examine loads it
        try:
            found = probe_signatures(path)
        except (blkid.ProbeError, OSError) as err:
            st.state = "refused"
            st.message = (f"pool {spec.name}: cannot tell what {path} holds ({err}); "
                          "not attaching it")
            return False
        if found:
            what = ", ".join(f"{k}={v}" for k, v in sorted(found.items()))
            st.state = "refused"
            st.message = (f"pool {spec.name}: {path} is not empty ({what}); the agent never "
                          "reformats a device: wipe it yourself (wipefs -a) if its data "
                          "is not needed, or name another device")
            return False
        return True

    def _create_bdev(self, spec: PoolSpec) -> None:
        dev = spec.device
        if dev.kind == "nvme":
            self.api.call("bdev_nvme_attach_controller", {
                "name": spec.bdev_name[:-2], "trtype": "PCIe", "traddr": dev.address})
        elif dev.kind == "uring":
            self.api.call("bdev_uring_create", {"name": spec.bdev_name,
                                                "filename": dev.address})
        else:
            self.api.call("bdev_aio_create", {"name": spec.bdev_name, "filename": dev.address,
                                              "block_size": 4096})

    def _lvstore_on(self, bdev_name: str) -> dict[str, Any] | None:
        for lvs in self.api.lvstores():
            if lvs.get("base_bdev") == bdev_name:
                return lvs
        return None

    def _use(self, spec: PoolSpec, st: PoolStatus, lvs: dict[str, Any], state: str,
             why: str) -> None:
        if lvs.get("name") != spec.name:
            st.state = "error"
            st.message = (f"pool {spec.name}: {spec.device.label} holds lvstore "
                          f"{lvs.get('name')!r} ({lvs.get('uuid')}), not {spec.name!r}; "
                          "name the pool after it (lvstores are not renamed behind your back)")
            return
        st.state, st.message, st.lvstore = state, why, lvs

    def wait_lvstores(self, timeout: float = 30.0,
                      clock: Callable[[], float] = time.monotonic) -> bool:
        """True once every ready pool's lvstore is visible (after a restart).
        ``timeout`` is on ``clock`` (the supervisor's: the target's own time)."""
        deadline = clock() + timeout
        while True:
            names = {lvs["name"] for lvs in self.api.lvstores()}
            if all(s.name in names for s in self.specs if self.status[s.name].ready):
                return True
            if clock() >= deadline:
                return False
            time.sleep(0.1)

    # --- report ----------------------------------------------------------------
    def _lvstores(self, max_age: float = 1.0) -> dict[str, dict[str, Any]]:
        """lvstores by name, cached ``max_age`` seconds; the last known on errors,
        also when spdk_tgt is unreachable (a scrape of the gauges must answer
        then, when the other metrics matter most)."""
        with self._cache_lock:
            at, cached = self._lvs_cache
            if time.monotonic() - at < max_age:
                return cached
            try:
                cached = {lvs["name"]: lvs for lvs in self.api.lvstores()}
            except (SpdkError, SpdkTransportError):
                return cached
            self._lvs_cache = (time.monotonic(), cached)
            return cached

    def _capacity(self, name: str) -> tuple[int, int]:
        lvs = self._lvstores().get(name)
        if lvs is None:
            return 0, 0
        cs = lvs["cluster_size"]
        return (lvs["total_data_clusters"] * cs,
                (lvs["total_data_clusters"] - lvs["free_clusters"]) * cs)

    def _update_capacity(self) -> None:
        self._lvstores(max_age=0)

    def report(self) -> list[dict[str, Any]]:
        """Every pool with its state, capacity and the device behind it (model,
        serial, PCI address, capacity, health where the device is NVMe)."""
        with self._lock:
            by_name = self._lvstores(max_age=0)
            out = []
            for spec in self.specs:
                st = self.status[spec.name]
                lvs = by_name.get(spec.name) if st.ready else None
                entry: dict[str, Any] = {"name": spec.name, "state": st.state,
                                         "message": st.message, "ready": st.ready}
                if lvs is not None:
                    cs = lvs["cluster_size"]
                    entry.update({"lvstore_uuid": lvs["uuid"], "cluster_size": cs,
                                  "capacity_bytes": lvs["total_data_clusters"] * cs,
                                  "free_bytes": lvs["free_clusters"] * cs})
                entry["devices"] = [self._device_report(spec)]
                out.append(entry)
            return out

    def _device_report(self, spec: PoolSpec) -> dict[str, Any]:
        dev = spec.device
        out: dict[str, Any] = {"kind": dev.kind, "bdev": spec.bdev_name}
        bdev = self.api.bdev_get(spec.bdev_name)
        if bdev is not None:
            out["capacity_bytes"] = bdev["num_blocks"] * bdev["block_size"]
        if dev.kind == "nvme":
            out["pci_address"] = dev.address
            nvme = ((bdev or {}).get("driver_specific", {}).get("nvme") or [{}])[0]
            cdata = nvme.get("ctrlr_data", {})
            out["model"] = cdata.get("model_number", "")
            out["serial"] = cdata.get("serial_number", "")
            try:
                out["health"] = self.api.call("bdev_nvme_get_controller_health_info",
                                              {"name": spec.bdev_name[:-2]})
            except SpdkError as err:
                out["health"] = {"error": str(err)}
        else:
            out["path"] = dev.address
            out.update(_block_identity(dev.address))
        return out


def volume_io_source(api: SpdkApi):
    """For ``metrics.VolumeIoCollector``: the lvols (uuid -> name) and SPDK's iostat."""
    def source() -> tuple[dict[str, str], dict[str, Any]]:
        lvols = {lv["uuid"]: lv["name"] for lv in api.lvols()}
        return lvols, api.iostat()
    return source


def _block_identity(path: str) -> dict[str, str]:
    """Model, serial and PCI address of a block device from sysfs; {} for a file."""
    try:
        real = os.path.realpath(path)
        if not os.path.exists(real) or not os.path.isabs(real) or not real.startswith("/dev/"):
            return {}
        sys_dev = Path("/sys/class/block") / os.path.basename(real)
        if (sys_dev / "partition").exists():
            sys_dev = sys_dev.resolve().parent
        out: dict[str, str] = {}
        for key, name in (("model", "device/model"), ("serial", "device/serial"),
                          ("serial", "serial")):
            f = sys_dev / name
            if f.exists() and key not in out:
                out[key] = f.read_text().strip()
        pci = re.findall(r"/([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])/",
                         str(sys_dev.resolve()))
        if pci:
            out["pci_address"] = pci[-1]
        return out
    except OSError:
        return {}

