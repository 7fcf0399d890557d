"""CSI Controller service: SPDK lvols on one or more targets, NVMe/TCP exports.

``ControllerServicer(config, driver_name, apis=None)``; ``apis`` maps target
names to ``SpdkApi`` objects (tests inject wrapped ones), by default each
target gets ``SpdkApi(SpdkClient(rpc, rpcTimeout))``. Snapshot RPCs live in
``snapshots.py``, the SPDK model in ``backend.py``.

Concurrency: every RPC holds a try-lock on its volume id or name (``@rpc``), a
second call on the same key is ABORTED, different volumes run in parallel. A
CreateVolume from a volume source also holds the source's id.

Idempotency and crash safety: state lives only in SPDK. Every RPC first reads
what exists and only does what is missing, so a retry after a crash between
any two SPDK calls converges. In-memory hints (node id of a host NQN, the
readonly flag of a publish, snapshot creation times) only refine answers and
are rebuilt as calls arrive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from google.protobuf import wrappers_pb2

from .. import contract
from ..errors import (
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
    require,
)
from ..locks import KeyedLocks
from ..proto import csi_pb2, csi_pb2_grpc
from ..rpc import rpc
from ..spdk.api import SpdkApi
from ..spdk.errors import SpdkExists, SpdkNoSpace, SpdkNotFound
from . import placement
from .config import Config
from .snapshots import SnapshotsMixin, paginate
from .target import Lvol, Target

_Mode = csi_pb2.VolumeCapability.AccessMode
SINGLE_NODE_MODES = frozenset({_Mode.SINGLE_NODE_WRITER, _Mode.SINGLE_NODE_READER_ONLY,
                               _Mode.SINGLE_NODE_SINGLE_WRITER, _Mode.SINGLE_NODE_MULTI_WRITER})
FS_TYPES = ("ext4", "xfs")
# Smallest device each filesystem's mkfs accepts: xfsprogs >= 5.19 refuses
# data sections under 300 MiB. A mount volume is rounded up to this so that
# NodeStageVolume cannot fail on a size the controller chose.
FS_MIN_BYTES = {"xfs": 300 * 1024 * 1024}
CLEAR_METHODS = ("none", "unmap", "write_zeroes")
PARAM_KEYS = ("target", "lvstore", "thinProvision", "clearMethod", "fsType")
K8S_PARAM_PREFIX = "csi.storage.k8s.io/"

_RPC = csi_pb2.ControllerServiceCapability.RPC
CONTROLLER_CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME, _RPC.PUBLISH_UNPUBLISH_VOLUME, _RPC.LIST_VOLUMES,
    _RPC.GET_CAPACITY, _RPC.CREATE_DELETE_SNAPSHOT, _RPC.LIST_SNAPSHOTS, _RPC.CLONE_VOLUME,
    _RPC.EXPAND_VOLUME, _RPC.LIST_VOLUMES_PUBLISHED_NODES, _RPC.GET_VOLUME,
    _RPC.VOLUME_CONDITION, _RPC.PUBLISH_READONLY, _RPC.SINGLE_NODE_MULTI_WRITER,
)


log = logging.getLogger("csi_spdk.controller")


def targets_ready(apis: Iterable[SpdkApi]) -> Callable[[], bool]:
    """A ``ready`` check: every target answers spdk_get_version."""
    apis = list(apis)

    def ready() -> bool:
        for api in apis:
            try:
                api.version()
            except CsiError as err:
                log.warning("SPDK target not ready", extra={"f": {
                    "rpc": getattr(api.client, "address", "?"), "error": err.message}})
                return False
        return True

    return ready


# --- request validation ------------------------------------------------------------
def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why a capability is unsupported, or None when it is supported."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume capability needs an access type (block or mount)"
    mode = cap.access_mode.mode
    if mode == _Mode.MULTI_NODE_MULTI_WRITER and kind != "block":
        return "MULTI_NODE_MULTI_WRITER is supported for block volumes only"
    if mode not in SINGLE_NODE_MODES | {_Mode.MULTI_NODE_READER_ONLY,
                                        _Mode.MULTI_NODE_MULTI_WRITER}:
        return f"access mode {_Mode.Mode.Name(mode)} is not supported"
    if kind == "mount" and cap.mount.fs_type and cap.mount.fs_type not in FS_TYPES:
        return f"fs_type {cap.mount.fs_type!r} is not supported (use {' or '.join(FS_TYPES)})"
    return None


def check_capabilities(caps) -> None:
    require(caps, "volume_capabilities")
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            raise InvalidArgument(problem)


def filesystem_floor(caps, params_fs: str) -> tuple[str, int]:
    """(fs type, smallest size it can be made on) for the mount capabilities
    of a request; ("", 0) for block-only requests or filesystems without one."""
    for cap in caps:
        if cap.WhichOneof("access_type") == "mount":
            fs = cap.mount.fs_type or params_fs
            if fs in FS_MIN_BYTES:
                return fs, FS_MIN_BYTES[fs]
    return "", 0


def is_single_node(cap: csi_pb2.VolumeCapability) -> bool:
    return cap.access_mode.mode in SINGLE_NODE_MODES


@dataclass(frozen=True)
class VolumeParams:
    target: str = ""
    lvstore: str = ""
    thin: bool = False
    clear_method: str = ""
    fs_type: str = ""


def parse_params(params: Mapping[str, str], config: Config) -> VolumeParams:
    """StorageClass parameters (docs/DESIGN.md); unknown keys are INVALID_ARGUMENT."""
    for key in params:
        if key not in PARAM_KEYS and not key.startswith(K8S_PARAM_PREFIX):
            raise InvalidArgument(f"unknown parameter {key!r}; accepted: "
                                  f"{', '.join(PARAM_KEYS)} and {K8S_PARAM_PREFIX}*")
    target = params.get("target", "")
    if target and config.target(target) is None:
        raise InvalidArgument(f"parameter target={target!r} is not a configured target "
                              f"({', '.join(config.target_names)})")
    thin = params.get("thinProvision", "false").lower()
    if thin not in ("true", "false"):
        raise InvalidArgument(f"parameter thinProvision={params['thinProvision']!r} "
                              "must be true or false")
    clear = params.get("clearMethod", "")
    if clear and clear not in CLEAR_METHODS:
        raise InvalidArgument(f"parameter clearMethod={clear!r} must be one of "
                              f"{', '.join(CLEAR_METHODS)}")
    fs = params.get("fsType", "")
    if fs and fs not in FS_TYPES:
        raise InvalidArgument(f"parameter fsType={fs!r} must be one of {', '.join(FS_TYPES)}")
    return VolumeParams(target, params.get("lvstore", ""), thin == "true", clear, fs)


def capacity_range(req) -> tuple[int, int]:
    required, limit = req.capacity_range.required_bytes, req.capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise OutOfRange("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    return required, limit


def _topology(target: Target) -> list[csi_pb2.Topology]:
    """No constraint unless the target has labels (then nodes must carry them)."""
    segment = target.cfg.segment()
    return [csi_pb2.Topology(segments=segment)] if segment else []


def _segments(topologies) -> list[dict[str, str]]:
    return [dict(t.segments) for t in topologies]


class ControllerServicer(SnapshotsMixin, csi_pb2_grpc.ControllerServicer):
    """The CSI Controller service over the configured SPDK targets."""

    def __init__(self, config: Config, driver_name: str,
                 apis: Mapping[str, SpdkApi] | None = None) -> None:
        self.locks = KeyedLocks()
        self.config = config
        self.driver_name = driver_name
        apis = apis or {}
        self.targets: dict[str, Target] = {
            t.name: Target(t, apis.get(t.name) or t.make_api()) for t in config.targets}
        self._hints = threading.Lock()
        self._node_ids: dict[str, str] = {}                  # host NQN -> CSI node id
        self._publishes: dict[tuple[str, str], tuple] = {}   # (uuid, host) -> (cap, ro)
        SnapshotsMixin.__init__(self)

    def ready(self) -> bool:
        """For Identity.Probe: every target answers spdk_get_version."""
        return targets_ready(t.api for t in self.targets.values())()

    def close(self) -> None:
        for t in self.targets.values():
            with contextlib.suppress(Exception):
                t.api.client.close()

    # --- helpers -----------------------------------------------------------------
    def _target(self, oid: contract.ObjectId, kind: str = "volume") -> Target:
        target = self.targets.get(oid.target)
        if target is None:
            raise NotFound(f"{kind} {oid} does not exist (no configured target {oid.target!r})")
        return target

    def _volume(self, volume_id: str) -> tuple[Target, Lvol]:
        oid = contract.parse_id(volume_id)
        target = self._target(oid)
        lv = target.lvol(oid.lvol_uuid)
        if lv is None or not contract.is_volume_lvol(lv.name) or lv.snapshot:
            raise NotFound(f"volume {volume_id} does not exist")
        return target, lv

    @staticmethod
    def _volume_msg(target: Target, lv: Lvol, fs_type: str = "") -> csi_pb2.Volume:
        """The CSI Volume of an lvol; its volume_context is the node's contract."""
        ctx = {contract.VC_TARGET: target.name, contract.VC_LVSTORE: lv.lvstore,
               contract.VC_LVOL_UUID: lv.uuid, contract.VC_THIN: str(lv.thin).lower()}
        if fs_type:
            ctx[contract.VC_FS_TYPE] = fs_type
        return csi_pb2.Volume(volume_id=str(contract.ObjectId(target.name, lv.uuid)),
                              capacity_bytes=lv.size, volume_context=ctx,
                              accessible_topology=_topology(target))

    def _volume_response(self, target: Target, lv: Lvol, params: VolumeParams,
                         source: csi_pb2.VolumeContentSource | None
                         ) -> csi_pb2.CreateVolumeResponse:
        vol = self._volume_msg(target, lv, params.fs_type)
        if source is not None:
            vol.content_source.CopyFrom(source)
        return csi_pb2.CreateVolumeResponse(volume=vol)

    def _find(self, lvol_name: str) -> tuple[Target, Lvol | None, dict[str, list[dict]]]:
        """Look the lvol name up in every target/lvstore (one bdev_get each).

        Returns the hit (or None) and each target's lvstores for placement. An
        unreachable target is an error: the name might exist there.
        """
        lvstores: dict[str, list[dict]] = {}
        for target in self.targets.values():
            lvstores[target.name] = target.lvstores()
            for lvs in lvstores[target.name]:
                lv = target.lvol_by_name(lvs["name"], lvol_name)
                if lv is not None:
                    return target, lv, lvstores
        return None, None, lvstores  # type: ignore[return-value]

    def _size_in(self, required: int, limit: int, cluster: int) -> int | None:
        """The volume size in an lvstore with this cluster size, or None if
        no whole number of clusters fits the range."""
        if required:
            size = placement.align(required, cluster)
        else:
            size = placement.align(self.config.default_volume_size, cluster)
            if limit and size > limit:
                size = placement.align_down(limit, cluster)
        if size <= 0 or (limit and size > limit):
            return None
        return size

    # --- CreateVolume ----------------------------------------------------------
    @rpc(lock=("name",))
    def CreateVolume(self, request, context):
        require(request.name, "name")
        check_capabilities(request.volume_capabilities)
        params = parse_params(request.parameters, self.config)
        required, limit = capacity_range(request)
        fs, floor = filesystem_floor(request.volume_capabilities, params.fs_type)
        if floor and limit and limit < floor:
            raise OutOfRange(f"{fs} needs a volume of at least {floor >> 20} MiB; "
                             f"limit_bytes is {limit}")
        if floor and required < floor:
            # more than asked for is still within the range (the limit is not below it)
            required = max(floor, required or self.config.default_volume_size)
        requisite = _segments(request.accessibility_requirements.requisite)
        preferred = _segments(request.accessibility_requirements.preferred)
        lvol_name = contract.volume_lvol_name(request.name)
        source = request.volume_content_source \
            if request.HasField("volume_content_source") else None
        kind = source.WhichOneof("type") if source is not None else None
        if source is not None and kind is None:
            raise InvalidArgument("volume_content_source needs a snapshot or a volume")

        target, lv, lvstores = self._find(lvol_name)
        if kind == "volume":
            src_id = source.volume.volume_id
            require(src_id, "volume_content_source.volume.volume_id")
            with self.locks.hold([src_id], what="CreateVolume from this source"):
                return self._create_clone(request, params, required, limit, requisite,
                                          lvol_name, source, target, lv, lvstores)
        if kind == "snapshot":
            return self._create_clone(request, params, required, limit, requisite,
                                      lvol_name, source, target, lv, lvstores)
        if lv is not None:
            self._check_size(request.name, lv, required, limit)
            return self._volume_response(target, lv, params, None)
        return self._create_empty(request.name, params, required, limit, requisite, preferred,
                                  lvol_name, lvstores)

    @staticmethod
    def _check_size(name: str, lv: Lvol, required: int, limit: int) -> None:
        if lv.size < required or (limit and lv.size > limit):
            raise AlreadyExists(f"volume {name!r} already exists with {lv.size} bytes, "
                                f"which is outside the requested range [{required}, "
                                f"{limit or 'unlimited'}]")

    def _create_empty(self, name, params, required, limit, requisite, preferred,
                      lvol_name, lvstores):
        pools = []
        for tname, stores in lvstores.items():
            if params.target and tname != params.target:
                continue
            target = self.targets[tname]
            for lvs in stores:
                if params.lvstore and lvs["name"] != params.lvstore:
                    continue
                pools.append(target.pool(lvs, with_provisioned=params.thin))
        if not pools:
            where = f"target {params.target!r}" if params.target else "any configured target"
            what = f"lvstore {params.lvstore!r}" if params.lvstore else "an lvstore"
            raise InvalidArgument(f"{where} has no {what}")
        sizes = {(p.target.name, p.lvstore): self._size_in(required, limit, p.cluster_size)
                 for p in pools}
        pools = [p for p in pools if sizes[(p.target.name, p.lvstore)] is not None]
        if not pools:
            raise OutOfRange(f"no lvstore can hold a volume in [{required}, {limit}] bytes "
                             "(sizes are whole clusters)")
        ratio = self.config.thin_overcommit_ratio
        ranked = placement.rank(pools, lambda p: sizes[(p.target.name, p.lvstore)],
                                params.thin, ratio, requisite, preferred)
        if not ranked:
            raise ResourceExhausted(
                f"no lvstore {'accessible from the requested topology ' if requisite else ''}"
                f"has room for a {'thin' if params.thin else 'thick'} volume of "
                f"{min(sizes.values())} bytes")
        for pool in ranked:
            target = self.targets[pool.target.name]
            size = sizes[(pool.target.name, pool.lvstore)]
            try:
                uuid = target.api.lvol_create(pool.lvstore, lvol_name, size, params.thin,
                                              params.clear_method or None)
            except SpdkNoSpace:
                continue  # raced for the space: try the next pool
            except SpdkExists:
                lv = target.lvol_by_name(pool.lvstore, lvol_name)
                if lv is None:
                    raise
                self._check_size(name, lv, required, limit)
                return self._volume_response(target, lv, params, None)
            target.adjust_provisioned(pool.lvstore, size)
            lv = Lvol(uuid=uuid, name=lvol_name, lvstore=pool.lvstore, lvs_uuid="",
                      size=size, thin=params.thin, snapshot=False, clone=False)
            return self._volume_response(target, lv, params, None)
        raise ResourceExhausted("every suitable lvstore ran out of space; retry later")

    def _create_clone(self, request, params, required, limit, requisite, lvol_name, source,
                      found_target, found_lv, lvstores):
        """Create (or finish creating) a clone of a snapshot or of a volume."""
        name = request.name
        if source.WhichOneof("type") == "snapshot":
            snap_id = contract.parse_id(source.snapshot.snapshot_id, "snapshot")
            target = self._target(snap_id, "snapshot")
            snap = target.lvol(snap_id.lvol_uuid)
            if snap is None or not snap.snapshot or not contract.is_snapshot_lvol(snap.name) \
                    or target.deleted_mark(snap) is not None:
                snap = None
            if snap is None and found_lv is not None and found_target is target:
                # The snapshot was deleted after the clone (it merged into it).
                self._check_size(name, found_lv, required, limit)
                return self._volume_response(target, found_lv, params, source)
            if snap is None:
                raise NotFound(f"snapshot {source.snapshot.snapshot_id} does not exist")
        else:
            target, src = self._volume(source.volume.volume_id)
            csic = contract.clone_source_lvol_name(name)
            snap = target.lvol_by_name(src.lvstore, csic)
            if snap is None and found_lv is None:
                with contextlib.suppress(SpdkExists):
                    target.api.snapshot(src.uuid, csic)
                snap = target.lvol_by_name(src.lvstore, csic)
                if snap is None:
                    raise NotFound(f"clone source snapshot {csic} vanished; retry")
        if found_lv is not None:
            compatible = found_target is target and snap is not None and \
                found_lv.lvstore == snap.lvstore and found_lv.base_snapshot == snap.name
            if not compatible:
                raise AlreadyExists(f"volume {name!r} already exists with a different "
                                    "content source")
        if params.target and params.target != target.name or \
                params.lvstore and params.lvstore != snap.lvstore:
            raise InvalidArgument(f"the content source lives on {target.name}/{snap.lvstore}, "
                                  "which contradicts the target/lvstore parameters")
        if not placement.accessible(target.cfg, requisite):
            raise ResourceExhausted(f"the content source lives on target {target.name}, "
                                    "which is not accessible from the requested topology")
        if limit and snap.size > limit:
            raise OutOfRange(f"the content source has {snap.size} bytes, more than "
                             f"limit_bytes {limit}")
        cluster = next((int(s["cluster_size"]) for s in lvstores.get(target.name, [])
                        if s["name"] == snap.lvstore), 0)
        size = max(snap.size, placement.align(required, cluster) if required else 0)
        if limit and size > limit:
            size = snap.size
        lv = found_lv
        if lv is None:
            try:
                uuid = target.api.clone(snap.alias, lvol_name)
            except SpdkExists:
                uuid = None
            lv = target.lvol(uuid) if uuid else target.lvol_by_name(snap.lvstore, lvol_name)
            if lv is None:
                raise NotFound(f"clone {lvol_name} vanished after creation; retry")
        if lv.size < size and lv.size == snap.size:
            # New clone, or a retry after a crash between clone and resize.
            try:
                target.api.lvol_resize(lv.uuid, size)
            except SpdkNoSpace as err:
                raise ResourceExhausted(f"no space to grow the clone to {size} bytes") from err
            lv.size = size
            target.adjust_provisioned(lv.lvstore, size)
        self._check_size(name, lv, required, limit)
        return self._volume_response(target, lv, params, source)

    # --- DeleteVolume ----------------------------------------------------------
    @rpc(lock=("volume_id",))
    def DeleteVolume(self, request, context):
        """Missing volume is success (and sweeps orphaned internal snapshots). A
        volume still published to a node (its subsystem allows a host) is
        FAILED_PRECONDITION: unpublish first. lvols without a driver prefix are
        never deleted (FAILED_PRECONDITION)."""
        require(request.volume_id, "volume_id")
        try:
            oid = contract.parse_id(request.volume_id)
            target = self._target(oid)
        except NotFound:
            return csi_pb2.DeleteVolumeResponse()
        lv = target.lvol(oid.lvol_uuid)
        if lv is None:
            # Maybe a retry after a crash between the delete and the reclaim of
            # the volume's internal parent snapshot: finish that.
            target.sweep()
            return csi_pb2.DeleteVolumeResponse()
        if not contract.is_driver_lvol(lv.name):
            raise FailedPrecondition(f"lvol {lv.alias} was not created by csi-spdk; "
                                     "refusing to delete it")
        if not contract.is_volume_lvol(lv.name) or lv.snapshot:
            raise FailedPrecondition(f"{request.volume_id} is a snapshot, not a volume; "
                                     "use DeleteSnapshot")
        sub = target.exporter.subsystem(lv.uuid)
        hosts = target.exporter.hosts_of(sub)
        if hosts:
            nodes = [self._node_ids.get(h, h) for h in hosts]
            raise FailedPrecondition(f"volume {request.volume_id} is still published to "
                                     f"{', '.join(nodes)}; unpublish it first")
        if sub is not None:
            target.exporter.delete(lv.uuid)
        target.delete_lvol(lv)
        return csi_pb2.DeleteVolumeResponse()

    # --- publish -----------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def ControllerPublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.node_id, "node_id")
        require(request.HasField("volume_capability"), "volume_capability")
        check_capabilities([request.volume_capability])
        target, lv = self._volume(request.volume_id)
        if self.config.nodes is not None and request.node_id not in self.config.nodes:
            raise NotFound(f"node {request.node_id!r} does not exist (known nodes: "
                           f"{', '.join(sorted(self.config.nodes)) or 'none'})")
        host = contract.host_nqn(request.node_id)
        cap = request.volume_capability
        sub = target.exporter.subsystem(lv.uuid)
        hosts = target.exporter.hosts_of(sub)
        key = (lv.uuid, host)
        with self._hints:
            self._node_ids[host] = request.node_id
            previous = self._publishes.get(key) if host in hosts else None
        signature = (cap.SerializeToString(deterministic=True), request.readonly)
        if previous is not None and previous != signature:
            raise AlreadyExists(f"volume {request.volume_id} is already published to node "
                                f"{request.node_id} with a different capability or readonly "
                                "flag")
        others = [h for h in hosts if h != host]
        if others and is_single_node(cap):
            nodes = [self._node_ids.get(h, h) for h in others]
            raise FailedPrecondition(
                f"volume {request.volume_id} has a single-node access mode and is already "
                f"published to {', '.join(nodes)}")
        ctx = target.exporter.export(lv.uuid, host, sub=sub)
        with self._hints:
            self._publishes[key] = signature
        if request.readonly:
            ctx[contract.PC_READONLY] = "true"
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=ctx)

    @rpc(lock=("volume_id",))
    def ControllerUnpublishVolume(self, request, context):
        """Idempotent: a missing volume, subsystem or host is success. An empty
        node_id unpublishes from every node."""
        require(request.volume_id, "volume_id")
        try:
            oid = contract.parse_id(request.volume_id)
            target = self._target(oid)
        except NotFound:
            return csi_pb2.ControllerUnpublishVolumeResponse()
        exporter = target.exporter
        if request.node_id:
            host = contract.host_nqn(request.node_id)
            exporter.unexport(oid.lvol_uuid, host)
            with self._hints:
                self._publishes.pop((oid.lvol_uuid, host), None)
        else:
            exporter.delete(oid.lvol_uuid)
            with self._hints:
                for key in [k for k in self._publishes if k[0] == oid.lvol_uuid]:
                    del self._publishes[key]
        return csi_pb2.ControllerUnpublishVolumeResponse()

    # --- queries -----------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def ValidateVolumeCapabilities(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_capabilities, "volume_capabilities")
        self._volume(request.volume_id)
        for key in request.parameters:
            if key not in PARAM_KEYS and not key.startswith(K8S_PARAM_PREFIX):
                return csi_pb2.ValidateVolumeCapabilitiesResponse(
                    message=f"unknown parameter {key!r}")
        problems = [p for p in map(capability_problem, request.volume_capabilities) if p]
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
            mutable_parameters=request.mutable_parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def _node_list(self, hosts: list[str]) -> list[str]:
        """CSI node ids of host NQNs learnt from publishes (a host NQN is a hash
        of the node id, so hosts published before a restart are unknown until
        the next publish/unpublish of that node and are left out)."""
        with self._hints:
            return sorted(self._node_ids[h] for h in hosts if h in self._node_ids)

    @staticmethod
    def _condition(target: Target, lv: Lvol, lvs_uuids: set[str]) -> csi_pb2.VolumeCondition:
        if lv.lvs_uuid and lv.lvs_uuid not in lvs_uuids:
            return csi_pb2.VolumeCondition(abnormal=True, message=(
                f"lvol {lv.alias} belongs to lvstore {lv.lvs_uuid}, which target "
                f"{target.name} no longer reports"))
        return csi_pb2.VolumeCondition(abnormal=False, message="volume is healthy")

    @rpc()
    def ListVolumes(self, request, context):
        """A scan of every target (lvol bdevs + subsystems, two RPCs each), sorted by
        volume id; the token is the last id returned, so pages stay consistent
        when volumes come and go between calls."""
        entries = []
        for target in self.targets.values():
            stores = {s["uuid"] for s in target.api.lvstores()}
            exported = target.exporter.exported_hosts()
            for lv in target.lvols_with_bdevs():
                if not contract.is_volume_lvol(lv.name) or lv.snapshot:
                    continue
                vid = str(contract.ObjectId(target.name, lv.uuid))
                entries.append((vid, target, lv, exported.get(lv.uuid, []),
                                self._condition(target, lv, stores)))
        entries.sort(key=lambda e: e[0])
        page, token = paginate(entries, request.starting_token, request.max_entries)
        out = []
        for _, target, lv, hosts, condition in page:
            vol = self._volume_msg(target, lv)
            status = csi_pb2.ListVolumesResponse.VolumeStatus(
                published_node_ids=self._node_list(hosts),
                volume_condition=condition)
            out.append(csi_pb2.ListVolumesResponse.Entry(volume=vol, status=status))
        return csi_pb2.ListVolumesResponse(entries=out, next_token=token)

    @rpc(lock=("volume_id",))
    def ControllerGetVolume(self, request, context):
        require(request.volume_id, "volume_id")
        target, lv = self._volume(request.volume_id)
        stores = {s["uuid"] for s in target.api.lvstores()}
        hosts = target.exporter.hosts(lv.uuid)
        vol = self._volume_msg(target, lv)
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=self._node_list(hosts),
            volume_condition=self._condition(target, lv, stores))
        return csi_pb2.ControllerGetVolumeResponse(volume=vol, status=status)

    @rpc()
    def GetCapacity(self, request, context):
        """Free bytes (thick) or overcommit headroom (thin) of the lvstores that
        the parameters and the topology segment select; also refreshes the
        lvstore gauges."""
        params = parse_params(request.parameters, self.config)
        segment = dict(request.accessible_topology.segments) \
            if request.HasField("accessible_topology") else {}
        ratio = self.config.thin_overcommit_ratio
        available = largest = 0
        for target in self.targets.values():
            if params.target and target.name != params.target:
                continue
            if segment and not placement.accessible(target.cfg, [segment]):
                continue
            for lvs in target.lvstores():
                if params.lvstore and lvs["name"] != params.lvstore:
                    continue
                pool = target.pool(lvs, with_provisioned=True)
                room = pool.available(params.thin, ratio)
                available += room
                largest = max(largest, placement.align_down(room, pool.cluster_size))
        return csi_pb2.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size=wrappers_pb2.Int64Value(value=largest))

    @rpc()
    def ControllerGetCapabilities(self, request, context):
        caps = [csi_pb2.ControllerServiceCapability(
            rpc=csi_pb2.ControllerServiceCapability.RPC(type=t)) for t in CONTROLLER_CAPABILITIES]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)

    # --- expansion ---------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def ControllerExpandVolume(self, request, context):
        """Grow the lvol (online: SPDK resizes exported lvols). A smaller or equal
        request is a no-op that reports the current size."""
        require(request.volume_id, "volume_id")
        require(request.HasField("capacity_range"), "capacity_range")
        required, limit = capacity_range(request)
        if request.HasField("volume_capability"):
            check_capabilities([request.volume_capability])
            node_expansion = request.volume_capability.WhichOneof("access_type") != "block"
        else:
            node_expansion = True
        target, lv = self._volume(request.volume_id)
        if required <= lv.size:
            return csi_pb2.ControllerExpandVolumeResponse(
                capacity_bytes=lv.size, node_expansion_required=node_expansion)
        lvs = next((s for s in target.api.lvstores() if s["uuid"] == lv.lvs_uuid), None)
        cluster = int(lvs["cluster_size"]) if lvs else 0
        size = placement.align(required, cluster)
        if limit and size > limit:
            raise OutOfRange(f"{required} bytes rounded to whole clusters ({size}) exceeds "
                             f"limit_bytes {limit}")
        if lv.thin and lvs:
            pool = target.pool(lvs, with_provisioned=True)
            if pool.provisioned_bytes - lv.size + size > pool.total_bytes * \
                    self.config.thin_overcommit_ratio:
                raise ResourceExhausted(f"growing to {size} bytes would exceed lvstore "
                                        f"{lv.lvstore}'s thin overcommit limit")
        try:
            target.api.lvol_resize(lv.uuid, size)
        except SpdkNoSpace as err:
            raise ResourceExhausted(f"lvstore {lv.lvstore} has no room to grow the volume to "
                                    f"{size} bytes") from err
        except SpdkNotFound as err:
            raise NotFound(f"volume {request.volume_id} does not exist") from err
        target.adjust_provisioned(lv.lvstore, size - lv.size)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=node_expansion)

    # --- not supported -------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def ControllerModifyVolume(self, request, context):
        raise Unimplemented("ControllerModifyVolume is not supported")

    @rpc(lock=("snapshot_id",))
    def GetSnapshot(self, request, context):
        raise Unimplemented("GetSnapshot is not supported")
