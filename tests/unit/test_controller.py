"""Controller service against the SPDK simulator (or CSI_SPDK_TEST_RPC): every RPC,
bad inputs, idempotency; assertions read SPDK's own state."""

from __future__ import annotations

import grpc
import pytest
from controller_fixtures import (
    NVMF_PORT,
    MiB,
    Mode,
    block_cap,
    call,
    create_req,
    expect_code,
    make_env,
    mount_cap,
    publish_req,
    uuid_of,
)

from csi_spdk import contract, metrics
from csi_spdk.controller.service import CONTROLLER_CAPABILITIES
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode


def bdev(env, ref):
    return env.t0.raw.bdev_get(ref)



def create(env, name="pvc-1", size=10 * MiB, **kw):
    return call(env.servicer, "CreateVolume", create_req(name, size, **kw)).volume


# --- capabilities --------------------------------------------------------------------
def test_controller_capabilities_exact(env):
    caps = call(env.servicer, "ControllerGetCapabilities",
                csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    got = {c.rpc.type for c in caps}
    RPC = csi_pb2.ControllerServiceCapability.RPC
    assert got == set(CONTROLLER_CAPABILITIES)
    assert RPC.GET_SNAPSHOT not in got and RPC.MODIFY_VOLUME in got


def test_unimplemented(env):
    expect_code(C.UNIMPLEMENTED, env.servicer, "GetSnapshot",
                csi_pb2.GetSnapshotRequest(snapshot_id="x"))


# --- CreateVolume ----------------------------------------------------------------------
def test_create_thick_volume_in_spdk(env):
    vol = create(env, "pvc-1", 10 * MiB)
    oid = contract.parse_id(vol.volume_id)
    assert oid.target == env.t0.name
    b = bdev(env, oid.lvol_uuid)
    assert b["aliases"] == [f"{env.t0.lvs}/{contract.volume_lvol_name('pvc-1')}"]
    assert b["num_blocks"] * b["block_size"] == 10 * MiB == vol.capacity_bytes
    assert b["driver_specific"]["lvol"]["thin_provision"] is False
    assert dict(vol.volume_context) == {"target": env.t0.name, "lvstore": env.t0.lvs,
                                        "lvolUuid": oid.lvol_uuid, "thinProvision": "false",
                                        "auth": "dhchap"}
    assert env.secrets.get(oid.lvol_uuid) is not None   # the default: per-volume keys
    # NVMe/TCP: reachable from every node, so no topology constraint
    assert list(vol.accessible_topology) == []
    # idempotent
    again = create(env, "pvc-1", 10 * MiB)
    assert again.volume_id == vol.volume_id
    assert len([lv for lv in env.t0.raw.lvols(env.t0.lvs)]) == 1


def test_create_rounding_default_and_limits(tmp_path):
    env = make_env(tmp_path, cluster_mib=4)
    try:
        v = create(env, "r", 5 * MiB)
        assert v.capacity_bytes == 8 * MiB
        assert bdev(env, uuid_of(v.volume_id))["num_blocks"] * 4096 == 8 * MiB
        d = call(env.servicer, "CreateVolume", create_req("d")).volume
        assert d.capacity_bytes == 16 * MiB                     # default size
        lim = call(env.servicer, "CreateVolume", create_req("l", 0, limit=9 * MiB)).volume
        assert lim.capacity_bytes == 8 * MiB                    # default capped by limit
        expect_code(C.OUT_OF_RANGE, env.servicer, "CreateVolume",
                    create_req("x", 5 * MiB, limit=6 * MiB))    # no cluster multiple fits
        expect_code(C.OUT_OF_RANGE, env.servicer, "CreateVolume",
                    create_req("y", 10 * MiB, limit=5 * MiB))
        expect_code(C.ALREADY_EXISTS, env.servicer, "CreateVolume", create_req("r", 12 * MiB))
        expect_code(C.ALREADY_EXISTS, env.servicer, "CreateVolume",
                    create_req("r", 1 * MiB, limit=4 * MiB))
    finally:
        env.close()


def test_create_long_name_hash_form(env):
    name = "pvc-" + "x" * 100
    vol = create(env, name)
    b = bdev(env, uuid_of(vol.volume_id))
    assert b["aliases"][0].split("/", 1)[1].startswith(contract.VOLUME_HASH_PREFIX)
    assert create(env, name).volume_id == vol.volume_id


@pytest.mark.parametrize("req,fragment", [
    (create_req(""), "name"),
    (csi_pb2.CreateVolumeRequest(name="a"), "capabilities"),
    (create_req("a", caps=[csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability
                                                    .AccessMode(mode=1))]), "access type"),
    (create_req("a", caps=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]), "block"),
    (create_req("a", caps=[block_cap(Mode.MULTI_NODE_SINGLE_WRITER)]), "not supported"),
    (create_req("a", caps=[block_cap(Mode.UNKNOWN)]), "not supported"),
    (create_req("a", caps=[mount_cap(fs="btrfs")]), "btrfs"),
    (create_req("a", params={"colour": "red"}), "'colour'"),
    (create_req("a", params={"thinProvision": "maybe"}), "thinProvision"),
    (create_req("a", params={"clearMethod": "shred"}), "clearMethod"),
    (create_req("a", params={"fsType": "ntfs"}), "fsType"),
    (create_req("a", params={"target": "nope"}), "nope"),
    (create_req("a", params={"lvstore": "nope"}), "nope"),
])
def test_create_invalid_arguments(env, req, fragment):
    msg = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", req)
    assert fragment in msg
    if fragment == "'colour'":
        assert "thinProvision" in msg and "clearMethod" in msg


