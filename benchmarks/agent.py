"""Agent hop benchmark: what going through ``csi-spdk agent`` costs per SPDK call.

    python3 benchmarks/agent.py --calls 2000
    python3 benchmarks/agent.py --calls 500 --recorded 10000

The simulator (a ``csi-spdk sim`` subprocess, or the real spdk_tgt named by
CSI_SPDK_TEST_RPC) is called three ways in the same run, interleaved call by
call so drift hits all of them alike:

- direct: ``SpdkClient`` on the SPDK Unix socket (the baseline);
- agent/unix: ``AgentClient`` to an agent subprocess on a Unix socket (dev);
- agent/mTLS: ``AgentClient`` to an agent subprocess on 127.0.0.1 with mutual
  TLS (production), certificates made with ``cryptography``;
- unary/unix, unary/mTLS: the same agents called with one unary ``Call`` RPC
  per SPDK call (the transport before the ``Session`` stream ``AgentClient``
  uses), so what the stream saves shows in the same run.

Operations: ``bdev_get_bdevs`` of one lvol (a read: forwarded unchecked) and a
``bdev_lvol_create`` + ``bdev_lvol_delete`` pair (both checked; the delete
resolves the uuid to the lvol's name first, one more SPDK call inside the
agent); and per CSI call, publish and unpublish (the export/unexport intents)
run over the direct socket, in the controller passing each SPDK call through
the agent, and in the agent itself (one round trip). Reports p50/p99 per
way, the p50 the agent adds over direct, and the gRPC floor: a no-op call
(grpc.health.v1 Check, unary) to the same agent process, so the unary ways'
added ~= floor + the agent's own work (checks, JSON, metrics, the
desired-state write), and a raw Python Unix socket echo (another process,
one thread each side): what any Python client/server round trip costs here
before gRPC adds its own.

``--recorded N`` starts both agents with N volumes already in their desired
state (subsystem, namespace, listener, host with two DH-HMAC-CHAP key names,
QoS: what a published volume leaves), written as the format-1 whole file an
earlier agent kept (a current agent migrates it at start), so the cost of a
recorded change at that size shows; the agents replay it onto the target at
start (most objects fail: their lvols do not exist) and the benchmark waits
for that. It prints the agents' resident memory at the end: VmRSS (now) and VmHWM
(the peak, reached while loading the record).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from agent_fixtures import SERVER_NAME  # noqa: E402
from agent_pki import Pki  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.spdk import intents  # noqa: E402
from csi_spdk.spdk.agent_client import AgentClient  # noqa: E402
from csi_spdk.spdk.api import SpdkApi  # noqa: E402
from csi_spdk.spdk.client import SpdkClient  # noqa: E402

MiB = 1 << 20
TARGET_ADDED_P50_MS = 0.3


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def child(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "csi_spdk", *argv], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_ready(api: SpdkApi, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            api.version()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"{what} did not start (rc={proc.poll()})") from None
            time.sleep(0.05)


def write_recorded(state_dir: Path, n: int) -> None:
    """N published volumes' records, in the format-1 file (see the docstring)."""
    import json
    subs, keys, qos = {}, {}, {}
    listen = {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}
    for i in range(n):
        uuid = str(uuidlib.UUID(int=i + 1))
        nqn, host = contract.subsystem_nqn(uuid), contract.host_nqn(f"node-{i % 50}")
        k1, k2 = f"dhchap-{uuid}-h", f"dhchap-{uuid}-c"
        for k in (k1, k2):
            keys[k] = {"name": k, "path": str(state_dir / "keys" / k)}
        subs[nqn] = {"params": {"nqn": nqn, "serial_number": contract.serial_number(uuid),
                                "model_number": contract.MODEL_NUMBER,
                                "allow_any_host": False, "max_namespaces": 1},
                     "allow_any_host": False,
                     "namespaces": {"1": {"namespace": {"bdev_name": uuid, "uuid": uuid,
                                                        "nsid": 1}}},
                     "listeners": [{"listen_address": listen}],
                     "hosts": {host: {"host": host, "dhchap_key": k1,
                                      "dhchap_ctrlr_key": k2}}}
        qos[uuid] = {"rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 100}
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state_dir / "desired.json").write_text(json.dumps(
        {"format": 1, "transports": {"TCP": {"trtype": "TCP"}}, "keys": keys,
         "subsystems": subs, "qos": qos, "crypto": {"keys": {}, "bdevs": {}}}))
    os.chmod(state_dir / "desired.json", 0o600)


