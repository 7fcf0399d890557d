"""SPDK's own QoS enforcement, with no driver and no network in the way.

    python3 benchmarks/qos_spdk.py --spdk-dd /path/spdk_dd [--prefix 'chrt -f 50'] \
        [--iops 1000 3000 5000 10000] [--mbps 16 32]

``spdk_dd`` (an SPDK application) reads a malloc bdev that carries a
``bdev_set_qos_limit`` from its start-up JSON config: one process, one
reactor, SPDK's token bucket and nothing else. It is the ceiling the driver's
path (``benchmarks/qos.py --perf``: volume created, limited and published by
the driver, read over NVMe/TCP by ``spdk_nvme_perf``) can reach on the same
machine at the same moment. When this figure falls short of a limit too, the
shortfall is SPDK's reactor not getting its core, not the driver.

``--prefix`` runs spdk_dd under a scheduler (``chrt -f 50``: a real-time
core, as a production spdk_tgt has with a dedicated, isolated CPU;
``nice -n 10``: a crowded one). Each limited run follows an unlimited run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

BLOCKS = 16384          # a 64 MiB malloc bdev of 4 KiB blocks: spdk_dd's --count bound
_RATE = re.compile(r"average (\d+) (kBps|MBps)")


def spdk_dd(cmd: list[str], limits: dict[str, int], block: int, count: int) -> dict:
    """One spdk_dd read of the malloc bdev under ``limits``: IOPS and MiB/s."""
    config = [{"method": "bdev_malloc_create",
               "params": {"name": "qos0", "num_blocks": BLOCKS, "block_size": 4096}}]
    if limits:
        config.append({"method": "bdev_set_qos_limit", "params": {"name": "qos0", **limits}})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp, "dd.json")
        cfg.write_text(json.dumps({"subsystems": [{"subsystem": "bdev", "config": config}]}))
        res = subprocess.run([*cmd, "--no-huge", "-s", "512", "-m", "0x2", "--json", str(cfg),
                              "--ib", "qos0", "--of", "/dev/null", "--bs", str(block),
                              "--qd", "64", "--count", str(count)],
                             capture_output=True, text=True, timeout=300)
    rates = _RATE.findall(res.stdout.replace("\r", "\n"))
    if res.returncode or not rates:
        raise SystemExit(f"spdk_dd failed ({res.returncode}):\n{res.stdout[-1500:]}"
                         f"{res.stderr[-1500:]}")
    value, unit = rates[-1]                 # spdk_dd's kB and MB are KiB and MiB
    kib_s = int(value) * (1024 if unit == "MBps" else 1)
    return {"iops": kib_s * 1024 / block, "mibps": kib_s / 1024, "block": block}


def measure(cmd: list[str], key: str, limit: int) -> dict:
    """The unlimited bdev, then ``key`` at ``limit``, read for about 5 s."""
    if key == "maxIOPS":
        block, spdk_key, per_s = 4096, "rw_ios_per_sec", limit
    else:
        block, spdk_key, per_s = 128 * 1024, "rw_mbytes_per_sec", limit * 8  # 128 KiB ops/s
    count = min(BLOCKS * 4096 // block, max(per_s * 5, 1))
    base = spdk_dd(cmd, {}, block, BLOCKS * 4096 // block)
    got = spdk_dd(cmd, {spdk_key: limit}, block, count)
    measured = got["iops"] if key == "maxIOPS" else got["mibps"]
    return {"key": key, "limit": limit, "measured": measured, "ratio": measured / limit,
            "baseline": base["iops"] if key == "maxIOPS" else base["mibps"]}


def report(runs: list[dict], title: str) -> None:
    print(f"== {title} ==", flush=True)
    for r in runs:
        unit = "IOPS" if r["key"] == "maxIOPS" else "MiB/s"
        verdict = "within 10%" if abs(r["ratio"] - 1) <= 0.10 else "OFF BY MORE THAN 10%"
        print(f"{r['key']}={r['limit']:<6} SPDK alone: {r['measured']:.1f} {unit} = "
              f"{r['ratio']:.3f} x limit, unlimited {r['baseline']:.0f}: {verdict}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spdk-dd", required=True, help="path of SPDK's spdk_dd")
    ap.add_argument("--prefix", default="", help="command prefix, e.g. 'chrt -f 50'")
    ap.add_argument("--iops", type=int, nargs="*", default=[1000, 3000, 5000, 10000])
    ap.add_argument("--mbps", type=int, nargs="*", default=[16, 32])
    args = ap.parse_args(argv)
    cmd = [*shlex.split(args.prefix), args.spdk_dd]
    runs = [measure(cmd, "maxIOPS", v) for v in args.iops]
    runs += [measure(cmd, "maxMBps", v) for v in args.mbps]
    report(runs, f"SPDK's QoS in one process (spdk_dd, prefix {args.prefix or 'none'!r})")
    print("@@BENCH " + json.dumps({"load": "spdk_dd", "prefix": args.prefix, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