def test_create_accepts_supported_caps_and_k8s_params(env):
    caps = [block_cap(Mode.MULTI_NODE_MULTI_WRITER), mount_cap(Mode.SINGLE_NODE_MULTI_WRITER),
            mount_cap(Mode.MULTI_NODE_READER_ONLY, fs="xfs"),
            block_cap(Mode.SINGLE_NODE_READER_ONLY), mount_cap(Mode.SINGLE_NODE_SINGLE_WRITER)]
    vol = call(env.servicer, "CreateVolume", create_req(
        "ok", MiB, caps=caps, params={"csi.storage.k8s.io/pvc/name": "x", "fsType": "xfs",
                                      "clearMethod": "none", "lvstore": env.t0.lvs,
                                      "target": env.t0.name, "thinProvision": "true"})).volume
    assert vol.volume_context["fsType"] == "xfs"


@pytest.mark.parametrize("fs_in", ["cap", "param"])
def test_xfs_volume_rounded_up_to_mkfs_minimum(env, fs_in):
    """mkfs.xfs refuses devices under 300 MiB: the controller hands out at
    least that much for an xfs mount volume, so staging cannot fail on size."""
    cap = mount_cap(fs="xfs" if fs_in == "cap" else "")
    params = {"thinProvision": "true"}
    if fs_in == "param":
        params["fsType"] = "xfs"
    vol = call(env.servicer, "CreateVolume",
               create_req("small-xfs", 10 * MiB, caps=[cap], params=params)).volume
    assert vol.capacity_bytes == 300 * MiB
    assert bdev(env, uuid_of(vol.volume_id))["num_blocks"] * 4096 == 300 * MiB
    again = call(env.servicer, "CreateVolume",
                 create_req("small-xfs", 10 * MiB, caps=[cap], params=params)).volume
    assert again.volume_id == vol.volume_id


def test_xfs_limit_below_minimum_is_out_of_range(env):
    before = env.t0.raw.lvols()
    msg = expect_code(C.OUT_OF_RANGE, env.servicer, "CreateVolume",
                      create_req("tiny-xfs", 10 * MiB, limit=100 * MiB,
                                 caps=[mount_cap(fs="xfs")]))
    assert "xfs needs a volume of at least 300 MiB" in msg
    assert env.t0.raw.lvols() == before


def test_ext4_and_block_not_rounded(env):
    for name, cap in (("e4", mount_cap(fs="ext4")), ("blk", block_cap())):
        vol = call(env.servicer, "CreateVolume", create_req(name, 2 * MiB, caps=[cap])).volume
        assert vol.capacity_bytes == 2 * MiB


