"""Local SSD discovery from a fake sysfs tree and a fake SPDK API; topology keys."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import fakesys  # noqa: E402

from csi_spdk import contract
from csi_spdk.node import topology  # noqa: E402

LABEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


def build(root: str) -> None:
    fakesys.add_pcie_ssd(root, "0000:01:00.0", "0x144d", "0xa80a",
                         "Samsung SSD 980 PRO 1TB", "S5GXNF0R123456", "5B2QGXA7",
                         namespaces=[1953525168])
    fakesys.add_pcie_ssd(root, "0000:02:00.0", "0x144d", "0xa80a",
                         "Samsung SSD 980 PRO 2TB", "S5GXNF0R999999", "5B2QGXA7",
                         namespaces=[3907029168])
    fakesys.add_pcie_ssd(root, "0000:03:00.0", "0x8086", "0x0a54", "INTEL SSDPE2KX040T8",
                         "PHLJ000000004P0DGN", "VDV10131", namespaces=[7814037168, 2048])
    fakesys.add_pcie_ssd(root, "0000:04:00.0", "0x1b36", "0x0010", "QEMU NVMe Ctrl",
                         "deadbeef", "8.0.0", namespaces=[])          # no namespace
    fakesys.add_pcie_ssd(root, "0000:05:00.0", "0xabcd", "0x0001", "Mystery Drive X1",
                         "M1", namespaces=[2048])
    # An NVMe/TCP volume of this very driver: a fabrics controller, not a local SSD.
    fakesys.add_fabrics_subsystem(root, os.path.join(root, "dev"), "nqn.x:vol",
                                  ["5b0c7b0e-3c1e-4e7a-9c55-0a8f3c4b7d21"])
    fakesys.add_fabrics_subsystem(root, os.path.join(root, "dev"), "nqn.y:loop", [],
                                  transport="loop")


def test_sysfs_inventory(tmp_path):
    build(str(tmp_path))
    ssds = topology.sysfs_ssds(str(tmp_path))
    assert [s.pci_address for s in ssds] == ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0",
                                             "0000:04:00.0", "0000:05:00.0"]
    samsung, _, intel, qemu, mystery = ssds
    assert (samsung.vendor_id, samsung.device_id, samsung.vendor) == ("144d", "a80a",
                                                                     "samsung")
    assert samsung.model == "Samsung SSD 980 PRO 1TB" and samsung.serial == "S5GXNF0R123456"
    assert samsung.firmware == "5B2QGXA7"
    assert samsung.capacity_bytes == 1953525168 * 512
    assert intel.capacity_bytes == (7814037168 + 2048) * 512
    # the hidden per-path disks nvmeXcYnZ are listed by their head's name
    assert intel.namespaces == [topology.Namespace("nvme2n1", 1, 7814037168 * 512),
                                topology.Namespace("nvme2n2", 2, 2048 * 512)]
    assert qemu.capacity_bytes == 0 and qemu.namespaces == []
    assert mystery.vendor == "abcd"
    assert all(s.owner == "kernel" for s in ssds)


def test_segments_and_key_scheme(tmp_path):
    build(str(tmp_path))
    seg = topology.segments("worker-1", topology.sysfs_ssds(str(tmp_path)),
                            {"topology.kubernetes.io/zone": "a"})
    p = contract.TOPOLOGY_SSD_PREFIX
    assert seg == {
        contract.TOPOLOGY_NODE_KEY: "worker-1",
        p + "samsung-ssd-980-pro": "true",          # 1TB and 2TB share one class
        p + "intel-ssdpe2kx040t8": "true",
        p + "qemu-nvme-ctrl": "true",
        p + "abcd-mystery-drive-x1": "true",
        "topology.kubernetes.io/zone": "a",
    }
    for key in seg:
        if key.startswith(p):
            assert LABEL_NAME.match(key[len(p):]) and len(key[len(p):]) <= 63


def test_class_names_stay_valid_labels():
    long_model = "Some Extremely Long Enterprise NVMe Model Name " * 4
    a = topology.class_name("0x1bb1", long_model)
    b = topology.class_name("0x1bb1", long_model + "Z")
    assert len(a) <= 63 and LABEL_NAME.match(a) and a.startswith("seagate-") and a != b
    assert topology.class_name("0x15b7", "WDC WDS100T3X0C-00SJG0") == "wdc-wds100t3x0c-00sjg0"
    assert topology.class_name("0x1e0f", "KIOXIA KCD8XRUG3T84") == "kioxia-kcd8xrug3t84"
    assert topology.class_name("0x1c5c", "SK hynix PC801 HFS001TEJ9X101N") == \
        "skhynix-pc801-hfs001tej9x101n"
    assert topology.class_name("0x1344", "Micron_7450_MTFDKCC3T8TFS") == \
        "micron-7450-mtfdkcc3t8tfs"
    assert topology.class_name("0x1af4", "") == "redhat-unknown"
    assert topology.class_name("", "!!!") == "unknown-unknown"
    assert LABEL_NAME.match(topology.class_name("0x8086", "  INTEL . SSD ..  "))


class FakeApi:
    def call(self, method, params=None):
        if method == "bdev_nvme_get_controllers":
            return [
                {"name": "Nvme0", "ctrlrs": [{"state": "enabled", "cntlid": 0,
                                              "trid": {"trtype": "PCIe",
                                                       "traddr": "0000:81:00.0"}}]},
                {"name": "Nvme1", "trid": {"trtype": "PCIe", "traddr": "0000:82:00.0"}},
                {"name": "Remote", "ctrlrs": [{"trid": {"trtype": "TCP",
                                                        "traddr": "10.0.0.1"}}]},
            ]
        if method == "bdev_get_bdevs":
            return [
                {"name": "Nvme0n1", "block_size": 512, "num_blocks": 1000,
                 "driver_specific": {"nvme": [{"pci_address": "0000:81:00.0",
                                               "trid": {"trtype": "PCIe",
                                                        "traddr": "0000:81:00.0"},
                                               "ns_data": {"id": 1},
                                               "ctrlr_data": {
                                                   "vendor_id": "0x1e0f",
                                                   "model_number": "KIOXIA KCM61VUL3T20",
                                                   "serial_number": "X1",
                                                   "firmware_revision": "0105"}}]}},
                {"name": "Malloc0", "block_size": 512, "num_blocks": 10,
                 "driver_specific": {}},
            ]
        raise AssertionError(method)


def test_spdk_inventory():
    ssds = topology.spdk_ssds(FakeApi())
    assert [(s.name, s.pci_address, s.owner) for s in ssds] == [
        ("Nvme0", "0000:81:00.0", "spdk"), ("Nvme1", "0000:82:00.0", "spdk")]
    k = ssds[0]
    assert (k.vendor, k.model, k.serial, k.firmware, k.capacity_bytes) == (
        "kioxia", "KIOXIA KCM61VUL3T20", "X1", "0105", 512000)
    assert ssds[0].ssd_class == "kioxia-kcm61vul3t20"
    assert ssds[0].namespaces == [topology.Namespace("Nvme0n1", 1, 512000)]
    assert ssds[1].capacity_bytes == 0 and ssds[1].namespaces == []


def test_parse_extra():
    assert topology.parse_extra(["a=b", "topology.kubernetes.io/zone = z1"]) == {
        "a": "b", "topology.kubernetes.io/zone": "z1"}


def test_discover_main_json_and_table(tmp_path, capsys):
    build(str(tmp_path))
    args = argparse.Namespace(sysfs_root=str(tmp_path), spdk_rpc="", format="json")
    assert topology.discover_main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 5 and data[0]["class"] == "samsung-ssd-980-pro"
    assert data[2]["namespaces"] == [{"name": "nvme2n1", "nsid": 1, "size_bytes": 7814037168 * 512},
                                     {"name": "nvme2n2", "nsid": 2, "size_bytes": 2048 * 512}]
    assert (data[2]["vendor_id"], data[2]["device_id"]) == ("8086", "0a54")
    args.format = "table"
    topology.discover_main(args)
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["OWNER", "NAME", "PCI", "IDS", "VENDOR", "MODEL",
                                             "SERIAL", "FW", "CAPACITY", "NAMESPACES", "CLASS"]
    rows = [re.split(r"\s{2,}", line) for line in lines[1:]]
    assert rows[2] == ["kernel", "nvme2", "0000:03:00.0", "8086:0a54", "intel",
                       "INTEL SSDPE2KX040T8", "PHLJ000000004P0DGN", "VDV10131", "3.6TiB",
                       "nvme2n1,nvme2n2", "intel-ssdpe2kx040t8"]
    assert rows[3][9:] == ["-", "qemu-nvme-ctrl"]       # no namespace
    args.sysfs_root = str(tmp_path / "empty")
    topology.discover_main(args)
    assert "no local NVMe SSDs" in capsys.readouterr().out


def test_cli_discover(tmp_path, capsys):
    from csi_spdk import cli
    build(str(tmp_path))
    assert cli.main(["discover", "--format", "json", "--sysfs-root", str(tmp_path)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5


def test_unreachable_spdk_is_tolerated_only_when_not_strict(tmp_path):
    import pytest

    from csi_spdk.spdk.errors import SpdkTransportError

    missing = str(tmp_path / "no-spdk.sock")
    assert topology.inventory(str(tmp_path), missing, strict=False) == []
    with pytest.raises(SpdkTransportError):
        topology.inventory(str(tmp_path), missing)


def test_single_controller_layout_and_nsid(tmp_path):
    """QEMU's -device nvme (no multipath head): nvmeXnY right under the controller."""
    fakesys.add_pcie_ssd(str(tmp_path), "0000:00:10.0", "0x1b36", "0x0010", "QEMU NVMe Ctrl",
                         "CSIA0001", "7.2.22", namespaces=[32768, 16384], multipath=False)
    (ssd,) = topology.sysfs_ssds(str(tmp_path))
    assert ssd.namespaces == [topology.Namespace("nvme0n1", 1, 16 << 20),
                              topology.Namespace("nvme0n2", 2, 8 << 20)]
    assert ssd.capacity_bytes == 24 << 20 and ssd.firmware == "7.2.22"


