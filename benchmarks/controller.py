"""Controller benchmark: SPDK round trips, latency and throughput per CSI call.

    python3 benchmarks/controller.py --volumes 100 1000 [--agent] [--rpc SOCK]

Runs the controller as a subprocess (``python -m csi_spdk controller``, info
log level, as in production), directly on the SPDK socket or, with
``--agent``, through a ``csi-spdk agent`` subprocess. SPDK is the simulator
unless ``--rpc``/CSI_SPDK_TEST_RPC names a real spdk_tgt (start it with
``--wait-for-rpc``, send ``nvmf_set_max_subsystems`` above 2N, then
``framework_start_init``; a uniquely named malloc lvstore is used and
removed). Each run prints, per CSI call (CreateVolume thin, Publish,
Unpublish, Delete):

- SPDK calls and serial SPDK rounds, counted by a proxy on the SPDK socket
  in a separate counting pass (a round: a stretch with at least one SPDK call
  in flight; calls sent together on several connections share one; the
  proxy holds each call 3 ms, as spdk_tgt's 4 ms poller does);
- controller->agent round trips (the agent's request counter), with --agent;
- p50/p99 over N volumes (the timing pass: no proxy), first-10% vs last-10%
  p50 and p99, next to the same figures of the bare SPDK sequence of that
  CSI call (``Bare``: the intents' calls in the same rounds, sent straight
  to SPDK), interleaved per volume so both see the same N and load: CSI
  minus bare is the driver's overhead, the bare growth is SPDK's own;
- the SPDK RPC period (a serial spdk_get_version on its own connection
  after every 10th volume) at the first and last 10% of each phase;
- the floor: rounds x that period + the gRPC hops x the gRPC floor (a no-op
  call to the same controller; through the agent, one more hop per agent
  round trip);
- with all N volumes (of both) published: ListVolumes (pages of 500, and
  unpaged), GetCapacity, controller (and agent) RSS, and lifecycles/s with
  1, 8 and 32 calls in flight, CSI and bare.

Each phase's figures are also printed (stderr) as soon as it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csi_spdk import contract  # noqa: E402
from csi_spdk.proto import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_spdk.spdk.api import SpdkApi  # noqa: E402
from csi_spdk.spdk.client import SpdkClient  # noqa: E402
from csi_spdk.spdk.errors import SpdkNotFound  # noqa: E402

MiB = 1024 * 1024
# the NVMe/TCP port of the listeners (another target may hold 4420): --nvmf-port
NVMF_PORT = 4420
# a CSI call that has not answered by then is an error, not a silent hang
CALL_DEADLINE = 600.0
OPS = ("CreateVolume", "ControllerPublishVolume", "ControllerUnpublishVolume", "DeleteVolume")


def wait_for(path: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"{what} did not start (rc={proc.poll()})")
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1000 if s else 0.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))


class CountingProxy:
    """A Unix-socket proxy in front of SPDK that counts JSON-RPC calls and
    serial rounds (stretches with >= 1 call in flight). Each call is held
    ``delay`` seconds, like spdk_tgt's poller holds it, so calls sent together
    overlap (and count as one round) even on the fast simulator."""

    def __init__(self, listen: str, upstream: str, delay: float = 0.003) -> None:
        self.listen, self.upstream, self.delay = listen, upstream, delay
        self.calls = self.rounds = self._inflight = 0
        self._lock = threading.Lock()
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(listen)
        self._srv.listen(256)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(self.upstream)
        dec = json.JSONDecoder()
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                with self._lock:
                    self.calls += 1
                    if self._inflight == 0:
                        self.rounds += 1
                    self._inflight += 1
                time.sleep(self.delay)
                up.sendall(data)
                buf = b""
                while True:   # one request in flight per connection (SpdkClient)
                    chunk = up.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    if buf.endswith(b"\n"):
                        with contextlib.suppress(ValueError):
                            dec.raw_decode(buf.decode().strip())
                            break
                with self._lock:
                    self._inflight -= 1
                c.sendall(buf)
        except OSError:
            return
        finally:
            c.close()
            up.close()

    def read(self) -> tuple[int, int]:
        with self._lock:
            return self.calls, self.rounds


class Stack:
    """Controller (+ agent) subprocesses over one SPDK socket."""

    def __init__(self, tmp: Path, tag: str, spdk: str, lvs: str, agent: bool) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.procs: list[subprocess.Popen] = []
        self.agent_metrics = ""
        target: dict = {"name": "bench",
                        "nvmf": {"listenAddress": "127.0.0.1", "port": NVMF_PORT},
                        "lvstores": [lvs]}
        if agent:
            asock = f"/tmp/csi-bench-{tag}-agent.sock"
            port = _free_port()
            self.agent_metrics = f"http://127.0.0.1:{port}/metrics"
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "csi_spdk", "agent", "--listen", f"unix://{asock}",
                 "--spdk-rpc", spdk, "--state-dir", str(tmp / f"agent-{tag}"),
                 "--metrics-address", f"127.0.0.1:{port}", "--log-level", "warning"],
                env=env, cwd=ROOT, stderr=open(tmp / f"agent-{tag}.log", "w"))  # noqa: SIM115
            self.procs.append(self.agent)
            wait_for(asock, self.agent, "agent")
            target["agent"] = {"address": f"unix://{asock}"}
        else:
            target["rpc"] = f"unix://{spdk}"
        cfg = tmp / f"controller-{tag}.json"
        cfg.write_text(json.dumps({"targets": [target], "thinOvercommitRatio": 100.0}))
        self.sock = f"/tmp/csi-bench-{tag}.sock"
        self.ctl = subprocess.Popen(
            [sys.executable, "-m", "csi_spdk", "controller", "--endpoint",
             f"unix://{self.sock}", "--config", str(cfg), "--log-level", "info"],
            env=env, cwd=ROOT, stderr=open(tmp / f"controller-{tag}.log", "w"))  # noqa: SIM115
        self.procs.append(self.ctl)
        wait_for(self.sock, self.ctl, "controller")
        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        self.stub = csi_pb2_grpc.ControllerStub(self.channel)

    def agent_requests(self) -> float:
        if not self.agent_metrics:
            return 0.0
        total = 0.0
        for line in urllib.request.urlopen(self.agent_metrics).read().decode().splitlines():
            if line.startswith("csi_spdk_agent_requests_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.channel.close()
        for p in reversed(self.procs):
            p.terminate()
            with contextlib.suppress(Exception):
                p.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Volumes:
    """The four CSI steps of one volume's lifecycle."""

    def __init__(self, stub, tag: str) -> None:
        self.stub, self.tag, self.ids = stub, tag, {}

    def step(self, op: str, i: int) -> None:
        s = self.stub
        if op == "CreateVolume":
            self.ids[i] = s.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=f"bench-{self.tag}-{i}", volume_capabilities=[cap()],
                parameters={"thinProvision": "true", "auth": "none"},
                capacity_range=csi_pb2.CapacityRange(required_bytes=MiB)),
                timeout=CALL_DEADLINE).volume.volume_id
        elif op == "ControllerPublishVolume":
            s.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
                volume_id=self.ids[i], node_id=f"node-{i % 8}", volume_capability=cap()),
                timeout=CALL_DEADLINE)
        elif op == "ControllerUnpublishVolume":
            s.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=self.ids[i], node_id=f"node-{i % 8}"), timeout=CALL_DEADLINE)
        else:
            s.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=self.ids[i]),
                           timeout=CALL_DEADLINE)