def test_create_full_and_thin_overcommit(env):
    expect_code(C.RESOURCE_EXHAUSTED, env.servicer, "CreateVolume",
                create_req("big", 300 * MiB))
    total = env.t0.raw.lvstores(env.t0.lvs)[0]["total_data_clusters"] * MiB
    thin = {"thinProvision": "true"}
    v1 = call(env.servicer, "CreateVolume", create_req("t1", total, params=thin)).volume
    assert bdev(env, uuid_of(v1.volume_id))["driver_specific"]["lvol"]["thin_provision"]
    call(env.servicer, "CreateVolume", create_req("t2", total - 2 * MiB, params=thin))
    # ratio 2.0: 2*total provisioned at most
    expect_code(C.RESOURCE_EXHAUSTED, env.servicer, "CreateVolume",
                create_req("t3", 4 * MiB, params=thin))
    cap = call(env.servicer, "GetCapacity", csi_pb2.GetCapacityRequest(parameters=thin))
    assert cap.available_capacity == 2 * MiB
    cap = call(env.servicer, "GetCapacity", csi_pb2.GetCapacityRequest())
    free = env.t0.raw.lvstores(env.t0.lvs)[0]["free_clusters"] * MiB
    assert cap.available_capacity == free
    assert metrics.LVSTORE_FREE.labels(env.t0.name, env.t0.lvs)._value.get() == free
    assert metrics.LVSTORE_TOTAL.labels(env.t0.name, env.t0.lvs)._value.get() == total


def test_multi_target_idempotency_and_topology(tmp_path):
    N = contract.TOPOLOGY_NODE_KEY
    env = make_env(tmp_path, n_targets=2, nodes=["node-a", "node-b"],
                   topology=[{"zone": "z1"}, {"zone": "z2"}])
    try:
        a, b = env.targets
        s = env.servicer
        v = call(s, "CreateVolume", create_req("v", MiB, params={"target": b})).volume
        assert v.volume_id.startswith(b + ":")
        # idempotent across targets even without the parameter
        assert call(s, "CreateVolume", create_req("v", MiB)).volume.volume_id == v.volume_id
        # the volume carries only its target's labels, never a node key
        assert [dict(t.segments) for t in v.accessible_topology] == [{"zone": "z2"}]
        # the consumer's own node wins when it hosts a target with room
        r = call(s, "CreateVolume", create_req(
            "r", MiB, requisite=[{N: "node-a", "zone": "z1"}, {N: "node-b", "zone": "z2"}],
            preferred=[{N: "node-a", "zone": "z1"}])).volume
        assert r.volume_id.startswith(a + ":")
        p = call(s, "CreateVolume", create_req(
            "p", MiB, requisite=[{N: "node-a", "zone": "z1"}, {N: "node-b", "zone": "z2"}],
            preferred=[{N: "node-b", "zone": "z2"}, {N: "node-a", "zone": "z1"}])).volume
        assert p.volume_id.startswith(b + ":")
        # a node in zone z1 only reaches target a, even when it prefers node-b
        q = call(s, "CreateVolume", create_req(
            "q", MiB, requisite=[{N: "node-c", "zone": "z1"}],
            preferred=[{N: "node-b", "zone": "z1"}])).volume
        assert q.volume_id.startswith(a + ":")
        # a requisite no target's labels allow is exhausted
        expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume",
                    create_req("x", MiB, requisite=[{N: "node-c", "zone": "z9"}]))
        cap = call(s, "GetCapacity", csi_pb2.GetCapacityRequest(
            accessible_topology=csi_pb2.Topology(segments={N: "node-c", "zone": "z9"})))
        assert cap.available_capacity == 0
        cap_a = call(s, "GetCapacity", csi_pb2.GetCapacityRequest(
            accessible_topology=csi_pb2.Topology(segments={"zone": "z1"})))
        assert cap_a.available_capacity == env.targets[a].raw.lvstores()[0]["free_clusters"] \
            * MiB
        # a snapshot source pins the clone to its target
        snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
            name="s", source_volume_id=v.volume_id)).snapshot
        expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req(
            "c", MiB, snapshot=snap.snapshot_id, requisite=[{N: "node-a", "zone": "z1"}]))
        expect_code(C.INVALID_ARGUMENT, s, "CreateVolume", create_req(
            "c", MiB, snapshot=snap.snapshot_id, params={"target": a}))
    finally:
        env.close()


