"""Real loop devices for the mount and node tests (root + util-linux needed)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

TOOLS = ("losetup", "mkfs.ext4", "blkid", "mount", "umount", "resize2fs")


def require_loop() -> None:
    """Skip the calling test with the reason when loop devices are unusable."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (util-linux/e2fsprogs)")
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices and mounts")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control: loop devices unavailable")


class Loops:
    """Creates loop devices on sparse files; ``cleanup`` unmounts and detaches."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.devices: list[str] = []

    def make(self, size: int = 64 << 20, name: str = "disk") -> tuple[str, str]:
        backing = os.path.join(self.tmp, f"{name}{len(self.devices)}.img")
        with open(backing, "wb") as f:
            f.truncate(size)
        res = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            pytest.skip(f"losetup failed: {res.stderr.strip()}")
        dev = res.stdout.strip()
        self.devices.append(dev)
        return dev, backing

    @staticmethod
    def grow(dev: str, backing: str, size: int) -> None:
        with open(backing, "r+b") as f:
            f.truncate(size)
        subprocess.run(["losetup", "-c", dev], check=True)

    def cleanup(self) -> None:
        # Unmount everything under the test's tmp dir, deepest first.
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            points = [line.split()[4] for line in f]
        for p in sorted((p for p in points if p.startswith(self.tmp)), key=len, reverse=True):
            subprocess.run(["umount", "-l", p], capture_output=True, check=False)
        for dev in self.devices:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


CAP_SYS_RESOURCE = 24


def has_cap(bit: int) -> bool:
    """True when this process has capability ``bit`` in its effective set."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False
