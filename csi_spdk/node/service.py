"""CSI Node service: stage (connect + mkfs-if-empty + mount), publish (bind), stats, expand.

State: one small JSON record per staged volume in ``<state_dir>/volumes/``
(written *before* connecting, so an unstage after a crash or restart still
knows which subsystem to disconnect). Without a record, unstage falls back to
the NQN derived from the volume id (``contract.subsystem_nqn``). A read-only
block publish binds a read-only loop device over the namespace, never the
namespace itself (``readonly_block.py``; its records are in ``targets/``).

Concurrency/idempotency contract: every volume RPC holds the volume id in
``self.locks`` (``@rpc(lock=("volume_id",))``), so a second concurrent call on
the same volume is ABORTED; different volumes proceed in parallel. Every RPC
is idempotent as the CSI spec requires: a repeated call with the same
arguments returns OK without redoing work; a path already occupied by
something else is an error, never a silent success.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import grpc

from .. import contract
from ..errors import (
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    require,
)
from ..locks import KeyedLocks
from ..proto import csi_pb2, csi_pb2_grpc
from ..rpc import rpc
from . import luks
from .luks import Luks
from .mount import SUPPORTED_FS, Mounter
from .readonly_block import ReadOnlyLoops

log = logging.getLogger("csi_spdk.node")

Mode = csi_pb2.VolumeCapability.AccessMode
_READ_ONLY_MODES = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
_SUPPORTED_MODES = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                    Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER,
                    Mode.MULTI_NODE_MULTI_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER,
                    Mode.SINGLE_NODE_MULTI_WRITER}
# A mounted (non-cluster) filesystem must not be written by two nodes.
_MOUNT_REFUSED_MODES = {Mode.MULTI_NODE_MULTI_WRITER}
_NODE_CAPS = ("STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME",
              "VOLUME_CONDITION", "SINGLE_NODE_MULTI_WRITER")
_EXPAND_WAIT = 15.0
# Errors after which kubelet treats NodeStage as finished (it will not call
# NodeUnstage): what this call set up must be undone. The others are retried
# (the operation is "in progress") and keep their record for the retry.
_RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass
class StageRecord:
    """What unstage/publish/stats/expand need to know about a staged volume."""

    volume_id: str
    nqn: str
    ns_uuid: str
    staging_path: str
    access: str             # "block" or "mount"
    fstype: str = ""
    device: str = ""
    readonly: bool = False
    state: str = "connecting"   # "connecting" until the stage completed, then "staged"
    traddr: str = ""            # where to reconnect when the kernel dropped the controller
    trsvcid: str = ""
    mapper: str = ""            # encryption: node: the LUKS mapping over ``device``


class StateStore:
    """Per-volume JSON records under ``<state_dir>/volumes``; atomic writes."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "volumes")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _path(self, volume_id: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(volume_id.encode()).hexdigest()[:40]
                            + ".json")

    def load(self, volume_id: str) -> StageRecord | None:
        try:
            with open(self._path(volume_id), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("unreadable stage record", extra={"f": {"volume": volume_id,
                                                                "error": str(err)}})
            return None
        known = StageRecord.__dataclass_fields__
        return StageRecord(**{k: v for k, v in data.items() if k in known})

    def save(self, rec: StageRecord) -> None:
        _atomic_write(self._path(rec.volume_id), json.dumps(asdict(rec), indent=1) + "\n")

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def persist_host_identity(state_dir: str, node_id: str) -> tuple[str, str]:
    """Write the derived host NQN/ID to ``state_dir/hostnqn`` and ``hostid``
    (for operators); warn when an existing file disagrees. Returns both."""
    os.makedirs(state_dir, exist_ok=True)
    values = {"hostnqn": contract.host_nqn(node_id), "hostid": contract.host_id(node_id)}
    for name, value in values.items():
        path = os.path.join(state_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                old = f.read().strip()
        except FileNotFoundError:
            old = None
        if old == value:
            continue
        if old is not None:
            log.warning("host identity file disagrees with the node id; rewriting it",
                        extra={"f": {"file": path, "old": old, "new": value,
                                     "node_id": node_id}})
        _atomic_write(path, value + "\n")
    return values["hostnqn"], values["hostid"]


def _access_type(cap: csi_pb2.VolumeCapability) -> str:
    kind = cap.WhichOneof("access_type")
    if kind not in ("block", "mount"):
        raise InvalidArgument("volume_capability needs an access type (block or mount)")
    return kind


def _check_capability(cap: csi_pb2.VolumeCapability) -> str:
    kind = _access_type(cap)
    if not cap.HasField("access_mode") or cap.access_mode.mode not in _SUPPORTED_MODES:
        raise InvalidArgument("volume_capability has no supported access mode")
    if kind == "mount":
        if cap.access_mode.mode in _MOUNT_REFUSED_MODES:
            raise InvalidArgument("a mounted filesystem cannot be MULTI_NODE_MULTI_WRITER; "
                                  "use volumeMode: Block")
        if cap.mount.fs_type and cap.mount.fs_type not in SUPPORTED_FS:
            raise InvalidArgument(f"fsType {cap.mount.fs_type!r} is not supported "
                                  f"(use one of {', '.join(SUPPORTED_FS)})")
    return kind


class NodeServicer(csi_pb2_grpc.NodeServicer):
    """The CSI Node service. ``initiator`` is an ``NvmeTcpInitiator`` (or a fake
    with the same methods), ``mounter`` a ``mount.Mounter``. ``topology``, when
    given, is called by every NodeGetInfo (``topology.NodeTopology.segments``:
    the SSDs present now); else the fixed ``topology_segments`` are reported."""

    def __init__(self, node_id: str, state_dir: str, initiator, mounter: Mounter | None = None,
                 max_volumes: int = 0, topology_segments: Mapping[str, str] | None = None,
                 connect_timeout: float = 30.0, unstage_grace: float = 30.0,
                 topology: Callable[[], Mapping[str, str]] | None = None) -> None:
        if not node_id:
            raise InvalidArgument("node id is required")
        self.node_id = node_id
        self.state_dir = state_dir
        self.initiator = initiator
        self.mounter = mounter or Mounter()
        self.max_volumes = max_volumes
        self.topology_segments = dict(topology_segments or
                                      {contract.TOPOLOGY_NODE_KEY: node_id})
        self.topology = topology
        self.connect_timeout = connect_timeout
        # NodeUnstage waits at most this long for a lost path to come back
        # (so dirty data can still be flushed), then disconnects first.
        self.unstage_grace = unstage_grace
        self.locks = KeyedLocks()
        self.store = StateStore(state_dir)
        self.ro_loops = ReadOnlyLoops(state_dir, run=self.mounter.run)
        self.luks = Luks(self.mounter.probe)
        persist_host_identity(state_dir, node_id)

    # --- helpers ------------------------------------------------------------------
    def _current_device(self, rec: StageRecord) -> str:
        """The namespace's device now (names can change across reconnects)."""
        dev = self.initiator.find_device(rec.nqn, rec.ns_uuid, 0) if rec.nqn else None
        return dev or rec.device

    def _volume_device(self, rec: StageRecord) -> str:
        """What holds the volume's data: the LUKS mapping (encryption: node), else
        the namespace."""
        return self.luks.path(rec.mapper) if rec.mapper else self._current_device(rec)

    def _same_device(self, mount_major_minor: str, device: str) -> bool:
        try:
            return self.mounter.device_number(device) == mount_major_minor
        except OSError:
            return False

    def _record(self, volume_id: str) -> StageRecord:
        rec = self.store.load(volume_id)
        if rec is None:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_id}")
        return rec

    # --- stage / unstage ------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def NodeStageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        cap = request.volume_capability
        kind = _check_capability(cap)
        pc = dict(request.publish_context)
        for key in (contract.PC_NQN, contract.PC_TRADDR, contract.PC_TRSVCID,
                    contract.PC_NS_UUID):
            if not pc.get(key):
                raise InvalidArgument(f"publish_context has no {key!r}: was the volume "
                                      "published by the csi-spdk controller?")
        staging = request.staging_target_path
        # capability first (Kubernetes' csi.storage.k8s.io/fstype lands there),
        # then the StorageClass fsType the controller put in volume_context
        want_fs = (cap.mount.fs_type or request.volume_context.get(contract.VC_FS_TYPE, "")) \
            if kind == "mount" else ""
        readonly = cap.access_mode.mode in _READ_ONLY_MODES
        rec = self.store.load(request.volume_id)
        if rec is not None and rec.state == "staged":
            if rec.staging_path != staging:
                raise FailedPrecondition(f"volume {request.volume_id} is already staged at "
                                         f"{rec.staging_path}")
            if rec.access != kind or (want_fs and rec.fstype and want_fs != rec.fstype):
                raise AlreadyExists(f"volume {request.volume_id} is already staged as "
                                    f"{rec.access} {rec.fstype}".rstrip())
        previous = rec
        rec = StageRecord(request.volume_id, pc[contract.PC_NQN], pc[contract.PC_NS_UUID],
                          staging, kind, rec.fstype if rec else "", rec.device if rec else "",
                          readonly, rec.state if rec else "connecting",
                          pc[contract.PC_TRADDR], pc[contract.PC_TRSVCID])
        encrypted = request.volume_context.get(contract.VC_ENCRYPTION) == \
            contract.ENCRYPTION_NODE
        key = luks.key_from_secrets(dict(request.secrets)) if encrypted else ""
        was_connected = self.initiator.is_connected(rec.nqn)
        self.store.save(rec)
        try:
            device = self.initiator.connect(pc, self.connect_timeout,
                                            secrets=request.secrets)
            data = device
            if encrypted:
                rec.mapper = luks.mapper_name(request.volume_id)
                data = self.luks.open(device, rec.mapper, key, readonly)
            if kind == "mount":
                rec.fstype = self._stage_mount(data, staging, want_fs, cap, readonly,
                                               previous)
        except CsiError as err:
            if err.code not in _RETRIED_CODES and (previous is None or
                                                   previous.state != "staged"):
                # final: kubelet will not unstage, so undo what this call made
                log.warning("stage failed for good; cleaning up", extra={"f": {
                    "volume": request.volume_id, "error": err.message}})
                if rec.mapper:
                    with contextlib.suppress(CsiError):
                        self.luks.close(rec.mapper)
                if not was_connected:
                    with contextlib.suppress(CsiError):
                        self.initiator.disconnect(rec.nqn)
                self.store.delete(request.volume_id)
            raise
        rec.device = device
        rec.state = "staged"
        self.store.save(rec)
        return csi_pb2.NodeStageVolumeResponse()

    def _stage_mount(self, device: str, staging: str, want_fs: str,
                     cap: csi_pb2.VolumeCapability, readonly: bool,
                     previous: StageRecord | None = None) -> str:
        existing = self.mounter.mounted_at(staging)
        if existing is not None:
            if self._same_device(existing.major_minor, device) and existing.root == "/":
                return existing.fstype
            old = self.luks.path(previous.mapper) if previous is not None and \
                previous.mapper else previous.device if previous is not None else ""
            if previous is not None and previous.state == "staged" and old \
                    and old != device and existing.source == old:
                # Our own stage, but the kernel dropped that controller and the
                # namespace came back as another device: the old mount is dead.
                log.warning("staged volume's device was replaced; remounting", extra={"f": {
                    "volume": previous.volume_id, "old": previous.device, "new": device}})
                self.mounter.unmount(staging)
                existing = None
        if existing is not None:
            raise FailedPrecondition(f"staging path {staging} already has {existing.source} "
                                     f"({existing.fstype}) mounted; refusing to stage over it")
        if readonly:
            found = self.mounter.probe(device)
            if not found.fstype:
                raise FailedPrecondition(f"read-only volume on {device} has no filesystem "
                                         "and cannot be formatted")
            fstype = found.fstype
            if want_fs and fstype != want_fs:
                raise FailedPrecondition(f"{device} holds {fstype}, not {want_fs}")
        else:
            fstype, _ = self.mounter.ensure_filesystem(device, want_fs)
        flags = list(cap.mount.mount_flags)
        if readonly:
            flags.append("ro")
            if fstype == "xfs":
                flags.append("norecovery")
            elif fstype == "ext4":
                flags.append("noload")
        os.makedirs(staging, exist_ok=True)
        self.mounter.mount(device, staging, fstype, flags)
        return fstype

    @rpc(lock=("volume_id",))
    def NodeUnstageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        rec = self.store.load(request.volume_id)
        nqn = rec.nqn if rec is not None else ""
        if not nqn:
            with contextlib.suppress(Exception):
                nqn = contract.subsystem_nqn(contract.parse_id(request.volume_id).lvol_uuid)
        if nqn and self.initiator.is_connected(nqn) and not self._wait_live(nqn):
            # The target is gone (the controller keeps reconnecting: ctrl_loss_tmo
            # -1): an unmount would wait for I/O forever. Disconnecting first
            # fails the queued I/O, so the unmount below finishes.
            log.warning("no live path; disconnecting before unmount", extra={"f": {
                "volume": request.volume_id, "nqn": nqn}})
            self.initiator.disconnect(nqn)
        self.mounter.unmount(request.staging_target_path)
        if rec is not None and rec.staging_path != request.staging_target_path:
            self.mounter.unmount(rec.staging_path)
        if rec is not None:
            self.ro_loops.detach_volume(rec.volume_id, self._volume_device(rec))
            if rec.mapper:
                self.luks.close(rec.mapper)
        if nqn:
            self.initiator.disconnect(nqn)
        self.store.delete(request.volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    def _wait_live(self, nqn: str) -> bool:
        """Wait up to ``unstage_grace`` seconds for a live path to ``nqn``."""
        deadline = time.monotonic() + self.unstage_grace
        while not self.initiator.path_live(nqn):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return True

    # --- publish / unpublish ----------------------------------------------------------
    @rpc(lock=("volume_id",))
    def NodePublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.target_path, "target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        kind = _check_capability(request.volume_capability)
        rec = self.store.load(request.volume_id)
        if rec is None or rec.state != "staged":
            raise FailedPrecondition(f"volume {request.volume_id} is not staged on this node; "
                                     "NodeStageVolume must succeed first")
        if rec.access != kind:
            raise AlreadyExists(f"volume {request.volume_id} was staged as {rec.access}, "
                                f"not {kind}")
        readonly = request.readonly or \
            request.volume_capability.access_mode.mode in _READ_ONLY_MODES
        target = request.target_path
        if kind == "block":
            self._publish_block(rec, target, readonly)
        else:
            self._publish_mount(rec, request.staging_target_path, target, readonly)
        return csi_pb2.NodePublishVolumeResponse()

    def _existing_ok(self, target: str, same: bool, readonly: bool, existing) -> bool:
        if not same:
            raise FailedPrecondition(f"target path {target} already has {existing.source} "
                                     "mounted, which is not this volume")
        if existing.readonly != readonly:
            raise AlreadyExists(f"volume is already published at {target} with "
                                f"readonly={existing.readonly}")
        return True

    def _publish_block(self, rec: StageRecord, target: str, readonly: bool) -> None:
        device = self._volume_device(rec)
        if not device or not os.path.exists(device):
            raise FailedPrecondition(f"the block device of {rec.volume_id} is gone; "
                                     "restage the volume")
        existing = self.mounter.mounted_at(target)
        if existing is not None:
            ro = self.ro_loops.load(target)
            source = ro["loop"] if ro is not None else device
            try:
                same = os.stat(target).st_rdev == os.stat(source).st_rdev
            except OSError:
                same = False
            self._existing_ok(target, same, readonly, existing)
            return
        if os.path.isdir(target):
            try:
                os.rmdir(target)
            except OSError as err:
                raise FailedPrecondition(f"block target {target} is a non-empty "
                                         "directory") from err
        if not readonly:
            self.mounter.bind_device(device, target)
            return
        # A read-only bind of the device node would not stop writes to it.
        loop = self.ro_loops.attach(rec.volume_id, target, device)
        try:
            self.mounter.bind_device(loop, target, readonly=True)
        except Exception:
            self.ro_loops.detach(target)
            raise

    def _publish_mount(self, rec: StageRecord, staging: str, target: str,
                       readonly: bool) -> None:
        staged = self.mounter.mounted_at(staging)
        if staged is None:
            raise FailedPrecondition(f"staging path {staging} is not mounted; restage the "
                                     "volume")
        os.makedirs(target, exist_ok=True)
        existing = self.mounter.mounted_at(target)
        if existing is not None:
            same = existing.major_minor == staged.major_minor and existing.root == staged.root
            self._existing_ok(target, same, readonly, existing)
            return
        self.mounter.bind_mount(staging, target, readonly)

    @rpc(lock=("volume_id",))
    def NodeUnpublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        target = request.target_path
        self.mounter.unmount(target)
        try:
            if os.path.isdir(target) and not os.path.islink(target):
                os.rmdir(target)
            elif os.path.lexists(target):
                os.unlink(target)
        except OSError as err:
            raise FailedPrecondition(f"cannot remove target path {target}: {err}") from err
        self.ro_loops.detach(target)      # read-only block publish: its loop device
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _volume_at_path(self, request):
        """Guard shared by stats and expand: a known volume at an existing path."""
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        rec = self._record(request.volume_id)
        if not os.path.exists(request.volume_path):
            raise NotFound(f"volume path {request.volume_path} does not exist")
        return rec, request.volume_path

    # --- stats / expand -----------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def NodeGetVolumeStats(self, request, context):
        rec, path = self._volume_at_path(request)
        problems = []
        if self.mounter.mounted_at(path) is None:
            problems.append(f"{path} is not mounted")
        if rec.nqn and rec.state == "staged" and rec.traddr and \
                not self.initiator.is_connected(rec.nqn):
            problems.append(self._reconnect(rec))
        if rec.nqn and not self.initiator.path_live(rec.nqn):
            problems.append(f"no live NVMe/TCP path to {rec.nqn}")
        Unit = csi_pb2.VolumeUsage
        usage = []
        try:
            if self.mounter.is_block(path):
                usage.append(Unit(unit=Unit.BYTES, total=self.mounter.block_size(path)))
            elif self.mounter.mounted_at(path) is not None:
                st = self.mounter.fs_stats(path)
                usage += [Unit(unit=Unit.BYTES, total=st.total_bytes,
                               available=st.available_bytes, used=st.used_bytes),
                          Unit(unit=Unit.INODES, total=st.total_inodes,
                               available=st.free_inodes, used=st.used_inodes)]
        except OSError as err:
            problems.append(f"cannot read {path}: {err.strerror or err}")
        condition = csi_pb2.VolumeCondition(abnormal=bool(problems),
                                            message="; ".join(problems) or "healthy")
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def _reconnect(self, rec: StageRecord) -> str:
        """The kernel deleted the controller of a staged volume (ctrl_loss_tmo ran
        out while the target was away): connect again from the stage record. A
        filesystem mounted on the old device stays broken until the volume is
        staged again (NodeStageVolume then remounts it)."""
        pc = {contract.PC_NQN: rec.nqn, contract.PC_TRTYPE: "tcp",
              contract.PC_TRADDR: rec.traddr, contract.PC_TRSVCID: rec.trsvcid,
              contract.PC_NS_UUID: rec.ns_uuid}
        try:
            device = self.initiator.connect(pc, min(self.connect_timeout, 10.0))
        except CsiError as err:
            return f"the NVMe/TCP controller of {rec.nqn} was gone; reconnecting failed: " \
                   f"{err.message}"
        log.warning("reconnected a staged volume", extra={"f": {
            "volume": rec.volume_id, "device": device}})
        if rec.mapper:
            return self._repoint_luks(rec, device)
        if device != rec.device and rec.access == "mount":
            return (f"the NVMe/TCP controller of {rec.nqn} was gone and was reconnected as "
                    f"{device}; the filesystem mounted from {rec.device} must be staged again")
        return f"the NVMe/TCP controller of {rec.nqn} was gone and was reconnected"

    def _repoint_luks(self, rec: StageRecord, device: str) -> str:
        """encryption: node: the LUKS mapping follows the reconnected device by
        a dm table reload (luks.py ``repoint``: NodeGetVolumeStats has no
        secret to reopen it with, the reload needs none); the filesystem or
        block target on the mapping keeps its device."""
        was = f"the NVMe/TCP controller of {rec.nqn} was gone and was reconnected as {device}"
        try:
            open_ = self.luks.repoint(rec.mapper, device)
        except CsiError as err:
            return f"{was}, but its LUKS mapping {rec.mapper} could not follow it " \
                   f"({err.message}); stage the volume again"
        if not open_:
            return f"{was}; its LUKS mapping {rec.mapper} is not open: stage the volume " \
                   "again (NodeStageVolume opens it with the key from the node-stage secret)"
        return f"{was}; LUKS mapping {rec.mapper} reads from it again"

    @rpc(lock=("volume_id",))
    def NodeExpandVolume(self, request, context):
        rec, path = self._volume_at_path(request)
        kind = rec.access
        if request.HasField("volume_capability"):
            kind = _access_type(request.volume_capability)
        required = request.capacity_range.required_bytes if \
            request.HasField("capacity_range") else 0
        self.initiator.rescan(rec.nqn)
        device = self._current_device(rec)
        size = self._wait_size(device, required)
        if rec.mapper:   # the LUKS mapping grows first, then the filesystem on it
            key = luks.key_from_secrets(dict(request.secrets)) \
                if request.secrets.get(contract.SECRET_ENCRYPTION_KEY) else None
            self.luks.resize(rec.mapper, key)
            device = self.luks.path(rec.mapper)
        if kind == "mount":
            mount_point = path if self.mounter.mounted_at(path) else rec.staging_path
            fstype = rec.fstype or self.mounter.probe(device).fstype
            self.mounter.resize_fs(device, mount_point, fstype)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    def _wait_size(self, device: str, required: int) -> int:
        """The kernel applies a namespace resize asynchronously after a rescan."""
        deadline = time.monotonic() + _EXPAND_WAIT
        interval = 0.02
        while True:
            try:
                size = self.mounter.block_size(device)
            except OSError as err:
                raise FailedPrecondition(f"cannot open {device}: {err}; restage the "
                                         "volume") from err
            if size >= required or time.monotonic() >= deadline:
                break
            time.sleep(interval)
            interval = min(interval * 2, 0.5)
        if size < required:
            raise Unavailable(f"{device} is {size} bytes, expected at least {required} after "
                              "the controller expansion; retry")
        return size

    # --- info -------------------------------------------------------------------------------
    @rpc()
    def NodeGetCapabilities(self, request, context):
        RPC = csi_pb2.NodeServiceCapability.RPC
        caps = [csi_pb2.NodeServiceCapability(rpc=RPC(type=RPC.Type.Value(name)))
                for name in _NODE_CAPS]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    @rpc()
    def NodeGetInfo(self, request, context):
        segments = self.topology() if self.topology is not None else self.topology_segments
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id, max_volumes_per_node=self.max_volumes,
            accessible_topology=csi_pb2.Topology(segments=segments))