def test_controller_going_away_is_not_listed(tmp_path):
    root = str(tmp_path)
    build(root)
    ctrl = os.path.join(root, "class", "nvme", "nvme3")
    with open(os.path.join(ctrl, "state"), "w") as f:
        f.write("deleting (no IO)\n")
    assert "0000:04:00.0" not in [s.pci_address for s in topology.sysfs_ssds(root)]


def test_controller_unplugged_while_read(tmp_path, monkeypatch):
    """The device vanishes between the transport read and the rest: no
    half-read entry (empty vendor/model) and so no bogus class label."""
    root = str(tmp_path)
    build(root)
    ctrl = os.path.realpath(os.path.join(root, "class", "nvme", "nvme1"))
    real_read = topology._read

    def racing_read(path):
        value = real_read(path)
        if path == os.path.join(root, "class", "nvme", "nvme1", "state") and \
                os.path.exists(ctrl):
            fakesys.remove_pcie_ssd(root, ctrl)
        return value
    monkeypatch.setattr(topology, "_read", racing_read)
    ssds = topology.sysfs_ssds(root)
    assert [s.serial for s in ssds] == ["S5GXNF0R123456", "PHLJ000000004P0DGN", "deadbeef", "M1"]
    seg = topology.segments("n", ssds)
    assert not [k for k in seg if "unknown" in k], seg


