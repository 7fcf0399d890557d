"""Capacity never lies: what GetCapacity promises, a write can use.

Every promise is checked with the simulator's write path (``SimServer.write``,
which allocates clusters like SPDK's blobstore and fails with ENOSPC when
none is free), so "admitted" is proven by writing every byte of every
admitted volume. Huge sizes (up to 2^63-1) must be refused before any SPDK
mutation. Simulator only: a real target has no host-side write hook here.
"""

from __future__ import annotations

import grpc
import pytest
from controller_fixtures import (
    REAL_RPC,
    MiB,
    call,
    create_req,
    expect_code,
    make_env,
    uuid_of,
)

from csi_spdk import contract
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
THIN = {"thinProvision": "true"}
THICK = {"thinProvision": "false"}
HUGE = 2**63 - 1
pytestmark = pytest.mark.skipif(bool(REAL_RPC), reason="needs the simulator's write path")


@pytest.fixture
def env1(tmp_path):
    """One 64 MiB lvstore (1 MiB clusters) at thinOvercommitRatio 1.0."""
    e = make_env(tmp_path, lvs_mib=64, ratio=1.0)
    yield e
    e.close()


def fill(env, volume_id: str, size: int, byte: int = 0xAB) -> None:
    """Write every byte of a volume (raises the simulator's ENOSPC error)."""
    chunk = bytes([byte]) * MiB
    for off in range(0, size, MiB):
        env.t0.server.write(uuid_of(volume_id), off, chunk)


def capacity(env, params=None) -> tuple[int, int]:
    cap = call(env.servicer, "GetCapacity", csi_pb2.GetCapacityRequest(parameters=params or {}))
    return cap.available_capacity, cap.maximum_volume_size.value


def snapshot(env, name: str, source: str):
    return call(env.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=source)).snapshot


def lvol_names(env) -> list[str]:
    return sorted(lv["name"] for lv in env.t0.raw.lvols(env.t0.lvs))


def lvs(env) -> dict:
    return env.t0.raw.lvstores(env.t0.lvs)[0]


def no_mutations(env, monkeypatch) -> list[str]:
    """Fail any mutating SPDK call the controller makes from now on."""
    seen: list[str] = []
    real = env.t0.api.call

    def guarded(method, params=None, timeout=None, **kw):
        if method.startswith(("bdev_lvol_create", "bdev_lvol_resize", "bdev_lvol_snapshot",
                              "bdev_lvol_clone", "bdev_lvol_inflate")):
            seen.append(method)
            raise AssertionError(f"{method} called for a request that cannot be met")
        return real(method, params, timeout, **kw)

    monkeypatch.setattr(env.t0.api, "call", guarded)
    return seen


def test_thick_volume_stays_thick_after_snapshot(env1):
    """SPDK turns a thick lvol thin at its first snapshot; the controller makes
    it own its clusters again, so filling what GetCapacity still offers never
    takes the space the thick volume was promised."""
    s = env1.servicer
    vol = call(s, "CreateVolume", create_req("thick", 16 * MiB)).volume
    fill(env1, vol.volume_id, 16 * MiB)
    snap = snapshot(env1, "s", vol.volume_id)
    b = env1.t0.raw.bdev_get(uuid_of(vol.volume_id))["driver_specific"]["lvol"]
    assert b["thin_provision"] is False and b["num_allocated_clusters"] == 16
    snap_lv = env1.t0.raw.bdev_get(uuid_of(snap.snapshot_id))["driver_specific"]["lvol"]
    assert snap_lv["num_allocated_clusters"] == 16
    avail, largest = capacity(env1)
    assert avail == lvs(env1)["free_clusters"] * MiB == largest
    other = call(s, "CreateVolume", create_req("other", largest)).volume
    fill(env1, other.volume_id, largest)
    fill(env1, vol.volume_id, 16 * MiB, 0xCD)          # the thick volume can rewrite all
    assert env1.t0.server.read(uuid_of(vol.volume_id), 0, 4) == b"\xcd" * 4
    assert env1.t0.server.read(uuid_of(snap.snapshot_id), 0, 4) == b"\xab" * 4
    assert capacity(env1) == (0, 0)
    expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req("x", MiB))


