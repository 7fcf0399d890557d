"""DesiredState: the agent's record of the exports, and its replay after a
spdk_tgt restart (a real SIGKILL of a simulator process)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from simproc import SimProcess, env

from csi_spdk.agent.state import DesiredState, StateError
from csi_spdk.spdk.api import SpdkApi

MiB = 1 << 20
NQN1 = "nqn.2016-06.io.spdk:csi-vol1"
NQN2 = "nqn.2016-06.io.spdk:csi-vol2"
GONE = "nqn.2016-06.io.spdk:csi-gone"
H1 = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001"
H2 = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000002"
H3 = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000003"
SECRET = "NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"


def forward(api: SpdkApi, state: DesiredState, method: str, params: dict[str, Any]) -> Any:
    """What the agent server does: forward, and record only what succeeded."""
    result = api.call(method, params)
    state.record(method, params, result)
    return result


def _listen(port: str) -> dict[str, str]:
    return {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port}


def _exports(api: SpdkApi) -> dict[str, Any]:
    subs = sorted(api.subsystems(), key=lambda s: s["nqn"])
    return {"subsystems": subs, "transports": [t["trtype"] for t in api.transports()],
            "keys": sorted(k["name"] for k in api.call("keyring_get_keys"))}


@pytest.fixture
def sim(short_tmp: Path):
    p = SimProcess(short_tmp / "spdk.sock", short_tmp / "data")
    yield p
    p.stop()


def _pool(api: SpdkApi, pool: Path) -> None:
    api.call("bdev_aio_create", {"name": "aio0", "filename": str(pool), "block_size": 4096})


def _build(api: SpdkApi, state: DesiredState, short_tmp: Path) -> list[str]:
    lvols = [api.lvol_create("pool", f"csi-{i}", 4 * MiB, thin=True) for i in range(3)]
    keyfile = short_tmp / "keys" / "psk1"
    keyfile.parent.mkdir(mode=0o700)
    keyfile.write_text(SECRET)
    keyfile.chmod(0o600)
    forward(api, state, "keyring_file_add_key", {"name": "psk1", "path": str(keyfile)})
    forward(api, state, "nvmf_create_transport", {"trtype": "TCP"})
    for nqn in (NQN1, NQN2, GONE):
        forward(api, state, "nvmf_create_subsystem", {
            "nqn": nqn, "serial_number": "SPDK00001", "model_number": "csi-spdk",
            "allow_any_host": False, "max_namespaces": 2})
    forward(api, state, "nvmf_subsystem_add_ns", {"nqn": NQN1,
                                                  "namespace": {"bdev_name": lvols[0]}})
    forward(api, state, "nvmf_subsystem_add_ns", {"nqn": NQN2, "namespace": {
        "bdev_name": lvols[1], "nsid": 2, "uuid": "0f7a4b2e-8a1d-4c3b-9b5a-6f1e2d3c4b5a"}})
    forward(api, state, "nvmf_subsystem_add_ns", {"nqn": GONE,
                                                  "namespace": {"bdev_name": lvols[2]}})
    for nqn in (NQN1, NQN2, GONE):
        forward(api, state, "nvmf_subsystem_add_listener", {"nqn": nqn,
                                                            "listen_address": _listen("4420")})
    forward(api, state, "nvmf_subsystem_add_listener", {"nqn": NQN2,
                                                        "listen_address": _listen("4421")})
    forward(api, state, "nvmf_subsystem_remove_listener", {"nqn": NQN2,
                                                           "listen_address": _listen("4421")})
    forward(api, state, "nvmf_subsystem_add_host", {"nqn": NQN1, "host": H1})
    forward(api, state, "nvmf_subsystem_add_host", {"nqn": NQN1, "host": H2})
    forward(api, state, "nvmf_subsystem_remove_host", {"nqn": NQN1, "host": H2})
    forward(api, state, "nvmf_subsystem_add_host", {"nqn": NQN2, "host": H2})
    forward(api, state, "nvmf_subsystem_add_host", {"nqn": NQN2, "host": H3})
    forward(api, state, "nvmf_subsystem_remove_ns", {"nqn": GONE, "nsid": 1})
    forward(api, state, "nvmf_delete_subsystem", {"nqn": GONE})
    forward(api, state, "bdev_set_qos_limit", {"name": lvols[0], "rw_ios_per_sec": 2000,
                                               "rw_mbytes_per_sec": 100})
    return lvols


def test_replay_recreates_exactly_what_was_recorded(sim: SimProcess, short_tmp: Path) -> None:
    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(64 * MiB)
    state = DesiredState(short_tmp / "state" / "desired.json")
    sim.start()
    with sim.client() as c:
        api = SpdkApi(c)
        _pool(api, pool)
        api.lvstore_create("aio0", "pool", MiB)
        lvols = _build(api, state, short_tmp)
        before = _exports(api)
        qos_before = api.bdev_get(lvols[0])["assigned_rate_limits"]
    state.close()          # what a killed agent leaves: the files on disk
    assert [s["nqn"] for s in before["subsystems"]] == [
        "nqn.2014-08.org.nvmexpress.discovery", NQN1, NQN2]
    sim.kill9()

    sim.start()
    with sim.client() as c:
        api = SpdkApi(c)
        _pool(api, pool)                         # the lvols come back, exports do not
        assert [s["nqn"] for s in api.subsystems()] == ["nqn.2014-08.org.nvmexpress.discovery"]
        state = DesiredState(short_tmp / "state" / "desired.json")
        report = state.replay(api)
        assert report["failed"] == []
        assert report["created"] == {
            "keys": ["psk1"], "transports": ["TCP"], "subsystems": [NQN1, NQN2],
            "namespaces": [f"{NQN1} nsid 1", f"{NQN2} nsid 2"],
            "listeners": [f"{NQN1} TCP 127.0.0.1:4420", f"{NQN2} TCP 127.0.0.1:4420"],
            "hosts": [f"{NQN1} {H1}", f"{NQN2} {H2}", f"{NQN2} {H3}"],
            "qos": [lvols[0]]}
        assert report["fixed"] == 12
        after = _exports(api)
        assert after == before
        by_nqn = {s["nqn"]: s for s in after["subsystems"]}
        assert [h["nqn"] for h in by_nqn[NQN1]["hosts"]] == [H1]
        assert sorted(h["nqn"] for h in by_nqn[NQN2]["hosts"]) == [H2, H3]
        assert api.bdev_get(lvols[0])["assigned_rate_limits"] == qos_before

        again = state.replay(api)
        assert again["fixed"] == 0 and again["failed"] == []
        assert _exports(api) == before


def test_replay_removes_hosts_the_record_does_not_allow(spdk_rpc: str, short_tmp: Path) -> None:
    from csi_spdk.spdk.client import SpdkClient

    state = DesiredState(short_tmp / "st" / "d.json")
    with SpdkClient(spdk_rpc) as c:
        api = SpdkApi(c)
        api.malloc_create("m0", 8 * MiB)
        forward(api, state, "nvmf_create_subsystem", {"nqn": NQN1, "allow_any_host": False})
        forward(api, state, "nvmf_subsystem_add_host", {"nqn": NQN1, "host": H1})
        api.host_add(NQN1, H2)                               # not through the agent
        api.call("nvmf_subsystem_allow_any_host", {"nqn": NQN1, "allow_any_host": True})
        report = state.replay(api)
        assert report["removed"]["hosts"] == [f"{NQN1} {H2}"]
        assert report["created"]["subsystems"] == [f"{NQN1} allow_any_host=False"]
        sub = api.subsystem_get(NQN1)
        assert [h["nqn"] for h in sub["hosts"]] == [H1]
        assert sub["allow_any_host"] is False
        api.subsystem_delete(NQN1)


def test_record_keeps_no_key_material_and_is_private(short_tmp: Path) -> None:
    path = short_tmp / "state" / "desired.json"
    state = DesiredState(path)
    assert state.record("keyring_file_add_key",
                        {"name": "k1", "path": "/var/lib/csi-spdk/keys/k1", "key": SECRET})
    assert state.record("bdev_lvol_get_lvols", {}) is False          # not an export
    assert state.record("keyring_file_add_key",
                        {"name": "k1", "path": "/var/lib/csi-spdk/keys/k1"}) is False
    journal = path.with_suffix(".journal")
    text = path.read_text() + journal.read_text()
    assert SECRET not in text and "VRLbtn" not in text
    assert DesiredState(path, read_only=True).snapshot()["keys"] == {
        "k1": {"name": "k1", "path": "/var/lib/csi-spdk/keys/k1"}}
    for f in (path, journal, path.with_suffix(".lock")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    state.record("keyring_file_remove_key", {"name": "k1"})
    state.close()
    assert DesiredState(path).snapshot()["keys"] == {}


def test_unreadable_state_is_a_clear_error_not_an_empty_record(short_tmp: Path) -> None:
    path = short_tmp / "state" / "desired.json"
    path.parent.mkdir(mode=0o700)
    path.write_text('{"format": 1, "subsystems": {')
    with pytest.raises(StateError, match="unreadable.*move it away"):
        DesiredState(path)
    assert path.read_text() == '{"format": 1, "subsystems": {'      # left as found


_WRITER = """
import sys
from csi_spdk.agent.state import DesiredState
s = DesiredState(sys.argv[1], compact_min_bytes=4096)     # compactions every ~25 records
start = len(s.snapshot()["subsystems"])
print("ready", start, flush=True)
i = start
while True:
    s.record("nvmf_create_subsystem", {"nqn": f"nqn.x:s{i:06d}", "allow_any_host": False})
    print(i, flush=True)                                   # acknowledged
    i += 1
