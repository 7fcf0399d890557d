"""node/luks.py ``repoint`` against the real kernel in the QEMU guest: a LUKS2
mapping (opened as NodeStage opens it, ``--disable-keyring``) over an NVMe/TCP
namespace whose controller is deleted and connected again as a new block
device reads the data again after the dm table reload, with no passphrase;
without the reload it cannot (the control)."""

from __future__ import annotations

import secrets
import uuid

import pytest

pytestmark = pytest.mark.guest


def test_guest_luks_mapping_follows_a_reconnected_namespace(guest):
    ns_uuid = str(uuid.uuid4())
    host_id = str(uuid.uuid4())
    host = f"nqn.2014-08.org.nvmexpress:uuid:{host_id}"
    nqn = "nqn.2024-11.io.csi-spdk:luks-reconnect"
    key = secrets.token_hex(64)
    res = guest.run(f"""
        . /etc/guest/lib.sh
        set -x
        modprobe nvmet; modprobe nvmet-tcp; modprobe nvme-tcp; modprobe dm-crypt || true
        truncate -s 64M /tmp/ns.img
        nvmet_export_file {nqn} /tmp/ns.img {ns_uuid} {host}
        conn() {{ nvme connect -t tcp -a 127.0.0.1 -s 4420 -n {nqn} --hostnqn {host} \\
                    --hostid {host_id}; wait_for 10 nvme_dev_for_uuid {ns_uuid}; }}
        conn
        old=$(nvme_dev_for_uuid {ns_uuid})
        cat /tmp/key | cryptsetup luksFormat --type luks2 --batch-mode \\
            --pbkdf pbkdf2 --pbkdf-force-iterations 1000 $old --key-file -
        cat /tmp/key | cryptsetup open --type luks2 --disable-keyring $old m --key-file -
        head -c 1048576 /dev/urandom > /tmp/pattern
        dd if=/tmp/pattern of=/dev/mapper/m bs=1M oflag=direct 2>/dev/null
        echo "before: $(dmsetup deps -o devname m)"
        nvme disconnect -n {nqn}
        wait_for 10 sh -c '! nvme_dev_for_uuid {ns_uuid}' || true
        conn
        new=$(nvme_dev_for_uuid {ns_uuid})
        echo "old $old new $new $(stat -c %t:%T $new)"
        if dd if=/dev/mapper/m of=/tmp/back0 bs=1M count=1 iflag=direct 2>/dev/null \\
           && cmp -s /tmp/pattern /tmp/back0
        then echo CONTROL-READ-OK; else echo CONTROL-READ-FAILED; fi
        python3 -c 'import sys
from csi_spdk.node.luks import Luks
print("repoint", Luks(lambda d: None).repoint("m", sys.argv[1]))' $new
        echo "after: $(dmsetup deps -o devname m)"
        dd if=/dev/mapper/m of=/tmp/back bs=1M count=1 iflag=direct 2>/dev/null
        cmp /tmp/pattern /tmp/back && echo DATA-BACK
        python3 -c 'import sys
from csi_spdk.node.luks import Luks
print("again", Luks(lambda d: None).repoint("m", sys.argv[1]))' $new
        cryptsetup close m
        python3 -c 'from csi_spdk.node.luks import Luks
print("closed", Luks(lambda d: None).repoint("m", "/dev/null"))'
        nvme disconnect -n {nqn}
        """, timeout=240, check=True, files={"/tmp/key": key})
    out = res.output
    assert "CONTROL-READ-FAILED" in out, out          # the dead device really is dead
    assert "repoint True" in out and "DATA-BACK" in out and "again True" in out, out
    assert "closed False" in out, out
    assert key not in out