class Bare:
    """The SPDK RPC sequence of each CSI call, sent straight to SPDK (no
    gRPC, no controller): the same calls in the same rounds as the intents
    (spdk/intents.py), so bare vs CSI separates driver overhead from SPDK's
    own growth with N."""

    def __init__(self, spdk: str, lvs: str, tag: str, inflight: int) -> None:
        self.client = SpdkClient(spdk, timeout=120, pool_size=3 * inflight, idle=3 * inflight)
        self.lvs, self.tag, self.ids = lvs, tag, {}
        self.pool = ThreadPoolExecutor(3 * inflight)
        self.listen = {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
                       "trsvcid": str(NVMF_PORT)}
        if not any(t.get("trtype", "").upper() == "TCP"
                   for t in self.client.call("nvmf_get_transports")):
            self.client.call("nvmf_create_transport", {"trtype": "TCP"})

    def _together(self, *calls: tuple[str, dict]) -> list:
        futs = [self.pool.submit(self._quiet, m, p) for m, p in calls]
        return [f.result() for f in futs]

    def _quiet(self, method: str, params: dict):
        try:
            return self.client.call(method, params)
        except SpdkNotFound:
            return None

    def step(self, op: str, i: int) -> None:
        c = self.client
        if op == "CreateVolume":
            self.ids[i] = c.call("bdev_lvol_create", {
                "lvs_name": self.lvs, "lvol_name": f"bare-{self.tag}-{i}",
                "size_in_mib": 1, "thin_provision": True})
            return
        uuid = self.ids[i]
        nqn = contract.subsystem_nqn(uuid)
        if op == "ControllerPublishVolume":
            self._together(("bdev_get_bdevs", {"name": uuid}), (
                "nvmf_create_subsystem", {
                    "nqn": nqn, "serial_number": contract.serial_number(uuid),
                    "model_number": "csi-spdk rw 00000000 h00000000",
                    "allow_any_host": False, "max_namespaces": 1}))
            self._together(
                ("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": uuid,
                                                                      "uuid": uuid}}),
                ("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": self.listen}),
                ("nvmf_subsystem_add_host", {"nqn": nqn,
                                             "host": contract.host_nqn(f"node-{i % 8}")}))
        elif op == "ControllerUnpublishVolume":
            c.call("nvmf_get_subsystems", {"nqn": nqn})
            c.call("nvmf_delete_subsystem", {"nqn": nqn})
        else:
            self._together(("bdev_get_bdevs", {"name": uuid}),
                           ("nvmf_get_subsystems", {"nqn": nqn}))
            c.call("bdev_lvol_delete", {"name": uuid})

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()


