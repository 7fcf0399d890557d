"""Encryption benchmark: the throughput cost of ``encryption: node`` (LUKS2 on
the node) and ``encryption: target`` (the target's crypto bdev) against
``none``, in one guest run.

    python3 benchmarks/encryption.py [--seconds 6] [--rounds 2] [--threads 4]

The host boots the QEMU guest (tests/e2e/guest) and runs this file inside it
with ``--in-guest``: the lib.sh stack (simulator with its kernel data plane,
agent, controller, node plugin), one raw block volume per mode created,
published and staged over gRPC, and a load generator (threads doing O_DIRECT
``pwrite``/``pread`` on the published device, QD = threads) run on each, the
modes interleaved round by round so a change of the machine's load hits them
alike: 128 KiB sequential writes and reads, 4 KiB random reads.

In the guest both encrypted modes run AES-XTS in the guest kernel's dm-crypt
(node mode: the LUKS mapping on the initiator side; target mode: the
simulator's data plane, a dm-crypt mapping under nvmet standing in for
SPDK's crypto bdev), so the figures compare where the cipher runs, not
SPDK's accel framework. TCG emulation makes absolute numbers meaningless (no
AES-NI, every instruction emulated); the ratio to ``none`` of the same run is
what says something. Prints a table and one ``@@BENCH <json>`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GUEST_SCRIPT = "/root/bench_encryption.py"
VOLUME_BYTES = 64 * MiB
MODES = ("none", "node", "target")
LOADS = (("write 128K", True, 128 << 10, False), ("read 128K", False, 128 << 10, False),
         ("randread 4K", False, 4 << 10, True))


# --- in the guest ------------------------------------------------------------------------
def load(dev: str, write: bool, block: int, rand: bool, threads: int, seconds: float) -> dict:
    from io_load import load as run_load  # next to this file (in the guest: GUEST_FILES)
    return run_load(dev, write, block, threads, seconds, span_bytes=VOLUME_BYTES, rand=rand)


def guest_main(args: argparse.Namespace) -> int:
    import grpc

    from csi_spdk.proto import csi_pb2 as csi
    from csi_spdk.proto import csi_pb2_grpc as csi_grpc

    run = "/run/csi"
    secrets = json.loads(Path(run, "auth-keys.json").read_text())
    ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{run}/controller.sock"))
    node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{run}/node.sock"))
    am = csi.VolumeCapability.AccessMode
    cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                               access_mode=am(mode=am.SINGLE_NODE_WRITER))
    node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
    devices: dict[str, str] = {}
    for mode in MODES:
        params = {"thinProvision": "false"} | ({} if mode == "none" else {"encryption": mode})
        vol = ctrl.CreateVolume(csi.CreateVolumeRequest(
            name=f"bench-{mode}", capacity_range=csi.CapacityRange(required_bytes=VOLUME_BYTES
                                                                   + 32 * MiB),
            volume_capabilities=[cap], parameters=params)).volume
        sec = dict(secrets)
        if mode != "none":
            uuid = vol.volume_context["lvolUuid"]
            sec["encryptionKey"] = json.loads(
                Path(run, "volume-keys", f"{uuid}.json").read_text())["encryptionKey"]
        pctx = ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node_id, volume_capability=cap,
            volume_context=dict(vol.volume_context), secrets=sec)).publish_context
        staging, target = f"/var/lib/kubelet/staging/{mode}", f"/var/lib/kubelet/pods/{mode}"
        node.NodeStageVolume(csi.NodeStageVolumeRequest(
            volume_id=vol.volume_id, publish_context=pctx, staging_target_path=staging,
            volume_capability=cap, secrets=sec, volume_context=dict(vol.volume_context)))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        node.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=vol.volume_id, publish_context=pctx, staging_target_path=staging,
            target_path=target, volume_capability=cap,
            volume_context=dict(vol.volume_context)))
        devices[mode] = target
    results: dict[str, dict[str, list[float]]] = {m: {n: [] for n, *_ in LOADS} for m in MODES}
    for r in range(args.rounds):
        for name, write, block, rand in LOADS:
            for mode in MODES:
                got = load(devices[mode], write, block, rand, args.threads, args.seconds)
                results[mode][name].append(got["mibps"])
                print(f"round {r + 1} {name:12s} {mode:6s} {got['mibps']:8.2f} MiB/s "
                      f"{got['iops']:8.0f} IOPS", flush=True)
    print("\nmedian MiB/s per mode (ratio to none in this run; TCG: only ratios matter)")
    summary: dict[str, dict[str, float]] = {}
    for name, *_ in LOADS:
        base = sorted(results["none"][name])[len(results["none"][name]) // 2]
        line = [f"{name:12s}"]
        for mode in MODES:
            vals = sorted(results[mode][name])
            med = vals[len(vals) // 2]
            summary.setdefault(mode, {})[name] = med
            line.append(f"{mode} {med:7.2f} ({med / base if base else 0:4.2f}x)")
        print("  ".join(line))
    print("@@BENCH " + json.dumps({"benchmark": "encryption", "seconds": args.seconds,
                                   "rounds": args.rounds, "threads": args.threads,
                                   "median_mibps": summary}), flush=True)
    return 0


# --- on the host, with the guest ------------------------------------------------------------
def host_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from guest.harness import run_in_guest

    script = f"""
        . /etc/guest/lib.sh
        modprobe dm-crypt
        csi_stack_start enc-bench-node
        rc=0
        python3 {GUEST_SCRIPT} --in-guest --seconds {args.seconds} --rounds {args.rounds} \\
            --threads {args.threads} || rc=$?
        csi_stack_stop || rc=1
        [ "$rc" = 0 ] || csi_stack_logs 60
        exit $rc
        """
    from io_load import GUEST_FILES
    res = run_in_guest(script, args.timeout,
                       files={GUEST_SCRIPT: Path(__file__).resolve(), **GUEST_FILES})
    print(res.output, end="" if res.output.endswith("\n") else "\n")
    if res.exit_code != 0:
        print(res.describe(), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per load")
    ap.add_argument("--threads", type=int, default=4, help="I/O threads (queue depth)")
    ap.add_argument("--timeout", type=int, default=900, help="guest script timeout (s)")
    ap.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return guest_main(args) if args.in_guest else host_main(args)


if __name__ == "__main__":
    sys.exit(main())
