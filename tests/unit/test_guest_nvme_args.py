"""The guest harness's QEMU arguments for emulated NVMe SSDs (no QEMU run)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "e2e"))
from guest import devices, harness  # noqa: E402


def test_nvme_controllers_namespaces_and_backing_files(tmp_path):
    ctrls = (harness.NvmeController("ssda", "SA1", (16 << 20, 8 << 20), slot=0x10),
             harness.NvmeController("ssdc", "SC3", (4 << 20,), intel_id=True))
    args = devices.qemu_nvme_args(tmp_path, ctrls)
    assert args == [
        "-device", "nvme,id=ssda,serial=SA1,addr=0x10",
        "-drive", f"file={tmp_path}/ssda-ns1.img,if=none,id=ssda-ns1,format=raw,cache=unsafe",
        "-device", "nvme-ns,drive=ssda-ns1,bus=ssda,nsid=1",
        "-drive", f"file={tmp_path}/ssda-ns2.img,if=none,id=ssda-ns2,format=raw,cache=unsafe",
        "-device", "nvme-ns,drive=ssda-ns2,bus=ssda,nsid=2",
        "-device", "nvme,id=ssdc,serial=SC3,use-intel-id=on",
        "-drive", f"file={tmp_path}/ssdc-ns1.img,if=none,id=ssdc-ns1,format=raw,cache=unsafe",
        "-device", "nvme-ns,drive=ssdc-ns1,bus=ssdc,nsid=1",
    ]
    sizes = {p.name: (p.stat().st_size, p.stat().st_blocks) for p in tmp_path.iterdir()}
    assert {k: v[0] for k, v in sizes.items()} == {
        "ssda-ns1.img": 16 << 20, "ssda-ns2.img": 8 << 20, "ssdc-ns1.img": 4 << 20}
    assert all(blocks == 0 for _, blocks in sizes.values()), "backing files must be sparse"
    assert ctrls[0].pci_address == "0000:00:10.0" and ctrls[1].pci_address is None


def test_monitor_and_nvme_on_the_command_line(tmp_path):
    kernel = harness.Kernel(tmp_path, "6.1.0-test")
    opts = harness.GuestOptions(nvme=(harness.NvmeController("x", "S"),), monitor=True)
    cmd = harness._qemu_cmd(kernel, tmp_path / "initrd.cpio", tmp_path / "o", tmp_path / "c",
                            60, opts)
    assert cmd[cmd.index("-qmp") + 1] == f"unix:{tmp_path}/qmp.sock,server=on,wait=off"
    assert "nvme,id=x,serial=S" in cmd
    plain = harness._qemu_cmd(kernel, tmp_path / "initrd.cpio", tmp_path / "o", tmp_path / "c",
                              60, harness.GuestOptions())
    assert "-qmp" not in plain and not [a for a in plain if a.startswith("nvme")]


def test_host_target_and_agent_forwards():
    """A real target's RPC socket and the host agent's socket each get their
    own guestfwd; no network at all without them."""
    assert harness._qemu_net_args(harness.GuestOptions()) == ["-nic", "none"]
    flag, nic = harness._qemu_net_args(harness.GuestOptions(
        host_rpc="unix:///tmp/t/spdk.sock", host_agent="/tmp/a/agent.sock"))
    assert flag == "-nic" and nic.startswith("user,model=virtio-net-pci,")
    assert nic.split(",")[2:] == [
        "guestfwd=tcp:10.0.2.100:5260-cmd:socat - UNIX-CONNECT:/tmp/t/spdk.sock",
        "guestfwd=tcp:10.0.2.100:5261-cmd:socat - UNIX-CONNECT:/tmp/a/agent.sock"]
    only_rpc = harness._qemu_net_args(harness.GuestOptions(host_rpc="127.0.0.1:5260"))[1]
    assert only_rpc.endswith("guestfwd=tcp:10.0.2.100:5260-cmd:socat - TCP:127.0.0.1:5260")
    assert "5261" not in only_rpc