def test_node_topology_follows_hot_removal(tmp_path):
    root = str(tmp_path)
    intel = fakesys.add_pcie_ssd(root, "0000:00:12.0", "0x8086", "0x5845", "QEMU NVMe Ctrl",
                                 "CSIC0003", namespaces=[32768], multipath=False)
    fakesys.add_pcie_ssd(root, "0000:00:10.0", "0x1b36", "0x0010", "QEMU NVMe Ctrl",
                         "CSIA0001", namespaces=[32768], multipath=False)
    b = fakesys.add_pcie_ssd(root, "0000:00:11.0", "0x1b36", "0x0010", "QEMU NVMe Ctrl",
                             "CSIB0002", namespaces=[65536], multipath=False)
    nt = topology.NodeTopology("n1", root, extra={"topology.kubernetes.io/zone": "z"})
    p = contract.TOPOLOGY_SSD_PREFIX
    assert nt.segments() == {contract.TOPOLOGY_NODE_KEY: "n1", "topology.kubernetes.io/zone": "z",
                             p + "qemu-nvme-ctrl": "true", p + "intel-qemu-nvme-ctrl": "true"}
    fakesys.remove_pcie_ssd(root, intel)
    assert nt.segments() == {contract.TOPOLOGY_NODE_KEY: "n1", "topology.kubernetes.io/zone": "z",
                             p + "qemu-nvme-ctrl": "true"}
    fakesys.remove_pcie_ssd(root, b)          # one of the class is left: the label stays
    assert p + "qemu-nvme-ctrl" in nt.segments()
    assert [s.serial for s in nt.inventory()] == ["CSIA0001"]


