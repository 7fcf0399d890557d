"""Fake host trees for ``csi-spdk doctor``: /proc, /sys, /boot and /lib/modules
under a root, and a bin dir of stand-in programs. ``good_node``/``good_storage``
build hosts where every check passes; tests then break one thing each."""

from __future__ import annotations

import os
from pathlib import Path

RELEASE = "6.12.57+deb13-cloud-amd64"
MiB = 1024 * 1024

NODE_TOOLS = ("mkfs.ext4", "resize2fs", "mkfs.xfs", "xfs_growfs", "blkid", "losetup", "mount",
              "umount", "tlshd")


def write(root: Path, path: str, text: str) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def program(bindir: Path, name: str, script: str = "exit 0") -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    p = bindir / name
    p.write_text(f"#!/bin/sh\n{script}\n")
    p.chmod(0o755)


def nvme_cli(bindir: Path, version: str) -> None:
    program(bindir, "nvme", f'[ "$1" = version ] && echo "nvme version {version} '
                            f'(git {version})" && echo "libnvme version 1.13 (git 1.13)"')


def mountinfo(root: Path, *lines: str) -> None:
    write(root, "/proc/self/mountinfo", "".join(line + "\n" for line in lines))


def kernel(root: Path, config: dict[str, str], modules: dict[str, str],
           loaded: list[str], config_file: bool = True) -> None:
    """``modules``: name -> 'module' | 'builtin' (where the .ko is listed)."""
    write(root, "/proc/sys/kernel/osrelease", RELEASE)
    write(root, "/proc/sys/kernel/hostname", "worker-1")
    if config_file:
        write(root, f"/boot/config-{RELEASE}",
              "".join(f"CONFIG_{k}={v}\n" for k, v in config.items()) +
              "# CONFIG_NVME_TARGET is not set\n")
    dep = "".join(f"kernel/drivers/nvme/host/{m}.ko.xz: \n" for m, k in modules.items()
                  if k == "module")
    builtin = "".join(f"kernel/drivers/nvme/host/{m}.ko\n" for m, k in modules.items()
                      if k == "builtin")
    write(root, f"/lib/modules/{RELEASE}/modules.dep", dep)
    write(root, f"/lib/modules/{RELEASE}/modules.builtin", builtin)
    for m in loaded:
        (root / "sys/module" / m.replace("-", "_")).mkdir(parents=True, exist_ok=True)


def good_node(root: Path, bindir: Path) -> None:
    kernel(root, {"NVME_CORE": "y", "NVME_FABRICS": "m", "NVME_TCP": "m", "NVME_AUTH": "y",
                  "NVME_HOST_AUTH": "y", "NVME_TCP_TLS": "y"},
           {"nvme-fabrics": "module", "nvme-tcp": "module"}, ["nvme-fabrics", "nvme-tcp"])
    (root / "var/lib/kubelet").mkdir(parents=True)
    mountinfo(root,
              "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
              "60 22 0:50 / /var/lib/kubelet rw,relatime shared:30 - tmpfs tmpfs rw",
              "61 22 0:51 / /run rw,nosuid shared:5 - tmpfs tmpfs rw")
    for tool in NODE_TOOLS:
        program(bindir, tool)
    nvme_cli(bindir, "2.13")


def hugepages(root: Path, size_kb: int, total: int, free: int) -> None:
    d = f"/sys/kernel/mm/hugepages/hugepages-{size_kb}kB"
    write(root, f"{d}/nr_hugepages", f"{total}\n")
    write(root, f"{d}/free_hugepages", f"{free}\n")


def pci_nvme(root: Path, bdf: str, driver: str, model: str = "") -> None:
    dev = root / "sys/devices/pci0000:00" / bdf
    write(root, f"/sys/devices/pci0000:00/{bdf}/class", "0x010802\n")
    write(root, f"/sys/devices/pci0000:00/{bdf}/vendor", "0x144d\n")
    write(root, f"/sys/devices/pci0000:00/{bdf}/device", "0xa80a\n")
    if model:
        write(root, f"/sys/devices/pci0000:00/{bdf}/nvme/nvme0/model", model.ljust(40) + "\n")
    if driver:
        drv = root / "sys/bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(drv, dev), dev / "driver")
    link = root / "sys/bus/pci/devices" / bdf
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(dev, link.parent), link)


def good_storage(root: Path) -> None:
    kernel(root, {}, {}, [])
    write(root, "/proc/meminfo", "MemTotal:       16384000 kB\nMemFree:  8000000 kB\n"
                                 "MemAvailable:   12000000 kB\nHugePages_Total:    1024\n"
                                 "Hugepagesize:       2048 kB\n")
    hugepages(root, 2048, 1024, 1024)
    mountinfo(root,
              "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
              "30 22 0:30 / /dev/hugepages rw,relatime shared:12 - hugetlbfs hugetlbfs rw")
    pci_nvme(root, "0000:01:00.0", "vfio-pci")
    (root / "sys/kernel/iommu_groups/0").mkdir(parents=True)
    (root / "sys/kernel/iommu_groups/1").mkdir(parents=True)
