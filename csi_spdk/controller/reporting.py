"""What the Controller service reports: ListVolumes, ControllerGetVolume and
GetCapacity, and the CSI Volume message every answer builds from an lvol.

A mixin of ``ControllerServicer`` (service.py): it reads ``self.targets``,
``self.health``, ``self.config`` and the node-id hints (``self._hints``,
``self._node_ids``) the service keeps. ControllerGetVolume reads SPDK at the
time of the call; ListVolumes and GetCapacity answer from what each target
keeps (its volumes and provisioned bytes, refreshed off the request path,
docs/DESIGN.md "At scale") plus one read of the lvstores and, for
ListVolumes, the page's subsystems. These RPCs change nothing, so a retry is
always safe.
"""

from __future__ import annotations

import heapq

from google.protobuf import wrappers_pb2

from .. import contract
from ..errors import InvalidArgument, require
from ..proto import csi_pb2
from ..rpc import rpc
from ..spdk.errors import SpdkTransportError
from ..spdk.intents import parallel
from . import placement, qos
from .requests import parse_params
from .snapshots import paginate
from .target import Lvol, Target

# A page's subsystems are read one by one (together, this many at a time, so
# other calls keep connections) up to PAGE_SUBSYSTEMS volumes on a target;
# a bigger page (an unpaged ListVolumes) reads the subsystem listing once.
PAGE_LOOKUPS = 16
PAGE_SUBSYSTEMS = 1024


def _hosts_of(target: Target, uuids: list[str]) -> dict[str, list[str]]:
    """lvol uuid -> allowed host NQNs of these volumes (none: unpublished)."""
    if len(uuids) > PAGE_SUBSYSTEMS:
        return target.exporter.exported_hosts(set(uuids))
    out: dict[str, list[str]] = {}
    for i in range(0, len(uuids), PAGE_LOOKUPS):
        batch = uuids[i:i + PAGE_LOOKUPS]
        for uuid, (sub, err) in zip(batch, parallel(
                *(lambda u=u: target.exporter.subsystem(u) for u in batch)), strict=True):
            if err is not None:
                raise err
            if sub is not None:
                out[uuid] = target.exporter.hosts_of(sub)
    return out


def _topology(target: Target) -> list[csi_pb2.Topology]:
    """No constraint unless the target has labels (then nodes must carry them)."""
    segment = target.cfg.segment()
    return [csi_pb2.Topology(segments=segment)] if segment else []


