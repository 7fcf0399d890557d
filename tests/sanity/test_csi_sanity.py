"""csi-sanity (kubernetes-csi/csi-test) against `csi-spdk dev`.

This runs the README's embedded default exactly as a newcomer would (the
simulator, an lvstore, the agent, controller and node plugin), so the command
itself is under test, and the controller's SPDK calls take the agent path.
The host kernel has no NVMe/TCP, so the five Node Service specs that stage a
volume (``HOST_SKIP``) run in the QEMU guest instead (tests/e2e);
every other spec, node argument checks included, must pass here.
With CSI_SPDK_TEST_RPC set, `dev --spdk-rpc` uses that real spdk_tgt.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from junit_summary import MUTABLE_PARAMETERS_YAML, missing_modify_specs, summarize

pytestmark = pytest.mark.sanity
ROOT = Path(__file__).resolve().parents[2]
HOST_SKIP = "|".join([
    "Node Service should work",
    "Node Service should be idempotent",
    "NodeUnpublishVolume should remove target path",
    "volume does not exist on the specified path",
    "node-expand is called after node-publish",
])


def _csi_sanity() -> str:
    found = shutil.which("csi-sanity")
    if not found:
        gopath = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True,
                                check=False).stdout.strip()
        candidate = Path(gopath or "/root/go") / "bin" / "csi-sanity"
        found = str(candidate) if candidate.exists() else None
    if not found:
        if os.environ.get("CI"):
            pytest.fail("csi-sanity is not installed (scripts/setup.sh installs it)")
        pytest.skip("csi-sanity is not installed; run scripts/setup.sh")
    return found


@pytest.fixture
def dev(tmp_path: Path):
    """`csi-spdk dev` in a subprocess; yields its socket dir; checks clean exit."""
    sock_dir = tmp_path / "s"
    cmd = [sys.executable, "-m", "csi_spdk", "dev", "--socket-dir", str(sock_dir)]
    real = os.environ.get("CSI_SPDK_TEST_RPC")
    if real:
        cmd += ["--spdk-rpc", real]
        before = _target_objects(real)
    log = open(tmp_path / "dev.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not all((sock_dir / n).exists() for n in ("controller.sock", "node.sock",
                                                     "agent.sock")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("csi-spdk dev did not start:\n" + (tmp_path / "dev.log").read_text())
        time.sleep(0.05)
    yield sock_dir, tmp_path / "dev.log"
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(20)
    finally:
        proc.kill()
        log.close()
    assert rc == 0, (tmp_path / "dev.log").read_text()[-4000:]
    leftovers = sorted(p.name for p in sock_dir.iterdir()) if sock_dir.exists() else []
    assert leftovers == [], f"csi-spdk dev left {leftovers} behind"
    if real:
        assert _target_objects(real) == before, "dev left SPDK objects on the target"


def _target_objects(rpc: str) -> tuple[list[str], list[str]]:
    """Bdev names and subsystem NQNs of a real target."""
    from csi_spdk.spdk.client import SpdkClient

    with SpdkClient(rpc) as c:
        return (sorted(b["name"] for b in c.call("bdev_get_bdevs")),
                sorted(s["nqn"] for s in c.call("nvmf_get_subsystems")))


def run_sanity(binary: str, sock_dir: Path, work: Path, skip: str) -> str:
    junit = work / "junit.xml"
    (work / "mnt").mkdir()
    (work / "stage").mkdir()
    mutable = work / "mutable.yaml"
    mutable.write_text(MUTABLE_PARAMETERS_YAML)
    cmd = [
        binary,
        f"--csi.endpoint=unix://{sock_dir}/node.sock",
        f"--csi.controllerendpoint=unix://{sock_dir}/controller.sock",
        f"--csi.mountdir={work}/mnt/target",
        f"--csi.stagingdir={work}/stage/staging",
        "--csi.testvolumesize=67108864",
        "--csi.testvolumeexpandsize=134217728",
        f"--csi.testvolumemutableparameters={mutable}",
        f"--csi.junitfile={junit}",
        # auth: dhchap is the default: dev's generated keys as node-stage and
        # controller-publish secrets
        f"--csi.secrets={sock_dir}/dev-state/csi-sanity-secrets.yaml",
        "--ginkgo.timeout=15m",
    ]
    if skip:
        cmd.append(f"--ginkgo.skip={skip}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    (work / "sanity.log").write_text(out.stdout + out.stderr)
    assert junit.exists(), out.stdout[-4000:] + out.stderr[-4000:]
    return str(junit)


def test_csi_sanity_controller(dev, tmp_path: Path) -> None:
    binary = _csi_sanity()
    sock_dir, dev_log = dev
    junit = run_sanity(binary, sock_dir, tmp_path, HOST_SKIP)
    passed, failed, skipped, failures = summarize(junit)
    print(f"csi-sanity: {passed} passed, {failed} failed, {skipped} skipped")
    assert failed == 0, "\n".join(failures) + "\n--- driver log tail:\n" + \
        dev_log.read_text()[-3000:]
    assert passed >= 70, f"only {passed} csi-sanity specs ran"
    # the controller reached SPDK through the agent: its audit lines are there
    agent_lines = [json.loads(line) for line in dev_log.read_text().splitlines()
                   if '"logger": "csi_spdk.agent"' in line]
    methods = {a.get("method") for a in agent_lines if a.get("outcome") == "ok"}
    # (the per-volume CSI calls as intents, snapshots and clones as checked calls)
    assert {"create_lvol", "export", "unexport", "delete_volume",
            "bdev_lvol_snapshot", "bdev_lvol_clone"} <= methods, methods
    missing = missing_modify_specs(junit)
    assert not missing, f"ModifyVolume specs that did not pass: {missing}"