def test_thin_promise_at_ratio_one_counts_snapshot_clusters(env1):
    s = env1.servicer
    a = call(s, "CreateVolume", create_req("a", 16 * MiB, params=THIN)).volume
    fill(env1, a.volume_id, 16 * MiB)
    snapshot(env1, "s", a.volume_id)
    total = lvs(env1)["total_data_clusters"] * MiB
    avail, largest = capacity(env1, THIN)
    assert avail == total - 16 * MiB - 16 * MiB == largest   # the volume + the snapshot
    b = call(s, "CreateVolume", create_req("b", largest, params=THIN)).volume
    fill(env1, b.volume_id, largest)
    fill(env1, a.volume_id, 16 * MiB, 0x11)                  # every promise holds at once
    assert capacity(env1, THIN)[0] == 0
    expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req("c", MiB, params=THIN))


def test_snapshot_of_thick_volume_refused_when_its_guarantee_cannot_be_kept(env1):
    s = env1.servicer
    vol = call(s, "CreateVolume", create_req("big", 40 * MiB)).volume
    before = lvol_names(env1)
    msg = expect_code(C.RESOURCE_EXHAUSTED, s, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=vol.volume_id))
    assert "stay thick" in msg
    assert lvol_names(env1) == before
    b = env1.t0.raw.bdev_get(uuid_of(vol.volume_id))["driver_specific"]["lvol"]
    assert b["thin_provision"] is False and b["num_allocated_clusters"] == 40


def test_clones_respect_the_overcommit_ratio(env1):
    """Four 12 MiB clones of a written 12 MiB thin volume on a ~60 MiB pool
    at ratio 1.0: only what every clone can fully rewrite is admitted."""
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 12 * MiB, params=THIN)).volume
    fill(env1, src.volume_id, 12 * MiB)
    snap = snapshot(env1, "s", src.volume_id)
    total = lvs(env1)["total_data_clusters"] * MiB
    room = total - 24 * MiB
    admitted = []
    for i in range(4):
        req = create_req(f"clone{i}", 12 * MiB, snapshot=snap.snapshot_id, params=THIN)
        if room < 12 * MiB:
            before = lvol_names(env1)
            expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", req)
            assert lvol_names(env1) == before
            continue
        admitted.append(call(s, "CreateVolume", req).volume)
        room -= 12 * MiB
    assert len(admitted) == (total - 24 * MiB) // (12 * MiB) < 4
    for v in [src, *admitted]:
        fill(env1, v.volume_id, 12 * MiB, 0x22)


def test_clone_from_volume_counts_its_hidden_snapshot(env1):
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 10 * MiB, params=THIN)).volume
    fill(env1, src.volume_id, 10 * MiB)
    call(s, "CreateVolume", create_req("c", 10 * MiB, volume=src.volume_id, params=THIN))
    total = lvs(env1)["total_data_clusters"] * MiB
    # src + csic snapshot (10 MiB of clusters) + the clone
    assert capacity(env1, THIN)[0] == total - 30 * MiB


