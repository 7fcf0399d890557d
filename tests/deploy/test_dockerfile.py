"""The container image recipe. CI has no Docker engine, so the image is NOT
built here; instead: hadolint lints the Dockerfile, the wheel the build stage
makes is built the same way and inspected, and the pinned Debian packages are
looked up in the apt lists (only where this machine is Debian 12 with apt lists).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"
TEXT = DOCKERFILE.read_text()


def test_hadolint_clean():
    out = run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape():
    assert "ARG BASE_IMAGE=python:3.13-slim-trixie" in TEXT
    assert len(re.findall(r"^FROM ", TEXT, re.M)) == 2, "multi-stage: build + runtime"
    assert 'ENTRYPOINT ["csi-spdk"]' in TEXT
    for label in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{label}=" in TEXT
    # Every apt package pinned with =version.
    pkgs = _apt_packages()
    assert {"nvme-cli", "e2fsprogs", "xfsprogs", "util-linux"} <= set(pkgs)
    assert all(pkgs.values()), pkgs


def test_dockerignore_keeps_what_the_build_copies():
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "csi_spdk/"):
        assert "!" + needed in ignore
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", TEXT, re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


def _apt_packages() -> dict[str, str]:
    block = TEXT.split("apt-get install", 1)[1].split("&&", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"([a-z0-9.+-]+)=(\S+)", block)}


def test_wheel_builds_with_the_entry_point(tmp_path):
    """The build stage's `pip wheel` step, for the driver itself."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--wheel-dir", str(tmp_path), str(ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=240)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"setuptools/wheel missing for --no-build-isolation: {out.stderr[-200:]}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (whl,) = tmp_path.glob("csi_spdk-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert "csi_spdk/cli.py" in names and "csi_spdk/proto/csi_pb2.py" in names
        ep = [n for n in names if n.endswith("entry_points.txt")]
        assert ep and "csi-spdk = csi_spdk.cli:main" in z.read(ep[0]).decode()
    version = re.search(r"^ARG VERSION=(\S+)", TEXT, re.M).group(1)
    assert whl.name.startswith(f"csi_spdk-{version}-"), "Dockerfile VERSION != package version"


def _trixie_apt() -> list[str]:
    """apt-cache options for the private Debian 13 apt state that
    scripts/install-guest-deps.sh keeps (the host is Debian 12: its own lists
    are bookworm's); [] when it is not there."""
    cache = Path(os.environ.get("CSI_SPDK_GUEST_CACHE", ROOT / ".cache" / "guest"))
    t = cache / "trixie" / "apt"
    if shutil.which("apt-cache") is None or not any((t / "lists").glob("*trixie*Packages*")):
        return []
    return ["-o", f"Dir::State::Lists={t / 'lists'}", "-o", f"Dir::State::status={t / 'status'}",
            "-o", f"Dir::Etc::sourcelist={t / 'sources.list'}",
            "-o", f"Dir::Etc::sourceparts={t / 'parts'}", "-o", f"Dir::Cache={t / 'cache'}"]


def test_pinned_apt_packages_exist_in_trixie():
    opts = _trixie_apt()
    if not opts:
        pytest.skip("no Debian 13 apt lists (scripts/install-guest-deps.sh): cannot check the "
                    "Dockerfile's package pins here")
    for pkg, version in _apt_packages().items():
        out = run(["apt-cache", *opts, "show", f"{pkg}={version}"])
        assert out.returncode == 0 and f"Version: {version}" in out.stdout, \
            f"{pkg}={version} is not in Debian 13's apt lists"
