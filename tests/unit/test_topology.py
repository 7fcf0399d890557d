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
    assert intel.capacity_bytes == (7814037168 + 2048) * 512 and len(intel.namespaces) == 2
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
    assert ssds[1].capacity_bytes == 0


def test_parse_extra():
    assert topology.parse_extra(["a=b", "topology.kubernetes.io/zone = z1"]) == {
        "a": "b", "topology.kubernetes.io/zone": "z1"}


def test_discover_main_json_and_table(tmp_path, capsys):
    build(str(tmp_path))
    args = argparse.Namespace(sysfs_root=str(tmp_path), spdk_rpc="", format="json")
    assert topology.discover_main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 5 and data[0]["class"] == "samsung-ssd-980-pro"
    args.format = "table"
    topology.discover_main(args)
    out = capsys.readouterr().out
    assert "0000:04:00.0" in out and "CLASS" in out and "nvme-ctrl" in out
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
