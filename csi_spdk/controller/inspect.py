"""``csi-spdk volumes list|get``, ``snapshots list``, ``targets list``: what the
driver made, for people (tables) and machines (JSON).

It reads what the controller reads, the same way: the controller's config
file and each target's SPDK JSON-RPC through the controller's own ``Target``
model (two or three RPCs per target: bdevs, lvstores, subsystems). Nothing is
kept by the driver that SPDK does not hold, so this is also the truth after a
controller restart. PV and claim names come from the Kubernetes API when one
answers (``kube.py``); host NQNs in allow-lists are mapped back to node names
from the config, Kubernetes' nodes and ``--node`` (a host NQN is a hash of the
node name, see ``contract.host_nqn``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

from .. import contract
from ..errors import CsiError, NotFound
from .config import Config, load
from .encryption import FileKeyStore
from .kube import KubeView
from .kube import load as load_kube
from .target import Lvol, Target, volumes_below


@dataclass
class VolumeRow:
    id: str
    target: str
    lvol: str
    size: int
    allocated: int
    thin: bool
    pv: str = ""
    pvc: str = ""
    source: str = ""                                   # snapshot id (or parent lvol) it came from
    qos: dict[str, int] = field(default_factory=dict)  # SPDK's assigned_rate_limits, non-zero
    nqn: str = ""                                      # its subsystem, when exported
    listeners: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)     # host NQNs in the allow-list
    nodes: list[str] = field(default_factory=list)     # the same as node names, where known
    # none / node / target: the PV's volumeAttributes, else the dev key store;
    # "target" also when its crypto bdev is stacked; "-" when nothing can tell
    encryption: str = ""


@dataclass
class SnapshotRow:
    id: str
    target: str
    lvol: str
    size: int
    allocated: int
    volumes: list[str] = field(default_factory=list)   # volume ids that depend on it
    clones: int = 0


@dataclass
class LvstoreRow:
    name: str
    total: int
    free: int
    cluster_size: int


@dataclass
class TargetRow:
    name: str
    rpc: str
    reachable: bool
    error: str = ""
    spdk_version: str = ""
    node: str = ""
    listen: str = ""
    dial: str = ""
    topology: dict[str, str] = field(default_factory=dict)
    lvstores: list[LvstoreRow] = field(default_factory=list)
    volumes: int = 0
    snapshots: int = 0
    exports: int = 0


@dataclass
class Inventory:
    targets: list[TargetRow] = field(default_factory=list)
    volumes: list[VolumeRow] = field(default_factory=list)
    snapshots: list[SnapshotRow] = field(default_factory=list)
    kube: KubeView = field(default_factory=KubeView)


def _qos(bdev: dict) -> dict[str, int]:
    return {k: int(v) for k, v in (bdev.get("assigned_rate_limits") or {}).items() if v}




def _scan_target(target: Target, inv: Inventory, host_names: dict[str, str]) -> None:
    cfg = target.cfg
    row = TargetRow(name=cfg.name, rpc=cfg.rpc, reachable=False, node=cfg.node,
                    listen=f"{cfg.listen_address}:{cfg.port}", dial=f"{cfg.dial}:{cfg.port}",
                    topology=dict(cfg.topology))
    inv.targets.append(row)
    try:
        row.spdk_version = str(target.api.version().get("version", ""))
        stores = target.lvstores()
        bdevs = target.api.bdevs()
        subsystems = {s["nqn"]: s for s in target.api.subsystems()}
    except CsiError as err:
        row.error = err.message
        return
    row.reachable = True
    clusters = {s["uuid"]: int(s["cluster_size"]) for s in stores}
    for s in stores:
        _, total, free = target.pool_bytes(s)
        row.lvstores.append(LvstoreRow(s["name"], total, free, int(s["cluster_size"])))
    lvols: list[tuple[Lvol, dict]] = []
    for bdev in bdevs:
        lv = Lvol.from_bdev(bdev)
        if lv is not None and lv.lvs_uuid in clusters:
            lvols.append((lv, bdev))
    by_name = {lv.name: lv for lv, _ in lvols}
    stacked = {contract.lvol_of_crypto_bdev(b.get("name", "")) for b in bdevs
               if b.get("product_name") == "crypto"}
    marked = {lv.name[len(contract.DELETED_MARK_PREFIX):] for lv, _ in lvols
              if lv.name.startswith(contract.DELETED_MARK_PREFIX)}
    for lv, bdev in lvols:
        allocated = int(bdev["driver_specific"]["lvol"].get("num_allocated_clusters", 0)) \
            * clusters[lv.lvs_uuid]
        oid = str(contract.ObjectId(cfg.name, lv.uuid))
        if lv.snapshot and contract.is_snapshot_lvol(lv.name) and lv.uuid not in marked:
            inv.snapshots.append(SnapshotRow(
                id=oid, target=cfg.name, lvol=lv.alias, size=lv.size, allocated=allocated,
                volumes=volumes_below(cfg.name, lv, by_name), clones=len(lv.clones)))
            row.snapshots += 1
            continue
        if lv.snapshot or not contract.is_volume_lvol(lv.name):
            continue
        parent = by_name.get(lv.base_snapshot or "")
        source = ""
        if parent is not None:
            source = str(contract.ObjectId(cfg.name, parent.uuid)) \
                if contract.is_snapshot_lvol(parent.name) else parent.alias
        vol = VolumeRow(id=oid, target=cfg.name, lvol=lv.alias, size=lv.size,
                        allocated=allocated, thin=lv.thin, source=source, qos=_qos(bdev))
        if lv.uuid in stacked:
            vol.encryption = contract.ENCRYPTION_TARGET
        sub = subsystems.get(contract.subsystem_nqn(lv.uuid))
        if sub is not None:
            row.exports += 1
            vol.nqn = sub["nqn"]
            vol.listeners = [f"{a.get('trtype', '').lower()}://{a.get('traddr')}:"
                             f"{a.get('trsvcid')}" for a in sub.get("listen_addresses") or []]
            vol.hosts = sorted(h["nqn"] for h in sub.get("hosts") or [])
            vol.nodes = [host_names.get(h, h) for h in vol.hosts]
        inv.volumes.append(vol)
        row.volumes += 1


def collect(config: Config, kube: KubeView, nodes: list[str] = ()) -> Inventory:
    """Every target's volumes, snapshots and exports, joined with ``kube``."""
    inv = Inventory(kube=kube)
    names = set(nodes) | set(kube.nodes) | set(config.nodes or ()) | \
        {t.node for t in config.targets if t.node}
    host_names = {contract.host_nqn(n): n for n in names}
    for tcfg in config.targets:
        target = Target(tcfg, tcfg.make_api())
        try:
            _scan_target(target, inv, host_names)
        finally:
            target.api.client.close()
    keys = FileKeyStore(config.encryption.key_dir) if config.encryption.key_dir else None
    for vol in inv.volumes:
        vol.pv = kube.pvs.get(vol.id, "")
        vol.pvc = kube.claims.get(vol.pv, "")
        vol.encryption = kube.encryption.get(vol.id) or _kept_mode(keys, vol.id) or \
            vol.encryption or "-"
    inv.volumes.sort(key=lambda v: v.id)
    inv.snapshots.sort(key=lambda s: s.id)
    return inv