# --- content sources -----------------------------------------------------------------
def test_create_from_snapshot(env):
    s = env.servicer
    src = create(env, "src", 8 * MiB)
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="snap", source_volume_id=src.volume_id)).snapshot
    clone = create(env, "clone", 16 * MiB, snapshot=snap.snapshot_id)
    b = bdev(env, uuid_of(clone.volume_id))
    assert b["driver_specific"]["lvol"]["base_snapshot"] == contract.snapshot_lvol_name("snap")
    assert b["num_blocks"] * b["block_size"] == 16 * MiB == clone.capacity_bytes
    assert clone.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert create(env, "clone", 16 * MiB, snapshot=snap.snapshot_id).volume_id == \
        clone.volume_id
    same_size = create(env, "clone2", 0, snapshot=snap.snapshot_id)
    assert same_size.capacity_bytes == 8 * MiB
    expect_code(C.OUT_OF_RANGE, s, "CreateVolume",
                create_req("small", 4 * MiB, limit=4 * MiB, snapshot=snap.snapshot_id))
    create(env, "plain", 8 * MiB)
    expect_code(C.ALREADY_EXISTS, s, "CreateVolume", create_req("plain", 8 * MiB,
                                                                 snapshot=snap.snapshot_id))
    expect_code(C.NOT_FOUND, s, "CreateVolume", create_req(
        "c3", MiB, snapshot=f"{env.t0.name}:00000000-0000-0000-0000-000000000000"))
    expect_code(C.NOT_FOUND, s, "CreateVolume", create_req("c3", MiB, snapshot="garbage"))
    expect_code(C.ALREADY_EXISTS, s, "CreateVolume", create_req("clone", 16 * MiB,
                                                                 volume=src.volume_id))


def test_create_from_volume(env):
    s = env.servicer
    src = create(env, "src", 8 * MiB)
    clone = create(env, "c", 12 * MiB, volume=src.volume_id)
    csic = contract.clone_source_lvol_name("c")
    b = bdev(env, uuid_of(clone.volume_id))
    assert b["driver_specific"]["lvol"]["base_snapshot"] == csic
    assert clone.capacity_bytes == 12 * MiB == b["num_blocks"] * b["block_size"]
    assert clone.content_source.volume.volume_id == src.volume_id
    assert create(env, "c", 12 * MiB, volume=src.volume_id).volume_id == clone.volume_id
    expect_code(C.NOT_FOUND, s, "CreateVolume", create_req(
        "c2", MiB, volume=f"{env.t0.name}:00000000-0000-0000-0000-000000000000"))
    # the source is locked while a clone is made from it
    with s.locks.hold([src.volume_id]):
        expect_code(C.ABORTED, s, "CreateVolume", create_req("c3", MiB, volume=src.volume_id))
    # deleting the clone and the source reclaims the clone-source snapshot
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=clone.volume_id))
    assert bdev(env, f"{env.t0.lvs}/{csic}") is None
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=src.volume_id))
    assert env.t0.raw.lvols(env.t0.lvs) == []


# --- publish -------------------------------------------------------------------------------
def test_publish_unpublish_spdk_state(env):
    s = env.servicer
    vol = create(env)
    uuid = uuid_of(vol.volume_id)
    ctx = call(s, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1")).publish_context
    # no volume_context in the request: the volume's keys in the store make it dhchap
    assert dict(ctx) == {"nqn": contract.subsystem_nqn(uuid), "trtype": "tcp",
                         "traddr": "10.0.2.2", "trsvcid": str(NVMF_PORT), "adrfam": "ipv4",
                         "nsUuid": uuid, "serial": contract.serial_number(uuid),
                         "auth": "dhchap"}
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    assert [h["nqn"] for h in sub["hosts"]] == [contract.host_nqn("node-1")]
    assert sub["allow_any_host"] is False and sub["max_namespaces"] == 1
    sig = contract.publish_signature(mount_cap().SerializeToString(deterministic=True), False)
    assert sub["model_number"] == contract.model_number(contract.host_nqn("node-1"), sig, False)
    assert contract.model_signature(sub["model_number"], contract.host_nqn("node-1")) == sig
    assert [(n["bdev_name"], n["uuid"]) for n in sub["namespaces"]] == [(uuid, uuid)]
    assert [a["traddr"] for a in sub["listen_addresses"]] == ["127.0.0.1"]
    # idempotent
    assert call(s, "ControllerPublishVolume",
                publish_req(vol.volume_id, "node-1")).publish_context == ctx
    # single-node volume on another node
    expect_code(C.FAILED_PRECONDITION, s, "ControllerPublishVolume",
                publish_req(vol.volume_id, "node-2"))
    # incompatible re-publish
    expect_code(C.ALREADY_EXISTS, s, "ControllerPublishVolume",
                publish_req(vol.volume_id, "node-1", readonly=True))
    # still published: delete refused
    msg = expect_code(C.FAILED_PRECONDITION, s, "DeleteVolume",
                      csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert "node-1" in msg
    got = call(s, "ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(
        volume_id=vol.volume_id))
    assert list(got.status.published_node_ids) == ["node-1"]
    assert not got.status.volume_condition.abnormal
    un = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id="node-1")
    call(s, "ControllerUnpublishVolume", un)
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
    call(s, "ControllerUnpublishVolume", un)
    call(s, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=f"{env.t0.name}:00000000-0000-0000-0000-000000000000", node_id="n"))
    call(s, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id="junk", node_id="n"))
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert bdev(env, uuid) is None


