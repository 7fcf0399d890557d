"""Smoke tests of the QEMU guest itself: the real Linux NVMe/TCP initiator
against the guest's own kernel target (nvmet), and the project's Python
environment inside the guest."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.guest


def test_guest_python_environment(guest):
    res = guest.run("""
        python3 -c 'import grpc, grpc_health.v1.health, yaml, pyudev, prometheus_client
import csi_spdk, csi_spdk.cli, csi_spdk.proto.csi_pb2_grpc, csi_spdk.spdk.api
print("grpc", grpc.__version__, "csi_spdk", csi_spdk.__file__)'
        csi-spdk --version
        nvme version
        mkfs.xfs -V
        """, timeout=60, check=True)
    assert "grpc 1.85.1" in res.output
    assert "nvme version 2." in res.output


def test_guest_kernel_target_roundtrip(guest):
    """configfs nvmet namespace on 127.0.0.1:4420 -> nvme connect -> ext4 ->
    write, remount, read back -> disconnect; a host not on the allow-list is
    refused."""
    ns_uuid = str(uuid.uuid4())
    host_id = str(uuid.uuid4())
    host_nqn = f"nqn.2014-08.org.nvmexpress:uuid:{host_id}"
    other = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"
    nqn = "nqn.2024-11.io.csi-spdk:smoke"
    res = guest.run(f"""
        . /etc/guest/lib.sh
        set -x
        modprobe nvmet; modprobe nvmet-tcp; modprobe nvme-tcp
        truncate -s 64M /tmp/ns.img
        nvmet_export_file {nqn} /tmp/ns.img {ns_uuid} {host_nqn}

        # a host that is not allowed cannot connect
        if nvme connect -t tcp -a 127.0.0.1 -s 4420 -n {nqn} --hostnqn {other} 2>/dev/null
        then echo "UNEXPECTED: foreign host connected"; exit 1; fi

        nvme connect -t tcp -a 127.0.0.1 -s 4420 -n {nqn} \\
            --hostnqn {host_nqn} --hostid {host_id}
        wait_for 10 nvme_dev_for_uuid {ns_uuid}
        dev=$(nvme_dev_for_uuid {ns_uuid})
        ctrl=$(nvme_ctrl_for_nqn {nqn})
        echo "device $dev controller $ctrl"
        test "$(cat /sys/class/nvme/$ctrl/transport)" = tcp
        test "$(blockdev --getsize64 $dev)" = 67108864
        nvme list -o json

        mkfs.ext4 -q $dev
        mkdir -p /mnt/v
        mount $dev /mnt/v
        dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
        cp /tmp/pattern /mnt/v/data
        umount /mnt/v
        echo 3 > /proc/sys/vm/drop_caches
        mount $dev /mnt/v
        cmp /tmp/pattern /mnt/v/data
        test "$(blkid -o value -s TYPE $dev)" = ext4
        umount /mnt/v

        nvme disconnect -n {nqn}
        ! nvme_dev_for_uuid {ns_uuid}
        echo SMOKE-OK
        """, timeout=120, check=True)
    assert "SMOKE-OK" in res.output