@pytest.mark.parametrize("kind", ["snapshot", "volume"])
def test_thick_clone_owns_its_clusters(env1, kind):
    """thinProvision: "false" on a clone is honoured: the clone is inflated,
    owns every cluster (a full rewrite cannot hit ENOSPC), holds the source's
    data, and no hidden snapshot stays behind for a clone of a volume."""
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB)).volume
    fill(env1, src.volume_id, 8 * MiB, 0x5C)
    source = {"volume": src.volume_id}
    if kind == "snapshot":
        source = {"snapshot": snapshot(env1, "s", src.volume_id).snapshot_id}
    clone = call(s, "CreateVolume", create_req(
        "c", 12 * MiB, params={"thinProvision": "false"}, **source)).volume
    assert clone.volume_context[contract.VC_THIN] == "false"
    lv = env1.t0.raw.bdev_get(uuid_of(clone.volume_id))["driver_specific"]["lvol"]
    assert lv["thin_provision"] is False and "base_snapshot" not in lv
    assert lv["num_allocated_clusters"] == 12
    data = env1.t0.server.read(uuid_of(clone.volume_id), 0, 8 * MiB)
    assert data == bytes([0x5C]) * (8 * MiB)
    assert env1.t0.server.read(uuid_of(clone.volume_id), 8 * MiB, 4 * MiB) == \
        bytes(4 * MiB)                                       # the grown part reads zeros
    if kind == "volume":        # the csic- snapshot merged back into the source
        assert lvol_names(env1) == sorted([contract.volume_lvol_name("src"),
                                           contract.volume_lvol_name("c")])
    again = call(s, "CreateVolume", create_req(          # a retry answers the same volume
        "c", 12 * MiB, params={"thinProvision": "false"}, **source)).volume
    assert again.volume_id == clone.volume_id
    if kind == "volume":        # and takes no new csic- snapshot of the source
        assert lvol_names(env1) == sorted([contract.volume_lvol_name("src"),
                                           contract.volume_lvol_name("c")])
    fill(env1, clone.volume_id, 12 * MiB, 0x11)
    fill(env1, src.volume_id, 8 * MiB, 0x22)             # and the source still can


def test_thick_clone_needs_its_size_free(tmp_path):
    """At ratio 2.0, a thick clone one cluster larger than the free clusters is
    RESOURCE_EXHAUSTED (naming thick space) and creates nothing; the same
    clone thin fits the overcommit and is admitted."""
    env = make_env(tmp_path, lvs_mib=64, ratio=2.0)
    try:
        s = env.servicer
        src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
        snap = snapshot(env, "s", src.volume_id)
        big = lvs(env)["free_clusters"] * MiB + MiB
        before = lvol_names(env)
        msg = expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req(
            "c", big, snapshot=snap.snapshot_id, params={"thinProvision": "false"}))
        assert "thick (allocated) space" in msg
        assert lvol_names(env) == before
        clone = call(s, "CreateVolume", create_req("c", big, snapshot=snap.snapshot_id,
                                                    params=THIN)).volume
        assert clone.volume_context[contract.VC_THIN] == "true"
    finally:
        env.close()


