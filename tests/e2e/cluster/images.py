"""The container images the cluster runs, built here (no registry, no Docker)
into one OCI layout and packed as one archive for ``ctr images import``:

* the driver's image (scripts/build-image.sh: mmdebstrap + the project's
  wheels + umoci), cached per content of what goes into it;
* the controller's CSI sidecars (csi-provisioner, -attacher, -resizer,
  -snapshotter; snapshot-controller runs on the host), each the Go binary
  scripts/install-k8s.sh built plus the Debian 13 glibc it links against, one
  layer, made with umoci;
* node-driver-registrar and livenessprobe: the Go module proxy refuses
  those modules, so their images are the driver's image whose entrypoint is
  ``csi-spdk registrar`` / ``csi-spdk livenessprobe`` (csi_spdk/kubelet_plugin.py,
  the same flags);
* the pause image: kubernetes' own build/pause/linux/pause.c (from the
  k8s.io/kubernetes module the control plane is built from), compiled static.

Every image carries ``io.containerd.image.name`` in the index, so
``ctr -n k8s.io images import`` names it as the chart's values say.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guest import harness  # noqa: E402
from k8s import cluster as k8s  # noqa: E402

REPO = HERE.parents[2]
CACHE = Path(os.environ.get("CSI_SPDK_GUEST_CACHE", REPO / ".cache" / "guest"))
LOCAL = "localhost/csi-spdk-rig"
DRIVER_REPO = "ghcr.io/csi-spdk/csi-spdk"
PAUSE_REF = "registry.k8s.io/pause:3.10"   # = sandbox_image in the node's containerd config
# value key in the chart's images: -> binary in K8S_BIN
SIDECARS = {"provisioner": "csi-provisioner", "attacher": "csi-attacher",
            "resizer": "csi-resizer", "snapshotter": "csi-snapshotter"}
# the inputs of scripts/build-image.sh (the image is rebuilt when one changes)
DRIVER_INPUTS = ("csi_spdk", "pyproject.toml", "README.md", "Dockerfile", "scripts/build-image.sh")


class ImageError(RuntimeError):
    pass


@dataclass
class Images:
    archive: Path            # the OCI archive to import
    digest: str              # identifies its content (cache key of the node's image disk)
    refs: dict[str, str]     # chart image key -> full reference
    values: dict             # the chart's `images:` values for these


def _run(*cmd: str, timeout: float = 600, **kw) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        raise ImageError(f"{' '.join(cmd)} failed ({res.returncode}): "
                         f"{(res.stderr or res.stdout)[-3000:]}")
    return res.stdout


def _version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise ImageError("no version in pyproject.toml")


def _tree_key(paths) -> str:
    """Git's tree/blob ids of the committed inputs (build-image.sh builds HEAD)."""
    ids = [_run("git", "-C", str(REPO), "rev-parse", f"HEAD:{p}").strip() for p in paths]
    return hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16]