def test_node_topology_keeps_spdk_ssds_across_an_unreachable_target(tmp_path, monkeypatch):
    from csi_spdk.spdk.errors import SpdkTransportError

    owned = topology.spdk_ssds(FakeApi())
    answers = [owned, SpdkTransportError("/x.sock", "bdev_nvme_get_controllers", "refused")]

    def fake(rpc, timeout):
        got = answers.pop(0)
        if isinstance(got, Exception):
            raise got
        return got
    monkeypatch.setattr(topology, "_spdk_inventory", fake)
    nt = topology.NodeTopology("n1", str(tmp_path), spdk_rpc="/x.sock")
    key = contract.TOPOLOGY_SSD_PREFIX + "kioxia-kcm61vul3t20"
    assert nt.segments()[key] == "true"
    assert nt.segments()[key] == "true"       # unreachable now: last known SSDs kept
    monkeypatch.undo()                        # a real client on a socket nobody serves
    never = topology.NodeTopology("n2", str(tmp_path), spdk_rpc=str(tmp_path / "none.sock"),
                                  spdk_timeout=0.5)
    assert never.segments() == {contract.TOPOLOGY_NODE_KEY: "n2"}


def test_node_get_info_reads_topology_per_call(tmp_path):
    from csi_spdk.node.service import NodeServicer
    from csi_spdk.proto import csi_pb2

    root = str(tmp_path / "sys")
    ctrl = fakesys.add_pcie_ssd(root, "0000:00:12.0", "0x8086", "0x5845", "QEMU NVMe Ctrl",
                                "CSIC0003", namespaces=[32768], multipath=False)
    nt = topology.NodeTopology("worker-1", root)

    class Init:                  # NodeGetInfo never touches the initiator
        pass
    node = NodeServicer("worker-1", str(tmp_path / "state"), Init(), topology=nt.segments)
    key = contract.TOPOLOGY_SSD_PREFIX + "intel-qemu-nvme-ctrl"
    info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), None)
    assert dict(info.accessible_topology.segments) == {contract.TOPOLOGY_NODE_KEY: "worker-1",
                                                       key: "true"}
    fakesys.remove_pcie_ssd(root, ctrl)
    info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), None)
    assert dict(info.accessible_topology.segments) == {contract.TOPOLOGY_NODE_KEY: "worker-1"}


def test_pci_address_from_a_link_of_another_form(tmp_path):
    """The kernel links ``device`` as ../../../<address> (read with one
    readlink); any other form is resolved the long way."""
    root = str(tmp_path)
    ctrl = fakesys.add_pcie_ssd(root, "0000:00:10.0", "0x1b36", "0x0010", "QEMU NVMe Ctrl",
                                "CSIA0001", namespaces=[8], multipath=False)
    link = os.path.join(ctrl, "device")
    os.unlink(link)
    os.symlink(os.path.join("..", ".."), link)       # same directory, other spelling
    assert [s.pci_address for s in topology.sysfs_ssds(root)] == ["0000:00:10.0"]