def test_expand_thick_needs_free_space(env1, monkeypatch):
    s = env1.servicer
    vol = call(s, "CreateVolume", create_req("v", 8 * MiB)).volume
    call(s, "CreateVolume", create_req("w", 40 * MiB))
    no_mutations(env1, monkeypatch)
    for size in (32 * MiB, HUGE):
        msg = expect_code(C.RESOURCE_EXHAUSTED, s, "ControllerExpandVolume",
                          csi_pb2.ControllerExpandVolumeRequest(
                              volume_id=vol.volume_id,
                              capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
        assert "thick" in msg
    monkeypatch.undo()
    assert env1.t0.raw.bdev_get(uuid_of(vol.volume_id))["num_blocks"] * 4096 == 8 * MiB
    free = lvs(env1)["free_clusters"] * MiB
    grown = call(s, "ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB + free)))
    assert grown.capacity_bytes == 8 * MiB + free
    fill(env1, vol.volume_id, grown.capacity_bytes)


@pytest.mark.parametrize("params", [{}, THIN])
def test_huge_sizes_are_refused_before_any_spdk_mutation(env1, monkeypatch, params):
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    snap = snapshot(env1, "s", src.volume_id)
    thin_vol = call(s, "CreateVolume", create_req("t", 8 * MiB, params=THIN)).volume
    seen = no_mutations(env1, monkeypatch)
    for size in (HUGE, 2**62, 1 << 50):
        expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req("h", size, params=params))
        expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume",
                    create_req("hc", size, snapshot=snap.snapshot_id))
        expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume",
                    create_req("hv", size, volume=src.volume_id))
        expect_code(C.RESOURCE_EXHAUSTED, s, "ControllerExpandVolume",
                    csi_pb2.ControllerExpandVolumeRequest(
                        volume_id=thin_vol.volume_id,
                        capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    expect_code(C.OUT_OF_RANGE, s, "CreateVolume",
                create_req("h", HUGE, limit=HUGE - 1, params=params))
    assert seen == []


def test_clone_range_that_cannot_be_met_creates_nothing(env1, monkeypatch):
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    snap = snapshot(env1, "s", src.volume_id)
    seen = no_mutations(env1, monkeypatch)
    odd = 10 * MiB + 1       # whole clusters (1 MiB) cannot be 10 MiB + 1 byte
    for source in ({"snapshot": snap.snapshot_id}, {"volume": src.volume_id}):
        msg = expect_code(C.OUT_OF_RANGE, s, "CreateVolume",
                          create_req("c", odd, limit=odd, params=THIN, **source))
        assert "limit_bytes" in msg
        expect_code(C.OUT_OF_RANGE, s, "CreateVolume",
                    create_req("c", 0, limit=4 * MiB, params=THIN, **source))
    assert seen == []


# --- kept figures (issue #12): no request waits on a scan, none admits wrongly ----------
def test_stale_cache_never_admits_a_volume_spdk_would_refuse(tmp_path):
    """Writes into a thin volume take free clusters the controller does not
    see: its kept free count is stale (too high). A thick volume above the
    real room must still be refused, with nothing created, and one within
    it created and fully writable."""
    env = make_env(tmp_path, lvs_mib=64, ratio=2.0)
    try:
        thin = call(env.servicer, "CreateVolume",
                    create_req("thin", 48 * MiB, params=THIN)).volume
        target = env.servicer.targets[env.t0.name]
        kept_free = target.cached_lvstores()[0]["free_clusters"]
        fill(env, thin.volume_id, 40 * MiB)
        real_free = env.t0.raw.lvstores(env.t0.lvs)[0]["free_clusters"]
        assert target.cached_lvstores()[0]["free_clusters"] == kept_free > real_free + 32
        msg = expect_code(C.RESOURCE_EXHAUSTED, env.servicer, "CreateVolume",
                          create_req("thick", 32 * MiB))
        assert "ran out of space" in msg or "room" in msg
        assert env.t0.raw.bdev_get(f"{env.t0.lvs}/{contract.volume_lvol_name('thick')}") is None
        # the refusal re-read the lvstore: the kept count is SPDK's again
        assert target.cached_lvstores()[0]["free_clusters"] == real_free
        ok = call(env.servicer, "CreateVolume", create_req("fits", 16 * MiB)).volume
        fill(env, ok.volume_id, 16 * MiB)     # every admitted byte is writable
    finally:
        env.close()


def test_request_path_never_scans(tmp_path, monkeypatch):
    """With the kept figures always stale, CreateVolume (thin and thick),
    publish, unpublish and delete still make no bdev_get_bdevs scan on the
    calling thread: the refresh runs in the background."""
    import threading

    env = make_env(tmp_path, lvs_mib=256, ratio=2.0, agent=False)
    try:
        call(env.servicer, "CreateVolume", create_req("warm", 8 * MiB, params=THIN))
        target = env.servicer.targets[env.t0.name]
        api = target.api
        scans: list[str] = []
        real_bdevs = api.bdevs

        def counting_bdevs(**kw):
            scans.append(threading.current_thread().name)
            return real_bdevs(**kw)
        monkeypatch.setattr(api, "bdevs", counting_bdevs)
        main = threading.current_thread().name
        for i in range(6):
            with target._prov_lock:   # every kept figure as old as can be
                target._prov = {k: (0.0, b, c) for k, (_, b, c) in target._prov.items()}
            params = THIN if i % 2 else {"thinProvision": "false"}
            vol = call(env.servicer, "CreateVolume", create_req(f"v{i}", 8 * MiB,
                                                                params=params)).volume
            call(env.servicer, "ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vol.volume_id, node_id="n1", volume_capability=csi_pb2.VolumeCapability(
                    block=csi_pb2.VolumeCapability.BlockVolume(),
                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1)),
                volume_context={"auth": "none"}))
            call(env.servicer, "ControllerUnpublishVolume",
                 csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id="n1"))
            call(env.servicer, "DeleteVolume",
                 csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
            assert env.t0.raw.bdev_get(uuid_of(vol.volume_id)) is None
        assert main not in scans
        assert scans   # the background refresh did run
    finally:
        env.close()


def test_kept_provisioned_counts_own_creates_without_a_rescan(tmp_path, monkeypatch):
    """Thin admission from kept figures: the driver's own creates are counted
    at once, so two creates that together exceed the ratio cannot both pass
    even when no rescan runs in between."""
    env = make_env(tmp_path, lvs_mib=64, ratio=2.0, agent=False)
    try:
        call(env.servicer, "CreateVolume", create_req("a", 80 * MiB, params=THIN))
        target = env.servicer.targets[env.t0.name]
        monkeypatch.setattr(target, "_scan_provisioned", lambda: None)  # no rescan at all
        expect_code(C.RESOURCE_EXHAUSTED, env.servicer, "CreateVolume",
                    create_req("b", 64 * MiB, params=THIN))        # 80 + 64 > 2 x 64
        assert env.t0.raw.bdev_get(f"{env.t0.lvs}/{contract.volume_lvol_name('b')}") is None
        call(env.servicer, "CreateVolume", create_req("c", 40 * MiB, params=THIN))  # 120
    finally:
        env.close()


def test_over_counted_snapshot_never_refuses_what_fits(env1, monkeypatch):
    """A new snapshot is counted at its source's full size until the rescan
    (an upper bound of what it holds): a create that fits SPDK's real figures
    is still admitted, because a refusal is decided on fresh ones."""
    src = call(env1.servicer, "CreateVolume", create_req("src", 16 * MiB, params=THIN)).volume
    fill(env1, src.volume_id, 4 * MiB)
    target = env1.servicer.targets[env1.t0.name]
    monkeypatch.setattr(target, "_kick_refresh", lambda: None)   # no rescan in between
    call(env1.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=src.volume_id))
    lvs = env1.t0.raw.lvstores(env1.t0.lvs)[0]
    total = int(lvs["total_data_clusters"]) * MiB
    kept = target.provisioned(lvs)                 # 16 (volume) + 16 (snapshot, bound)
    real = 16 * MiB + 4 * MiB                      # the snapshot holds 4 clusters
    assert kept >= 32 * MiB
    size = (total - real) // MiB * MiB             # fits only on the real figures
    assert size > total - kept
    vol = call(env1.servicer, "CreateVolume", create_req("big", size)).volume
    assert env1.t0.raw.bdev_get(uuid_of(vol.volume_id)) is not None


