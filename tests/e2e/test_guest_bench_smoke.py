"""benchmarks/node.py runs end to end in the guest with 2 volumes and prints
what it promises (not a timing test: no figure is compared with a limit)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from guest.harness import GuestOptions

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_node", ROOT / "benchmarks" / "node.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_guest_node_benchmark_smoke(guest, host_rpc):
    bench = _bench()
    res = guest.run(bench.guest_script(2, ["block", "mount"]), timeout=400,
                    files=bench.guest_files(), options=GuestOptions(host_rpc=host_rpc),
                    check=True)
    data = bench.parse(res.output)
    assert data["volumes"] == 2 and data["target_ms"] == 100.0
    assert set(data["results"]) == {"block", "mount"}
    for access, figures in data["results"].items():
        want = {"connect", "disconnect", "stage", "publish", "unpublish", "unstage", "grpc",
                "roundtrip", "bare_roundtrip"}
        if access == "mount":
            want |= {"mkfs", "mount", "connect_mount"}
        nonempty = {k for k, v in figures.items() if v}
        assert nonempty == want, (access, nonempty)
        for name in want:
            assert len(figures[name]) == 2 and all(0 < x < 60 for x in figures[name]), \
                (access, name, figures[name])
        for s, p, u, us, rt in zip(figures["stage"], figures["publish"], figures["unpublish"],
                                   figures["unstage"], figures["roundtrip"], strict=True):
            assert abs(s + p + u + us - rt) < 1e-6
        assert f"== node, {access}, N=2 volumes" in res.output
    assert res.output.count("staging overhead on top of the kernel's own work") == 2
