"""Record, replay or live-compare generated JSON-RPC sequences (see README.md).

    python3 -m tests.differential record --spdk-tgt /work/spdk-bin/spdk_tgt \\
        --seeds 2-11 --steps 600          # re-record tests/differential/recordings/
    python3 -m tests.differential replay  # every recording against a fresh simulator
    python3 -m tests.differential live --spdk-tgt ... --seed 42 --steps 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import harness


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _record(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    kept = 0
    for seed in _seeds(args.seeds):
        if kept >= args.keep:
            break
        start = time.monotonic()
        try:
            with harness.spdk_tgt(args.spdk_tgt) as (sock, root):
                entries = harness.record(sock, root, seed, args.steps)
        except RuntimeError as err:     # the real target crashed or hung: say so, skip
            print(f"seed {seed}: SKIPPED, {err}", flush=True)
            continue
        kept += 1
        harness.save(args.out / f"seed-{seed:03d}.json", seed, args.steps, "spdk_tgt v25.09",
                     entries)
        errors = sum(1 for e in entries if "error" in e["response"])
        print(f"seed {seed}: {len(entries)} steps, {errors} errors, "
              f"{time.monotonic() - start:.1f}s", flush=True)
    return 0


def _report(name: str, result: harness.Replay, limit: int) -> int:
    print(f"{name}: {len(result.differences)} differing responses")
    for diff in result.differences[:limit]:
        print(f"  {diff}")
    return len(result.differences)


def _replay(args: argparse.Namespace) -> int:
    total = 0
    for path in sorted(args.dir.glob("seed-*.json")):
        rec = harness.load(path)
        with harness.simulator() as (sock, root):
            total += _report(path.name, harness.replay(rec["entries"], sock, root), args.show)
    return 1 if total else 0


def _live(args: argparse.Namespace) -> int:
    total = 0
    for seed in _seeds(args.seeds):
        with harness.spdk_tgt(args.spdk_tgt) as (sock_a, root_a), \
                harness.simulator() as (sock_b, root_b):
            result = harness.compare_live(sock_a, root_a, sock_b, root_b, seed, args.steps)
        total += _report(f"seed {seed}", result, args.show)
    return 1 if total else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.differential")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="record from fresh real spdk_tgt instances")
    rec.add_argument("--spdk-tgt", required=True)
    rec.add_argument("--seeds", default="1-10")
    rec.add_argument("--steps", type=int, default=600)
    rec.add_argument("--keep", type=int, default=10, help="stop after this many recordings")
    rec.add_argument("--out", type=Path, default=harness.RECORDINGS)
    rep = sub.add_parser("replay", help="replay recordings against the simulator")
    rep.add_argument("--dir", type=Path, default=harness.RECORDINGS)
    rep.add_argument("--show", type=int, default=20)
    live = sub.add_parser("live", help="one sequence against spdk_tgt and the simulator")
    live.add_argument("--spdk-tgt", required=True)
    live.add_argument("--seeds", default="1")
    live.add_argument("--steps", type=int, default=600)
    live.add_argument("--show", type=int, default=20)
    args = ap.parse_args(argv)
    return {"record": _record, "replay": _replay, "live": _live}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
