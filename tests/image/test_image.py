"""The driver's OCI image, built without Docker (scripts/build-image.sh:
mmdebstrap + the project's wheels + umoci) and run in a plain namespace
(unshare + chroot of the unpacked image): its entrypoint, the node's tools,
the Dockerfile's packages at the Dockerfile's versions, and the controller
serving against the simulator from inside the image.

Needs root and the Debian archive (CI has both); the build takes a few
minutes and is done once per session (or reused from CSI_SPDK_IMAGE_DIR)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

# The session's first test pays for the build (5-11 min measured on a loaded 2-core machine).
pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(why: str) -> None:
    if _ci():
        pytest.fail(f"{why} (CI is set: the image must build here)")
    pytest.skip(why)


def dockerfile_packages() -> dict[str, str]:
    block = DOCKERFILE[DOCKERFILE.index("apt-get install"):DOCKERFILE.index("apt-get clean")]
    return dict(re.findall(r"^\s+([a-z0-9][a-z0-9.+-]*)=(\S+)\s*\\$", block, re.M))


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        _unavailable("building the image needs root (mmdebstrap --mode=root)")
    given = os.environ.get("CSI_SPDK_IMAGE_DIR")
    out = Path(given) if given else tmp_path_factory.mktemp("image")
    if not (given and (out / "oci" / "index.json").exists()):
        res = subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh"), str(out)],
                             capture_output=True, text=True, timeout=1500,
                             env={**os.environ, "PYTHON": sys.executable})
        if res.returncode != 0:
            pytest.fail(f"build-image.sh failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        print(res.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture(scope="session")
def rootfs(image, tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("bundle") / "b"
    version = _version()
    res = subprocess.run(["umoci", "unpack", "--image", f"{image}/oci:{version}", str(bundle)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return bundle / "rootfs"


def _version() -> str:
    return re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def in_image(rootfs: Path, *argv: str, binds: dict[str, str] | None = None,
             popen: bool = False, **kw):
    """Run argv in the image: new mount and PID namespaces, /proc and /dev
    mounted, chroot. ``binds``: host dir -> path in the image."""
    mounts = [f"mount -t proc proc {rootfs}/proc", f"mount --rbind /dev {rootfs}/dev"]
    for host, inside in (binds or {}).items():
        mounts += [f"mkdir -p {rootfs}{inside}", f"mount --bind {host} {rootfs}{inside}"]
    script = " && ".join(mounts) + ' && exec chroot "$0" "$@"'
    cmd = ["unshare", "-m", "-p", "-f", "--propagation", "private", "sh", "-c", script,
           str(rootfs), *argv]
    env = {"PATH": "/opt/csi-spdk/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root"}
    if popen:
        return subprocess.Popen(cmd, env=env, **kw)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_entrypoint_version(image, rootfs):
    config = _config(image)
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/csi-spdk"]
    res = in_image(rootfs, *config["config"]["Entrypoint"], "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"csi-spdk {_version()}"


def _config(image: Path) -> dict:
    def blob(digest: str) -> dict:
        algo, _, hexd = digest.partition(":")
        return json.loads((image / "oci" / "blobs" / algo / hexd).read_text())
    index = json.loads((image / "oci" / "index.json").read_text())
    manifest = blob(index["manifests"][0]["digest"])
    return blob(manifest["config"]["digest"])


def test_image_metadata(image, rootfs):
    config = _config(image)
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == _version()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels["org.opencontainers.image.revision"])
    assert "csi:x:65532:65532:" in (rootfs / "etc/passwd").read_text()  # for the controller
    assert not (rootfs / "etc/nvme/hostnqn").exists() and not (rootfs / "etc/nvme/hostid").exists()
    assert not (rootfs / "usr/share/man").exists() or not any((rootfs / "usr/share/man").iterdir())


def test_archive_names_the_image_as_the_chart_does(image):
    """`ctr images import`, `kind load image-archive` and `podman load` name an
    OCI archive's image from io.containerd.image.name: without it the image
    imports unnamed and Pods cannot find it (no registry here, nor in kind)."""
    import tarfile

    import yaml
    values = yaml.safe_load((REPO / "deploy/helm/csi-spdk/values.yaml").read_text())
    want = f"{values['images']['driver']['repository']}:{values['images']['driver']['tag']}"
    assert values["images"]["driver"]["tag"] == _version()
    archive = image / f"csi-spdk-{_version()}.oci.tar"
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("./index.json"))
    names = [m.get("annotations", {}).get("io.containerd.image.name")
             for m in index["manifests"]]
    assert names == [want]
    assert index["manifests"][0]["digest"] == (image / "digest").read_text().strip()


def _pyc_state(py: Path) -> str:
    """How the interpreter would treat ``py`` on a read-only root:
    "unchecked" (an unchecked-hash pyc: loaded as is), "checked" (a hash pyc:
    the source is read and hashed at every import), "stale"/"timestamp" (an
    mtime pyc that does / does not match), or "missing" (compiled in memory
    at every start)."""
    import importlib.util
    import struct
    pyc = Path(importlib.util.cache_from_source(str(py)).replace(
        f"cpython-{sys.version_info.major}{sys.version_info.minor}", "cpython-313"))
    if not pyc.exists():
        return "missing"
    flags = struct.unpack("<I", pyc.read_bytes()[4:8])[0]
    if flags & 1:
        return "checked" if flags & 2 else "unchecked"
    mtime, size = struct.unpack("<II", pyc.read_bytes()[8:16])
    st = py.stat()
    return "timestamp" if (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF) == (
        mtime, size) else "stale"


def test_every_module_is_byte_compiled(rootfs):
    """The containers run with a read-only root file system: a module without
    a valid .pyc is compiled again at every start (the standard library's
    top-level modules once were, and a TCG node spent tens of CPU seconds on
    each Python start). build-image.sh compiles the standard library and the
    venv with unchecked-hash pycs (independent of the mtimes it resets)."""
    roots = [rootfs / "usr/lib/python3.13", rootfs / "opt/csi-spdk/lib"]
    assert all(r.is_dir() for r in roots), roots
    states: dict[str, list[str]] = {}
    for root in roots:
        for py in root.rglob("*.py"):
            if "__pycache__" not in py.parts:
                states.setdefault(_pyc_state(py), []).append(str(py.relative_to(rootfs)))
    assert len(states.get("unchecked", [])) > 3000, {k: len(v) for k, v in states.items()}
    bad = {k: v[:10] for k, v in states.items() if k != "unchecked"}
    assert not bad, bad


def test_the_dockerfiles_packages_at_its_versions(rootfs):
    res = in_image(rootfs, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n")
    assert res.returncode == 0, res.stderr
    installed = dict(line.split("=", 1) for line in res.stdout.split())
    want = dockerfile_packages()
    assert want and {p: installed.get(p) for p in want} == want


@pytest.mark.parametrize("argv,expect", [
    (["nvme", "version"], "nvme version 2."),
    (["mkfs.ext4", "-V"], "mke2fs"),
    (["mkfs.xfs", "-V"], "mkfs.xfs version"),
    (["xfs_growfs", "-V"], "xfs_growfs version"),
    (["resize2fs"], "resize2fs"),
    (["blkid", "-V"], "blkid from util-linux"),
    (["losetup", "--version"], "losetup from util-linux"),
    (["mount", "--version"], "mount from util-linux"),
    (["cryptsetup", "--version"], "cryptsetup 2."),
])
def test_node_tools(rootfs, argv, expect):
    res = in_image(rootfs, *argv)
    assert expect in res.stdout + res.stderr, (res.returncode, res.stdout, res.stderr)


def test_doctor_sees_the_node_tools(rootfs):
    res = in_image(rootfs, "csi-spdk", "doctor", "node", "--node-id", "n1", "--format", "json")
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["filesystem tools"]["status"] == "pass", checks["filesystem tools"]
    assert checks["nvme-cli"]["status"] == "pass", checks["nvme-cli"]


def test_controller_serves_from_the_image(rootfs, tmp_path):
    """`csi-spdk dev` inside the image (simulator + controller + node), its
    sockets bind-mounted out; CreateVolume from the host; a clean stop."""
    from csi_spdk.proto import csi_pb2, csi_pb2_grpc

    socks = tmp_path / "socks"
    socks.mkdir()
    log = open(tmp_path / "dev.log", "w")  # noqa: SIM115 - closed below
    proc = in_image(rootfs, "csi-spdk", "dev", "--socket-dir", "/run/csi",
                    binds={str(socks): "/run/csi"}, popen=True, stdout=log,
                    stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while "csi-spdk dev is running" not in (tmp_path / "dev.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "dev.log").read_text()
            time.sleep(0.2)
        with grpc.insecure_channel(f"unix:{socks}/controller.sock") as ch:
            ident = csi_pb2_grpc.IdentityStub(ch)
            assert ident.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value
            vol = csi_pb2_grpc.ControllerStub(ch).CreateVolume(csi_pb2.CreateVolumeRequest(
                name="from-the-image", capacity_range=csi_pb2.CapacityRange(
                    required_bytes=8 << 20),
                volume_capabilities=[csi_pb2.VolumeCapability(
                    block=csi_pb2.VolumeCapability.BlockVolume(),
                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))]), timeout=30)
        assert vol.volume.volume_id.startswith("dev:") and vol.volume.capacity_bytes >= 8 << 20
        with grpc.insecure_channel(f"unix:{socks}/node.sock") as ch:
            info = csi_pb2_grpc.NodeStub(ch).NodeGetInfo(csi_pb2.NodeGetInfoRequest(),
                                                         timeout=30)
        assert info.node_id == "dev-node"
    finally:
        _stop(proc)
        log.close()
    assert sorted(p.name for p in socks.iterdir()) == []


def _stop(proc: subprocess.Popen) -> None:
    """Stop `csi-spdk dev` in the image: SIGTERM to its process (the child of
    unshare), wait, then make sure nothing is left."""
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in kids.stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_dockerfile_and_image_agree_on_packages():
    """The build script reads the same list (one source of truth)."""
    script = (REPO / "scripts" / "build-image.sh").read_text()
    assert "/apt-get install/,/apt-get clean/" in script and "Dockerfile" in script
    assert set(dockerfile_packages()) == {"nvme-cli", "e2fsprogs", "xfsprogs", "util-linux",
                                          "mount", "libudev1", "cryptsetup-bin"}