def test_publish_to_unknown_node_is_not_found(tmp_path):
    import dataclasses

    env = make_env(tmp_path)
    try:
        env.servicer.config = dataclasses.replace(env.config, nodes=frozenset({"node-1"}))
        vol = create(env)
        msg = expect_code(C.NOT_FOUND, env.servicer, "ControllerPublishVolume",
                          publish_req(vol.volume_id, "ghost"))
        assert "ghost" in msg and "node-1" in msg
        # nothing was exported for the unknown node
        assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid_of(vol.volume_id))) is None
        call(env.servicer, "ControllerPublishVolume", publish_req(vol.volume_id, "node-1"))
    finally:
        env.close()


def test_publish_multi_node_and_readonly(env):
    s = env.servicer
    vol = create(env)
    uuid = uuid_of(vol.volume_id)
    cap = block_cap(Mode.MULTI_NODE_MULTI_WRITER)
    call(s, "ControllerPublishVolume", publish_req(vol.volume_id, "n1", cap))
    call(s, "ControllerPublishVolume", publish_req(vol.volume_id, "n2", cap))
    hosts = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))["hosts"]
    assert sorted(h["nqn"] for h in hosts) == sorted(map(contract.host_nqn, ["n1", "n2"]))
    ro = mount_cap(Mode.MULTI_NODE_READER_ONLY)
    ctx = call(s, "ControllerPublishVolume",
               publish_req(vol.volume_id, "n3", ro, readonly=True)).publish_context
    assert ctx["readonly"] == "true"
    listed = call(s, "ListVolumes", csi_pb2.ListVolumesRequest()).entries
    assert list(listed[0].status.published_node_ids) == ["n1", "n2", "n3"]
    call(s, "ControllerUnpublishVolume",
         csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id="n1"))
    hosts = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))["hosts"]
    assert sorted(h["nqn"] for h in hosts) == sorted(map(contract.host_nqn, ["n2", "n3"]))


@pytest.mark.parametrize("req,code", [
    (csi_pb2.ControllerPublishVolumeRequest(node_id="n", volume_capability=mount_cap()),
     C.INVALID_ARGUMENT),
    (publish_req("target-a:00000000-0000-0000-0000-000000000000", ""), C.INVALID_ARGUMENT),
    (csi_pb2.ControllerPublishVolumeRequest(
        volume_id="target-a:00000000-0000-0000-0000-000000000000", node_id="n"),
     C.INVALID_ARGUMENT),
    (publish_req("target-a:00000000-0000-0000-0000-000000000000", "n"), C.NOT_FOUND),
    (publish_req("not-an-id", "n"), C.NOT_FOUND),
    (publish_req("other:00000000-0000-0000-0000-000000000000", "n"), C.NOT_FOUND),
    (publish_req("target-a:00000000-0000-0000-0000-000000000000", "n",
                 mount_cap(Mode.MULTI_NODE_MULTI_WRITER)), C.INVALID_ARGUMENT),
])
def test_publish_bad_requests(env, req, code):
    expect_code(code, env.servicer, "ControllerPublishVolume", req)


def test_unpublish_requires_volume_id(env):
    expect_code(C.INVALID_ARGUMENT, env.servicer, "ControllerUnpublishVolume",
                csi_pb2.ControllerUnpublishVolumeRequest(node_id="n"))


