"""ListVolumes, GetCapacity and controller memory with N volumes on one target.

    python3 benchmarks/at_scale.py --volumes 10000 [--rpc SOCK] [--nvmf-port P]

The lifecycle benchmark (``controller.py``) makes its N volumes one CSI call
at a time, which at 10,000 takes hours on a crowded machine. This one fills
the target quickly instead: straight through SPDK, ``--inflight`` calls at
once on separate connections (SPDK reads every connection in the same
poll), it makes what CreateVolume and ControllerPublishVolume make (a thin
1 MiB lvol named like a volume, its subsystem with the namespace, the
listener and one host), then starts the controller as in production
(``python -m csi_spdk controller``) and measures:

- ListVolumes, every page of 500 (p50, max, the first one: the controller's
  one scan of its process) and unpaged, checking that the pages together
  are the N volumes, each once;
- GetCapacity (p50 of 5);
- the controller's VmRSS (steady) and VmHWM (peak) after start, after the
  first ListVolumes and at the end;
- the baseline, in the same run: one ``bdev_get_bdevs`` and one
  ``nvmf_get_subsystems`` sent straight to SPDK (what every page and every
  GetCapacity cost before they answered from kept figures) and the size
  of their replies.

SPDK is the simulator unless ``--rpc`` names a real spdk_tgt (started with
``--wait-for-rpc``, ``nvmf_set_max_subsystems`` above N, then
``framework_start_init``); a uniquely named malloc lvstore is used and
removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import controller as lifecycle  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.proto import csi_pb2  # noqa: E402
from csi_spdk.spdk.client import SpdkClient  # noqa: E402

MiB = 1024 * 1024


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    d = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(d["VmRSS"].split()[0]) / 1024, int(d["VmHWM"].split()[0]) / 1024


def fill(spdk: str, lvs: str, tag: str, n: int, inflight: int, port: int) -> list[str]:
    """N published volumes as the controller makes them; their uuids."""
    client = SpdkClient(spdk, timeout=600, pool_size=inflight, idle=inflight)
    if not any(t.get("trtype", "").upper() == "TCP" for t in client.call("nvmf_get_transports")):
        client.call("nvmf_create_transport", {"trtype": "TCP"})
    listen = {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}

    def one(i: int) -> str:
        uuid = client.call("bdev_lvol_create", {
            "lvs_name": lvs, "lvol_name": contract.volume_lvol_name(f"fill-{tag}-{i}"),
            "size_in_mib": 1, "thin_provision": True})
        nqn = contract.subsystem_nqn(uuid)
        client.call("nvmf_create_subsystem", {
            "nqn": nqn, "serial_number": contract.serial_number(uuid),
            "model_number": "csi-spdk rw 00000000 h00000000", "allow_any_host": False,
            "max_namespaces": 1})
        client.call("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {
            "bdev_name": uuid, "uuid": uuid}})
        client.call("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": listen})
        client.call("nvmf_subsystem_add_host", {"nqn": nqn,
                                                "host": contract.host_nqn(f"node-{i % 8}")})
        return uuid
    out: list[str] = []
    with ThreadPoolExecutor(inflight) as pool:
        for k, uuid in enumerate(pool.map(one, range(n)), 1):
            out.append(uuid)
            if k % max(1, n // 10) == 0:
                lifecycle.say(f"  filled {k}/{n}")
    client.close()
    return out


def baseline(spdk: str) -> dict[str, tuple[float, int]]:
    """Seconds and reply bytes of one full listing of each kind, straight to SPDK."""
    out = {}
    for method in ("bdev_get_bdevs", "nvmf_get_subsystems"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(spdk)
        t = time.perf_counter()
        s.sendall(json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}).encode())
        chunks, size = [], 0
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                with contextlib.suppress(ValueError):
                    json.loads(b"".join(chunks))
                    break
        out[method] = (time.perf_counter() - t, size)
        s.close()
    return out


def measure(stack, n: int, made: set[str]) -> dict:
    stub, pid = stack.stub, stack.ctl.pid
    r: dict = {"rss_start": memory(pid)}
    pages, token, seen = [], "", []
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        resp = stub.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=500,
                                                           starting_token=token), timeout=1800)
        pages.append(time.perf_counter() - t)
        if len(pages) == 1:
            r["rss_first_page"] = memory(pid)
        seen += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    r["list_total"], r["pages"] = time.perf_counter() - t0, pages
    ours = [v for v in seen if v.split(":", 1)[1] in made]
    r["listed"], r["unique"] = len(ours), len(set(ours)) == len(ours)
    t = time.perf_counter()
    resp = stub.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=1800)
    r["list_unpaged"], r["unpaged_entries"] = time.perf_counter() - t, len(resp.entries)
    caps = []
    for _ in range(5):
        t = time.perf_counter()
        stub.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"thinProvision": "true"}),
                         timeout=1800)
        caps.append(time.perf_counter() - t)
    r["capacity"] = statistics.median(caps)
    r["rss_end"] = memory(pid)
    return r


def report(n: int, real: bool, fill_s: float, base: dict, r: dict) -> None:
    ms = 1000
    p = r["pages"]
    print(f"\n== N={n} published volumes, {'real spdk_tgt' if real else 'simulator'} ==")
    print(f"fill (straight through SPDK): {fill_s:.0f} s")
    for method, (secs, size) in base.items():
        print(f"baseline {method} (one full listing, straight to SPDK): {secs * ms:.0f} ms, "
              f"{size / MiB:.1f} MiB of reply")
    print(f"ListVolumes, pages of 500: {len(p)} pages, {r['list_total'] * ms:.0f} ms in all; "
          f"first page {p[0] * ms:.0f} ms (the process's one scan), later pages p50 "
          f"{statistics.median(p[1:] or p) * ms:.0f} ms, max {max(p[1:] or p) * ms:.0f} ms; "
          f"{r['listed']} of {n} volumes listed, each once: {r['unique']}")
    print(f"ListVolumes unpaged: {r['list_unpaged'] * ms:.0f} ms ({r['unpaged_entries']} "
          f"entries); GetCapacity p50 of 5: {r['capacity'] * ms:.1f} ms")
    for label, key in (("at start", "rss_start"), ("after the first page", "rss_first_page"),
                       ("at the end", "rss_end")):
        rss, hwm = r[key]
        print(f"controller {label}: VmRSS {rss:.1f} MiB, VmHWM {hwm:.1f} MiB")


def bench(n: int, spdk: str, inflight: int, port: int, tmp: Path) -> None:
    tag = uuidlib.uuid4().hex[:6]
    sim = None
    if not spdk:
        spdk = str(tmp / "spdk.sock")
        sim = subprocess.Popen([sys.executable, "-m", "csi_spdk", "sim", "--rpc-socket", spdk,
                                "--data-dir", str(tmp / "data"), "--log-level", "warning",
                                "--max-subsystems", str(n + 64)],
                               env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
                               cwd=HERE.parent)
        lifecycle.wait_for(spdk, sim, "simulator")
    api = SpdkClient(spdk, timeout=1800)
    malloc, lvs = f"scale{tag}m", f"scale{tag}l"
    stack = None
    try:
        mib = min(n + 256, 2048)
        ratio = max(300, -(-2 * n * 100 // mib))
        api.call("bdev_malloc_create", {"name": malloc, "num_blocks": mib * MiB // 4096,
                                        "block_size": 4096})
        api.call("bdev_lvol_create_lvstore", {"bdev_name": malloc, "lvs_name": lvs,
                                              "cluster_sz": MiB,
                                              "num_md_pages_per_cluster_ratio": ratio})
        lifecycle.say(f"N={n}: filling, {inflight} calls in flight")
        t = time.perf_counter()
        made = set(fill(spdk, lvs, tag, n, inflight, port))
        fill_s = time.perf_counter() - t
        lifecycle.say("  baseline listings")
        base = baseline(spdk)
        lifecycle.NVMF_PORT = port
        stack = lifecycle.Stack(tmp, tag, spdk, lvs, agent=False)
        lifecycle.say(f"N={n}: controller pid {stack.ctl.pid}: ListVolumes, GetCapacity")
        r = measure(stack, n, made)
        report(n, sim is None, fill_s, base, r)
    finally:
        if stack is not None:
            stack.stop()
        with contextlib.suppress(Exception):
            ours = {lv["uuid"] for lv in api.call("bdev_lvol_get_lvols", {"lvs_name": lvs})}
            nqns = api.call("nvmf_get_subsystems", each=lambda s: s["nqn"] if s["nqn"][
                len(contract.NQN_PREFIX):] in ours else None)   # (only this run's)
            gone = SpdkClient(spdk, timeout=600, pool_size=inflight, idle=inflight)
            with ThreadPoolExecutor(inflight) as pool:   # together: N serial calls take long
                list(pool.map(lambda q: gone.call("nvmf_delete_subsystem", {"nqn": q}), nqns))
            gone.close()
            api.call("bdev_lvol_delete_lvstore", {"lvs_name": lvs})
            api.call("bdev_malloc_delete", {"name": malloc})
        api.close()
        if sim is not None:
            sim.terminate()
            sim.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, nargs="+", default=[1000])
    ap.add_argument("--rpc", default=os.environ.get("CSI_SPDK_TEST_RPC", ""),
                    help="a real spdk_tgt RPC socket (default: simulator)")
    ap.add_argument("--inflight", type=int, default=32, help="SPDK calls at once while filling")
    ap.add_argument("--nvmf-port", type=int, default=4420)
    args = ap.parse_args()
    for n in args.volumes:
        with tempfile.TemporaryDirectory(prefix="csi-scale-", dir="/tmp") as tmp:
            bench(n, args.rpc.removeprefix("unix://"), args.inflight, args.nvmf_port, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
