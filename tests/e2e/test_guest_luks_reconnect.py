"""node/luks.py ``repoint`` against the real kernel in the QEMU guest: a LUKS2
mapping (opened as NodeStage opens it, ``--disable-keyring``) over an NVMe/TCP
namespace whose controller is deleted and connected again as a new block
device reads the data again after the dm table reload, with no passphrase;
without the reload it cannot (the control).

The namespace is the guest's own kernel target over a file, or, when
CSI_SPDK_TEST_RPC names a real spdk_tgt (host_rpc), a malloc bdev that target
exports on the host's 127.0.0.1 and the guest dials at 10.0.2.2."""

from __future__ import annotations

import secrets
import uuid

import pytest
from guest.harness import GuestOptions

pytestmark = pytest.mark.guest

# export/unexport NQN NSUUID HOSTNQN on the real target ($GUEST_SPDK_RPC)
SPDK_EXPORT = r'''
import os, sys
from csi_spdk.spdk.client import SpdkClient
rpc = SpdkClient(sys.argv[1])
verb, nqn = sys.argv[2], sys.argv[3]
bdev = "luks-reconnect-" + nqn.rsplit(":", 1)[1]
if verb == "export":
    ns, host = sys.argv[4], sys.argv[5]
    if not any(t.get("trtype", "").upper() == "TCP" for t in rpc.call("nvmf_get_transports")):
        rpc.call("nvmf_create_transport", {"trtype": "TCP"})
    rpc.call("bdev_malloc_create", {"name": bdev, "num_blocks": 131072, "block_size": 512})
    rpc.call("nvmf_create_subsystem", {"nqn": nqn, "serial_number": "CSILUKSRECONNECT"})
    rpc.call("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": bdev,
                                                                 "uuid": ns}})
    rpc.call("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": {
        "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1",
        "trsvcid": os.environ.get("GUEST_TARGET_PORT", "4420")}})
    rpc.call("nvmf_subsystem_add_host", {"nqn": nqn, "host": host})
else:
    for method, params in (("nvmf_delete_subsystem", {"nqn": nqn}),
                           ("bdev_malloc_delete", {"name": bdev})):
        try:
            rpc.call(method, params)
        except Exception as err:
            print("unexport:", method, err)
print(verb, "done")
'''


@pytest.mark.timeout(600)   # the guest's own 240 s + boot margin, on a loaded host
def test_guest_luks_mapping_follows_a_reconnected_namespace(guest, host_rpc):
    ns_uuid = str(uuid.uuid4())
    host_id = str(uuid.uuid4())
    host = f"nqn.2014-08.org.nvmexpress:uuid:{host_id}"
    nqn = f"nqn.2016-06.io.spdk:csi-test-luks-{ns_uuid[:8]}"
    key = secrets.token_hex(64)
    res = guest.run(f"""
        . /etc/guest/lib.sh
        set -x
        modprobe nvme-tcp; modprobe dm-crypt || true
        if [ -n "$GUEST_SPDK_RPC" ]; then
            python3 /root/spdk_export.py $GUEST_SPDK_RPC export {nqn} {ns_uuid} {host} || exit 1
            trap 'python3 /root/spdk_export.py $GUEST_SPDK_RPC unexport {nqn}' EXIT
            addr=10.0.2.2
        else
            modprobe nvmet; modprobe nvmet-tcp
            truncate -s 64M /tmp/ns.img
            nvmet_export_file {nqn} /tmp/ns.img {ns_uuid} {host}
            addr=127.0.0.1
        fi
        conn() {{ nvme connect -t tcp -a $addr -s ${{GUEST_TARGET_PORT:-4420}} -n {nqn} \\
                    --hostnqn {host} --hostid {host_id}; wait_for 10 nvme_dev_for_uuid {ns_uuid}; }}
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
        """, timeout=240, check=True, files={"/tmp/key": key, "/root/spdk_export.py": SPDK_EXPORT},
        options=GuestOptions(host_rpc=host_rpc))
    out = res.output
    assert "CONTROL-READ-FAILED" in out, out          # the dead device really is dead
    assert "repoint True" in out and "DATA-BACK" in out and "again True" in out, out
    assert "closed False" in out, out
    assert key not in out
    if host_rpc:
        assert "unexport done" in out, out