class VolumeReports:
    """ListVolumes, ControllerGetVolume, GetCapacity (see the module docstring)."""

    @staticmethod
    def _volume_msg(target: Target, lv: Lvol, fs_type: str = "") -> csi_pb2.Volume:
        """The CSI Volume of an lvol; its volume_context is the node's contract."""
        ctx = {contract.VC_TARGET: target.name, contract.VC_LVSTORE: lv.lvstore,
               contract.VC_LVOL_UUID: lv.uuid, contract.VC_THIN: str(lv.thin).lower()}
        if fs_type:
            ctx[contract.VC_FS_TYPE] = fs_type
        ctx.update(qos.context(lv.qos))
        return csi_pb2.Volume(volume_id=str(contract.ObjectId(target.name, lv.uuid)),
                              capacity_bytes=lv.size, volume_context=ctx,
                              accessible_topology=_topology(target))

    def _node_list(self, hosts: list[str]) -> list[str]:
        """CSI node ids of the host NQNs allowed on a subsystem: read from the
        NQN itself (contract.host_nqn embeds the node id), so they survive a
        restart; only hash-form or legacy NQNs fall back to in-memory hints."""
        out = set()
        with self._hints:
            for h in hosts:
                node = contract.node_of_host(h) or self._node_ids.get(h)
                if node is not None:
                    out.add(node)
        return sorted(out)

    def _node_names(self, hosts: list[str]) -> list[str]:
        """For messages: node ids where known, else the host NQN."""
        with self._hints:
            return [contract.node_of_host(h) or self._node_ids.get(h, h) for h in hosts]

    def _condition(self, target: Target, lv: Lvol, lvs_uuids: set[str]
                   ) -> csi_pb2.VolumeCondition:
        up, error = self.health.status(target.name)
        if up is False:
            return csi_pb2.VolumeCondition(abnormal=True, message=(
                f"target {target.name} failed its last health check: {error}"))
        if lv.lvs_uuid and lv.lvs_uuid not in lvs_uuids:
            return csi_pb2.VolumeCondition(abnormal=True, message=(
                f"lvol {lv.alias} belongs to lvstore {lv.lvs_uuid}, which target "
                f"{target.name} no longer reports"))
        return csi_pb2.VolumeCondition(abnormal=False, message="volume is healthy")

    @rpc()
    def ListVolumes(self, request, context):
        """The volumes each target keeps (``volumes.KeptVolumes``: no scan
        per page, only the first call of a process waits for one), in volume
        id order; the token is the last id returned, so a volume that exists
        throughout is listed exactly once however volumes come and go between
        pages, and a token that is no volume id is ABORTED. Per page: one
        lvstore read per target and the subsystem of each volume on it (read
        together, ``PAGE_LOOKUPS`` at a time), so published nodes and
        conditions are current. Only the page is built: memory follows the
        page size."""
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        start = request.starting_token
        if start:
            paginate([], start, 0)   # (ABORTED for a token that is no volume id)
        limit = request.max_entries or 0
        page = self._page(start, limit + 1 if limit else 0)
        token = ""
        if limit and len(page) > limit:
            page = page[:limit]
            token = page[-1][0]
        out, seen = [], {}
        for _, target, lv in page:
            if target.name not in seen:   # read once per target with volumes on the page
                seen[target.name] = ({s["uuid"] for s in target.api.lvstores()},
                                     _hosts_of(target, [e[2].uuid for e in page
                                                        if e[1] is target]))
            stores, exported = seen[target.name]
            status = csi_pb2.ListVolumesResponse.VolumeStatus(
                published_node_ids=self._node_list(exported.get(lv.uuid, [])),
                volume_condition=self._condition(target, lv, stores))
            out.append(csi_pb2.ListVolumesResponse.Entry(
                volume=self._volume_msg(target, lv), status=status))
        return csi_pb2.ListVolumesResponse(entries=out, next_token=token)

    def _page(self, after: str, keep: int) -> list[tuple[str, Target, Lvol]]:
        """(volume id, target, lvol) of the kept volumes after ``after``, in id
        order: the first ``keep`` only (0: all)."""
        def volumes():
            for target in self.targets.values():
                for lv in target.kept_volumes():
                    vid = str(contract.ObjectId(target.name, lv.uuid))
                    if vid > after:
                        yield vid, target, lv
        key = lambda e: e[0]  # noqa: E731
        if keep:
            return heapq.nsmallest(keep, volumes(), key=key)
        return sorted(volumes(), key=key)

    @rpc(lock=("volume_id",))
    def ControllerGetVolume(self, request, context):
        """A volume on a target that cannot be reached right now is reported
        with an abnormal condition (and size 0: unknown), not as an error."""
        require(request.volume_id, "volume_id")
        try:
            target, lv = self.targets.volume(request.volume_id)
            stores = {s["uuid"] for s in target.api.lvstores()}
            hosts = target.exporter.hosts(lv.uuid)
        except SpdkTransportError as err:
            oid = contract.parse_id(request.volume_id)
            condition = csi_pb2.VolumeCondition(abnormal=True, message=(
                f"target {oid.target} is unreachable: {err.message}"))
            status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=condition)
            return csi_pb2.ControllerGetVolumeResponse(
                volume=csi_pb2.Volume(volume_id=request.volume_id), status=status)
        vol = self._volume_msg(target, lv)
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=self._node_list(hosts),
            volume_condition=self._condition(target, lv, stores))
        return csi_pb2.ControllerGetVolumeResponse(volume=vol, status=status)

    @rpc()
    def GetCapacity(self, request, context):
        """Free bytes (thick) or overcommit headroom (thin) of the lvstores that
        the parameters and the topology segment select; also refreshes the
        lvstore gauges. One lvstore read per target (free clusters as SPDK
        has them now) and the kept provisioned bytes (no scan: the driver's
        own changes counted at once, a snapshot at its source's full size,
        anything done behind its back from the next rescan; docs/DESIGN.md
        "At scale")."""
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
                pool = target.pool(lvs)   # kept provisioned bytes: no scan
                room = pool.available(params.thin, ratio)
                available += room
                largest = max(largest, placement.align_down(room, pool.cluster_size))
        return csi_pb2.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size=wrappers_pb2.Int64Value(value=largest))