def wait_replayed(log: Path, proc: subprocess.Popen, timeout: float = 1200) -> None:
    """Until the agent logged its first recovery (the replay of its record)."""
    end = time.monotonic() + timeout
    while "objects fixed" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"agent did not finish its first replay: {log}")
        time.sleep(0.5)


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class UnaryClient:
    """One unary ``Call`` RPC per SPDK call: the agent transport before the
    Session stream (the baseline the stream is compared with)."""

    def __init__(self, channel) -> None:
        from csi_spdk.proto import agent_pb2_grpc
        self.channel, self.stub = channel, agent_pb2_grpc.AgentStub(channel)

    def call(self, method: str, params: dict | None = None, timeout: float | None = None):
        import json

        from csi_spdk.proto import agent_pb2
        from csi_spdk.spdk.errors import from_response
        reply = self.stub.Call(agent_pb2.CallRequest(
            method=method, params_json=json.dumps(params) if params is not None else "",
            timeout=timeout or 30), timeout=(timeout or 30) + 2)
        if reply.HasField("error"):
            raise from_response(method, {"code": reply.error.code,
                                         "message": reply.error.message})
        return json.loads(reply.result_json) if reply.result_json else None

    def close(self) -> None:
        self.channel.close()


ECHO = """import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print("ready", flush=True)
c, _ = s.accept()
while (d := c.recv(65536)):
    c.sendall(d)
"""