def test_a_delete_gives_its_size_back_to_the_kept_figures(tmp_path, monkeypatch):
    """The driver's own DeleteVolume takes the volume's size off the kept
    provisioned bytes at once: with no rescan in between, the kept figure is
    what SPDK holds, and a create that fits only because of the delete is
    admitted from it (no scan on the request path)."""
    env = make_env(tmp_path, lvs_mib=64, ratio=2.0, agent=False)
    try:
        a = call(env.servicer, "CreateVolume", create_req("a", 80 * MiB, params=THIN)).volume
        call(env.servicer, "CreateVolume", create_req("b", 16 * MiB, params=THIN))
        target = env.servicer.targets[env.t0.name]
        monkeypatch.setattr(target, "_kick_refresh", lambda: None)   # no rescan in between
        call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=a.volume_id))
        assert env.t0.raw.bdev_get(uuid_of(a.volume_id)) is None
        assert target.provisioned(lvs(env)) == 16 * MiB
        scans: list[int] = []
        real_bdevs = target.api.bdevs
        monkeypatch.setattr(target.api, "bdevs", lambda **kw: scans.append(1) or real_bdevs(**kw))
        c = call(env.servicer, "CreateVolume", create_req("c", 100 * MiB, params=THIN)).volume
        assert scans == []                     # 16 + 100 <= 2 x 64 on the kept figures
        b = env.t0.raw.bdev_get(uuid_of(c.volume_id))
        assert b["num_blocks"] * b["block_size"] == 100 * MiB
        assert target.provisioned(lvs(env), max_age=0) == 116 * MiB   # a fresh scan agrees
    finally:
        env.close()