def _kept_mode(keys: FileKeyStore | None, volume_id: str) -> str:
    """The mode the dev key store holds for the volume ("none" without a key)."""
    if keys is None:
        return ""
    try:
        key = keys.get(contract.parse_id(volume_id).lvol_uuid)
    except CsiError:
        return ""
    return key.mode if key is not None else contract.ENCRYPTION_NONE


# --- output ------------------------------------------------------------------------------
def size(n: int) -> str:
    """Bytes as kubectl-style binary units: 16Mi, 1.5Gi, 0."""
    for unit, scale in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= scale:
            text = f"{n / scale:.1f}".removesuffix(".0")
            return f"{text}{unit}"
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def _csv(items: list[str]) -> str:
    return ",".join(items) or "-"


def volume_table(vols: list[VolumeRow], wide: bool) -> str:
    header = ["VOLUME", "PVC", "SIZE", "ALLOCATED", "TYPE", "NODES"]
    if wide:
        header += ["PV", "TARGET", "LVOL", "SOURCE", "QOS", "ENCRYPTION", "NQN", "LISTENERS"]
    rows = []
    for v in vols:
        r = [v.id, v.pvc or "-", size(v.size), size(v.allocated), "thin" if v.thin else "thick",
             _csv(v.nodes)]
        if wide:
            r += [v.pv or "-", v.target, v.lvol, v.source or "-",
                  _csv([f"{k}={n}" for k, n in sorted(v.qos.items())]), v.encryption or "-",
                  v.nqn or "-", _csv(v.listeners)]
        rows.append(r)
    return table(rows, header)