# --- DeleteVolume -----------------------------------------------------------------------
def test_delete_volume_cases(env):
    s = env.servicer
    for vid in ("", ):
        expect_code(C.INVALID_ARGUMENT, s, "DeleteVolume",
                    csi_pb2.DeleteVolumeRequest(volume_id=vid))
    for vid in ("junk", f"{env.t0.name}:00000000-0000-0000-0000-000000000000",
                "nosuchtarget:00000000-0000-0000-0000-000000000000"):
        call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vid))
    foreign = env.t0.raw.lvol_create(env.t0.lvs, "precious", MiB, thin=True)
    msg = expect_code(C.FAILED_PRECONDITION, s, "DeleteVolume",
                      csi_pb2.DeleteVolumeRequest(volume_id=f"{env.t0.name}:{foreign}"))
    assert "not created by csi-spdk" in msg
    assert bdev(env, foreign) is not None
    vol = create(env)
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=vol.volume_id)).snapshot
    expect_code(C.FAILED_PRECONDITION, s, "DeleteVolume",
                csi_pb2.DeleteVolumeRequest(volume_id=snap.snapshot_id))
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert bdev(env, uuid_of(vol.volume_id)) is None
    # a foreign lvol is also not a volume for the other RPCs
    expect_code(C.NOT_FOUND, s, "ControllerPublishVolume",
                publish_req(f"{env.t0.name}:{foreign}", "n"))


# --- snapshots ------------------------------------------------------------------------------
def test_snapshots(env):
    s = env.servicer
    vol = create(env, "v", 8 * MiB)
    req = csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=vol.volume_id)
    snap = call(s, "CreateSnapshot", req).snapshot
    b = bdev(env, uuid_of(snap.snapshot_id))
    assert b["aliases"] == [f"{env.t0.lvs}/{contract.snapshot_lvol_name('snap-1')}"]
    assert b["driver_specific"]["lvol"]["snapshot"] is True
    assert snap.ready_to_use and snap.size_bytes == 8 * MiB
    assert snap.source_volume_id == vol.volume_id and snap.creation_time.seconds > 0
    again = call(s, "CreateSnapshot", req).snapshot
    assert again == snap
    other = create(env, "w", MiB)
    expect_code(C.ALREADY_EXISTS, s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="snap-1", source_volume_id=other.volume_id))
    expect_code(C.NOT_FOUND, s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="snap-x", source_volume_id=f"{env.t0.name}:00000000-0000-0000-0000-000000000000"))
    expect_code(C.INVALID_ARGUMENT, s, "CreateSnapshot",
                csi_pb2.CreateSnapshotRequest(source_volume_id=vol.volume_id))
    expect_code(C.INVALID_ARGUMENT, s, "CreateSnapshot",
                csi_pb2.CreateSnapshotRequest(name="n"))
    snap2 = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="snap-2", source_volume_id=other.volume_id)).snapshot
    ls = call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries
    assert sorted(e.snapshot.snapshot_id for e in ls) == sorted(
        [snap.snapshot_id, snap2.snapshot_id])
    by_id = call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        snapshot_id=snap2.snapshot_id)).entries
    assert [e.snapshot.snapshot_id for e in by_id] == [snap2.snapshot_id]
    by_src = call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        source_volume_id=vol.volume_id)).entries
    assert [e.snapshot.snapshot_id for e in by_src] == [snap.snapshot_id]
    assert call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(snapshot_id="junk")).entries \
        == []
    page = call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(max_entries=1))
    assert len(page.entries) == 1 and page.next_token
    rest = call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        max_entries=1, starting_token=page.next_token))
    assert len(rest.entries) == 1 and not rest.next_token
    assert rest.entries[0].snapshot.snapshot_id != page.entries[0].snapshot.snapshot_id
    expect_code(C.ABORTED, s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        starting_token="bogus"))
    expect_code(C.INVALID_ARGUMENT, s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        max_entries=-1))
    # delete: simple, then missing
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap2.snapshot_id))
    assert bdev(env, uuid_of(snap2.snapshot_id)) is None
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap2.snapshot_id))
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id="junk"))
    expect_code(C.INVALID_ARGUMENT, s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest())
    expect_code(C.FAILED_PRECONDITION, s, "DeleteSnapshot",
                csi_pb2.DeleteSnapshotRequest(snapshot_id=vol.volume_id))