def test_clone_from_volume_needs_room_for_its_snapshot(env1):
    """A clone of a written thin volume takes a csic- snapshot that holds the
    source's clusters: at ratio 1.0 the clone is admitted only when its size
    plus those clusters fit, else RESOURCE_EXHAUSTED with nothing created;
    what is admitted can be fully rewritten."""
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    fill(env1, src.volume_id, 8 * MiB)
    total = lvs(env1)["total_data_clusters"] * MiB
    before = lvol_names(env1)
    # src (8) + the snapshot's 8 + the clone: one cluster too many
    expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req(
        "c", total - 15 * MiB, volume=src.volume_id, params=THIN))
    assert lvol_names(env1) == before
    clone = call(s, "CreateVolume", create_req("c", total - 16 * MiB, volume=src.volume_id,
                                               params=THIN)).volume
    assert clone.capacity_bytes == total - 16 * MiB
    fill(env1, clone.volume_id, total - 16 * MiB, 0x11)
    fill(env1, src.volume_id, 8 * MiB, 0x22)


def test_clone_from_a_thick_volume_needs_room_to_keep_it_thick(tmp_path):
    """The csic- snapshot takes a thick source's clusters and the source is
    inflated back so it stays thick: a clone of it needs the source's size in
    free clusters (RESOURCE_EXHAUSTED with nothing created when they are not
    there), and once they are, the source owns all its clusters again."""
    env = make_env(tmp_path, lvs_mib=64, ratio=2.0)
    try:
        s = env.servicer
        thick = {"thinProvision": "false"}
        src = call(s, "CreateVolume", create_req("src", 16 * MiB, params=thick)).volume
        filler = call(s, "CreateVolume", create_req(
            "filler", (lvs(env)["free_clusters"] - 8) * MiB, params=thick)).volume
        before = lvol_names(env)
        msg = expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req(
            "c", 16 * MiB, volume=src.volume_id, params=THIN))
        assert "thick (allocated) space" in msg
        assert lvol_names(env) == before
        call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=filler.volume_id))
        # room for the source but not also for a thick clone of it (16 + 16)
        call(s, "CreateVolume", create_req(
            "filler", (lvs(env)["free_clusters"] - 24) * MiB, params=thick))
        msg = expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req(
            "t", 16 * MiB, volume=src.volume_id, params=thick))
        assert "thick (allocated) space" in msg
        assert lvol_names(env) == before
        call(s, "CreateVolume", create_req("c", 16 * MiB, volume=src.volume_id, params=THIN))
        lv = env.t0.raw.bdev_get(uuid_of(src.volume_id))["driver_specific"]["lvol"]
        assert lv["thin_provision"] is False and lv["num_allocated_clusters"] == 16
    finally:
        env.close()


def test_clone_from_volume_counts_its_snapshot_before_the_rescan(env1, monkeypatch):
    """Until the rescan, the csic- snapshot a clone from a volume takes is
    counted at its source's size (an upper bound of what it holds): a thin
    create that fits only if that snapshot held nothing is refused, never
    admitted on an under-count."""
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    fill(env1, src.volume_id, 8 * MiB)
    target = s.targets[env1.t0.name]
    monkeypatch.setattr(target, "_kick_refresh", lambda: None)   # no rescan in between
    call(s, "CreateVolume", create_req("c", 8 * MiB, volume=src.volume_id, params=THIN))
    total = lvs(env1)["total_data_clusters"] * MiB
    assert target.provisioned(lvs(env1)) >= 24 * MiB      # src + the snapshot's 8 + clone
    before = lvol_names(env1)
    expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req(
        "x", total - 23 * MiB, params=THIN))
    assert lvol_names(env1) == before


