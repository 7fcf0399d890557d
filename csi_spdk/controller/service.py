"""CSI Controller service: SPDK lvols on one or more targets, NVMe/TCP exports.

``ControllerServicer(config, driver_name, apis=None)``; ``apis`` maps target
names to ``SpdkApi`` objects (tests inject wrapped ones), by default each
target gets ``SpdkApi(SpdkClient(rpc, rpcTimeout))``. The create paths live
in ``create.py``, request validation in ``requests.py``, the snapshot RPCs in
``snapshots.py``, what it reports (ListVolumes, ControllerGetVolume,
GetCapacity) in ``reporting.py``, the model of one SPDK target in ``target.py``;
below the guard clauses of the others: ``delete.py`` (the delete intent and
the reclaim it allows), ``expand.py`` (an admitted online growth),
``refusals.py`` (what an intent's refusal is to the CO); beside the RPCs:
``reconciler.py`` (the background sweep), ``stores.py`` (the default secret
and key stores).

Concurrency: every RPC holds a try-lock on its volume id or name (``@rpc``), a
second call on the same key is ABORTED, different volumes run in parallel. A
CreateVolume from a volume source also holds the source's id.

Idempotency and crash safety: state lives only in SPDK (docs/DESIGN.md "Where
each CSI answer comes from"). Every RPC first reads what exists and only does
what is missing, so a retry after a crash between any two SPDK calls
converges. In-memory hints (node ids of hash-form host NQNs, the signature of
a second host's publish) only refine answers for the cases SPDK cannot hold.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping

from .. import contract
from ..errors import (
    CsiError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unimplemented,
    echo,
    require,
)
from ..locks import KeyedLocks
from ..proto import csi_pb2, csi_pb2_grpc
from ..rpc import rpc
from ..spdk.api import SpdkApi
from ..spdk.intents import IntentError
from . import dhchap_strength, qos
from .auth import SecretStore, VolumeAuth
from .config import Config
from .create import CreateRequest, create_empty, create_from_snapshot, create_from_volume
from .delete import delete_lvol, reclaim_after_delete
from .encryption import KeyStore, VolumeEncryption
from .expand import grow
from .health import TargetHealth
from .reconciler import RECONCILE_INTERVAL, Reconciler
from .refusals import delete_refusal, publish_refusal
from .reporting import VolumeReports
from .requests import (
    IMMUTABLE_KEYS,
    K8S_PARAM_PREFIX,
    PARAM_KEYS,
    VolumeParams,
    capability_problem,
    capacity_range,
    check_capabilities,
    filesystem_floor,
    is_single_node,
    parse_params,
    segments_of,
)
from .snapshots import SnapshotService
from .stores import KeyCustodies, default_key_store, default_secret_store
from .target import Lvol, Target, Targets

_RPC = csi_pb2.ControllerServiceCapability.RPC
CONTROLLER_CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME, _RPC.PUBLISH_UNPUBLISH_VOLUME, _RPC.LIST_VOLUMES,
    _RPC.GET_CAPACITY, _RPC.CREATE_DELETE_SNAPSHOT, _RPC.LIST_SNAPSHOTS, _RPC.CLONE_VOLUME,
    _RPC.EXPAND_VOLUME, _RPC.LIST_VOLUMES_PUBLISHED_NODES, _RPC.GET_VOLUME,
    _RPC.VOLUME_CONDITION, _RPC.PUBLISH_READONLY, _RPC.SINGLE_NODE_MULTI_WRITER,
    _RPC.MODIFY_VOLUME,
)


log = logging.getLogger("csi_spdk.controller")


def _source_uuid(source: csi_pb2.VolumeContentSource | None) -> str:
    """The lvol uuid of a content source ("" without one or for a malformed id,
    which the create path reports)."""
    if source is None:
        return ""
    kind = source.WhichOneof("type")
    ident = source.snapshot.snapshot_id if kind == "snapshot" else \
        source.volume.volume_id if kind == "volume" else ""
    try:
        return contract.parse_id(ident).lvol_uuid if ident else ""
    except CsiError:
        return ""


class ControllerServicer(SnapshotService, VolumeReports, csi_pb2_grpc.ControllerServicer):
    """The CSI Controller service over the configured SPDK targets."""

    def __init__(self, config: Config, driver_name: str,
                 apis: Mapping[str, SpdkApi] | None = None,
                 secret_store: SecretStore | None = None, key_custody=None,
                 key_store: KeyStore | None = None) -> None:
        """``secret_store``/``key_custody`` (target name -> KeyCustody): the
        auth strategies (controller/auth.py); defaults from ``config.auth``."""
        self.locks = KeyedLocks()
        self.config = config
        self.driver_name = driver_name
        apis = apis or {}
        self.targets = Targets(
            (t.name, Target(t, apis.get(t.name) or t.make_api())) for t in config.targets)
        self._hints = threading.Lock()
        self._node_ids: dict[str, str] = {}                  # host NQN -> CSI node id
        # lvol uuid -> host NQN -> the publish's signature (only published volumes)
        self._publishes: dict[str, dict[str, str]] = {}
        SnapshotService.__init__(self, self.targets, self.locks, config)
        self.auth = VolumeAuth(secret_store or default_secret_store(config),
                               key_custody or KeyCustodies(self.targets, config.auth.key_dir))
        self.encryption = VolumeEncryption(key_store or default_key_store(config))
        self.health = TargetHealth(self.targets)
        # False on a standby replica (controller/lease.py): no reconciling there
        self.active: Callable[[], bool] = lambda: True
        self.reconciler = Reconciler(self.targets, lambda: self.active())

    def start_background(self, reconcile_interval: float = RECONCILE_INTERVAL) -> None:
        """The target health checker and the reconciler (daemon threads)."""
        self.health.start()
        self.reconciler.start(reconcile_interval)

    def reconcile(self) -> None:
        """One reconciler pass now (``reconciler.py``)."""
        self.reconciler.run_once()

    def ready(self) -> bool:
        """For Identity.Probe: the process is up and can serve. Targets' own
        health is ``self.health`` (metric + volume conditions): one down target
        must not get the controller restarted (controller/health.py)."""
        return True

    def close(self) -> None:
        self.reconciler.stop()
        self.health.stop()
        for t in self.targets.values():
            t.stop()
            with contextlib.suppress(Exception):
                t.api.client.close()

    # --- helpers -----------------------------------------------------------------
    def _volume_response(self, target: Target, lv: Lvol, params: VolumeParams,
                         source: csi_pb2.VolumeContentSource | None, name: str,
                         secrets: Mapping[str, str] | None = None
                         ) -> csi_pb2.CreateVolumeResponse:
        """The answer; a clone is thin (its volume_context says so from SPDK)."""
        vol = self._volume_msg(target, lv, params.fs_type)
        vol.volume_context.update(self.auth.created(lv.uuid, name, params.auth))
        vol.volume_context.update(params.dhchap.context())
        # after auth: its Secret (if any) is made first and gets the key added
        vol.volume_context.update(self.encryption.created(
            lv.uuid, name, params.encryption, dict(secrets or {}), _source_uuid(source)))
        if source is not None:
            vol.content_source.CopyFrom(source)
        return csi_pb2.CreateVolumeResponse(volume=vol)

    # --- CreateVolume ----------------------------------------------------------
    @rpc(lock=("name",))
    def CreateVolume(self, request, context):
        require(request.name, "name")
        check_capabilities(request.volume_capabilities)
        params = parse_params(request.parameters, self.config, request.mutable_parameters)
        self.auth.check(params.auth)   # before anything is made
        source_uuid = _source_uuid(request.volume_content_source
                                   if request.HasField("volume_content_source") else None)
        self.encryption.check(params.encryption, source_uuid)
        required, limit = capacity_range(request)
        fs, floor = filesystem_floor(request.volume_capabilities, params.fs_type)
        if floor and limit and limit < floor:
            raise OutOfRange(f"{fs} needs a volume of at least {floor >> 20} MiB; "
                             f"limit_bytes is {limit}")
        if floor and required < floor:
            # more than asked for is still within the range (the limit is not below it)
            required = max(floor, required or self.config.default_volume_size)
        source = request.volume_content_source \
            if request.HasField("volume_content_source") else None
        kind = source.WhichOneof("type") if source is not None else None
        if source is not None and kind is None:
            raise InvalidArgument("volume_content_source needs a snapshot or a volume")
        if kind == "volume":
            require(source.volume.volume_id, "volume_content_source.volume.volume_id")

        req = CreateRequest(
            name=request.name, lvol_name=contract.volume_lvol_name(request.name),
            params=params, required=required, limit=limit,
            requisite=segments_of(request.accessibility_requirements.requisite),
            preferred=segments_of(request.accessibility_requirements.preferred),
            source=source)
        # pinned to a target: only that one can hold the name (a retry has the
        # same parameters), so another, unreachable target does not matter
        req.found_target, req.found, req.lvstores = self.targets.find(
            req.lvol_name, only=params.target, lvstore=params.lvstore,
            always=source is not None or bool(params.dhchap))
        req.looked = req.found is not None or source is not None or len(
            [1 for stores in req.lvstores.values() for s in stores
             if not params.lvstore or s["name"] == params.lvstore]) > 1
        if params.dhchap and req.found is None:
            dhchap_strength.restrict(self.targets, req, source, kind)
        if kind == "volume":
            with self.locks.hold([source.volume.volume_id],
                                 what="CreateVolume from this source"):
                target, lv = create_from_volume(self.targets, self.config, req)
        elif kind == "snapshot":
            target, lv = create_from_snapshot(self.targets, self.config, req)
        else:
            target, lv = create_empty(self.targets, self.config, req)
        # Clones and restores too: SPDK does not copy QoS to a clone, and the new
        # volume gets its own request's limits, not its source's.
        lv.qos = qos.apply(target, lv.uuid, params.qos, lv.qos)
        target.volume_kept(lv)   # ListVolumes shows it at once (volumes.py)
        return self._volume_response(target, lv, params, source, request.name,
                                     request.secrets)

    # --- DeleteVolume ----------------------------------------------------------
    @rpc(lock=("volume_id",))
    def DeleteVolume(self, request, context):
        """Missing volume is success (and sweeps orphaned internal snapshots
        when a delete may have been cut short: ``Target.take_unfinished``). A
        volume still published to a node (its subsystem allows a host) is
        FAILED_PRECONDITION: unpublish first. lvols without a driver prefix are
        never deleted (FAILED_PRECONDITION)."""
        require(request.volume_id, "volume_id")
        try:
            oid = contract.parse_id(request.volume_id)
            target = self.targets.of(oid)
        except NotFound:
            return csi_pb2.DeleteVolumeResponse()
        try:
            return self._delete_volume(request, target, oid)
        except BaseException:
            target.unfinished_delete()   # the retry finishes what this left
            raise

    def _delete_volume(self, request, target: Target, oid: contract.ObjectId):
        try:
            found, stacked = delete_lvol(target, oid.lvol_uuid, self.encryption)
        except IntentError as ierr:
            raise delete_refusal(request.volume_id, ierr, self._node_names) from None
        reclaim_after_delete(self.targets, target, found)
        target.volume_gone(oid.lvol_uuid)   # ListVolumes stops showing it (volumes.py)
        self.auth.deleted(target.name, oid.lvol_uuid)
        self.encryption.deleted(target.api, oid.lvol_uuid, stacked)
        return csi_pb2.DeleteVolumeResponse()

    # --- publish -----------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def ControllerPublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.node_id, "node_id")
        require(request.HasField("volume_capability"), "volume_capability")
        check_capabilities([request.volume_capability])
        oid = contract.parse_id(request.volume_id)
        target = self.targets.of(oid)
        if self.config.nodes is not None and request.node_id not in self.config.nodes:
            raise NotFound(f"node {echo(request.node_id)} does not exist (known nodes: "
                           f"{', '.join(sorted(self.config.nodes)) or 'none'})")
        host = contract.host_nqn(request.node_id)
        legacy = contract.legacy_host_nqn(request.node_id)
        cap = request.volume_capability
        signature = contract.publish_signature(cap.SerializeToString(deterministic=True),
                                               request.readonly)
        with self._hints:
            self._node_ids[host] = self._node_ids[legacy] = request.node_id
            hint = self._publishes.get(oid.lvol_uuid, {}).get(host)
        dhchap_strength.check_target(target.name, target.api,
                                     dhchap_strength.from_context(dict(request.volume_context)))
        mode = self.auth.mode_of(oid.lvol_uuid,
                                 request.volume_context.get(contract.VC_AUTH, ""))
        csi_name = ""
        if mode != contract.AUTH_NONE:
            # keys go to the target only for a volume that exists
            _, lv = self.targets.volume(request.volume_id)
            csi_name = lv.name[len(contract.VOLUME_PREFIX):] \
                if lv.name.startswith(contract.VOLUME_PREFIX) else ""
        keys = self.auth.keys_for_publish(target.name, oid.lvol_uuid, mode,
                                          dict(request.secrets), csi_name)
        bdev = self.encryption.publish_bdev(
            target.api, oid.lvol_uuid, request.volume_context.get(contract.VC_ENCRYPTION, ""),
            dict(request.secrets))
        try:
            ctx = target.exporter.export(
                oid.lvol_uuid, host, legacy=legacy, signature=signature, hint=hint,
                model=contract.model_number(host, signature, request.readonly),
                single_node=is_single_node(cap), keys=keys, bdev=bdev)
        except IntentError as err:
            raise publish_refusal(request.volume_id, request.node_id, err,
                                  self._node_names) from None
        if keys:
            ctx[contract.PC_AUTH] = mode
        with self._hints:
            self._publishes.setdefault(oid.lvol_uuid, {})[host] = signature
        if request.readonly:
            ctx[contract.PC_READONLY] = "true"
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=ctx)

    @rpc(lock=("volume_id",))
    def ControllerUnpublishVolume(self, request, context):
        """Idempotent: a missing volume, subsystem or host is success. An empty
        node_id unpublishes from every node. One intent: the subsystem read,
        then the host removed, or the subsystem deleted with its last host."""
        require(request.volume_id, "volume_id")
        try:
            oid = contract.parse_id(request.volume_id)
            target = self.targets.of(oid)
        except NotFound:
            return csi_pb2.ControllerUnpublishVolumeResponse()
        exporter = target.exporter
        if request.node_id:
            host = contract.host_nqn(request.node_id)
            # the node's older host NQN form too (published by an older driver)
            hosts = [host, contract.legacy_host_nqn(request.node_id)]
            # whether a crypto bdev was exported comes from the unexport's own
            # read of the subsystem (intents.stacked): no look-up of its own
            gone, stacked = exporter.withdraw(oid.lvol_uuid, hosts)
        else:
            stacked = exporter.delete(oid.lvol_uuid)    # not read: None, look
            gone = True
        with self._hints:
            if request.node_id:
                self._publishes.get(oid.lvol_uuid, {}).pop(host, None)
            if gone or not request.node_id or not self._publishes.get(oid.lvol_uuid):
                self._publishes.pop(oid.lvol_uuid, None)
        if gone:
            # the last host is gone: so are the volume's keys on the target
            self.auth.drop_target_keys(target.name, oid.lvol_uuid)
            self.encryption.unexported(target.api, oid.lvol_uuid, stacked)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    # --- queries -----------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def ValidateVolumeCapabilities(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_capabilities, "volume_capabilities")
        self.targets.volume(request.volume_id)
        for key in request.parameters:
            if key not in PARAM_KEYS and not key.startswith(K8S_PARAM_PREFIX):
                return csi_pb2.ValidateVolumeCapabilitiesResponse(
                    message=f"unknown parameter {echo(key)}")
        try:
            qos.parse(request.parameters)
            qos.parse_mutable(request.mutable_parameters, IMMUTABLE_KEYS)
        except InvalidArgument as err:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=err.message)
        problems = [p for p in map(capability_problem, request.volume_capabilities) if p]
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
            mutable_parameters=request.mutable_parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

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
        target, lv = self.targets.volume(request.volume_id)
        if required <= lv.size:
            return csi_pb2.ControllerExpandVolumeResponse(
                capacity_bytes=lv.size, node_expansion_required=node_expansion)
        size = grow(self.targets, target, lv, volume_id=request.volume_id, required=required,
                    limit=limit, overcommit=self.config.thin_overcommit_ratio)
        if size != lv.size:
            lv.size = size
            target.volume_kept(lv)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=node_expansion)

    # --- modification ---------------------------------------------------------------
    @rpc(lock=("volume_id",))
    def ControllerModifyVolume(self, request, context):
        """Change the QoS limits online (qos.py). Only the keys given change
        (CSI: no modification from the absence of a key); 0 turns one off."""
        require(request.volume_id, "volume_id")
        require(request.mutable_parameters, "mutable_parameters")
        wanted = qos.parse_mutable(request.mutable_parameters, IMMUTABLE_KEYS)
        target, lv = self.targets.volume(request.volume_id)
        lv.qos = qos.apply(target, lv.uuid, wanted, lv.qos)
        target.volume_kept(lv)
        qos.release_hold(target, lv.uuid)
        return csi_pb2.ControllerModifyVolumeResponse()

    # --- not supported -------------------------------------------------------------
    @rpc(lock=("snapshot_id",))
    def GetSnapshot(self, request, context):
        raise Unimplemented("GetSnapshot is not supported")
