"""Record ``bdev_set_qos_limit`` answers from a real, freshly started spdk_tgt
into tests/contract/data/qos_v25.09.json (same format as shared/spdk-golden;
replayed against the simulator by test_qos_golden.py).

    python3 tests/contract/record_qos.py /path/to/spdk.sock [OUT.json]

The sequence covers what the driver relies on and spdk-golden 08 does not:
UINT64_MAX as "not given", the uint64 decode bounds, IOPS round-up with
wrap-around, the MiB/s clamp, a disable freeing the QoS structure (a closed
bdev then takes one change again), limits kept after the consumer closes,
and a namespace-only subsystem (no listener, no host) as the consumer, which
is how the driver holds an unpublished volume open (controller/qos.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from golden_replay import Recorder  # noqa: E402

OUT = HERE / "data" / "qos_v25.09.json"
U64 = 2**64 - 1
NQN = "nqn.2024-11.io.csi-spdk:vol:qos-record"


def sequence(lvol: str) -> list[tuple[str, dict | None, str]]:
    """(method, params, note); ``lvol`` is replaced by the lvol's uuid."""
    q = "bdev_set_qos_limit"
    return [
        (q, {"name": lvol, "rw_ios_per_sec": U64}, "UINT64_MAX is 'not given'"),
        (q, {"name": lvol, "rw_ios_per_sec": 2**64}, "above uint64"),
        (q, {"name": lvol, "rw_ios_per_sec": -1}, "negative"),
        (q, {"name": lvol, "rw_ios_per_sec": 1.5}, "fraction"),
        (q, {"name": lvol, "rw_ios_per_sec": "1000"}, "string"),
        (q, {"name": lvol, "iops": 1000}, "unknown key"),
        (q, {"name": lvol, "rw_ios_per_sec": 0}, "all zero on a bdev without QoS"),
        (q, {"name": lvol, "w_mbytes_per_sec": 0}, "again: still no QoS structure"),
        (q, {"name": lvol, "w_mbytes_per_sec": 3}, "first real change, unopened"),
        (q, {"name": lvol, "w_mbytes_per_sec": 4}, "second change, unopened"),
        ("bdev_get_bdevs", {"name": lvol}, "limits after the refused change"),
        ("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": False}, None),
        ("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": lvol}},
         "namespace only: no listener, no host"),
        (q, {"name": lvol, "w_mbytes_per_sec": 4}, "held open by the namespace"),
        (q, {"name": lvol, "rw_ios_per_sec": 1}, "IOPS 1"),
        ("bdev_get_bdevs", {"name": lvol}, None),
        (q, {"name": lvol, "rw_ios_per_sec": U64 - 614}, "IOPS round-up wraps"),
        (q, {"name": lvol, "r_mbytes_per_sec": U64 - 1}, "MiB/s clamp"),
        ("bdev_get_bdevs", {"name": lvol}, None),
        (q, {"name": lvol, "rw_ios_per_sec": 0, "r_mbytes_per_sec": 0}, "w limit stays"),
        (q, {"name": lvol, "rw_ios_per_sec": 3000}, None),
        ("nvmf_delete_subsystem", {"nqn": NQN}, "the consumer closes"),
        ("bdev_get_bdevs", {"name": lvol}, "limits kept after close"),
        (q, {"name": lvol, "rw_ios_per_sec": 4000}, "closed: EAGAIN"),
        ("nvmf_create_subsystem", {"nqn": NQN, "allow_any_host": False}, None),
        ("nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": lvol}}, None),
        (q, {"name": lvol, "rw_ios_per_sec": 0, "w_mbytes_per_sec": 0}, "disable"),
        ("bdev_get_bdevs", {"name": lvol}, None),
        ("nvmf_delete_subsystem", {"nqn": NQN}, None),
        (q, {"name": lvol, "rw_ios_per_sec": 5000}, "disabled then closed: one change again"),
        (q, {"name": lvol, "rw_ios_per_sec": 6000}, "and EAGAIN after it"),
        ("bdev_get_bdevs", {"name": lvol}, None),
    ]


def main(sock: str, out: Path = OUT) -> int:
    rec = Recorder(sock)
    send = rec.send
    send("spdk_get_version", None)
    send("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 16384, "block_size": 4096})
    send("bdev_lvol_create_lvstore", {"bdev_name": "Malloc0", "lvs_name": "lvs0"})
    lvol = send("bdev_lvol_create", {"lvol_name": "vol0", "size_in_mib": 8,
                                     "lvs_name": "lvs0", "thin_provision": True})["result"]
    for method, params, note in sequence(lvol):
        send(method, params, note)
    send("bdev_lvol_delete", {"name": lvol})
    send("bdev_lvol_delete_lvstore", {"lvs_name": "lvs0"})
    send("bdev_malloc_delete", {"name": "Malloc0"})
    rec.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else OUT))