def test_clone_retry_after_the_snapshot_of_a_thick_source_needs_room_to_reinflate(tmp_path):
    """A crash right after the csic- snapshot of a thick source, before the
    source was inflated back, leaves the source a thin clone of that snapshot:
    the retry still needs the source's size in free clusters to make it thick
    again (RESOURCE_EXHAUSTED with nothing created without them), and with
    them it finishes: the source owns all its clusters again."""
    env = make_env(tmp_path, lvs_mib=64, ratio=2.0)
    try:
        s = env.servicer
        thick = {"thinProvision": "false"}
        src = call(s, "CreateVolume", create_req("src", 16 * MiB, params=thick)).volume
        env.t0.raw.call("bdev_lvol_snapshot", {           # what the crash left
            "lvol_name": uuid_of(src.volume_id),
            "snapshot_name": contract.clone_source_lvol_name("c")})
        filler = call(s, "CreateVolume", create_req(
            "filler", (lvs(env)["free_clusters"] - 8) * MiB, params=thick)).volume
        before = lvol_names(env)
        msg = expect_code(C.RESOURCE_EXHAUSTED, s, "CreateVolume", create_req(
            "c", 16 * MiB, volume=src.volume_id, params=THIN))
        assert "thick (allocated) space" in msg      # the driver's check, before SPDK's
        assert lvol_names(env) == before
        call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=filler.volume_id))
        call(s, "CreateVolume", create_req("c", 16 * MiB, volume=src.volume_id, params=THIN))
        lv = env.t0.raw.bdev_get(uuid_of(src.volume_id))["driver_specific"]["lvol"]
        assert lv["thin_provision"] is False and lv["num_allocated_clusters"] == 16
    finally:
        env.close()


def test_thick_clone_of_a_thin_volume_retried_answers_the_same_volume(env1):
    """A thick clone of a thin volume is inflated and its csic- snapshot
    merged back into the source: a retry (no snapshot left to look at)
    answers the same volume and leaves nothing behind."""
    s = env1.servicer
    src = call(s, "CreateVolume", create_req("src", 8 * MiB, params=THIN)).volume
    request = create_req("c", 8 * MiB, volume=src.volume_id, params={"thinProvision": "false"})
    clone = call(s, "CreateVolume", request).volume
    assert lvol_names(env1) == sorted([contract.volume_lvol_name("src"),
                                       contract.volume_lvol_name("c")])
    assert call(s, "CreateVolume", request).volume.volume_id == clone.volume_id
    assert lvol_names(env1) == sorted([contract.volume_lvol_name("src"),
                                       contract.volume_lvol_name("c")])
    lv = env1.t0.raw.bdev_get(uuid_of(clone.volume_id))["driver_specific"]["lvol"]
    assert lv["thin_provision"] is False and lv["num_allocated_clusters"] == 8


