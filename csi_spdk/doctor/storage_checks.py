"""Preflight checks for a storage host that runs ``spdk_tgt``: huge pages and
memory, NVMe SSDs on a driver SPDK can use (and the IOMMU vfio-pci needs), and
optionally that the target answers on its RPC socket."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import CsiError
from .host import Host
from .report import Check, fail, ok, warn

MiB = 1024 * 1024
NVME_CLASS = "0x010802"                      # PCI mass storage / NVM / NVMe
SPDK_DRIVERS = ("vfio-pci", "uio_pci_generic", "igb_uio")
HP_DIR = "/sys/kernel/mm/hugepages"


def hugepages(host: Host) -> tuple[int, int, list[str]]:
    """Reserved and free huge page bytes over all sizes, and the sizes seen."""
    total = free = 0
    sizes = []
    for d in host.listdir(HP_DIR):
        if not d.startswith("hugepages-") or not d.endswith("kB"):
            continue
        size = int(d[len("hugepages-"):-2]) * 1024
        n = int((host.read(f"{HP_DIR}/{d}/nr_hugepages") or "0").strip() or 0)
        f = int((host.read(f"{HP_DIR}/{d}/free_hugepages") or "0").strip() or 0)
        total, free = total + n * size, free + f * size
        sizes.append(d)
    return total, free, sizes


def hugepage_checks(host: Host, need_mib: int) -> Iterator[Check]:
    title = "huge pages for spdk_tgt"
    total, free, _ = hugepages(host)
    pages_2m = -(-need_mib // 2)
    fix = (f"echo {pages_2m} > {HP_DIR}/hugepages-2048kB/nr_hugepages and persist "
           f"vm.nr_hugepages={pages_2m} in /etc/sysctl.d/90-spdk.conf (or hugepagesz=1G "
           f"hugepages={-(-need_mib // 1024)} on the kernel command line); spdk_tgt --no-huge "
           "-s <MiB> runs without them, for tests only")
    if free >= need_mib * MiB:
        yield ok(title, f"{free // MiB} MiB free of {total // MiB} MiB reserved "
                        f"(need {need_mib} MiB)")
    elif total >= need_mib * MiB:
        yield fail(title, f"{total // MiB} MiB reserved but only {free // MiB} MiB free "
                          f"(need {need_mib} MiB): another process holds them",
                   "stop the other DPDK/SPDK process, or reserve more: " + fix)
    else:
        yield fail(title, f"{total // MiB} MiB reserved, {free // MiB} MiB free "
                          f"(need {need_mib} MiB)", fix)
    title = "hugetlbfs mount"
    mounts = [m.mount_point for m in host.mounts() if m.fstype == "hugetlbfs"]
    if mounts:
        yield ok(title, ", ".join(mounts))
    else:
        yield fail(title, "no hugetlbfs is mounted",
                   "mount -t hugetlbfs nodev /dev/hugepages (systemd's dev-hugepages.mount "
                   "does it at boot); the spdk_tgt Pod mounts it as an emptyDir medium "
                   "HugePages")


def memory_check(host: Host, need_mib: int) -> Check:
    """Huge pages come out of RAM: the host needs them plus room for itself."""
    title = "memory"
    info = host.meminfo()
    total = info.get("MemTotal", 0)
    if not total:
        return warn(title, "no /proc/meminfo", "")
    reserved, _, _ = hugepages(host)
    rest = total - max(reserved, need_mib * MiB)
    if rest < 1024 * MiB:
        return fail(title, f"{total // MiB} MiB in all: {need_mib} MiB of huge pages would "
                           f"leave {max(rest, 0) // MiB} MiB for everything else",
                    "give the storage host more memory or spdk_tgt less (its -s MiB and the "
                    "huge pages reserved)")
    return ok(title, f"{total // MiB} MiB, {info.get('MemAvailable', 0) // MiB} MiB available")


def nvme_devices(host: Host) -> list[tuple[str, str, str]]:
    """(PCI address, bound driver or '', description) of every PCI NVMe device."""
    out = []
    base = "/sys/bus/pci/devices"
    for bdf in host.listdir(base):
        if (host.read(f"{base}/{bdf}/class") or "").strip() != NVME_CLASS:
            continue
        driver = host.link_name(f"{base}/{bdf}/driver")
        model = ""
        for ctrl in host.listdir(f"{base}/{bdf}/nvme"):
            model = (host.read(f"{base}/{bdf}/nvme/{ctrl}/model") or "").strip()
        ids = "{}:{}".format((host.read(f"{base}/{bdf}/vendor") or "").strip(),
                             (host.read(f"{base}/{bdf}/device") or "").strip())
        out.append((bdf, driver, model or ids))
    return out


def ssd_checks(host: Host, wanted: list[str]) -> Iterator[Check]:
    """With ``wanted`` (the SSDs meant for SPDK), each must be on an SPDK
    driver; without, report each SSD and where it stands."""
    devices = nvme_devices(host)
    found = {bdf for bdf, _, _ in devices}
    for bdf in wanted:
        if bdf not in found:
            yield fail(f"SSD {bdf}", "no such PCI NVMe device",
                       "check the address with lspci -D -d ::0108")
    if not devices and not wanted:
        yield warn("NVMe SSDs", "none found on PCI",
                   "lvstores then need another base bdev (bdev_aio_create on a file or "
                   "device; bdev_malloc_create for tests)")
    for bdf, driver, what in devices:
        title = f"SSD {bdf} ({what})"
        rebind = (f"unbind it from the kernel and give it to SPDK: driverctl set-override "
                  f"{bdf} vfio-pci (or SPDK's scripts/setup.sh with PCI_ALLOWED={bdf})")
        if driver in SPDK_DRIVERS:
            yield ok(title, f"bound to {driver}: SPDK can attach it (bdev_nvme_attach_controller "
                            f"-t pcie -a {bdf})")
        elif bdf in wanted:
            yield fail(title, f"bound to {driver or 'no driver'}, not to vfio-pci or "
                              "uio_pci_generic", rebind)
        elif not wanted:
            yield warn(title, f"bound to {driver or 'no driver'}: the kernel owns it, SPDK "
                              "cannot use it", "if it is meant for SPDK, " + rebind)
    if any(d == "vfio-pci" for _, d, _ in devices) or wanted:
        yield iommu_check(host)


def iommu_check(host: Host) -> Check:
    title = "IOMMU for vfio-pci"
    groups = host.listdir("/sys/kernel/iommu_groups")
    if groups:
        return ok(title, f"{len(groups)} IOMMU groups")
    noiommu = (host.read("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode") or "")
    if noiommu.strip() in ("Y", "1"):
        return warn(title, "no IOMMU; vfio runs in unsafe no-IOMMU mode",
                    "enable the IOMMU (intel_iommu=on or amd_iommu=on) for DMA isolation")
    return fail(title, "no IOMMU groups: vfio-pci cannot take the SSDs",
                "boot with intel_iommu=on (or amd_iommu=on) and iommu=pt, or bind the SSDs to "
                "uio_pci_generic instead")


def spdk_check(rpc: str) -> Check:
    from ..spdk.api import SpdkApi
    from ..spdk.client import SpdkClient

    title = f"spdk_tgt at {rpc}"
    try:
        api = SpdkApi(SpdkClient(rpc, timeout=5.0))
    except ValueError as err:
        return fail(title, str(err), "give --spdk-rpc a socket path or host:port")
    try:
        version = api.version().get("version", "?")
        stores = api.lvstores()
    except CsiError as err:
        return fail(title, err.message, "start spdk_tgt with -r <socket>, or give the socket "
                                        "it uses")
    finally:
        api.client.close()
    names = ", ".join(s["name"] for s in stores) or "none yet (bdev_lvol_create_lvstore)"
    return ok(title, f"{version}, lvstores: {names}")


def storage_checks(host: Host, need_mib: int, ssds: list[str], spdk_rpc: str) -> list[Check]:
    checks = [*hugepage_checks(host, need_mib), memory_check(host, need_mib),
              *ssd_checks(host, ssds)]
    if spdk_rpc:
        checks.append(spdk_check(spdk_rpc))
    return checks
