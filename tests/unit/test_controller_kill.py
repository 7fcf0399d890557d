"""Crash safety for real: the controller runs as a process
(``python3 -m csi_spdk controller``) against a simulator process, is SIGKILLed
at an SPDK call boundary (``CSI_SPDK_CRASH_AT=<method>:<nth>:<before|after>``:
before the call is sent, or after SPDK applied it and replied), and a fresh
controller process gets the same CSI call again over gRPC. Every case asserts
that the kill point was reached (the hook's marker file), that the caller saw
UNAVAILABLE (a crash is transient, never a final INTERNAL), that the retry
converges to the state the call asks for, and that tearing everything down
through CSI leaves zero lvols, subsystems and hosts.

Setup and teardown use the same controller code in-process (state lives in
SPDK only); the crashing call and its retry go through real processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from controller_fixtures import REAL_RPC, MiB, block_cap, call, create_req, publish_req

from csi_spdk import contract
from csi_spdk.childclock import ChildClock
from csi_spdk.controller import config as cfgmod
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.dev import write_dev_secrets
from csi_spdk.proto import csi_pb2, csi_pb2_grpc
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import CRASH_ENV, CRASH_MARKER_ENV, SpdkClient

ROOT = Path(__file__).resolve().parents[2]
C = grpc.StatusCode
THIN = {"thinProvision": "true"}
MNMW = csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
pytestmark = pytest.mark.skipif(bool(REAL_RPC), reason="starts its own simulator process")
# No gRPC deadline on the calls under test: what a case asserts is the code the
# caller sees when the controller dies (UNAVAILABLE) and the state the retry
# converges to; a deadline only adds DEADLINE_EXCEEDED when a loaded machine is
# slow (a publish is ~15 SPDK calls through two starved processes). The
# test's own timeout bounds a hang.
CALL_DEADLINE = None


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "csi_spdk", *args], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=full)


def _wait_socket(path: Path, proc: subprocess.Popen, what: str) -> None:
    """Until the Unix socket accepts a connection (it exists before listen()):
    60 s of the process's own time (``ChildClock``: not the time a loaded
    machine keeps it, or this test, waiting for a CPU)."""
    clock = ChildClock(proc.pid, also=[os.getpid()])
    while True:
        if proc.poll() is not None or clock.elapsed() > 60:
            raise AssertionError(f"{what} did not start (exit {proc.poll()})")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)


@dataclass
class Rig:
    tmp: Path
    sim: subprocess.Popen
    raw: SpdkApi
    config: Path
    servicer: ControllerServicer        # in-process, for setup and teardown
    procs: list = field(default_factory=list)
    n: int = 0

    def controller(self, crash: str = "") -> tuple[subprocess.Popen, object]:
        self.n += 1
        sock = self.tmp / f"csi{self.n}.sock"
        env = {CRASH_ENV: crash, CRASH_MARKER_ENV: str(self.marker)} if crash else {}
        proc = _start(["controller", "--endpoint", f"unix://{sock}", "--config",
                       str(self.config), "--log-level", "warning"], self.tmp / "ctl.log", env)
        self.procs.append(proc)
        _wait_socket(sock, proc, "controller")
        channel = grpc.insecure_channel(f"unix://{sock}")
        # the socket accepts: the server is listening; its handshake takes
        # what the machine gives it (the test's timeout bounds a hang)
        grpc.channel_ready_future(channel).result()
        return proc, csi_pb2_grpc.ControllerStub(channel)

    @property
    def marker(self) -> Path:
        return self.tmp / "crash.marker"

    def lvols(self) -> list[str]:
        return sorted(lv["name"] for lv in self.raw.lvols("lvs0"))

    def subsystems(self) -> list[dict]:
        return [s for s in self.raw.subsystems() if s["nqn"].startswith(contract.NQN_PREFIX)]

    def stop(self) -> None:
        for proc in [*self.procs, self.sim]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.servicer.close()


@pytest.fixture
def rig(tmp_path):
    sock = tmp_path / "spdk.sock"
    sim = _start(["sim", "--rpc-socket", str(sock), "--data-dir", str(tmp_path / "data"),
                  "--log-level", "warning"], tmp_path / "sim.log")
    _wait_socket(sock, sim, "simulator")
    raw = SpdkApi(SpdkClient(str(sock), timeout=30))
    raw.malloc_create("m0", 256 * MiB)
    raw.lvstore_create("m0", "lvs0", cluster_sz=MiB)
    static_keys, _ = write_dev_secrets(tmp_path)   # auth: dhchap (the default) on publish
    cfg = {"targets": [{"name": "target-a", "rpc": f"unix://{sock}", "lvstores": ["lvs0"],
                        "nvmf": {"listenAddress": "127.0.0.1", "port": 4420}}],
           "thinOvercommitRatio": 2.0,
           "auth": {"staticSecretsFile": str(static_keys), "keyDir": str(tmp_path / "keys")},
           "encryption": {"keyDir": str(tmp_path / "volume-keys")}}
    path = tmp_path / "controller.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = Rig(tmp_path, sim, raw, path,
            ControllerServicer(cfgmod.parse(cfg), "csi-spdk.io",
                               apis={"target-a": SpdkApi(SpdkClient(str(sock), timeout=30))}))
    yield r
    r.stop()


# --- the calls under test ------------------------------------------------------------
def vol(r, name, size=8 * MiB, **kw):
    return call(r.servicer, "CreateVolume", create_req(name, size, **kw)).volume


def snap(r, name, source):
    return call(r.servicer, "CreateSnapshot", csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=source)).snapshot


def bytes_of(r, vid):
    b = r.raw.bdev_get(vid.split(":")[1])
    return b["num_blocks"] * b["block_size"]


def lvol_of(r, vid):
    return r.raw.bdev_get(vid.split(":")[1])["driver_specific"]["lvol"]


def hosts(r, vid):
    sub = r.raw.subsystem_get(contract.subsystem_nqn(vid.split(":")[1]))
    return None if sub is None else sorted(h["nqn"] for h in sub["hosts"])


@dataclass
class Case:
    setup: object           # rig -> ctx dict
    method: str             # the CSI RPC
    request: object         # ctx -> request
    check: object           # (rig, ctx, response) -> None
    points: list            # [(spdk method, nth)]


def _create_empty():
    return Case(lambda r: {}, "CreateVolume", lambda c: create_req("v", 8 * MiB),
                lambda r, c, resp: (
                    bytes_of(r, resp.volume.volume_id) == 8 * MiB
                    and not lvol_of(r, resp.volume.volume_id)["thin_provision"]
                    and r.lvols() == [contract.volume_lvol_name("v")]) or _fail(r),
                [("bdev_lvol_create", 1)])


def _fail(r):
    raise AssertionError(f"unexpected state: {r.lvols()}")


def _from_snapshot(thick: bool = False):
    def setup(r):
        src = vol(r, "src", params=THIN)
        return {"src": src.volume_id, "snap": snap(r, "s", src.volume_id).snapshot_id}

    def check(r, c, resp):
        lv = lvol_of(r, resp.volume.volume_id)
        assert bytes_of(r, resp.volume.volume_id) == 12 * MiB
        if thick:           # inflated: owns its clusters, no longer a clone
            assert lv["thin_provision"] is False and "base_snapshot" not in lv
        else:
            assert lv["base_snapshot"] == contract.snapshot_lvol_name("s")
        assert len(r.lvols()) == 4   # src, snapshot, its meta lvol, the clone
    points = [("bdev_lvol_create", 1), ("bdev_lvol_clone", 1), ("bdev_lvol_resize", 1),
              ("bdev_lvol_delete", 1)]   # the pending marker, clone, growth, marker gone
    if thick:
        points.insert(3, ("bdev_lvol_inflate", 1))
    params = {"thinProvision": "false"} if thick else THIN
    return Case(setup, "CreateVolume",
                lambda c: create_req("c", 12 * MiB, snapshot=c["snap"], params=params),
                check, points)


def _from_volume(thick_source: bool):
    def setup(r):
        return {"src": vol(r, "src", params={} if thick_source else THIN).volume_id}

    def check(r, c, resp):
        csic = contract.clone_source_lvol_name("c")
        assert bytes_of(r, resp.volume.volume_id) == 12 * MiB
        assert lvol_of(r, resp.volume.volume_id)["base_snapshot"] == csic
        src = lvol_of(r, c["src"])
        assert src["thin_provision"] is (not thick_source)      # a thick source stays thick
        assert r.lvols() == sorted([csic, contract.volume_lvol_name("c"),
                                    contract.volume_lvol_name("src")])
    points = [("bdev_lvol_snapshot", 1), ("bdev_lvol_create", 1), ("bdev_lvol_clone", 1),
              ("bdev_lvol_resize", 1), ("bdev_lvol_delete", 1)]
    if thick_source:
        points.append(("bdev_lvol_inflate", 1))
    return Case(setup, "CreateVolume",
                lambda c: create_req("c", 12 * MiB, volume=c["src"], params=THIN), check, points)


def _publish():
    def check(r, c, resp):
        assert hosts(r, c["v"]) == [contract.host_nqn("node-1")]
        sub = r.raw.subsystem_get(contract.subsystem_nqn(c["v"].split(":")[1]))
        assert len(sub["namespaces"]) == 1 and len(sub["listen_addresses"]) == 1
        assert resp.publish_context[contract.PC_NQN] == sub["nqn"]
    return Case(lambda r: {"v": vol(r, "v").volume_id}, "ControllerPublishVolume",
                lambda c: publish_req(c["v"], "node-1"), check,
                # the subsystem is created while the lvol is looked up (the 2nd
                # bdev_get_bdevs; the 1st checks the volume before its keys go
                # to the target), then namespace, listener and host are sent
                # together: a kill at any of them leaves the others in flight
                [("nvmf_create_transport", 1), ("nvmf_create_subsystem", 1),
                 ("bdev_get_bdevs", 2),
                 ("nvmf_subsystem_add_ns", 1), ("nvmf_subsystem_add_listener", 1),
                 ("nvmf_subsystem_add_host", 1)])


def _unpublish(last: bool):
    def setup(r):
        v = vol(r, "v", caps=[block_cap(MNMW)]).volume_id
        for node in (["node-1"] if last else ["node-1", "node-2"]):
            call(r.servicer, "ControllerPublishVolume", publish_req(v, node, cap=block_cap(MNMW)))
        return {"v": v}

    def check(r, c, resp):
        assert hosts(r, c["v"]) == (None if last else [contract.host_nqn("node-2")])
    # the last host goes with its subsystem (one call), then the volume's keys
    points = [("nvmf_delete_subsystem", 1), ("keyring_file_remove_key", 1)] if last \
        else [("nvmf_subsystem_remove_host", 1)]
    return Case(setup, "ControllerUnpublishVolume",
                lambda c: csi_pb2.ControllerUnpublishVolumeRequest(volume_id=c["v"],
                                                                   node_id="node-1"),
                check, points)


def _delete_volume():
    def setup(r):
        src = vol(r, "src", params=THIN)
        c = vol(r, "c", volume=src.volume_id, params=THIN)
        return {"src": src.volume_id, "c": c.volume_id}

    def check(r, c, resp):   # the clone and its csic- source are gone; the source stays
        assert r.lvols() == [contract.volume_lvol_name("src")]
    return Case(setup, "DeleteVolume",
                lambda c: csi_pb2.DeleteVolumeRequest(volume_id=c["c"]), check,
                [("bdev_lvol_delete", 1), ("bdev_lvol_delete", 2)])


def _snapshot():
    def check(r, c, resp):
        s = resp.snapshot
        assert lvol_of(r, s.snapshot_id)["snapshot"] and s.source_volume_id == c["v"]
        assert lvol_of(r, c["v"])["thin_provision"] is False   # re-inflated
        meta = [n for n in r.lvols() if n.startswith(contract.SNAPSHOT_META_PREFIX)]
        assert [contract.parse_snapshot_meta(n)[:2] for n in meta] == \
            [(s.snapshot_id.split(":")[1], c["v"].split(":")[1])]
    return Case(lambda r: {"v": vol(r, "v").volume_id}, "CreateSnapshot",
                lambda c: csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=c["v"]),
                check, [("bdev_lvol_snapshot", 1), ("bdev_lvol_create", 1),
                        ("bdev_lvol_inflate", 1)])


def _delete_snapshot(clones: int):
    def setup(r):
        # 0 clones: a thick source is re-inflated (no longer a clone); 1: a thin
        # source; 2: a thin source and a volume restored from the snapshot
        v = vol(r, "v", params={} if clones == 0 else THIN).volume_id
        s = snap(r, "s", v).snapshot_id
        if clones == 2:
            vol(r, "c", snapshot=s, params=THIN)
        return {"v": v, "s": s}

    def check(r, c, resp):
        listed = call(r.servicer, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries
        assert listed == []
        names = r.lvols()
        uuid = c["s"].split(":")[1]
        if clones == 2:     # hidden until one clone is left, with its meta lvol
            assert contract.deleted_mark_lvol_name(uuid) in names
            assert contract.snapshot_lvol_name("s") in names
        else:
            assert names == [contract.volume_lvol_name("v")]
    points = [("bdev_lvol_create", 1)] if clones == 2 else \
        [("bdev_lvol_delete", 1), ("bdev_lvol_delete", 2)]
    return Case(setup, "DeleteSnapshot",
                lambda c: csi_pb2.DeleteSnapshotRequest(snapshot_id=c["s"]), check, points)


def _expand():
    def check(r, c, resp):
        assert resp.capacity_bytes == 32 * MiB == bytes_of(r, c["v"])
    return Case(lambda r: {"v": vol(r, "v").volume_id}, "ControllerExpandVolume",
                lambda c: csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=c["v"], capacity_range=csi_pb2.CapacityRange(
                        required_bytes=32 * MiB)),
                check, [("bdev_lvol_resize", 1)])


CASES = {
    "create_empty": _create_empty(), "from_snapshot": _from_snapshot(),
    "from_snapshot_thick": _from_snapshot(thick=True),
    "from_volume_thin": _from_volume(False), "from_volume_thick": _from_volume(True),
    "publish": _publish(), "unpublish_last": _unpublish(True),
    "unpublish_not_last": _unpublish(False), "delete_volume": _delete_volume(),
    "snapshot": _snapshot(), "delete_snapshot_0_clones": _delete_snapshot(0),
    "delete_snapshot_1_clone": _delete_snapshot(1),
    "delete_snapshot_2_clones": _delete_snapshot(2), "expand": _expand(),
}
PARAMS = [pytest.param(name, m, n, when, id=f"{name}-{m}:{n}:{when}")
          for name, case in CASES.items() for m, n in case.points
          for when in ("before", "after")]


def teardown_everything(r) -> None:
    """Delete every snapshot, publish and volume through CSI, clones first."""
    s = r.servicer
    for _ in range(4):
        # what the killed process and its successor made or deleted is in
        # this servicer's kept view only after a rescan (controller/volumes.py:
        # changes behind a controller's back show at its next one): take it
        # now, as the periodic rescan would, instead of racing its timer
        for t in s.targets.values():
            t.rescan()
        for e in call(s, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries:
            call(s, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(
                snapshot_id=e.snapshot.snapshot_id))
        vols = call(s, "ListVolumes", csi_pb2.ListVolumesRequest()).entries
        # clones (with a base snapshot) first, so their parents can be reclaimed
        order = sorted(vols, key=lambda e: "base_snapshot" not in lvol_of(r, e.volume.volume_id))
        for e in order:
            call(s, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=e.volume.volume_id))
            call(s, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=e.volume.volume_id))
        if not r.lvols():
            break


@pytest.mark.parametrize(("name", "spdk_method", "nth", "when"), PARAMS)
def test_sigkill_at_spdk_boundary_then_retry_converges(rig, name, spdk_method, nth, when):
    case: Case = CASES[name]
    ctx = case.setup(rig)
    request = case.request(ctx)
    proc, stub = rig.controller(crash=f"{spdk_method}:{nth}:{when}")
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, case.method)(request, timeout=CALL_DEADLINE)
    assert err.value.code() == C.UNAVAILABLE, err.value      # transient for the caller
    assert proc.wait(30) == -signal.SIGKILL
    assert rig.marker.read_text().strip() == f"{spdk_method}:{nth}:{when}"  # the point ran
    proc2, stub2 = rig.controller()
    resp = getattr(stub2, case.method)(request, timeout=CALL_DEADLINE)
    again = getattr(stub2, case.method)(request, timeout=CALL_DEADLINE)   # and it stays converged
    assert type(again) is type(resp)
    case.check(rig, ctx, resp)
    teardown_everything(rig)
    assert rig.lvols() == [] and rig.subsystems() == []      # nothing leaked
    assert [k["name"] for k in rig.raw.keyring_keys()] == []  # no key either
    with contextlib.suppress(Exception):
        proc2.send_signal(signal.SIGTERM)


# --- a QoS hold left on a target-mode encrypted volume, then a publish -------------------
HOLD_POINTS = [pytest.param(m, n, w, id=f"{m}:{n}:{w}") for m, n, w in (
    ("nvmf_subsystem_add_ns", 1, "after"), ("bdev_set_qos_limit", 2, "after"),
    ("nvmf_delete_subsystem", 1, "before"))]


@pytest.mark.parametrize(("spdk_method", "nth", "when"), HOLD_POINTS)
def test_publish_of_an_encrypted_volume_after_a_modify_killed_in_its_qos_hold(
        rig, spdk_method, nth, when):
    """ControllerModifyVolume of an unpublished ``encryption: target`` volume
    is killed while its QoS hold (the lvol as a host-less namespace) claims
    the lvol; a fresh controller's ControllerPublishVolume still stacks the
    crypto bdev and exports only it, and the retried modify converges."""
    r = rig
    v = vol(r, "v", params={"encryption": "target", "maxIOPS": "2000"})
    uuid = v.volume_id.split(":")[1]
    nqn = contract.subsystem_nqn(uuid)
    modify = csi_pb2.ControllerModifyVolumeRequest(volume_id=v.volume_id,
                                                   mutable_parameters={"maxIOPS": "5000"})
    call(r.servicer, "ControllerModifyVolume", csi_pb2.ControllerModifyVolumeRequest(
        volume_id=v.volume_id, mutable_parameters={"maxIOPS": "3000"}))  # QoS active
    _crash(r, "ControllerModifyVolume", modify, f"{spdk_method}:{nth}:{when}")
    held = r.raw.subsystem_get(nqn)
    assert [ns["bdev_name"] for ns in held["namespaces"]] == [uuid] and not held["hosts"]
    _, stub = r.controller()
    req = publish_req(v.volume_id, "node-1", cap=block_cap(MNMW))
    req.volume_context.update(v.volume_context)
    resp = stub.ControllerPublishVolume(req, timeout=CALL_DEADLINE)
    assert resp.publish_context[contract.PC_NS_UUID] == uuid
    sub = r.raw.subsystem_get(nqn)
    crypt = contract.crypto_bdev_name(uuid)
    assert [(ns["bdev_name"], ns["uuid"]) for ns in sub["namespaces"]] == [(crypt, uuid)]
    assert hosts(r, v.volume_id) == [contract.host_nqn("node-1")]
    assert r.raw.bdev_get(crypt)["driver_specific"]["crypto"]["base_bdev_name"] == uuid
    stub.ControllerModifyVolume(modify, timeout=CALL_DEADLINE)
    assert r.raw.bdev_get(uuid)["assigned_rate_limits"]["rw_ios_per_sec"] == 5000
    teardown_everything(r)
    assert r.lvols() == [] and r.subsystems() == []
    assert r.raw.call("accel_crypto_keys_get", {}) == []
    assert r.raw.bdev_get(crypt) is None


# --- a crash between clone and resize, then the clone's source goes away -----------------
UNFINISHED = [pytest.param(m, n, w, id=f"{m}:{n}:{w}") for m, n, w in (
    ("bdev_lvol_clone", 1, "after"), ("bdev_lvol_resize", 1, "before"),
    ("bdev_lvol_resize", 1, "after"))]


def _crash(rig, method, request, point):
    proc, stub = rig.controller(crash=point)
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request, timeout=CALL_DEADLINE)
    assert err.value.code() == C.UNAVAILABLE, err.value
    assert proc.wait(30) == -signal.SIGKILL
    assert rig.marker.read_text().strip() == point
    rig.marker.unlink()


@pytest.mark.parametrize("thick_source", [True, False], ids=["thick_source", "thin_source"])
@pytest.mark.parametrize(("spdk_method", "nth", "when"), UNFINISHED)
def test_unfinished_clone_of_a_deleted_snapshot_is_reclaimed(rig, spdk_method, nth, when,
                                                             thick_source):
    """CreateVolume from a snapshot is killed after the clone (before or after
    its resize), then the user deletes the snapshot: its only clone left is
    the unfinished one (thick source, re-inflated), so SPDK merges the snapshot
    into it; or it has two (thin source) and is hidden. The retry is NOT_FOUND
    for the snapshot, and the clone the driver left is gone (with the hidden
    snapshot it held), instead of a NOT_FOUND naming it forever."""
    src = vol(rig, "src", params={} if thick_source else THIN)
    s = snap(rig, "s", src.volume_id).snapshot_id
    request = create_req("c", 12 * MiB, snapshot=s, params=THIN)
    _crash(rig, "CreateVolume", request, f"{spdk_method}:{nth}:{when}")
    clone = contract.volume_lvol_name("c")
    assert clone in rig.lvols() and contract.pending_lvol_name(clone) in rig.lvols()
    call(rig.servicer, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=s))
    assert call(rig.servicer, "ListSnapshots", csi_pb2.ListSnapshotsRequest()).entries == []
    assert (contract.snapshot_lvol_name("s") in rig.lvols()) is not thick_source
    _, stub = rig.controller()
    for _ in range(2):           # and it stays so
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateVolume(request, timeout=CALL_DEADLINE)
        assert err.value.code() == C.NOT_FOUND
        assert s in err.value.details() and "holds the name" not in err.value.details()
    assert rig.lvols() == [contract.volume_lvol_name("src")]   # the source alone is left
    assert bytes_of(rig, src.volume_id) == 8 * MiB


def test_finished_volume_is_never_reclaimed(rig):
    """The same name held by a volume CreateVolume did answer with (no pending
    marker) is named in the NOT_FOUND and left alone: it may hold user data."""
    src = vol(rig, "src", params=THIN)
    s = snap(rig, "s", src.volume_id).snapshot_id
    done = vol(rig, "c", 12 * MiB, snapshot=s, params=THIN)
    call(rig.servicer, "DeleteSnapshot", csi_pb2.DeleteSnapshotRequest(snapshot_id=s))
    _, stub = rig.controller()
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVolume(create_req("c", 12 * MiB, snapshot=s, params=THIN), timeout=CALL_DEADLINE)
    assert err.value.code() == C.NOT_FOUND and done.volume_id in err.value.details()
    assert bytes_of(rig, done.volume_id) == 12 * MiB
    assert [n for n in rig.lvols() if contract.is_volume_lvol(n)] == \
        sorted([contract.volume_lvol_name("src"), contract.volume_lvol_name("c")])
    teardown_everything(rig)
    assert rig.lvols() == []


@pytest.mark.parametrize(("spdk_method", "nth", "when"), UNFINISHED)
def test_unfinished_clone_of_a_volume_converges_after_the_reconciler(rig, spdk_method, nth,
                                                                     when):
    """CreateVolume from a volume is killed after the clone; the reconciler
    then runs (it deletes the unfinished clone, and its csic- snapshot merges
    back into the source): the retry makes the clone afresh and answers it."""
    src = vol(rig, "src", params=THIN)
    request = create_req("c", 12 * MiB, volume=src.volume_id, params=THIN)
    _crash(rig, "CreateVolume", request, f"{spdk_method}:{nth}:{when}")
    clone = contract.volume_lvol_name("c")
    assert contract.pending_lvol_name(clone) in rig.lvols()
    rig.servicer.targets["target-a"].sweep()          # what the periodic reconciler does
    assert rig.lvols() == [contract.volume_lvol_name("src")]
    _, stub = rig.controller()
    resp = stub.CreateVolume(request, timeout=CALL_DEADLINE)
    assert bytes_of(rig, resp.volume.volume_id) == 12 * MiB
    csic = contract.clone_source_lvol_name("c")
    assert lvol_of(rig, resp.volume.volume_id)["base_snapshot"] == csic
    assert rig.lvols() == sorted([csic, clone, contract.volume_lvol_name("src")])
    teardown_everything(rig)
    assert rig.lvols() == []
