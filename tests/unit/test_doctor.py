"""``csi-spdk doctor``: every check passes on a well-prepared fake host, and
each thing an operator can get wrong fails (or warns, for an optional
feature) with a fix that names what to do. Fake /proc, /sys, /boot and
/lib/modules trees under a root; stand-in programs on PATH."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import fakehost  # noqa: E402
from fakehost import RELEASE  # noqa: E402

from csi_spdk import contract  # noqa: E402
from csi_spdk.doctor.host import Host  # noqa: E402
from csi_spdk.doctor.node_checks import node_checks  # noqa: E402
from csi_spdk.doctor.storage_checks import storage_checks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STATE = "/var/lib/csi-spdk"


@pytest.fixture
def node(tmp_path, monkeypatch):
    root, bindir = tmp_path / "root", tmp_path / "bin"
    fakehost.good_node(root, bindir)
    monkeypatch.setenv("PATH", str(bindir))
    return root, bindir


def run_node(root: Path, node_id: str = "worker-1") -> dict:
    checks = node_checks(Host(str(root)), node_id, STATE, "/var/lib/kubelet")
    return {c.name: c for c in checks}


def statuses(checks: dict) -> dict[str, str]:
    return {name: c.status for name, c in checks.items()}


def only_change(checks: dict, name: str, status: str):
    """Exactly ``name`` has ``status``; every other check still passes."""
    got = statuses(checks)
    assert got[name] == status, checks[name]
    assert {n: s for n, s in got.items() if n != name} == \
        {n: "pass" for n in got if n != name}, got
    return checks[name]


def test_a_prepared_node_passes_everything(node):
    root, _ = node
    checks = run_node(root)
    assert set(statuses(checks).values()) == {"pass"}, checks
    assert list(checks) == [
        "kernel module nvme-fabrics", "kernel module nvme-tcp", "nvme-cli", "filesystem tools",
        "in-band authentication (DH-HMAC-CHAP)", "NVMe/TCP TLS", "host NQN and host ID",
        "kubelet directory", "mount propagation"]
    assert checks["nvme-cli"].detail == "2.13"
    assert contract.host_nqn("worker-1") in checks["host NQN and host ID"].detail


def test_module_not_loaded(node):
    root, _ = node
    (root / "sys/module/nvme_tcp").rmdir()
    c = only_change(run_node(root), "kernel module nvme-tcp", "fail")
    assert c.detail.startswith("not loaded")
    assert c.fix.startswith("modprobe nvme-tcp;") and "/etc/modules-load.d/nvme-tcp.conf" in c.fix


def test_module_missing_from_the_kernel(node):
    root, _ = node
    (root / "sys/module/nvme_fabrics").rmdir()
    fakehost.write(root, f"/lib/modules/{RELEASE}/modules.dep",
                   "kernel/drivers/nvme/host/nvme-tcp.ko.xz: \n")
    c = only_change(run_node(root), "kernel module nvme-fabrics", "fail")
    assert c.detail.startswith(f"kernel {RELEASE} has no nvme-fabrics")
    assert "boot a kernel" in c.fix


def test_module_built_in(node):
    root, _ = node
    (root / "sys/module/nvme_tcp").rmdir()
    fakehost.write(root, f"/lib/modules/{RELEASE}/modules.builtin",
                   "kernel/drivers/nvme/host/nvme-tcp.ko\n")
    fakehost.write(root, f"/lib/modules/{RELEASE}/modules.dep", "")
    assert run_node(root)["kernel module nvme-tcp"].detail.startswith("built into the kernel")


@pytest.mark.parametrize("version,status,detail", [
    ("1.16", "fail", "1.16 is older than 2.0"),
    ("2.3", "pass", "2.3 (no --tls before 2.4)"),
])
def test_nvme_cli_versions(node, version, status, detail):
    root, bindir = node
    fakehost.nvme_cli(bindir, version)
    checks = run_node(root)
    assert (checks["nvme-cli"].status, checks["nvme-cli"].detail) == (status, detail)
    if version == "2.3":  # and TLS cannot work with it
        assert checks["NVMe/TCP TLS"].status == "warn"
        assert checks["NVMe/TCP TLS"].detail == "nvme-cli 2.3 has no --tls"


def test_nvme_cli_missing(node):
    root, bindir = node
    (bindir / "nvme").unlink()
    c = only_change(run_node(root), "nvme-cli", "fail")
    assert c.fix.startswith("apt-get install nvme-cli")


def test_a_missing_filesystem_tool(node):
    root, bindir = node
    (bindir / "mkfs.xfs").unlink()
    (bindir / "xfs_growfs").unlink()
    c = only_change(run_node(root), "filesystem tools", "fail")
    assert (c.detail, c.fix) == ("missing mkfs.xfs, xfs_growfs", "apt-get install xfsprogs")


def _config(root: Path, text: str) -> None:
    fakehost.write(root, f"/boot/config-{RELEASE}", text)


def test_auth_missing_is_a_warning_with_the_fix(node):
    """6.12-style config: the library (NVME_AUTH) is on for the target, the
    host option is off: in-band auth does not work on this node."""
    root, _ = node
    _config(root, "CONFIG_NVME_AUTH=m\n# CONFIG_NVME_HOST_AUTH is not set\n"
                  "CONFIG_NVME_TCP_TLS=y\n")
    c = only_change(run_node(root), "in-band authentication (DH-HMAC-CHAP)", "warn")
    assert c.detail == f"kernel {RELEASE} is built without CONFIG_NVME_HOST_AUTH"
    assert "Debian 13" in c.fix


def test_auth_on_a_6_1_style_config(node):
    root, _ = node
    _config(root, "CONFIG_NVME_AUTH=y\nCONFIG_NVME_TCP_TLS=y\n")
    assert run_node(root)["in-band authentication (DH-HMAC-CHAP)"].status == "pass"
    _config(root, "# CONFIG_NVME_AUTH is not set\nCONFIG_NVME_TCP_TLS=y\n")
    assert run_node(root)["in-band authentication (DH-HMAC-CHAP)"].status == "warn"


def test_kernel_config_from_proc_config_gz(node):
    root, _ = node
    (root / f"boot/config-{RELEASE}").unlink()
    with gzip.open(root / "proc/config.gz", "wt") as f:
        f.write("CONFIG_NVME_HOST_AUTH=y\nCONFIG_NVME_TCP_TLS=y\n")
    c = run_node(root)["in-band authentication (DH-HMAC-CHAP)"]
    assert (c.status, c.detail) == ("pass", "CONFIG_NVME_HOST_AUTH=y in /proc/config.gz")


def test_no_kernel_config_at_all(node):
    root, _ = node
    (root / f"boot/config-{RELEASE}").unlink()
    c = run_node(root)["in-band authentication (DH-HMAC-CHAP)"]
    assert c.status == "warn" and c.detail.startswith("cannot tell")
    (root / "sys/module/nvme_auth").mkdir()
    assert run_node(root)["in-band authentication (DH-HMAC-CHAP)"].status == "pass"


def test_tls_needs_kernel_and_tlshd(node):
    root, bindir = node
    _config(root, "CONFIG_NVME_HOST_AUTH=y\n# CONFIG_NVME_TCP_TLS is not set\n")
    (bindir / "tlshd").unlink()
    c = only_change(run_node(root), "NVMe/TCP TLS", "warn")
    assert c.detail == (f"kernel {RELEASE} is built without CONFIG_NVME_TCP_TLS; "
                        "tlshd (ktls-utils) is not on PATH")


def test_host_identity_of_a_renamed_node(node):
    root, _ = node
    fakehost.write(root, f"{STATE}/hostnqn", contract.host_nqn("old-name") + "\n")
    c = only_change(run_node(root), "host NQN and host ID", "fail")
    assert "was the node renamed?" in c.detail and contract.host_nqn("worker-1") in c.detail
    fakehost.write(root, f"{STATE}/hostnqn", contract.host_nqn("worker-1") + "\n")
    fakehost.write(root, f"{STATE}/hostid", contract.host_id("worker-1") + "\n")
    c = run_node(root)["host NQN and host ID"]
    assert c.status == "pass" and "recorded in" in c.detail


def test_all_zero_etc_hostnqn_warns(node):
    root, _ = node
    fakehost.write(root, "/etc/nvme/hostnqn",
                   "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000\n")
    c = only_change(run_node(root), "host NQN and host ID", "warn")
    assert "all-zero UUID" in c.detail


def test_kubelet_dir_missing(node):
    root, _ = node
    (root / "var/lib/kubelet").rmdir()
    checks = run_node(root)
    assert checks["kubelet directory"].status == "fail"
    assert "mount propagation" not in checks
    assert "--kubelet-dir" in checks["kubelet directory"].fix


def test_kubelet_on_a_private_mount(node):
    root, _ = node
    fakehost.mountinfo(root,
                       "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
                       "60 22 0:50 / /var/lib/kubelet rw,relatime - tmpfs tmpfs rw")
    c = only_change(run_node(root), "mount propagation", "fail")
    assert c.detail.startswith("/var/lib/kubelet is on /var/lib/kubelet, which is not shared")
    assert c.fix.startswith("mount --make-rshared /var/lib/kubelet")
    # on the root mount, shared: fine
    fakehost.mountinfo(root, "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
                       "61 22 0:51 / /run rw shared:5 - tmpfs tmpfs rw")
    assert run_node(root)["mount propagation"].detail == "/var/lib/kubelet is on /, a shared mount"


def test_cli_table_and_json(node):
    root, bindir = node
    env = {"PATH": str(bindir), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "csi_spdk", "doctor", "node", "--root",
                          str(root)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"csi-spdk doctor node on worker-1 (kernel {RELEASE})"
    assert all(line.startswith("PASS  ") for line in lines[1:-1]) and len(lines) == 11
    assert lines[-1] == "9 checks: 0 failed, 0 warnings; this node is ready"
    (root / "sys/module/nvme_tcp").rmdir()
    res = subprocess.run([sys.executable, "-m", "csi_spdk", "doctor", "node", "--root",
                          str(root), "--format", "json"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 1
    out = json.loads(res.stdout)
    assert out["ok"] is False and out["role"] == "node"
    bad = [c for c in out["checks"] if c["status"] != "pass"]
    assert [c["name"] for c in bad] == ["kernel module nvme-tcp"]
    assert set(bad[0]) == {"name", "status", "detail", "fix"}


# --- storage host -------------------------------------------------------------------------
@pytest.fixture
def storage(tmp_path):
    root = tmp_path / "root"
    fakehost.good_storage(root)
    return root


def run_storage(root: Path, need: int = 2048, ssds=(), rpc: str = "") -> dict:
    return {c.name: c for c in storage_checks(Host(str(root)), need, list(ssds), rpc)}


def test_a_prepared_storage_host_passes(storage):
    checks = run_storage(storage, ssds=["0000:01:00.0"])
    assert set(statuses(checks).values()) == {"pass"}, checks
    assert list(checks) == ["huge pages for spdk_tgt", "hugetlbfs mount", "memory",
                            "SSD 0000:01:00.0 (0x144d:0xa80a)", "IOMMU for vfio-pci"]
    assert checks["huge pages for spdk_tgt"].detail == \
        "2048 MiB free of 2048 MiB reserved (need 2048 MiB)"


def test_too_few_huge_pages(storage):
    fakehost.hugepages(storage, 2048, 256, 256)
    c = run_storage(storage)["huge pages for spdk_tgt"]
    assert c.status == "fail" and c.detail == "512 MiB reserved, 512 MiB free (need 2048 MiB)"
    assert c.fix.startswith("echo 1024 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")


def test_huge_pages_held_by_another_process(storage):
    fakehost.hugepages(storage, 2048, 1024, 10)
    c = run_storage(storage)["huge pages for spdk_tgt"]
    assert c.status == "fail" and "another process holds them" in c.detail


def test_one_gib_pages_count(storage):
    fakehost.hugepages(storage, 2048, 0, 0)
    fakehost.hugepages(storage, 1048576, 2, 2)
    assert run_storage(storage)["huge pages for spdk_tgt"].status == "pass"


def test_no_hugetlbfs(storage):
    fakehost.mountinfo(storage, "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw")
    c = run_storage(storage)["hugetlbfs mount"]
    assert c.status == "fail" and c.fix.startswith("mount -t hugetlbfs nodev /dev/hugepages")


def test_too_little_memory(storage):
    fakehost.write(storage, "/proc/meminfo", "MemTotal: 2097152 kB\nMemAvailable: 1000000 kB\n")
    c = run_storage(storage)["memory"]
    assert c.status == "fail" and c.detail.startswith("2048 MiB in all: 2048 MiB of huge pages")


def test_ssd_owned_by_the_kernel(tmp_path):
    root = tmp_path / "r"
    fakehost.good_storage(root)
    fakehost.pci_nvme(root, "0000:02:00.0", "nvme", model="SAMSUNG MZQL21T9HCJR-00A07")
    name = "SSD 0000:02:00.0 (SAMSUNG MZQL21T9HCJR-00A07)"
    c = run_storage(root)[name]
    assert c.status == "warn" and "the kernel owns it" in c.detail
    checks = run_storage(root, ssds=["0000:02:00.0"])
    assert checks[name].status == "fail"
    assert checks[name].fix.startswith("unbind it from the kernel and give it to SPDK: "
                                       "driverctl set-override 0000:02:00.0 vfio-pci")
    missing = run_storage(root, ssds=["0000:09:00.0"])["SSD 0000:09:00.0"]
    assert missing.status == "fail" and missing.detail == "no such PCI NVMe device"


def test_vfio_without_an_iommu(storage):
    for g in ("0", "1"):
        (storage / "sys/kernel/iommu_groups" / g).rmdir()
    c = run_storage(storage)["IOMMU for vfio-pci"]
    assert c.status == "fail" and "intel_iommu=on" in c.fix
    fakehost.write(storage, "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode", "Y\n")
    assert run_storage(storage)["IOMMU for vfio-pci"].status == "warn"


def test_spdk_target_reachable(storage, spdk_rpc):
    c = run_storage(storage, rpc=spdk_rpc)[f"spdk_tgt at {spdk_rpc}"]
    assert c.status == "pass" and c.detail.startswith("SPDK v")


def test_spdk_target_unreachable(storage, tmp_path):
    rpc = str(tmp_path / "none.sock")
    c = run_storage(storage, rpc=rpc)[f"spdk_tgt at {rpc}"]
    assert c.status == "fail" and "unreachable" in c.detail and c.fix.startswith("start spdk_tgt")


def test_storage_cli_exit_code(storage):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "csi_spdk", "doctor", "storage", "--root",
                         str(storage), "--format", "json"], capture_output=True, text=True,
                        env=env, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    bad = subprocess.run([sys.executable, "-m", "csi_spdk", "doctor", "storage", "--root",
                          str(storage), "--hugepages-mib", "4096"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 1
    assert [line.split(":")[0] for line in bad.stdout.splitlines() if line.startswith("FAIL")] \
        == ["FAIL  huge pages for spdk_tgt"]