def _version_of(binary: Path) -> str:
    """The main module's version `go version -m` records (e.g. v6.3.0)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    out = _run(go, "version", "-m", str(binary))
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["mod"] and len(parts) >= 3:
            return parts[2]
    raise ImageError(f"no module version in {binary}")


def driver_image(out_root: Path) -> Path:
    """The driver's OCI layout (scripts/build-image.sh), cached by its inputs;
    in $CSI_SPDK_IMAGE_DIR when set (scripts/test.sh sets it, keyed the same
    way, so tests/image reuses this build instead of making its own)."""
    given = os.environ.get("CSI_SPDK_IMAGE_DIR")
    out = Path(given) if given else out_root / f"driver-{_tree_key(DRIVER_INPUTS)}"
    if not (out / "digest").exists():
        shutil.rmtree(out, ignore_errors=True)
        _run("bash", str(REPO / "scripts" / "build-image.sh"), str(out), timeout=1800,
             env={**os.environ, "PYTHON": sys.executable})
    return out / "oci"


def _pause_binary(work: Path) -> Path:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    info = json.loads(_run(go, "mod", "download", "-json", f"k8s.io/kubernetes@{k8s.K8S_VERSION}",
                           cwd="/"))
    src = Path(info["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    out = work / "pause"
    _run("gcc", "-Os", "-static", "-o", str(out), str(src), "-DVERSION=v3.10-csi-spdk-rig")
    _run("strip", str(out))
    return out


def _glibc_tree(binary: Path, dest: Path) -> None:
    """``binary``'s shared libraries from Debian 13 (the guest's userland), at
    their paths, plus the loader's /lib64 link."""
    root = harness.userland_root(CACHE)
    for lib in harness._ldd(root, [str(binary)]):
        rel = os.path.relpath(os.path.realpath(lib), root)
        if rel.startswith(".."):
            raise ImageError(f"{binary.name} needs {lib}, which Debian 13's userland lacks")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), target)
    (dest / "lib64").mkdir(exist_ok=True)
    if not (dest / "lib64" / "ld-linux-x86-64.so.2").exists():
        os.symlink("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                   dest / "lib64" / "ld-linux-x86-64.so.2")
    (dest / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (dest / "etc").mkdir(exist_ok=True)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/:/nonexistent\n"
                                         "nobody:x:65534:65534:nobody:/:/nonexistent\n")


def _binary_image(layout: Path, tag: str, binary: Path, work: Path) -> None:
    tree = work / f"tree-{tag}"
    tree.mkdir()
    _glibc_tree(binary, tree)
    shutil.copy2(binary, tree / binary.name)
    _run("umoci", "new", "--image", f"{layout}:{tag}")
    _run("umoci", "insert", "--image", f"{layout}:{tag}", "--no-history", str(tree), "/")
    _run("umoci", "config", "--image", f"{layout}:{tag}", "--no-history",
         "--config.entrypoint", f"/{binary.name}", "--config.user", "0")


def build(out_root: Path | None = None) -> Images:
    """All images in one archive under ``out_root`` (cached by content)."""
    out_root = out_root or CACHE / "cluster-images"
    out_root.mkdir(parents=True, exist_ok=True)
    version = _version()
    driver = driver_image(out_root)
    sidecars = {key: k8s.BIN / binary for key, binary in SIDECARS.items()}
    missing = [str(b) for b in sidecars.values() if not b.exists()]
    if missing:
        raise ImageError(f"missing sidecar binaries (scripts/install-k8s.sh): {missing}")
    versions = {key: _version_of(b) for key, b in sidecars.items()}
    key = hashlib.sha256(json.dumps([
        (driver / "index.json").read_text(), versions,
        [os.stat(b).st_mtime_ns for b in sidecars.values()],
        hashlib.sha256((HERE / "images.py").read_bytes()).hexdigest()]).encode()).hexdigest()[:16]
    dest = out_root / f"all-{key}"
    refs = {"driver": f"{DRIVER_REPO}:{version}",
            **{k: f"{LOCAL}/{SIDECARS[k]}:{v}" for k, v in versions.items()},
            "nodeDriverRegistrar": f"{LOCAL}/node-driver-registrar:csi-spdk-{version}",
            "livenessProbe": f"{LOCAL}/livenessprobe:csi-spdk-{version}",
            "pause": PAUSE_REF}
    values = {}
    for k, ref in refs.items():
        if k == "pause":
            continue
        repo, _, tag = ref.rpartition(":")
        values[k] = {"repository": repo, "tag": tag, "pullPolicy": "Never"}
    archive = dest / "images.oci.tar"
    if not archive.exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        work = Path(tempfile.mkdtemp(prefix="csi-spdk-images-"))
        try:
            layout = work / "oci"
            shutil.copytree(driver, layout)
            for k, role in (("nodeDriverRegistrar", "registrar"),
                            ("livenessProbe", "livenessprobe")):
                _run("umoci", "config", "--image", f"{layout}:{version}", "--tag", k,
                     "--no-history", "--config.entrypoint", "/usr/local/bin/csi-spdk",
                     "--config.entrypoint", role, "--clear=config.cmd")
            for k, b in sidecars.items():
                _binary_image(layout, k, b, work)
            pause = _pause_binary(work)
            _run("umoci", "new", "--image", f"{layout}:pause")
            _run("umoci", "insert", "--image", f"{layout}:pause", "--no-history", str(pause),
                 "/pause")
            _run("umoci", "config", "--image", f"{layout}:pause", "--no-history",
                 "--config.entrypoint", "/pause")
            _run("umoci", "gc", "--layout", str(layout))
            # name every manifest the way the chart's values do
            index = json.loads((layout / "index.json").read_text())
            by_tag = {version: refs["driver"], "pause": PAUSE_REF,
                      **{k: refs[k] for k in (*SIDECARS, "nodeDriverRegistrar", "livenessProbe")}}
            for m in index["manifests"]:
                tag = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                if tag in by_tag:
                    m["annotations"]["io.containerd.image.name"] = by_tag[tag]
            index["manifests"] = [m for m in index["manifests"]
                                  if "io.containerd.image.name" in m.get("annotations", {})]
            (layout / "index.json").write_text(json.dumps(index))
            _run("tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
                 "-cf", str(archive) + ".tmp", "-C", str(layout), ".")
            os.replace(str(archive) + ".tmp", archive)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Images(archive=archive, digest=key, refs=refs, values=values)


if __name__ == "__main__":
    imgs = build()
    print(json.dumps({"archive": str(imgs.archive), "digest": imgs.digest, "refs": imgs.refs},
                     indent=1))
