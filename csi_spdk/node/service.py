"""CSI Node service: stage (connect + mkfs-if-empty + mount), publish (bind), stats, expand.

The RPCs and their guard clauses are here; the steps they call are in small
modules named after what they do: ``capability.py`` (which capabilities the
node serves), ``records.py`` (the stage records and host identity files),
``stage.py`` (the staging mount, the wait for a live path), ``publish.py``
(the binds at a target path), ``stats.py`` (usage and the volume condition,
with the reconnect of a vanished controller), ``expand.py`` (the wait for
the grown namespace), ``rekey.py`` (the pair a mid-rotation Secret says the
target holds, the re-key on kubelet's republish and its acknowledgement).

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
import logging
import os
from collections.abc import Callable, Mapping

import grpc

from .. import contract
from ..errors import (
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    require,
)
from ..locks import KeyedLocks
from ..proto import csi_pb2, csi_pb2_grpc
from ..rpc import rpc
from . import expand, luks, stats
from .capability import access_type, check_capability, is_read_only
from .luks import Luks
from .mount import Mounter
from .publish import publish_block, publish_mount
from .readonly_block import ReadOnlyLoops
from .records import StageRecord, StateStore, persist_host_identity
from .rekey import Rekeyer, connect_secrets
from .stage import mount_staging, wait_live

log = logging.getLogger("csi_spdk.node")

_NODE_CAPS = ("STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME",
              "VOLUME_CONDITION", "SINGLE_NODE_MULTI_WRITER")
# Errors after which kubelet treats NodeStage as finished (it will not call
# NodeUnstage): what this call set up must be undone. The others are retried
# (the operation is "in progress") and keep their record for the retry.
_RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED})


class NodeServicer(csi_pb2_grpc.NodeServicer):
    """The CSI Node service. ``initiator`` is an ``NvmeTcpInitiator`` (or a fake
    with the same methods), ``mounter`` a ``mount.Mounter``. ``topology``, when
    given, is called by every NodeGetInfo (``topology.NodeTopology.segments``:
    the SSDs present now); else the fixed ``topology_segments`` are reported."""

    def __init__(self, node_id: str, state_dir: str, initiator, mounter: Mounter | None = None,
                 max_volumes: int = 0, topology_segments: Mapping[str, str] | None = None,
                 connect_timeout: float = 30.0, unstage_grace: float = 30.0,
                 topology: Callable[[], Mapping[str, str]] | None = None,
                 acks=None) -> None:
        """``acks``: where key rotations are acknowledged (node/acks.py), or None."""
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
        self.rekeyer = Rekeyer(initiator, acks)
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
        kind = check_capability(cap)
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
        readonly = is_read_only(cap)
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
        secrets = connect_secrets(pc, request.secrets)   # mid-rotation: the target's pair
        was_connected = self.initiator.is_connected(rec.nqn)
        self.store.save(rec)
        try:
            device = self.initiator.connect(pc, self.connect_timeout, secrets=secrets)
            data = device
            if encrypted:
                rec.mapper = luks.mapper_name(request.volume_id)
                data = self.luks.open(device, rec.mapper, key, readonly)
            if kind == "mount":
                rec.fstype = mount_staging(self.mounter, self.luks, device=data,
                                           staging=staging, cap=cap, want_fs=want_fs,
                                           readonly=readonly, previous=previous)
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
        rec.acked = self.rekeyer.staged(rec, pc, secrets)
        self.store.save(rec)
        return csi_pb2.NodeStageVolumeResponse()

    @rpc(lock=("volume_id",))
    def NodeUnstageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        rec = self.store.load(request.volume_id)
        nqn = rec.nqn if rec is not None else ""
        if not nqn:
            with contextlib.suppress(Exception):
                nqn = contract.subsystem_nqn(contract.parse_id(request.volume_id).lvol_uuid)
        if nqn and self.initiator.is_connected(nqn) and \
                not wait_live(self.initiator, nqn, self.unstage_grace):
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
        if rec is not None and rec.acked:
            self.rekeyer.forget(request.volume_id)
        self.store.delete(request.volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    # --- publish / unpublish ----------------------------------------------------------
    @rpc(lock=("volume_id",))
    def NodePublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.target_path, "target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        kind = check_capability(request.volume_capability)
        rec = self.store.load(request.volume_id)
        if rec is None or rec.state != "staged":
            raise FailedPrecondition(f"volume {request.volume_id} is not staged on this node; "
                                     "NodeStageVolume must succeed first")
        if rec.access != kind:
            raise AlreadyExists(f"volume {request.volume_id} was staged as {rec.access}, "
                                f"not {kind}")
        # kubelet's republish (requiresRepublish) with the Secret fetched afresh:
        # a rotation in progress re-keys the live controller (node/rekey.py)
        acked = self.rekeyer.republish(rec, request.publish_context, request.secrets)
        if acked is not None:
            rec.acked = acked
            self.store.save(rec)
        readonly = request.readonly or is_read_only(request.volume_capability)
        target = request.target_path
        if kind == "block":
            publish_block(self.mounter, self.ro_loops, volume_id=rec.volume_id,
                          device=self._volume_device(rec), target=target, readonly=readonly)
        else:
            publish_mount(self.mounter, staging=request.staging_target_path, target=target,
                          readonly=readonly)
        return csi_pb2.NodePublishVolumeResponse()

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
            problems.append(stats.reconnect(self.initiator, self.luks, rec,
                                            min(self.connect_timeout, 10.0)))
        if rec.nqn and not self.initiator.path_live(rec.nqn):
            problems.append(f"no live NVMe/TCP path to {rec.nqn}")
        usage, unreadable = stats.usage(self.mounter, path)
        problems += unreadable
        condition = csi_pb2.VolumeCondition(abnormal=bool(problems),
                                            message="; ".join(problems) or "healthy")
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    @rpc(lock=("volume_id",))
    def NodeExpandVolume(self, request, context):
        rec, path = self._volume_at_path(request)
        kind = rec.access
        if request.HasField("volume_capability"):
            kind = access_type(request.volume_capability)
        required = request.capacity_range.required_bytes if \
            request.HasField("capacity_range") else 0
        self.initiator.rescan(rec.nqn)
        device = self._current_device(rec)
        size = expand.wait_size(self.mounter, device, required)
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