def snapshot_table(snaps: list[SnapshotRow], wide: bool) -> str:
    header = ["SNAPSHOT", "SIZE", "ALLOCATED", "VOLUMES"]
    if wide:
        header += ["TARGET", "LVOL", "CLONES"]
    rows = []
    for s in snaps:
        r = [s.id, size(s.size), size(s.allocated), _csv(s.volumes)]
        if wide:
            r += [s.target, s.lvol, str(s.clones)]
        rows.append(r)
    return table(rows, header)


def target_table(targets: list[TargetRow], wide: bool) -> str:
    header = ["TARGET", "REACHABLE", "SPDK", "LVSTORES", "VOLUMES", "SNAPSHOTS", "EXPORTS"]
    if wide:
        header += ["RPC", "NODE", "LISTEN", "DIAL", "TOPOLOGY", "ERROR"]
    rows = []
    for t in targets:
        stores = _csv([f"{s.name}({size(s.total - s.free)}/{size(s.total)} used)"
                       for s in t.lvstores])
        r = [t.name, "yes" if t.reachable else "no", t.spdk_version or "-", stores,
             str(t.volumes), str(t.snapshots), str(t.exports)]
        if wide:
            r += [t.rpc, t.node or "-", t.listen, t.dial,
                  _csv([f"{k}={v}" for k, v in sorted(t.topology.items())]), t.error or "-"]
        rows.append(r)
    return table(rows, header)


def describe(v: VolumeRow) -> str:
    """``volumes get``: one field a line."""
    fields = [("Volume", v.id), ("PV", v.pv or "-"), ("PVC", v.pvc or "-"),
              ("Target", v.target), ("Lvol", v.lvol), ("Size", f"{size(v.size)} ({v.size})"),
              ("Allocated", f"{size(v.allocated)} ({v.allocated})"),
              ("Type", "thin" if v.thin else "thick"), ("Source", v.source or "-"),
              ("QoS", _csv([f"{k}={n}" for k, n in sorted(v.qos.items())])),
              ("Encryption", v.encryption or "-"),
              ("NQN", v.nqn or "- (not exported)"), ("Listeners", _csv(v.listeners)),
              ("Hosts", _csv(v.hosts)), ("Nodes", _csv(v.nodes))]
    width = max(len(k) for k, _ in fields) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {val}" for k, val in fields)


# --- command -------------------------------------------------------------------------------
def _warn(command: str, inv: Inventory, kube_wanted: bool) -> int:
    """One stderr line per unreachable target (and for a Kubernetes API that did
    not answer when asked for explicitly); exit code 1 when a target failed."""
    bad = [t for t in inv.targets if not t.reachable]
    for t in bad:
        print(f"csi-spdk {command}: target {t.name} ({t.rpc}) is unreachable, its objects "
              f"are not listed: {t.error}", file=sys.stderr)
    if kube_wanted and inv.kube.error:
        print(f"csi-spdk {command}: PV/PVC names not shown: {inv.kube.error}", file=sys.stderr)
    return 1 if bad else 0


def main(args: argparse.Namespace) -> int:
    config = load(args.config)
    kube = load_kube(args.driver_name, args.kube)
    inv = collect(config, kube, args.node)
    command = f"{args.command} {args.action}"
    as_json = args.output == "json"
    wide = args.output == "wide"
    if args.command == "volumes" and args.action == "get":
        found = next((v for v in inv.volumes if v.id == args.volume_id), None)
        if found is None:
            rc = _warn(command, inv, args.kube == "on")
            raise NotFound(f"volume {args.volume_id} does not exist" +
                           (" on the reachable targets" if rc else ""))
        print(json.dumps(asdict(found), indent=2) if as_json else describe(found))
        return _warn(command, inv, args.kube == "on")
    items, render = {
        "volumes": (inv.volumes, volume_table),
        "snapshots": (inv.snapshots, snapshot_table),
        "targets": (inv.targets, target_table),
    }[args.command]
    if as_json:
        print(json.dumps({
            "items": [asdict(i) for i in items],
            "errors": [{"target": t.name, "error": t.error}
                       for t in inv.targets if not t.reachable],
            "kubernetes": inv.kube.source or None, "kubernetesError": inv.kube.error or None,
        }, indent=2))
    else:
        print(render(items, wide))
    return _warn(command, inv, args.kube == "on")