def grpc_floor(sock: str, calls: int = 300) -> float:
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        ident = csi_pb2_grpc.IdentityStub(ch)
        out = []
        for _ in range(calls):
            t = time.perf_counter()
            ident.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            out.append(time.perf_counter() - t)
    return pct(out, .5)


def count_pass(tmp: Path, spdk: str, lvs: str, agent: bool, k: int = 12) -> dict:
    """SPDK calls/rounds and agent hops per CSI call (medians over k volumes,
    after one warm-up volume: the first calls read the lvstores and make the
    TCP transport once)."""
    proxy = CountingProxy(str(tmp / "count.sock"), spdk)
    st = Stack(tmp, "count" + uuidlib.uuid4().hex[:4], str(tmp / "count.sock"), lvs, agent)
    vols = Volumes(st.stub, "count")
    out: dict[str, list[tuple[int, int, float]]] = {op: [] for op in OPS}
    try:
        for op in OPS:
            for i in range(k + 1):
                # (a scrape of the agent's metrics makes SPDK calls of its own,
                # bdev_get_iostat: read them outside the counted window)
                a0 = st.agent_requests()
                c0, r0 = proxy.read()
                vols.step(op, i)
                c1, r1 = proxy.read()
                if i:
                    out[op].append((c1 - c0, r1 - r0, st.agent_requests() - a0))
    finally:
        st.stop()
    return {op: tuple(statistics.median(x[j] for x in v) for j in range(3))
            for op, v in out.items()}


