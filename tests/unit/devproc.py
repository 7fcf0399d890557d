"""``csi-spdk dev`` as a real subprocess, and a CSI lifecycle driven through its
controller socket (used by the dev and inspection tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from controller_fixtures import create_req, publish_req

from csi_spdk.childclock import ChildClock
from csi_spdk.proto import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


@dataclass
class Dev:
    proc: subprocess.Popen
    sock_dir: Path
    log: Path

    @property
    def controller(self) -> str:
        return f"unix://{self.sock_dir}/controller.sock"

    def output(self) -> str:
        return self.log.read_text()

    def wait_decided(self) -> int | None:
        """Until the process exits (its code) or says it is running (None).

        No deadline of its own: how long a start takes on a loaded machine
        is not what a test asserts, and the test's timeout bounds a hang."""
        while "csi-spdk dev is running" not in self.output():
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.05)
        return None

    def stop(self) -> int:
        """SIGTERM, and its exit code once it stopped: within 30 s of its own
        time (its children's and ours too, ``ChildClock``), else SIGKILL."""
        clock = ChildClock(self.proc.pid, also=[os.getpid()])
        self.proc.send_signal(signal.SIGTERM)
        try:
            while True:
                try:
                    return self.proc.wait(0.2)
                except subprocess.TimeoutExpired:
                    if clock.elapsed() > 30:
                        raise
        finally:
            self.proc.kill()


def start_dev(tmp: Path, *extra: str, sock_dir: Path | None = None, wait: bool = True) -> Dev:
    sock_dir = sock_dir or tmp / "s"
    log = tmp / f"dev-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_spdk", "dev", "--socket-dir", str(sock_dir), *extra],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    dev = Dev(proc, sock_dir, log)
    if not wait:
        return dev
    # 180 s of its own time (its children's and ours too): the time a loaded
    # machine keeps them waiting for a CPU is not what a start costs
    clock = ChildClock(proc.pid, also=[os.getpid()])
    while "csi-spdk dev is running" not in dev.output():
        if proc.poll() is not None or clock.elapsed() > 180:
            proc.kill()
            raise AssertionError(f"csi-spdk dev did not start:\n{dev.output()}")
        time.sleep(0.05)
    return dev


@dataclass
class Lifecycle:
    """What ``run_lifecycle`` made."""
    volume: str = ""
    thin_volume: str = ""
    snapshot: str = ""
    clone: str = ""
    published_to: str = ""
    made: list[str] = field(default_factory=list)


def run_lifecycle(endpoint: str, node: str = "dev-node", name: str = "life") -> Lifecycle:
    """Create a thick volume, a thin one, snapshot the first, clone the
    snapshot, publish the first to ``node``: every kind of object the driver
    makes on a target."""
    with grpc.insecure_channel(endpoint.replace("unix://", "unix:")) as ch:
        stub = csi_pb2_grpc.ControllerStub(ch)
        out = Lifecycle(published_to=node)
        out.volume = stub.CreateVolume(create_req(f"{name}-vol", 16 * MiB)).volume.volume_id
        out.thin_volume = stub.CreateVolume(create_req(
            f"{name}-thin", 32 * MiB, params={"thinProvision": "true"})).volume.volume_id
        out.snapshot = stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=f"{name}-snap", source_volume_id=out.volume)).snapshot.snapshot_id
        out.clone = stub.CreateVolume(create_req(
            f"{name}-clone", 16 * MiB, snapshot=out.snapshot)).volume.volume_id
        stub.ControllerPublishVolume(publish_req(out.volume, node))
        return out
