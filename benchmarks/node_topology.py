"""NodeGetInfo's cost now that it reads the SSD inventory per call.

    python3 benchmarks/node_topology.py --ssds 8 --volumes 64

Builds a fake sysfs tree (tests/unit/data/fakesys.py: the Linux 6.1 layout)
with N local PCIe SSDs and V connected NVMe/TCP volumes (fabrics controllers
the scan must read and skip), then times in the same run:

* static: NodeGetInfo over a precomputed segment dict (what the node did
  before: the inventory was read once at start-up);
* per call: NodeGetInfo through ``NodeTopology.segments`` (sysfs scan);

and prints p50/p99 of each and the difference per call. A real sysfs is a
kernel pseudo-filesystem, not tmpfs files, so absolute numbers differ; the
order of magnitude (tens of microseconds per SSD) is what the run is for.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit" / "data"))

import fakesys  # noqa: E402

from csi_spdk.node.service import NodeServicer  # noqa: E402
from csi_spdk.node.topology import NodeTopology  # noqa: E402
from csi_spdk.proto import csi_pb2  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1e6


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ssds", type=int, default=8)
    ap.add_argument("--volumes", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "sys")
        for i in range(args.ssds):
            fakesys.add_pcie_ssd(root, f"0000:{i + 1:02x}:00.0", "0x144d", "0xa80a",
                                 "SAMSUNG MZQL21T9HCJR-00A07", f"S{i:08d}", "GDC5302Q",
                                 namespaces=[3750748848], multipath=False)
        for v in range(args.volumes):
            fakesys.add_fabrics_subsystem(root, str(Path(tmp) / "dev"), f"nqn.x:vol{v}",
                                          [str(uuid.uuid4())])
        topo = NodeTopology("bench-node", root)
        state = str(Path(tmp) / "state")
        live = NodeServicer("bench-node", state, object(), topology=topo.segments)
        static = NodeServicer("bench-node", state, object(),
                              topology_segments=topo.segments())
        req = csi_pb2.NodeGetInfoRequest()
        assert dict(live.NodeGetInfo(req, None).accessible_topology.segments) == \
            dict(static.NodeGetInfo(req, None).accessible_topology.segments)
        results = {}
        for _ in range(2):            # interleave: load noise hits both alike
            for name, node in (("static", static), ("per call", live)):
                results.setdefault(name, []).extend(
                    timed(lambda n=node: n.NodeGetInfo(req, None), args.calls // 2))
    print(f"NodeGetInfo with {args.ssds} local SSDs and {args.volumes} NVMe/TCP "
          f"controllers, {args.calls} calls each:")
    for name, vals in results.items():
        print(f"  {name:9s} p50 {pct(vals, 0.5):8.1f} us   p99 {pct(vals, 0.99):8.1f} us")
    extra = pct(results["per call"], 0.5) - pct(results["static"], 0.5)
    print(f"  the per-call inventory adds {extra:.1f} us (p50) per NodeGetInfo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