def timing_pass(steppers: dict, n: int, spdk: str, at_scale=None,
                probe_every: int = 10) -> dict[str, dict[str, list[float]]]:
    """N of each CSI call in turn (all creates, then all publishes, ...); for
    each volume, every stepper in turn (``Volumes`` through the controller,
    ``Bare``: the same SPDK sequence sent directly), so both see the same N
    and the same load. After every ``probe_every``-th volume one serial
    spdk_get_version on its own connection: the RPC period under that load
    and N (``out["_period"][op]``). ``at_scale(out)`` runs once, with all N
    volumes (of each stepper) published."""
    out: dict[str, dict[str, list[float]]] = {k: {op: [] for op in OPS} for k in steppers}
    out["_period"] = {op: [] for op in OPS}
    probe = SpdkClient(spdk, timeout=120, pool_size=1)
    probe.call("spdk_get_version")
    for op in OPS:
        say(f"  {op} x {n}")
        for i in range(n):
            for name, vols in steppers.items():
                t = time.perf_counter()
                vols.step(op, i)
                out[name][op].append(time.perf_counter() - t)
            if i % probe_every == 0:
                t = time.perf_counter()
                probe.call("spdk_get_version")
                out["_period"][op].append(time.perf_counter() - t)
            if (i + 1) % max(1, n // 10) == 0:
                say(f"    {op} {i + 1}/{n}")   # where a run that dies stopped
        say(phase_line(op, out, n))   # as it goes: a 10,000-volume run is long
        if op == "ControllerPublishVolume" and at_scale is not None:
            at_scale(out)
    probe.close()
    return out


def measure_at_scale(stack: Stack, tag: str):
    """ListVolumes (every page), GetCapacity, RSS and lifecycles/s with the
    timing pass's N volumes published."""
    def run(times: dict) -> None:
        times["_rss"] = [rss_mib(stack.ctl.pid)] + (
            [rss_mib(stack.agent.pid)] if stack.agent_metrics else [])
        t = time.perf_counter()
        pages, token, entries, page_t = 0, "", 0, []
        while True:
            t1 = time.perf_counter()
            r = stack.stub.ListVolumes(csi_pb2.ListVolumesRequest(
                max_entries=500, starting_token=token), timeout=CALL_DEADLINE)
            page_t.append(time.perf_counter() - t1)
            pages, entries, token = pages + 1, entries + len(r.entries), r.next_token
            if not token:
                break
        times["_list"] = [time.perf_counter() - t, pages, entries]
        times["_pages"] = page_t
        t = time.perf_counter()
        stack.stub.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=CALL_DEADLINE)
        times["_list_all"] = [time.perf_counter() - t]
        caps = []
        for _ in range(5):
            t = time.perf_counter()
            stack.stub.GetCapacity(csi_pb2.GetCapacityRequest(parameters={
                "thinProvision": "true"}), timeout=CALL_DEADLINE)
            caps.append(time.perf_counter() - t)
        times["_cap"] = [statistics.median(caps)]
        times["_rates"] = [throughput(lambda k: Volumes(stack.stub, f"{tag}s{k}"), 4 * k, k)
                           for k in (1, 8, 32)]
        times["_rss_after"] = [rss_mib(stack.ctl.pid), hwm_mib(stack.ctl.pid)]
    return run


