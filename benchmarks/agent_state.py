"""What recording one change in the agent's desired state costs, by size.

    python3 benchmarks/agent_state.py --volumes 0 1000 10000 --changes 200

For each size, a state with that many published volumes (subsystem,
namespace, listener, host with key names, two key entries, QoS) is built, then
the same change (a host added to / removed from one volume, alternately) is
recorded ``--changes`` times two ways, interleaved change by change:

- journal: ``DesiredState.record`` as the agent runs it now (one fdatasync'd
  journal record of the touched entry; compaction when it is due, counted in);
- whole file: the same change kept in memory, then the write the agent did
  per change before the journal, ``atomicfile.write_json`` of the whole state
  (write-temp, fsync, rename, fsync the directory): the baseline.

Prints p50/p99 per way and size, the journal and snapshot sizes, and the
process's resident memory with that many volumes held (VmRSS, and the
state's own allocation by tracemalloc).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid as uuidlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csi_spdk import atomicfile, contract  # noqa: E402
from csi_spdk.agent.state import DesiredState  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(st: DesiredState, n: int) -> None:
    """N published volumes, recorded as the agent records an export (batched)."""
    listen = {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "4420"}
    with st.batch():
        for i in range(n):
            uuid = str(uuidlib.UUID(int=i + 1))
            nqn, host = contract.subsystem_nqn(uuid), contract.host_nqn(f"node-{i % 50}")
            k1, k2 = f"dhchap-{uuid}-h", f"dhchap-{uuid}-c"
            for k in (k1, k2):
                st.record("keyring_file_add_key", {"name": k, "path": f"/keys/{k}"})
            st.record("nvmf_create_subsystem", {
                "nqn": nqn, "serial_number": contract.serial_number(uuid),
                "model_number": contract.MODEL_NUMBER, "allow_any_host": False,
                "max_namespaces": 1})
            st.record("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {
                "bdev_name": uuid, "uuid": uuid}}, 1)
            st.record("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": listen})
            st.record("nvmf_subsystem_add_host", {"nqn": nqn, "host": host,
                                                  "dhchap_key": k1, "dhchap_ctrlr_key": k2})
            st.record("bdev_set_qos_limit", {"name": uuid, "rw_ios_per_sec": 2000})


def one_size(n: int, changes: int, tmp: Path) -> None:
    gc.collect()
    rss0 = rss_mib()
    tracemalloc.start()
    st = DesiredState(tmp / f"n{n}" / "desired.json")
    fill(st, n)
    state_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss = rss_mib()
    nqn = contract.subsystem_nqn(str(uuidlib.UUID(int=1)))
    st.record("nvmf_create_subsystem", {"nqn": nqn, "allow_any_host": False})
    journal: list[float] = []
    whole: list[float] = []
    baseline = tmp / f"n{n}" / "whole-file.json"
    for i in range(changes):
        method = "nvmf_subsystem_add_host" if i % 2 == 0 else "nvmf_subsystem_remove_host"
        params = {"nqn": nqn, "host": "nqn.2014-08.org.nvmexpress:uuid:bench"}
        t = time.perf_counter()
        st.record(method, params)
        journal.append((time.perf_counter() - t) * 1000)
        method = "nvmf_subsystem_remove_host" if i % 2 == 0 else "nvmf_subsystem_add_host"
        t = time.perf_counter()
        with st.batch():                 # in memory only: the write below is the cost
            st.record(method, params)
            atomicfile.write_json(baseline, st._data, 0o600)
            whole.append((time.perf_counter() - t) * 1000)
        # (the batch's own journal record is appended after the timer stopped)
    size = st.path.stat().st_size
    jsize = st.journal.journal_path.stat().st_size
    st.close()
    print(f"{n:>7} volumes  journal    p50 {statistics.median(journal):8.3f}  "
          f"p99 {pct(journal, 0.99):8.3f} ms   (snapshot {size / 1e6:.1f} MB, journal "
          f"{jsize / 1e3:.0f} kB now)")
    print(f"{'':>7}          whole file p50 {statistics.median(whole):8.3f}  "
          f"p99 {pct(whole, 0.99):8.3f} ms   ({baseline.stat().st_size / 1e6:.1f} MB per "
          f"change)")
    print(f"{'':>7}          memory: the state {state_bytes / 2**20:.1f} MiB (tracemalloc), "
          f"process VmRSS {rss:.1f} MiB (+{rss - rss0:.1f})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, nargs="+", default=[0, 1000, 10000])
    ap.add_argument("--changes", type=int, default=200)
    args = ap.parse_args()
    print("recording one change in the agent's desired state (same run, interleaved):")
    with tempfile.TemporaryDirectory(prefix="csi-bench-state-", dir="/tmp") as tmp:
        for n in args.volumes:
            one_size(n, args.changes, Path(tmp))
    import os
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
