"""Supervisor: spdk_tgt (here the simulator in its own process) is killed with
SIGKILL while volumes are exported; the agent restarts it, re-attaches the
pool, replays the exports. Also: attaching to a target someone else runs,
bounded restart backoff, and the huge page check."""

from __future__ import annotations

import base64
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from simproc import SimProcess, wait_ready

from csi_spdk.agent.pools import Pools
from csi_spdk.agent.state import DesiredState
from csi_spdk.agent.supervisor import (
    MemoryCheckError,
    Supervisor,
    SupervisorConfig,
    check_memory,
    sim_command,
)
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.client import SpdkClient

MiB = 1 << 20
HOSTS = {f"nqn.2016-06.io.spdk:csi-v{i}": [
    f"nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000{i}{j}"
    for j in range(i + 1)] for i in range(3)}


def _export(api: SpdkApi, state: DesiredState, lvol: str, nqn: str, hosts: list[str]) -> None:
    """The calls the controller makes through the agent to publish a volume."""
    def fwd(method: str, params: dict) -> None:
        state.record(method, params, api.call(method, params))
    fwd("nvmf_create_subsystem", {"nqn": nqn, "serial_number": "SPDK0001",
                                  "model_number": "csi-spdk", "allow_any_host": False})
    fwd("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": lvol}})
    fwd("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": {
        "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}})
    for h in hosts:
        fwd("nvmf_subsystem_add_host", {"nqn": nqn, "host": h})


def _exports(api: SpdkApi) -> dict[str, dict]:
    return {s["nqn"]: {"hosts": sorted(h["nqn"] for h in s["hosts"]),
                       "ns": [(n["nsid"], n["bdev_name"], n["uuid"]) for n in s["namespaces"]],
                       "listen": s["listen_addresses"], "any": s["allow_any_host"]}
            for s in api.subsystems() if s["subtype"] == "NVMe"}


def _setup(short_tmp: Path):
    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(128 * MiB)
    pools_doc = {"pools": [{"name": "pool0", "devices": [{"path": str(pool)}],
                            "cluster_size": "1MiB"}]}
    sock = str(short_tmp / "spdk.sock")
    return pool, pools_doc, sock


def test_kill9_of_the_managed_target_restores_every_export(short_tmp: Path) -> None:
    _, pools_doc, sock = _setup(short_tmp)
    cfg = SupervisorConfig(sock, command=sim_command(sock, str(short_tmp / "data"),
                                                     "--log-level", "warning"),
                           poll_interval=0.1, check_memory=False,
                           log_file=str(short_tmp / "tgt.log"))
    state = DesiredState(short_tmp / "state" / "desired.json")
    restarts0 = REGISTRY.get_sample_value("csi_spdk_agent_spdk_tgt_restarts_total") or 0
    with SpdkClient(sock) as c:
        api = SpdkApi(c)
        sup = Supervisor(cfg, Pools(pools_doc, api), state)
        sup.start()
        try:
            [first] = sup.wait_recoveries(1, 60)
            assert first.reason == "start" and first.pools[0]["state"] == "created"
            state.record("nvmf_create_transport", {"trtype": "TCP"},
                         api.call("nvmf_create_transport", {"trtype": "TCP"}))
            lvols = {}
            for i, (nqn, hosts) in enumerate(HOSTS.items()):
                lvols[nqn] = api.lvol_create("pool0", f"csi-v{i}", 8 * MiB, thin=True)
                _export(api, state, lvols[nqn], nqn, hosts)
                c.call("sim_bdev_write", {"name": lvols[nqn], "offset": MiB,
                                          "data": base64.b64encode(nqn.encode()).decode()})
            before = _exports(api)
            assert sorted(before) == sorted(HOSTS)
            old_pid = sup.pid
            assert old_pid == sup.proc.pid

            t0 = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            deadline = t0 + 120
            while time.monotonic() < deadline:
                try:
                    if _exports(api) == before:
                        break
                except Exception:
                    pass
                time.sleep(0.02)
            recovered_in = time.monotonic() - t0
            recs = sup.wait_recoveries(2, 60)
            assert len(recs) == 2, "no recovery after the kill"
            rec = recs[1]
            print(f"\nkill -9 -> every export back: {recovered_in:.3f}s "
                  f"(recovery itself {rec.duration:.3f}s, {rec.replay['fixed']} objects)")
            assert rec.reason.startswith("restarted after it exited (-9)")
            assert sup.pid != old_pid and sup.proc.pid == sup.pid
            assert rec.pools[0]["state"] == "loaded"
            assert rec.replay["failed"] == []
            assert rec.replay["created"]["subsystems"] == list(HOSTS)
            assert rec.replay["fixed"] == 1 + sum(3 + len(h) for h in HOSTS.values())
            after = _exports(api)
            assert after == before
            for nqn, hosts in HOSTS.items():
                assert after[nqn]["hosts"] == sorted(hosts)      # exactly those hosts
                got = c.call("sim_bdev_read", {"name": lvols[nqn], "offset": MiB,
                                               "length": len(nqn)})
                assert base64.b64decode(got) == nqn.encode()
            assert (REGISTRY.get_sample_value("csi_spdk_agent_spdk_tgt_restarts_total")
                    == restarts0 + 1)
            assert REGISTRY.get_sample_value("csi_spdk_agent_spdk_tgt_up") == 1
            assert REGISTRY.get_sample_value("csi_spdk_agent_replayed_objects_total",
                                             {"kind": "hosts"}) >= 6
            st = sup.status()
            assert st["up"] and st["restarts"] == 1 and st["managed"]
        finally:
            sup.stop()
    assert sup.proc.poll() is not None                 # stop() stopped spdk_tgt too


def test_attached_target_restarted_by_someone_else_is_recovered(short_tmp: Path) -> None:
    _, pools_doc, sock = _setup(short_tmp)
    sim = SimProcess(Path(sock), short_tmp / "data").start()
    state = DesiredState(short_tmp / "state" / "desired.json")
    nqn = "nqn.2016-06.io.spdk:csi-attached"
    host = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000aa"
    try:
        with SpdkClient(sock) as c:
            api = SpdkApi(c)
            sup = Supervisor(SupervisorConfig(sock, poll_interval=0.1), Pools(pools_doc, api),
                             state).start()
            try:
                [first] = sup.wait_recoveries(1, 30)
                assert first.reason == "attached" and sup.proc is None
                lvol = api.lvol_create("pool0", "csi-a", 4 * MiB, thin=False)
                state.record("nvmf_create_transport", {"trtype": "TCP"},
                             api.call("nvmf_create_transport", {"trtype": "TCP"}))
                _export(api, state, lvol, nqn, [host])
                before = _exports(api)
                sim.kill9()
                time.sleep(0.5)                # down for a few polls, then back
                sim.start()
                recs = sup.wait_recoveries(2, 60)
                assert len(recs) == 2
                assert recs[1].reason in ("answers again", f"pid changed {first.pid} -> "
                                          f"{sim.proc.pid}")
                assert _exports(api) == before
                assert _exports(api)[nqn]["hosts"] == [host]
            finally:
                sup.stop()
    finally:
        sim.stop()
    assert sim.proc.poll() is not None


def test_fast_restart_is_seen_by_the_pid_behind_the_socket(short_tmp: Path) -> None:
    """A target replaced between two polls still triggers a recovery."""
    sock = short_tmp / "spdk.sock"
    sim = SimProcess(sock, short_tmp / "data").start()
    state = DesiredState(short_tmp / "state" / "desired.json")
    state.record("nvmf_create_subsystem", {"nqn": "nqn.2016-06.io.spdk:fast",
                                           "allow_any_host": False})
    try:
        # a wait long enough that kill + restart of the simulator (a Python start,
        # slow on a loaded machine) fits inside it: no poll sees the target down
        sup = Supervisor(SupervisorConfig(str(sock), poll_interval=10.0), None, state).start()
        try:
            assert sup.wait_recoveries(1, 30)[0].replay["created"]["subsystems"] == [
                "nqn.2016-06.io.spdk:fast"]
            time.sleep(0.3)              # the loop is now in its 10 s wait
            sim.kill9()
            sim.start()
            recs = sup.wait_recoveries(2, 40)
            assert len(recs) == 2 and recs[1].reason.startswith("pid changed"), recs
            with SpdkClient(str(sock)) as c:
                assert SpdkApi(c).subsystem_get("nqn.2016-06.io.spdk:fast") is not None
        finally:
            sup.stop()
    finally:
        sim.stop()


def test_a_target_that_keeps_dying_is_restarted_with_bounded_backoff(short_tmp: Path) -> None:
    marker = short_tmp / "starts"
    cmd = ["/bin/sh", "-c", f"echo x >> {marker}; exit 3"]
    cfg = SupervisorConfig(str(short_tmp / "none.sock"), command=cmd, poll_interval=0.05,
                           check_memory=False, backoff_initial=0.2, backoff_max=0.8,
                           start_timeout=5)
    sup = Supervisor(cfg).start()
    try:
        time.sleep(4.0)
    finally:
        sup.stop()
    starts = len(marker.read_text().split())
    # 0.2, 0.4, 0.8, 0.8, ... between starts: about 6 in 4 s, never a tight loop
    assert 3 <= starts <= 10, starts
    assert sup.status()["up"] is False and sup.recoveries() == []


def _hugepages(root: Path, **pools: tuple[int, int]) -> Path:
    for size, (total, free) in pools.items():
        d = root / "kernel" / "mm" / "hugepages" / f"hugepages-{size[1:]}kB"
        d.mkdir(parents=True)
        (d / "nr_hugepages").write_text(f"{total}\n")
        (d / "free_hugepages").write_text(f"{free}\n")
    (root / "kernel" / "mm" / "hugepages").mkdir(parents=True, exist_ok=True)
    return root


def test_huge_page_check_says_what_to_do(short_tmp: Path) -> None:
    meminfo = short_tmp / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    tgt = ["/usr/local/bin/spdk_tgt", "-m", "0x1", "-s", "2048"]
    none = _hugepages(short_tmp / "none")
    with pytest.raises(MemoryCheckError, match="no huge pages are reserved.*nr_hugepages"
                                               ".*--no-huge -s 2048"):
        check_memory(tgt, str(none), str(meminfo))
    few = _hugepages(short_tmp / "few", s2048=(512, 256))
    with pytest.raises(MemoryCheckError, match="asks for 2048 MiB.*only 512 MiB.*1024 MiB "
                                               "reserved"):
        check_memory(tgt, str(few), str(meminfo))
    used = _hugepages(short_tmp / "used", s2048=(512, 0))
    with pytest.raises(MemoryCheckError, match="in use"):
        check_memory(tgt[:3], str(used), str(meminfo))
    ok = _hugepages(short_tmp / "ok", s2048=(1024, 1024), s1048576=(1, 1))
    assert check_memory(tgt, str(ok), str(meminfo)).startswith("3072 MiB of huge pages free")
    assert check_memory([*tgt, "--mem-size=3g"][:3] + ["--mem-size=3g"], str(ok),
                        str(meminfo)).startswith("3072")
    with pytest.raises(MemoryCheckError, match="asks for 4096 MiB"):
        check_memory(tgt[:3] + ["-s", "4g"], str(ok), str(meminfo))
    assert "skipped" in check_memory([*tgt, "--no-huge"], str(none), str(meminfo))


def test_supervisor_refuses_to_start_a_target_without_memory(short_tmp: Path,
                                                              monkeypatch) -> None:
    import csi_spdk.agent.supervisor as supmod
    none = _hugepages(short_tmp / "none")
    real = supmod.check_memory
    monkeypatch.setattr(supmod, "check_memory",
                        lambda cmd: real(cmd, str(none), "/proc/meminfo"))
    cfg = SupervisorConfig(str(short_tmp / "s.sock"), command=["spdk_tgt", "-s", "1024"])
    with pytest.raises(MemoryCheckError, match="no huge pages"):
        Supervisor(cfg).start()


def test_wait_ready_helper_times_out(short_tmp: Path) -> None:
    with pytest.raises(TimeoutError):
        wait_ready(short_tmp / "nothing.sock", timeout=0.3)
    assert sys.executable


def test_storage_side_from_agent_flags(short_tmp: Path) -> None:
    """The wiring ``csi-spdk agent`` uses: its flags, then start/record/report/stop."""
    import shlex

    from csi_spdk.agent import storage

    pool = short_tmp / "pool.img"
    with open(pool, "wb") as f:
        f.truncate(64 * MiB)
    (short_tmp / "pools.yaml").write_text(
        f"pools:\n  - name: pool0\n    devices:\n      - path: {pool}\n")
    sock = str(short_tmp / "spdk.sock")
    from csi_spdk.cli import build_parser

    args = build_parser().parse_args([          # the agent's own flags, as the CLI has them
        "agent", "--listen", f"unix://{short_tmp}/agent.sock",
        "--spdk-rpc", f"unix://{sock}", "--state-dir", str(short_tmp / "st"),
        "--pools", str(short_tmp / "pools.yaml"), "--spdk-poll-interval", "0.1",
        "--no-hugepage-check",
        "--spdk-tgt-cmd", shlex.join(sim_command(sock, str(short_tmp / "data")))])
    side = storage.StorageSide.from_args(args).start()
    try:
        assert side.wait_ready(60)
        [rep] = side.pools.report()
        assert rep["name"] == "pool0" and rep["state"] == "created"
        with SpdkClient(sock) as c:
            params = {"nqn": "nqn.2016-06.io.spdk:wired", "allow_any_host": False}
            c.call("nvmf_create_subsystem", params)
            side.record("nvmf_create_subsystem", params)
        assert list(side.state.snapshot()["subsystems"]) == ["nqn.2016-06.io.spdk:wired"]
        assert (short_tmp / "st" / "desired.json").exists()
        assert side.supervisor.status()["managed"] is True
    finally:
        side.stop()


def test_a_hung_managed_target_is_killed_and_restarted(short_tmp: Path) -> None:
    """spdk_tgt alive but silent (SIGSTOP): after hang_timeout it is killed and
    started again, and the recorded export comes back."""
    sock = str(short_tmp / "spdk.sock")
    state = DesiredState(short_tmp / "state" / "desired.json")
    state.record("nvmf_create_subsystem", {"nqn": "nqn.2016-06.io.spdk:hung",
                                           "allow_any_host": False})
    cfg = SupervisorConfig(sock, command=sim_command(sock, str(short_tmp / "data")),
                           poll_interval=0.1, probe_timeout=0.5, hang_timeout=2.0,
                           check_memory=False)
    sup = Supervisor(cfg, None, state).start()
    try:
        assert len(sup.wait_recoveries(1, 60)) == 1
        hung = sup.pid
        os.kill(hung, signal.SIGSTOP)
        recs = sup.wait_recoveries(2, 60)
        assert len(recs) == 2, "the hung target was not replaced"
        assert recs[1].reason == "restarted after it exited (-9)"
        assert sup.pid != hung
        with SpdkClient(sock) as c:
            assert SpdkApi(c).subsystem_get("nqn.2016-06.io.spdk:hung") is not None
    finally:
        sup.stop()


def _late_target(short_tmp: Path) -> list[str]:
    """A target that answers only after 2 s of sleep (its own time, not a wait for a CPU)."""
    sock = str(short_tmp / "spdk.sock")
    return ["/bin/sh", "-c", "sleep 2; exec \"$0\" \"$@\"",
            *sim_command(sock, str(short_tmp / "data"))]


def test_a_start_slower_than_start_timeout_on_its_own_time_is_killed(short_tmp, caplog):
    """The start timeout counts the target's own time: 2 s of sleep is more
    than a 1 s start_timeout, so it is killed (and started again)."""
    cfg = SupervisorConfig(str(short_tmp / "spdk.sock"), command=_late_target(short_tmp),
                           poll_interval=0.1, probe_timeout=0.5, start_timeout=1.0,
                           check_memory=False, backoff_initial=5.0, backoff_max=5.0)
    sup = Supervisor(cfg).start()
    try:
        deadline = time.monotonic() + 120
        while "did not answer on" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sup.stop()
    assert "did not answer on" in caplog.text and "within 1s; killing it" in caplog.text
    assert sup.recoveries() == []


def test_a_target_kept_waiting_for_a_cpu_is_not_killed_as_hung(short_tmp, monkeypatch):
    """The same start on a machine that kept it waiting for a CPU the whole
    time (a clock that says so): not killed, it comes up and is recovered."""
    import csi_spdk.agent.supervisor as supmod

    class Starved:
        """Every second of wall time was spent on a run queue."""

        def __init__(self, pid: int, also=()) -> None:
            self.pid = pid

        def elapsed(self) -> float:
            return 0.0

    monkeypatch.setattr(supmod, "ChildClock", Starved)
    cfg = SupervisorConfig(str(short_tmp / "spdk.sock"), command=_late_target(short_tmp),
                           poll_interval=0.1, probe_timeout=0.5, start_timeout=1.0,
                           check_memory=False)
    sup = Supervisor(cfg).start()
    try:
        recs = sup.wait_recoveries(1, 120)
    finally:
        sup.stop()
    assert [r.reason for r in recs] == ["start"]


def test_a_kept_recovery_holds_the_counts_and_a_bounded_sample_of_ids():
    from csi_spdk.agent.supervisor import KEPT_IDS, _kept
    report = {"created": {"subsystems": [f"nqn-{i}" for i in range(3 * KEPT_IDS)], "hosts": []},
              "removed": {"hosts": ["h"]}, "fixed": 3 * KEPT_IDS + 1,
              "failed": [{"object": f"ns {i}", "error": "e"} for i in range(2 * KEPT_IDS)]}
    kept = _kept(report)
    assert kept["counts"] == {"created": {"subsystems": 3 * KEPT_IDS, "hosts": 0},
                              "removed": {"hosts": 1}, "failed": 2 * KEPT_IDS}
    assert kept["created"]["subsystems"] == report["created"]["subsystems"][:KEPT_IDS]
    assert kept["failed"] == report["failed"][:KEPT_IDS] and kept["removed"] == {"hosts": ["h"]}
    assert kept["fixed"] == 3 * KEPT_IDS + 1 and _kept({}) == {}