def _truth(env, ratio: float) -> tuple[int, int]:
    """(thin room, thick room) from SPDK itself, with a full scan: the
    lvstore's total x ratio less every volume's size and the clusters
    snapshots and markers hold; free clusters (and at ratio <= 1 the thin
    promises too) for thick."""
    lvs = env.t0.raw.lvstores(env.t0.lvs)[0]
    cluster = int(lvs["cluster_size"])
    total = int(lvs["total_data_clusters"]) * cluster
    free = int(lvs["free_clusters"]) * cluster
    provisioned = 0
    for b in env.t0.raw.bdevs():
        lv = (b.get("driver_specific") or {}).get("lvol")
        if lv is None or not b["aliases"][0].startswith(f"{env.t0.lvs}/"):
            continue
        name = b["aliases"][0].split("/", 1)[1]
        if lv.get("snapshot") or name.startswith(contract.MARKER_PREFIXES):
            provisioned += int(lv["num_allocated_clusters"]) * cluster
        else:
            provisioned += int(b["num_blocks"]) * int(b["block_size"])
    thin = max(0, int(total * ratio) - provisioned)
    thick = max(0, min(free, total - provisioned)) if ratio <= 1.0 else free
    return thin, thick


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_kept_figures_never_report_more_room_than_spdk_has(tmp_path, monkeypatch, ratio):
    """Capacity never lies, from kept figures (issue #12: GetCapacity makes
    no scan). After every step of creates (thin, thick), writes, deletes,
    snapshots and clones, GetCapacity's thin and thick room is at most what
    a full scan of SPDK gives; an lvol made behind the controller's back
    takes thick room at once (free clusters are read fresh) and its size
    counts from the next rescan, which makes the figures SPDK's again; and
    no GetCapacity lists the bdevs on its thread."""
    import threading

    env = make_env(tmp_path, lvs_mib=64, ratio=ratio, agent=False)
    try:
        s = env.servicer
        target = s.targets[env.t0.name]
        scans: list[str] = []
        real_bdevs = target.api.bdevs

        def counting(**kw):
            scans.append(threading.current_thread().name)
            return real_bdevs(**kw)
        monkeypatch.setattr(target.api, "bdevs", counting)

        def check(step: str, exact: bool = False) -> None:
            thin, thick = capacity(env, THIN)[0], capacity(env, THICK)[0]
            want_thin, want_thick = _truth(env, ratio)
            assert thin <= want_thin and thick <= want_thick, (step, thin, want_thin,
                                                                thick, want_thick)
            if exact:
                assert (thin, thick) == (want_thin, want_thick), step
        main = threading.current_thread().name
        call(s, "CreateVolume", create_req("warm", 4 * MiB, params=THIN))
        scans.clear()
        check("start", exact=True)
        a = call(s, "CreateVolume", create_req("a", 12 * MiB, params=THIN)).volume
        check("thin create")
        b = call(s, "CreateVolume", create_req("b", 8 * MiB)).volume
        check("thick create")
        fill(env, a.volume_id, 6 * MiB)
        check("writes into the thin volume")
        snap = snapshot(env, "sa", a.volume_id)
        check("snapshot of the thin volume")
        snapshot(env, "sb", b.volume_id)
        check("snapshot of the thick volume (inflated back)")
        clone = call(s, "CreateVolume", create_req(
            "c", 12 * MiB, params=THIN, snapshot=snap.snapshot_id)).volume
        check("clone")
        call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=a.volume_id))
        check("delete of the snapshot's source")
        call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=clone.volume_id))
        check("delete of the clone")
        assert main not in scans
        # behind the controller's back: a thin and a thick lvol
        env.t0.raw.lvol_create(env.t0.lvs, "oob-thin", 16 * MiB, True)
        env.t0.raw.lvol_create(env.t0.lvs, "oob-thick", 6 * MiB, False)
        # SPDK's free clusters are read fresh: never more thick room than them
        # (the thin promises of the out-of-band lvol count from the rescan)
        free = env.t0.raw.lvstores(env.t0.lvs)[0]["free_clusters"] * MiB
        assert capacity(env, THICK)[0] <= free
        assert main not in scans
        target.rescan()
        check("rescan after the out-of-band lvols", exact=True)
    finally:
        env.close()


def test_stale_cache_never_admits_a_thick_volume_after_an_out_of_band_lvol(tmp_path):
    """An lvol made behind the controller's back took free clusters it
    does not know of: a thick CreateVolume beyond SPDK's real room is
    RESOURCE_EXHAUSTED with nothing created (SPDK refuses it, and the
    refusal re-reads the lvstore), one within it is made and writable."""
    env = make_env(tmp_path, lvs_mib=64, ratio=1.0)
    try:
        call(env.servicer, "CreateVolume", create_req("warm", 4 * MiB))
        target = env.servicer.targets[env.t0.name]
        kept_free = target.cached_lvstores()[0]["free_clusters"]
        env.t0.raw.lvol_create(env.t0.lvs, "oob", 40 * MiB, False)
        real_free = env.t0.raw.lvstores(env.t0.lvs)[0]["free_clusters"]
        assert kept_free >= real_free + 40
        expect_code(C.RESOURCE_EXHAUSTED, env.servicer, "CreateVolume",
                    create_req("big", (real_free + 4) * MiB))
        assert env.t0.raw.bdev_get(f"{env.t0.lvs}/{contract.volume_lvol_name('big')}") is None
        assert capacity(env, THICK)[0] <= real_free * MiB
        ok = call(env.servicer, "CreateVolume", create_req("fits", (real_free - 2) * MiB)).volume
        fill(env, ok.volume_id, (real_free - 2) * MiB)
    finally:
        env.close()