def test_delete_snapshot_with_clones_is_hidden_then_reclaimed(env):
    s = env.servicer
    vol = create(env, "v", 8 * MiB, params={"thinProvision": "true"})  # stays a clone
    snap = call(s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=vol.volume_id)).snapshot
    c1 = create(env, "c1", 8 * MiB, snapshot=snap.snapshot_id)   # snapshot now has 2 clones
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    uuid = uuid_of(snap.snapshot_id)
    b = bdev(env, uuid)     # SPDK keeps it (2 clones), marked deleted for CSI
    assert b["aliases"] == [f"{env.t0.lvs}/{contract.snapshot_lvol_name('s')}"]
    mark = bdev(env, f"{env.t0.lvs}/{contract.deleted_mark_lvol_name(uuid)}")
    assert mark["driver_specific"]["lvol"]["thin_provision"] is True
    assert mark["driver_specific"]["lvol"]["num_allocated_clusters"] == 0
    assert call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries == []
    assert call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest(
        snapshot_id=snap.snapshot_id)).entries == []
    assert "csid-" not in str(call(s, "ListVolumes", csi_pb2.ListVolumesRequest()))
    # the name stays taken in SPDK until the clones go: a clear refusal
    msg = expect_code(C.FAILED_PRECONDITION, s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=vol.volume_id))
    assert "was deleted" in msg
    call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    # a clone from a hidden snapshot is not possible any more
    expect_code(C.NOT_FOUND, s, "CreateVolume", create_req("c2", MiB,
                                                            snapshot=snap.snapshot_id))
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=c1.volume_id))
    assert bdev(env, uuid) is None                       # reclaimed (merged into v)
    assert bdev(env, mark["uuid"]) is None                # and its marker
    assert bdev(env, uuid_of(vol.volume_id)) is not None
    call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert env.t0.raw.lvols(env.t0.lvs) == []


# --- expansion, listing, validation ------------------------------------------------------------
def test_expand(env):
    s = env.servicer
    vol = create(env, "v", 8 * MiB)
    r = call(s, "ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=20 * MiB),
        volume_capability=mount_cap()))
    assert r.capacity_bytes == 20 * MiB and r.node_expansion_required
    assert bdev(env, uuid_of(vol.volume_id))["num_blocks"] * 4096 == 20 * MiB
    r = call(s, "ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=4 * MiB),
        volume_capability=block_cap()))
    assert r.capacity_bytes == 20 * MiB and not r.node_expansion_required
    expect_code(C.RESOURCE_EXHAUSTED, s, "ControllerExpandVolume",
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vol.volume_id,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=1000 * MiB)))
    expect_code(C.NOT_FOUND, s, "ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id=f"{env.t0.name}:00000000-0000-0000-0000-000000000000",
        capacity_range=csi_pb2.CapacityRange(required_bytes=MiB)))
    expect_code(C.INVALID_ARGUMENT, s, "ControllerExpandVolume",
                csi_pb2.ControllerExpandVolumeRequest(volume_id=vol.volume_id))
    expect_code(C.INVALID_ARGUMENT, s, "ControllerExpandVolume",
                csi_pb2.ControllerExpandVolumeRequest(
                    capacity_range=csi_pb2.CapacityRange(required_bytes=MiB)))


def test_list_volumes_pagination(env):
    s = env.servicer
    ids = sorted(create(env, f"v{i}", MiB).volume_id for i in range(5))
    all_ = call(s, "ListVolumes", csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in all_.entries] == ids and not all_.next_token
    seen, token = [], ""
    while True:
        page = call(s, "ListVolumes", csi_pb2.ListVolumesRequest(max_entries=2,
                                                                 starting_token=token))
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert seen == ids
    expect_code(C.ABORTED, s, "ListVolumes", csi_pb2.ListVolumesRequest(starting_token="x"))
    expect_code(C.INVALID_ARGUMENT, s, "ListVolumes", csi_pb2.ListVolumesRequest(max_entries=-1))


