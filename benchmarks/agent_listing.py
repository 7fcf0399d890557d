"""Listings through the agent at scale: time and memory of ``bdev_get_bdevs``
with N lvols, the controller's way (``SpdkApi.call(each=)``) against the
bare SPDK socket in the same run.

    python3 benchmarks/agent_listing.py --lvols 10000

A ``csi-spdk sim`` subprocess (or the real spdk_tgt named by CSI_SPDK_TEST_RPC)
gets N thin lvols; an agent subprocess serves it on a Unix socket. Measured,
interleaved round by round:

- direct: ``SpdkApi`` on the SPDK socket, keeping one name per bdev (baseline);
- agent: the same through ``AgentClient`` (the agent relays the listing
  element by element, the client decodes it element by element);
- agent/whole: ``AgentClient.call`` without ``each`` (the reply decoded whole,
  what every listing through the agent cost before).

Reported: p50 seconds per listing, this process's peak of traced Python
allocations per way (tracemalloc; the kept names are in all of them), and
the agent's VmHWM before and after the listings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from agent import child, wait_ready  # noqa: E402

from csi_spdk.spdk.agent_client import AgentClient  # noqa: E402
from csi_spdk.spdk.api import SpdkApi  # noqa: E402
from csi_spdk.spdk.client import SpdkClient  # noqa: E402

MiB = 1 << 20


def vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(api: SpdkApi, n: int) -> str:
    """A 1 GiB lvstore with N thin 4 MiB lvols (skipping what an earlier run left)."""
    if not _exists(api, "bl0"):
        api.call("bdev_malloc_create", {"name": "bl0", "num_blocks": 262144, "block_size": 4096})
    if not [s for s in api.call("bdev_lvol_get_lvstores") if s["name"] == "bls"]:
        api.call("bdev_lvol_create_lvstore", {"bdev_name": "bl0", "lvs_name": "bls",
                                              "cluster_sz": MiB,
                                              # one metadata page per lvol at least
                                              "num_md_pages_per_cluster_ratio": 2000})
    have = {b["aliases"][0] for b in api.call("bdev_get_bdevs") if b.get("aliases")}
    t0 = time.monotonic()
    for i in range(n):
        name = f"csi-listing-{i:05d}"
        if f"bls/{name}" not in have:
            api.call("bdev_lvol_create", {"lvs_name": "bls", "lvol_name": name,
                                          "size_in_mib": 4, "thin_provision": True})
    return f"{n} lvols ready in {time.monotonic() - t0:.1f} s"


def _exists(api: SpdkApi, name: str) -> bool:
    try:
        return bool(api.call("bdev_get_bdevs", {"name": name}))
    except Exception:  # noqa: BLE001 - ENODEV: not there
        return False


def measure(fn) -> tuple[float, int, int]:
    tracemalloc.start()
    t0 = time.monotonic()
    got = fn()
    took = time.monotonic() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return took, peak, len(got)


def bench(n: int, rounds: int, rpc: str, tmp: Path) -> int:
    procs = []
    try:
        if not rpc:
            rpc = str(tmp / "spdk.sock")
            procs.append(child(["sim", "--rpc-socket", rpc], tmp / "sim.log"))
        direct = SpdkApi(SpdkClient(rpc, timeout=600))
        if procs:
            wait_ready(direct, procs[0], "the simulator")
        print(fill(direct, n), flush=True)
        agent_sock = tmp / "agent.sock"
        agent = child(["agent", "--listen", f"unix://{agent_sock}", "--spdk-rpc", rpc,
                       "--state-dir", str(tmp / "agent-state")], tmp / "agent.log")
        procs.append(agent)
        client = AgentClient(f"unix://{agent_sock}", timeout=600)
        via = SpdkApi(client)
        wait_ready(via, agent, "the agent")
        hwm_before = vm(agent.pid, "VmHWM")

        def name(b):
            return b["name"]

        ways = {
            "direct": lambda: direct.call("bdev_get_bdevs", each=name),
            "agent": lambda: via.call("bdev_get_bdevs", each=name),
            "agent/whole": lambda: [name(b) for b in client.call("bdev_get_bdevs")],
        }
        times: dict[str, list[float]] = {w: [] for w in ways}
        peaks: dict[str, int] = {w: 0 for w in ways}
        counts = set()
        for _ in range(rounds):
            for way, fn in ways.items():
                took, peak, count = measure(fn)
                times[way].append(took)
                peaks[way] = max(peaks[way], peak)
                counts.add(count)
        print(f"bdev_get_bdevs with {n} lvols ({sorted(counts)} bdevs listed), "
              f"{rounds} rounds, load {os.getloadavg()[0]:.1f}:")
        print(f"  {'way':<12} {'p50 s':>8} {'peak traced MiB':>16}")
        for way in ways:
            print(f"  {way:<12} {statistics.median(times[way]):>8.3f} "
                  f"{peaks[way] / MiB:>16.1f}")
        print(f"  agent VmHWM: {hwm_before:.1f} MiB before the listings, "
              f"{vm(agent.pid, 'VmHWM'):.1f} MiB after; VmRSS now {vm(agent.pid, 'VmRSS'):.1f}")
        client.close()
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lvols", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rpc", default=os.environ.get("CSI_SPDK_TEST_RPC", ""),
                    help="a real spdk_tgt RPC socket (default: simulator)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="csi-bench-", dir="/tmp") as tmp:
        return bench(args.lvols, args.rounds, args.rpc, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