def throughput(make, n: int, inflight: int) -> float:
    """Whole lifecycles (create, publish, unpublish, delete) per second;
    ``make(inflight)`` gives the steps (``Volumes`` or ``Bare``)."""
    vols = make(inflight)

    def life(i: int) -> None:
        for op in OPS:
            vols.step(op, i)
    t = time.perf_counter()
    with ThreadPoolExecutor(inflight) as pool:
        list(pool.map(life, range(n)))
    return n / (time.perf_counter() - t)


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def phase_line(op: str, out: dict, n: int) -> str:
    """One phase's figures: p50/p99 overall and first/last 10%, per stepper,
    and the RPC period first/last 10%."""
    k = max(1, n // 10)
    parts = [f"{op} done:"]
    for name in (x for x in out if not x.startswith("_")):
        t = out[name][op]
        parts.append(f"{name} p50 {_p50(t):.2f} p99 {pct(t, .99):.1f} ms, first10% "
                     f"{_p50(t[:k]):.2f} (p99 {pct(t[:k], .99):.1f}) last10% {_p50(t[-k:]):.2f} "
                     f"(p99 {pct(t[-k:], .99):.1f});")
    c = out["_period"][op]
    j = max(1, len(c) // 10)
    parts.append(f"period {_p50(c[:j]):.2f} -> {_p50(c[-j:]):.2f} ms")
    return " ".join(parts)


def _p50(t: list[float]) -> float:
    return statistics.median(t) * 1000 if t else 0.0


def bench(n: int, real_rpc: str, agent: bool, tmp: Path) -> None:
    tag = uuidlib.uuid4().hex[:6]
    sim = None
    if real_rpc:
        spdk = real_rpc
    else:
        spdk = str(tmp / "spdk.sock")
        sim = subprocess.Popen([sys.executable, "-m", "csi_spdk", "sim", "--rpc-socket", spdk,
                                "--data-dir", str(tmp / "data"), "--log-level", "warning",
                                "--max-subsystems", str(2 * n + 64)],
                               env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
        wait_for(spdk, sim, "simulator")
    api = SpdkApi(SpdkClient(spdk, timeout=900))
    malloc, lvs = f"bench{tag}m", f"bench{tag}l"
    stack = None
    try:
        # thin 1 MiB volumes take no cluster, one metadata page each (and a
        # few for the lvstore): size the metadata for 3N lvols
        mib = min(2 * n + 256, 2048)
        ratio = max(300, -(-3 * n * 100 // mib))
        api.malloc_create(malloc, mib * MiB)
        api.call("bdev_lvol_create_lvstore", {"bdev_name": malloc, "lvs_name": lvs,
                                              "cluster_sz": MiB,
                                              "num_md_pages_per_cluster_ratio": ratio})
        say(f"N={n}: counting pass")
        counts = count_pass(tmp, spdk, lvs, agent)
        say("  SPDK calls/rounds/agent trips: " + "; ".join(
            f"{op} {c[0]:.0f}/{c[1]:.0f}/{c[2]:.0f}" for op, c in counts.items()))
        stack = Stack(tmp, tag, spdk, lvs, agent)
        say(f"N={n}: timing pass (CSI and bare interleaved), controller pid {stack.ctl.pid}")
        hop = grpc_floor(stack.sock)
        bare = Bare(spdk, lvs, f"{tag}b", inflight=1)
        csi_at_scale = measure_at_scale(stack, tag)

        def at_scale(out: dict) -> None:
            say(f"N={n}: at scale (ListVolumes, GetCapacity, RSS, volumes/s)")
            csi_at_scale(out["csi"])
            c = out["csi"]
            say(f"  ListVolumes {c['_list'][0] * 1000:.0f} ms ({c['_list'][1]:.0f} pages, p50 "
                f"{_p50(c['_pages']):.0f} ms, first {c['_pages'][0] * 1000:.0f} ms), "
                f"unpaged {c['_list_all'][0] * 1000:.0f} ms, GetCapacity "
                f"{c['_cap'][0] * 1000:.0f} ms, RSS {c['_rss'][0]:.1f} MiB -> "
                f"{c['_rss_after'][0]:.1f} (peak {c['_rss_after'][1]:.1f}); CSI lifecycles/s "
                + ", ".join(f"{r:.1f}" for r in c["_rates"]) + " at 1/8/32 in flight")
            out["bare"]["_rates"] = [
                throughput(lambda k: Bare(spdk, lvs, f"{tag}b{k}", inflight=k), 4 * k, k)
                for k in (1, 8, 32)]
            say("  bare lifecycles/s " + ", ".join(f"{r:.1f}" for r in out["bare"]["_rates"]))
        times = timing_pass({"csi": Volumes(stack.stub, tag), "bare": bare}, n, spdk, at_scale)
        bare.close()
        report(n, real_rpc, agent, counts, hop, times)
    finally:
        if stack is not None:
            stack.stop()
        with contextlib.suppress(Exception):
            api.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
            api.call("bdev_malloc_delete", {"name": malloc})
        api.client.close()
        if sim is not None:
            sim.terminate()
            sim.wait(10)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def report(n: int, real_rpc: str, agent: bool, counts: dict, hop: float,
           out: dict) -> None:
    k = max(1, n // 10)
    times, bare, periods = out["csi"], out["bare"], out["_period"]
    where = "real spdk_tgt" if real_rpc else "simulator"
    how = "through the agent" if agent else "on the SPDK socket"
    period = pct([x for op in OPS for x in periods[op]], .5)
    print(f"\n== N={n} volumes, {where}, controller {how} ==")
    print(f"SPDK RPC period (a serial spdk_get_version after each CSI call, p50): "
          f"{period:.2f} ms; gRPC floor (no-op call p50): {hop:.2f} ms")
    print(f"{'CSI call':<26}{'calls':>6}{'rounds':>7}{'agent':>6}"
          f"{'p50':>9}{'p99':>9}{'floor':>9}{'first10%':>10}{'last10%':>9}"
          f"{'p99 f/l10%':>16}{'growth':>8}")
    for op in OPS:
        calls, rounds, hops = counts[op]
        floor = rounds * period + (1 + (hops if agent else 0)) * hop
        for label, t in ((op, times[op]), ("  bare SPDK sequence", bare[op])):
            f10, l10 = _p50(t[:k]), _p50(t[-k:])
            head = (f"{label:<26}{calls:>6.0f}{rounds:>7.0f}{hops if agent else 0:>6.0f}"
                    if t is times[op] else f"{label:<45}")
            print(f"{head}{pct(t, .5):>7.2f}ms{pct(t, .99):>7.2f}ms"
                  + (f"{floor:>7.2f}ms" if t is times[op] else f"{'':>9}")
                  + f"{f10:>8.2f}ms{l10:>7.2f}ms"
                  f"{pct(t[:k], .99):>7.1f}/{pct(t[-k:], .99):>5.1f}ms"
                  f"{(l10 / f10 - 1) * 100 if f10 else 0:>+7.1f}%")
    print("SPDK RPC period (serial spdk_get_version) first10% -> last10% of each phase, "
          "p50 (p99):")
    for op in OPS:
        c = periods[op]
        j = max(1, len(c) // 10)
        print(f"  during {op:<26} {_p50(c[:j]):6.2f} ({pct(c[:j], .99):6.1f}) -> "
              f"{_p50(c[-j:]):6.2f} ({pct(c[-j:], .99):6.1f}) ms")
    print(f"lifecycle volumes/s with {n} volumes published (CSI | bare): " + ", ".join(
        f"{r:.1f} | {br:.1f} with {i} in flight"
        for i, r, br in zip((1, 8, 32), times["_rates"], bare["_rates"], strict=True)))
    lt, pages, entries = times["_list"]
    print(f"with {n} volumes published: ListVolumes {lt * 1000:.1f} ms for {pages:.0f} "
          f"pages of 500 ({entries:.0f} entries; a page p50 {_p50(times['_pages']):.1f} ms, "
          f"max {max(times['_pages']) * 1000:.1f} ms), unpaged "
          f"{times['_list_all'][0] * 1000:.1f} ms; "
          f"GetCapacity {times['_cap'][0] * 1000:.1f} ms (p50 of 5); controller RSS "
          f"{times['_rss'][0]:.1f} MiB (after the throughput runs "
          f"{times['_rss_after'][0]:.1f}, peak {times['_rss_after'][1]:.1f})"
          + (f", agent RSS {times['_rss'][1]:.1f} MiB" if agent else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rpc", default=os.environ.get("CSI_SPDK_TEST_RPC", ""),
                    help="a real spdk_tgt RPC socket (default: simulator)")
    ap.add_argument("--agent", action="store_true", help="the controller goes through an agent")
    ap.add_argument("--nvmf-port", type=int, default=NVMF_PORT,
                    help="NVMe/TCP port of the listeners (default 4420)")
    args = ap.parse_args()
    globals()["NVMF_PORT"] = args.nvmf_port
    # a run killed from outside says so, with where each thread was
    faulthandler.register(signal.SIGTERM, chain=True)
    for n in args.volumes:
        with tempfile.TemporaryDirectory(prefix="csi-bench-", dir="/tmp") as tmp:
            bench(n, args.rpc.removeprefix("unix://"), args.agent, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