def socket_echo(tmp: Path) -> tuple[subprocess.Popen, socket.socket]:
    """A raw Unix socket echo in another Python process: the floor of any
    Python request/reply here (two context switches, two syscalls a side)."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO, str(tmp / "echo.sock")],
                            stdout=subprocess.PIPE)
    proc.stdout.readline()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(tmp / "echo.sock"))
    return proc, sock


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def csi_call_hop(ways: dict[str, SpdkApi], probe: str, calls: int) -> None:
    """Per CSI call: a publish (the export intent) and its unpublish (the
    unexport intent) of one volume, run in the controller over the direct
    socket, in the controller with each SPDK call passed through the agent
    (the design before the intents), and in the agent (one round trip)."""
    listen = SpdkApi.listen_address("127.0.0.1", 4420)
    if not ways["direct"].transports():
        ways["direct"].transport_create("TCP")
    spec = {"uuid": probe, "host": contract.host_nqn("bench-node"), "model": "csi-spdk bench",
            "signature": "s", "listen": listen, "keys": {}}
    runs = {"direct": lambda n, s: intents.run(ways["direct"], n, s),
            "agent, per SPDK call": lambda n, s: intents.run(ways["agent/unix"], n, s),
            "unary, per SPDK call": lambda n, s: intents.run(ways["unary/unix"], n, s),
            "agent, intent": lambda n, s: ways["agent/unix"].intent(n, s)}
    pub: dict[str, list[float]] = {w: [] for w in runs}
    unpub: dict[str, list[float]] = {w: [] for w in runs}
    for _ in range(max(20, calls // 10)):
        for way, run in runs.items():
            pub[way].append(timed(lambda r=run: r("export", spec)))
            unpub[way].append(timed(lambda r=run: r("unexport", {"uuid": probe,
                                                                 "hosts": [spec["host"]]})))
    print("per CSI call (the export / unexport intents of one volume), ms:")
    for op, table in (("ControllerPublish", pub), ("ControllerUnpublish", unpub)):
        base = statistics.median(table["direct"])
        for way, values in table.items():
            print(f"{op if way == 'direct' else '':20}  {way:22}"
                  f"{statistics.median(values):9.3f}{pct(values, 0.99):9.3f}"
                  f"{'' if way == 'direct' else f'{statistics.median(values) - base:9.3f}'}")


def bench(calls: int, rpc: str, tmp: Path, recorded: int = 0) -> int:
    procs: list[subprocess.Popen] = []
    target = rpc or "simulator"
    try:
        if not rpc:
            rpc = str(tmp / "spdk.sock")
            procs.append(child(["sim", "--rpc-socket", rpc, "--data-dir", str(tmp / "data"),
                                "--log-level", "warning"], tmp / "sim.log"))
        direct = SpdkApi(SpdkClient(rpc, timeout=30))
        wait_ready(direct, procs[-1] if procs else subprocess.Popen(["true"]), "simulator")
        pki = Pki(tmp / "pki")
        if recorded:
            t0 = time.monotonic()
            for st in ("st1", "st2"):
                write_recorded(tmp / st, recorded)
            print(f"{recorded} volumes recorded per agent "
                  f"({(tmp / 'st1' / 'desired.json').stat().st_size / 1e6:.1f} MB format-1 "
                  f"file, {time.monotonic() - t0:.1f}s)", flush=True)
        procs.append(child(["agent", "--listen", f"unix://{tmp}/agent.sock", "--spdk-rpc", rpc,
                            "--state-dir", str(tmp / "st1")], tmp / "agent-unix.log"))
        unix = SpdkApi(AgentClient(f"unix://{tmp}/agent.sock", timeout=30))
        wait_ready(unix, procs[-1], "agent (unix)")
        unix_proc = procs[-1]
        port = 20000 + os.getpid() % 20000
        procs.append(child(["agent", "--listen", f"127.0.0.1:{port}", "--spdk-rpc", rpc,
                            "--state-dir", str(tmp / "st2"), "--tls-cert", str(pki.server.cert),
                            "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca)],
                           tmp / "agent-tls.log"))
        tls = SpdkApi(AgentClient(f"127.0.0.1:{port}", pki.client_tls(), SERVER_NAME,
                                  timeout=30))
        wait_ready(tls, procs[-1], "agent (mTLS)")
        agent_procs = {"agent/unix": unix_proc, "agent/mTLS": procs[-1]}
        if recorded:
            t0 = time.monotonic()
            wait_replayed(tmp / "agent-unix.log", unix_proc)
            wait_replayed(tmp / "agent-tls.log", procs[-1])
            print(f"both agents replayed their record at start: {time.monotonic() - t0:.1f}s",
                  flush=True)
            # what the replay made (up to the target's subsystem limit) would
            # leave no room for the benchmark's own export: the record stays
            fake = contract.NQN_PREFIX + "00000000-0000-0000-0000-"
            for sub in direct.subsystems():
                if sub["nqn"].startswith(fake):
                    direct.subsystem_delete(sub["nqn"])

        suffix = uuidlib.uuid4().hex[:8]
        malloc, lvs = f"agentbench{suffix}", f"agentbench{suffix}"
        direct.malloc_create(malloc, 256 * MiB)
        direct.lvstore_create(malloc, lvs, cluster_sz=MiB)
        probe = direct.lvol_create(lvs, contract.volume_lvol_name(f"probe-{suffix}"), MiB,
                                   True)
        import grpc
        rd = lambda p: Path(p).read_bytes()  # noqa: E731
        creds = grpc.ssl_channel_credentials(rd(pki.ca), rd(pki.client.key), rd(pki.client.cert))
        ways = {"direct": direct, "agent/unix": unix, "agent/mTLS": tls,
                "unary/unix": SpdkApi(UnaryClient(grpc.insecure_channel(
                    f"unix://{tmp}/agent.sock"))),
                "unary/mTLS": SpdkApi(UnaryClient(grpc.secure_channel(
                    f"127.0.0.1:{port}", creds,
                    options=[("grpc.ssl_target_name_override", SERVER_NAME)])))}
        read: dict[str, list[float]] = {w: [] for w in ways}
        pair: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(50):  # warm up connections and caches
            for api in ways.values():
                api.bdev_get(probe)
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"unix://{tmp}/agent.sock"))
        echo_proc, echo = socket_echo(tmp)
        procs.append(echo_proc)
        floor: list[float] = []
        raw: list[float] = []
        payload = b'{"method": "bdev_get_bdevs", "params": {"name": "%s"}}' % probe.encode()

        def echo_once() -> None:
            echo.sendall(payload)
            echo.recv(65536)
        for i in range(calls):
            floor.append(timed(lambda: health.Check(health_pb2.HealthCheckRequest())))
            raw.append(timed(echo_once))
            for way, api in ways.items():
                read[way].append(timed(lambda a=api: a.bdev_get(probe)))

                tag = way.replace("/", "-")

                def create_delete(a=api, n=f"csi-b{i}-{tag}-{suffix}") -> None:
                    a.lvol_delete(a.lvol_create(lvs, n, MiB, True))
                pair[way].append(timed(create_delete))

        print(f"agent hop, {calls} calls per way ({target}), ms:")
        print(f"{'':22}{'p50':>9}{'p99':>9}{'mean':>9}{'+p50':>9}")
        worst = 0.0
        worst_unary = 0.0
        for op, table, per in (("bdev_get_bdevs", read, 1), ("create+delete pair", pair, 2)):
            base = statistics.median(table["direct"])
            for way, values in table.items():
                added = statistics.median(values) - base
                print(f"{op if way == 'direct' else '':20}  {way:10}"
                      f"{statistics.median(values):9.3f}{pct(values, 0.99):9.3f}"
                      f"{statistics.fmean(values):9.3f}"
                      f"{'' if way == 'direct' else f'{added:9.3f}'}")
                if way.startswith("agent/"):
                    worst = max(worst, added / per)
                elif way.startswith("unary/"):
                    worst_unary = max(worst_unary, added / per)
        csi_call_hop(ways, probe, calls)
        print(f"{'floors':20}  {'gRPC unary':10}{statistics.median(floor):9.3f}"
              f"{pct(floor, 0.99):9.3f}{statistics.fmean(floor):9.3f}   (health Check)")
        print(f"{'':20}  {'raw socket':10}{statistics.median(raw):9.3f}"
              f"{pct(raw, 0.99):9.3f}{statistics.fmean(raw):9.3f}   (Python echo)")
        print(f"worst p50 added per SPDK call: session {worst:.3f} ms, unary "
              f"{worst_unary:.3f} ms (target < {TARGET_ADDED_P50_MS}); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("agent memory, MiB: " + ", ".join(
            f"{way} VmRSS {memory_mib(p.pid):.1f} VmHWM {memory_mib(p.pid, 'VmHWM'):.1f}"
            for way, p in agent_procs.items()) + f" ({recorded} volumes recorded)")
        direct.lvol_delete(probe)
        with contextlib.suppress(Exception):
            direct.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
            direct.call("bdev_malloc_delete", {"name": malloc})
        for api in ways.values():
            api.client.close()
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            with contextlib.suppress(Exception):
                p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--recorded", type=int, default=0,
                    help="volumes already in each agent's desired state at start")
    ap.add_argument("--rpc", default=os.environ.get("CSI_SPDK_TEST_RPC", ""),
                    help="a real spdk_tgt RPC socket (default: simulator)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="csi-bench-", dir="/tmp") as tmp:
        return bench(args.calls, args.rpc, Path(tmp), args.recorded)


if __name__ == "__main__":
    sys.exit(main())