"""


def test_sigkill_during_record_loses_nothing_acknowledged(short_tmp: Path) -> None:
    """SIGKILL of a writer at arbitrary moments (appends and compactions, the
    journal compacts every few records here): every record it acknowledged is
    there after the restart, in order, nothing skipped, and the next writer
    goes on from there."""
    path = short_tmp / "state" / "desired.json"
    acked = -1
    for delay in (0.3, 0.45, 0.6, 0.75, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env(),
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == b"ready" and int(ready[1]) == acked + 1
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
        lines = proc.stdout.read().split(b"\n")
        acked = max([acked, *(int(x) for x in lines[:-1])])   # the last may be cut
        st = DesiredState(path)                               # parses: a torn tail dropped
        subs = sorted(st.snapshot()["subsystems"])
        st.close()
        # every acknowledged record, and at most the one in flight beyond it
        assert len(subs) in (acked + 1, acked + 2), (len(subs), acked)
        assert subs == [f"nqn.x:s{i:06d}" for i in range(len(subs))]
        acked = len(subs) - 1
        assert sorted(p.name for p in path.parent.iterdir()) == [
            "desired.journal", "desired.json", "desired.lock"], \
            "stale temp files are cleaned when the state is opened"
    assert acked > 50


def test_namespaces_recorded_without_the_reply(spdk_rpc: str, short_tmp: Path) -> None:
    """A caller that does not pass add_ns's reply: the namespace is keyed by its
    bdev, its removal still matches it, and replay re-adds exactly the live one."""
    from csi_spdk.spdk.client import SpdkClient

    path = short_tmp / "st" / "d.json"
    state = DesiredState(path)
    with SpdkClient(spdk_rpc) as c:
        api = SpdkApi(c)
        api.malloc_create("nsa", 8 * MiB)
        api.malloc_create("nsb", 8 * MiB)
        for nqn in (NQN1, NQN2):
            params = {"nqn": nqn, "allow_any_host": False, "max_namespaces": 1}
            api.call("nvmf_create_subsystem", params)
            state.record("nvmf_create_subsystem", params)
        for nqn, bdev in ((NQN1, "nsa"), (NQN2, "nsb")):
            params = {"nqn": nqn, "namespace": {"bdev_name": bdev}}
            api.call("nvmf_subsystem_add_ns", params)
            state.record("nvmf_subsystem_add_ns", params)          # no result
        api.ns_remove(NQN2, 1)
        state.record("nvmf_subsystem_remove_ns", {"nqn": NQN2, "nsid": 1})
        rec = DesiredState(path, read_only=True).snapshot()["subsystems"]
        assert list(rec[NQN1]["namespaces"]) == ["auto:nsa"]
        assert rec[NQN2]["namespaces"] == {}
        for nqn in (NQN1, NQN2):
            api.subsystem_delete(nqn)
        report = state.replay(api)
        assert report["created"]["namespaces"] == [f"{NQN1} auto:nsa"]
        assert [(n["nsid"], n["bdev_name"]) for n in api.subsystem_get(NQN1)["namespaces"]] \
            == [(1, "nsa")]
        assert api.subsystem_get(NQN2)["namespaces"] == []
        assert state.replay(api)["fixed"] == 0
        for nqn in (NQN1, NQN2):
            api.subsystem_delete(nqn)


def test_a_replay_never_undoes_a_change_made_while_it_runs(spdk_rpc: str,
                                                            short_tmp: Path) -> None:
    """A replay (a spdk_tgt restart seen, or a false alarm on a loaded host)
    while the controller unexports: the host removal goes through a real
    agent server and must not be put back by the replay, which read the
    record before the removal was recorded (seen in the real-kubelet rig:
    DeleteVolume then refused forever, "still published")."""
    import threading

    from agent_fixtures import start_agent

    from csi_spdk.spdk.client import SpdkClient

    state = DesiredState(short_tmp / "st" / "d.json")
    agent = start_agent(spdk_rpc, short_tmp / "agent-state", f"unix://{short_tmp}/a.sock",
                        state=state)
    client = agent.client()
    nqn = "nqn.2024-11.io.csi-spdk:vol:00000000-0000-4000-8000-0000000000aa"
    try:
        with SpdkClient(spdk_rpc) as c:
            raw = SpdkApi(c)
            client.call("nvmf_create_subsystem", {"nqn": nqn, "allow_any_host": False})
            client.call("nvmf_subsystem_add_host", {"nqn": nqn, "host": H1})
            assert [h["nqn"] for h in raw.subsystem_get(nqn)["hosts"]] == [H1]

            started, go_on = threading.Event(), threading.Event()

            class Paused(SpdkApi):
                """Stops the replay at its first SPDK call until told to go on."""
                def call(self, method, params=None, timeout=None, each=None):
                    if not started.is_set():
                        started.set()
                        go_on.wait(10)
                    return raw.call(method, params, timeout=timeout, each=each)

            replay = threading.Thread(target=lambda: state.replay(Paused(c)))
            replay.start()
            assert started.wait(10)
            removed = threading.Thread(target=lambda: client.call(
                "nvmf_subsystem_remove_host", {"nqn": nqn, "host": H1}))
            removed.start()
            removed.join(1.0)
            # the change waits for the replay (without the lock it ran now and
            # the replay, going on, put the host back)
            assert removed.is_alive()
            assert [h["nqn"] for h in raw.subsystem_get(nqn)["hosts"]] == [H1]
            go_on.set()
            replay.join(30)
            removed.join(30)
            assert not replay.is_alive() and not removed.is_alive()
            assert raw.subsystem_get(nqn)["hosts"] == []
            # and the record agrees: a second replay changes nothing
            report = state.replay(raw)
            assert report["fixed"] == 0, report
            assert raw.subsystem_get(nqn)["hosts"] == []
            raw.subsystem_delete(nqn)
    finally:
        client.close()
        agent.stop()
        state.close()