def test_get_volume_and_validate(env):
    s = env.servicer
    vol = create(env)
    got = call(s, "ControllerGetVolume", csi_pb2.ControllerGetVolumeRequest(
        volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == vol.capacity_bytes
    assert list(got.status.published_node_ids) == []
    missing = f"{env.t0.name}:00000000-0000-0000-0000-000000000000"
    expect_code(C.NOT_FOUND, s, "ControllerGetVolume",
                csi_pb2.ControllerGetVolumeRequest(volume_id=missing))
    expect_code(C.INVALID_ARGUMENT, s, "ControllerGetVolume",
                csi_pb2.ControllerGetVolumeRequest())
    V = csi_pb2.ValidateVolumeCapabilitiesRequest
    ok = call(s, "ValidateVolumeCapabilities", V(volume_id=vol.volume_id,
                                                  volume_capabilities=[mount_cap()]))
    assert ok.HasField("confirmed")
    bad = call(s, "ValidateVolumeCapabilities", V(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]))
    assert not bad.HasField("confirmed") and bad.message
    expect_code(C.NOT_FOUND, s, "ValidateVolumeCapabilities",
                V(volume_id=missing, volume_capabilities=[mount_cap()]))
    expect_code(C.INVALID_ARGUMENT, s, "ValidateVolumeCapabilities", V(volume_id=vol.volume_id))
    expect_code(C.INVALID_ARGUMENT, s, "ValidateVolumeCapabilities",
                V(volume_capabilities=[mount_cap()]))


def test_volume_condition_abnormal_when_lvstore_missing(env):
    from csi_spdk.controller.target import Lvol
    cond = env.servicer._condition(env.servicer.targets[env.t0.name],
                                   Lvol("u", "csi-x", "lvs", "gone", 1, False, False, False),
                                   {"other"})
    assert cond.abnormal and "gone" in cond.message


def test_lvstores_not_configured_are_not_the_drivers(env):
    """An lvstore on the same target that the config does not name (another
    cluster's, say) holds lvols with the driver's names: ListVolumes and
    ListSnapshots do not show them, and a CreateVolume of that name makes its
    own volume in a configured lvstore instead of answering with theirs."""
    s = env.servicer
    raw = env.t0.raw
    mine = call(s, "CreateVolume", create_req("mine", 4 * MiB)).volume
    malloc = f"{env.t0.malloc}other"
    raw.malloc_create(malloc, 32 * MiB)
    raw.lvstore_create(malloc, "other-lvs", cluster_sz=MiB)
    theirs = raw.lvol_create("other-lvs", contract.volume_lvol_name("x"), 4 * MiB, True)
    raw.call("bdev_lvol_snapshot", {"lvol_name": theirs,
                                    "snapshot_name": contract.snapshot_lvol_name("y")})
    try:
        listed = call(s, "ListVolumes", csi_pb2.ListVolumesRequest()).entries
        assert [e.volume.volume_id for e in listed] == [mine.volume_id]
        assert call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries == []
        made = call(s, "CreateVolume", create_req("x", 4 * MiB)).volume
        assert uuid_of(made.volume_id) != theirs
        assert raw.bdev_get(uuid_of(made.volume_id))["aliases"] == \
            [f"{env.t0.lvs}/{contract.volume_lvol_name('x')}"]
    finally:
        for lv in raw.lvols("other-lvs"):
            if not lv.get("is_snapshot"):
                raw.lvol_delete(lv["uuid"])
        for lv in raw.lvols("other-lvs"):
            raw.lvol_delete(lv["uuid"])
        raw.call("bdev_lvol_delete_lvstore", {"lvs_name": "other-lvs"})
        raw.call("bdev_malloc_delete", {"name": malloc})


def test_a_clone_is_not_answered_with_a_same_named_volume_of_another_target(tmp_path):
    """Two targets whose lvstores have the same name. A thick volume "c"
    exists on the second; CreateVolume "c" as a thick clone of a volume on the
    first is ALREADY_EXISTS (another content source), never that volume, and
    takes no snapshot of the source."""
    env = make_env(tmp_path, n_targets=2)
    try:
        a, b = env.targets
        assert env.targets[a].lvs == env.targets[b].lvs
        s = env.servicer
        thick = {"thinProvision": "false"}
        src = call(s, "CreateVolume", create_req("src", 4 * MiB, params={**thick,
                                                                         "target": a})).volume
        call(s, "CreateVolume", create_req("c", 4 * MiB, params={**thick, "target": b}))
        expect_code(grpc.StatusCode.ALREADY_EXISTS, s, "CreateVolume", create_req(
            "c", 4 * MiB, volume=src.volume_id, params=thick))
        assert sorted(lv["name"] for lv in env.targets[a].raw.lvols(env.targets[a].lvs)) == \
            [contract.volume_lvol_name("src")]
    finally:
        env.close()


def test_content_source_on_a_target_that_is_not_configured_is_not_found(env):
    """A snapshot or volume id naming a target this controller does not
    have: NOT_FOUND that says which kind of source and which target."""
    s = env.servicer
    uuid = "0f0e0d0c-0b0a-4909-8807-060504030201"
    for kind, source in (("snapshot", {"snapshot": f"elsewhere:{uuid}"}),
                         ("volume", {"volume": f"elsewhere:{uuid}"})):
        msg = expect_code(grpc.StatusCode.NOT_FOUND, s, "CreateVolume",
                          create_req("c", 4 * MiB, **source))
        assert msg.startswith(f"{kind} elsewhere:{uuid} does not exist") and \
            "'elsewhere'" in msg
    assert env.t0.raw.lvols(env.t0.lvs) == []
