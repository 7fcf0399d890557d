"""In-band authentication (DH-HMAC-CHAP) enforced by the real Linux kernel.

The simulator's kernel data plane (``csi-spdk sim --nvmet``) mirrors a host
entry added with keyring key names into nvmet's ``hosts/<nqn>/dhchap_*``; the
guest's nvme-cli 2.13 and 6.12 kernel then authenticate for real:

* our key format is accepted by ``nvme check-dhchap-key`` / ``check-tls-key``;
* the authorised node connects with its keys, writes and reads back;
* no key, a wrong host key, a wrong controller key, and a third identity
  (another host id) claiming the node's host NQN are refused by the kernel;
* rotation (``nvmf_subsystem_set_keys``, then the connected host's new
  secrets in sysfs, which re-authenticates): the connection survives, the old
  key is refused on a fresh connect, the new one accepted;
* removing the host entry and the keys leaves nothing in nvmet's configfs;
* no key appears in any output or log the run produced (host side grep).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from guest.harness import GuestOptions
from guest.target_host import TargetRun, free_port, host_agent

from csi_spdk import nvme_keys

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]  # TCG guests on a loaded host

DRIVER = r"""
import os, sys, time
from pathlib import Path

sys.path.insert(0, "/root")
from csi_spdk.node import reauth as node_reauth
from target_driver import (HOSTNQN, MiB, NVMET, Target, controllers, dmesg_count, run,
                           wait_dev, write_read_back)

T = Target()
K, api = T.keys, T.api
OTHER_HOSTID = "0f0e0d0c-0b0a-4908-8706-050403020100"


def refused(label, p, nqn):
    assert p.returncode != 0, f"{label}: the kernel let it connect"
    assert controllers(nqn) == before, f"{label}: a controller appeared"
    print(f"REFUSED {label}", flush=True)


# 1. our keys are valid for nvme-cli 2.13 (the same library the kernel path uses)
for k in ("host1", "ctrl1", "host2", "ctrl2", "wrong"):
    assert run("nvme", "check-dhchap-key", f"--key={K[k]}").returncode == 0, k
assert run("nvme", "check-tls-key", f"--hostnqn={HOSTNQN}",
           "--subsysnqn=nqn.2024-11.io.csi-spdk:check",
           f"--keydata={K['psk']}").returncode == 0
bad = K["host1"][:12] + ("A" if K["host1"][12] != "A" else "B") + K["host1"][13:]
assert run("nvme", "check-dhchap-key", f"--key={bad}").returncode != 0, "corrupt key accepted"

try:
    lvol, nqn = T.volume(32 * MiB)
    T.listen_on(nqn)
    h1, c1 = T.put_key("h1", "host1"), T.put_key("c1", "ctrl1")
    api.host_add(nqn, HOSTNQN, dhchap_key=h1, dhchap_ctrlr_key=c1)
    host_dir = NVMET / "hosts" / HOSTNQN
    if not T.real:      # the simulator's kernel data plane mirrors the keys
        assert (host_dir / "dhchap_key").read_text().strip() == K["host1"], "host key"
        assert (host_dir / "dhchap_ctrl_key").read_text().strip() == K["ctrl1"], "ctrl key"
        assert (NVMET / "subsystems" / nqn / "allowed_hosts" / HOSTNQN).exists()
    sub = api.subsystem_get(nqn)
    assert sub["hosts"] == [{"nqn": HOSTNQN, "dhchap_key": h1, "dhchap_ctrlr_key": c1}], sub

    # 2. refused: no key, wrong host key, right host key + wrong controller key,
    #    a third identity claiming the node's host NQN
    before = controllers(nqn)
    refused("no key", T.connect(nqn), nqn)
    refused("wrong host key", T.connect(nqn, f"--dhchap-secret={K['wrong']}",
                                        f"--dhchap-ctrl-secret={K['ctrl1']}"), nqn)
    refused("wrong controller key", T.connect(nqn, f"--dhchap-secret={K['host1']}",
                                              f"--dhchap-ctrl-secret={K['wrong']}"), nqn)
    refused("third identity without key", T.connect(nqn, hostid=OTHER_HOSTID), nqn)
    refused("third identity with a guessed key",
            T.connect(nqn, f"--dhchap-secret={K['wrong']}", hostid=OTHER_HOSTID), nqn)

    # 3. the authorised node: connect (bidirectional), write, read back
    auth_before = dmesg_count("authenticated")
    p = T.connect(nqn, f"--dhchap-secret={K['host1']}", f"--dhchap-ctrl-secret={K['ctrl1']}")
    assert p.returncode == 0, "the authorised host was refused"
    dev = wait_dev(lvol)
    (ctrl,) = controllers(nqn)
    print("CONNECTED", ctrl, dev, flush=True)
    pattern = write_read_back(dev, 4 * MiB)
    print("DATA-OK", flush=True)

    # 4. rotation in two steps, each leaving host and target consistent after
    #    ONE sysfs write (one write = one re-authentication of the live
    #    controller): (a) the host key: target h2+c1, then the host's
    #    dhchap_secret; (b) the controller key: target h2+c2, then the host's
    #    dhchap_ctrl_secret.
    h2, c2 = T.put_key("h2", "host2"), T.put_key("c2", "ctrl2")
    cdir = Path("/sys/class/nvme") / ctrl

    def reauth(attr, value):
        # the node's own step (csi_spdk/node/reauth.py): the write, the admin
        # queue's verdict, then the end of every I/O queue's re-authentication
        # before the target moves on (else qid 1 meets the next pair)
        n = dmesg_count("authenticated")
        pair = {"dhchap_secret": (value, K["ctrl1"]), "dhchap_ctrl_secret": (K["host2"], value)}
        done = node_reauth.converge("/sys", [ctrl], *pair[attr], timeout=120)
        assert done == [f"{ctrl}/{attr}"], done
        assert dmesg_count("authenticated") > n, f"no re-authentication after writing {attr}"
        assert dmesg_count("qid 1: ") == io_failed, "an I/O queue failed to re-authenticate"

    io_failed = dmesg_count("qid 1: ")

    n_auth = dmesg_count("authenticated")
    api.host_set_keys(nqn, HOSTNQN, dhchap_key=h2, dhchap_ctrlr_key=c1)
    reauth("dhchap_secret", K["host2"])
    api.host_set_keys(nqn, HOSTNQN, dhchap_key=h2, dhchap_ctrlr_key=c2)
    if not T.real:
        assert (host_dir / "dhchap_key").read_text().strip() == K["host2"]
    assert api.subsystem_get(nqn)["hosts"] == [
        {"nqn": HOSTNQN, "dhchap_key": h2, "dhchap_ctrlr_key": c2}]
    reauth("dhchap_ctrl_secret", K["ctrl2"])
    T.drop_key(h1)
    T.drop_key(c1)
    print("dmesg auth lines:", auth_before, n_auth, dmesg_count("authenticated"), flush=True)
    assert controllers(nqn) == [ctrl], controllers(nqn)
    assert (cdir / "state").read_text().strip() == "live"
    Path("/proc/sys/vm/drop_caches").write_text("3")
    fd = os.open(dev, os.O_RDWR)
    assert os.pread(fd, len(pattern), 4 * MiB) == pattern, "read-back after rotation"
    os.pwrite(fd, pattern[::-1], 8 * MiB)
    os.fsync(fd)
    os.close(fd)
    print("ROTATED-CONNECTION-SURVIVED", flush=True)
    before = controllers(nqn)
    refused("old keys after rotation",
            T.connect(nqn, f"--dhchap-secret={K['host1']}", f"--dhchap-ctrl-secret={K['ctrl1']}",
                      "--duplicate-connect"), nqn)
    p = T.connect(nqn, f"--dhchap-secret={K['host2']}", f"--dhchap-ctrl-secret={K['ctrl2']}",
                  "--duplicate-connect")
    assert p.returncode == 0, "the rotated keys were refused"
    assert len(controllers(nqn)) == 2
    print("NEW-KEYS-OK", flush=True)

    # 5. unpublish: disconnect, remove the host entry and the keys
    run("nvme", "disconnect", "-n", nqn)
    assert controllers(nqn) == []
    api.host_remove(nqn, HOSTNQN)
    assert api.subsystem_get(nqn)["hosts"] == []
    T.drop_key(h2)
    T.drop_key(c2)
    if not T.real:
        assert not host_dir.exists(), "host entry (with its keys) left in nvmet"
    assert T.our_keys() == [], T.our_keys()
    api.subsystem_delete(nqn)
    T.forget("subsystem", nqn)
    assert api.subsystem_get(nqn) is None
    if not T.real:
        assert not any((NVMET / "hosts").iterdir())
    print("AUTH-OK", flush=True)
finally:
    T.cleanup()
"""


def _keys() -> dict[str, str]:
    out = {k: nvme_keys.generate_dhchap_key().text
           for k in ("host1", "ctrl1", "host2", "ctrl2", "wrong")}
    out["psk"] = nvme_keys.generate_tls_psk().text
    out["psk_wrong"] = nvme_keys.generate_tls_psk().text
    return out


def assert_no_key_material(keys: dict[str, str], *texts: str) -> None:
    """Each key's base64 body must appear in none of ``texts``."""
    for name, key in keys.items():
        body = key.split(":")[2]
        for i, text in enumerate(texts):
            assert body not in text, f"key {name} leaked into captured text #{i}"


def target_log() -> str:
    """The real target's own log, when the run names it (CSI_SPDK_TEST_TGT_LOG)."""
    path = os.environ.get("CSI_SPDK_TEST_TGT_LOG")
    return Path(path).read_text(errors="replace") if path else ""


def test_guest_dhchap_enforced_by_kernel(guest, host_rpc):
    keys = _keys()
    with TargetRun(host_rpc, keys) as tr:
        res = tr.run(guest, driver=DRIVER, timeout=600,
                     teardown='echo "--- dmesg (nvme) ---"; dmesg | grep -i nvme | tail -40')
    # the grep runs before the assertions on success so a leak is caught either way
    assert_no_key_material(keys, res.output, res.console, target_log())
    assert res.exit_code == 0, res.describe()
    assert ("real spdk_tgt" in res.output) == bool(host_rpc), "ran against the wrong target"
    for marker in ("REFUSED no key", "REFUSED wrong host key", "REFUSED wrong controller key",
                   "REFUSED third identity without key", "DATA-OK",
                   "ROTATED-CONNECTION-SURVIVED", "REFUSED old keys after rotation",
                   "NEW-KEYS-OK", "AUTH-OK"):
        assert marker in res.output, marker


TLS_DRIVER = r"""
import subprocess, sys, time
from pathlib import Path

sys.path.insert(0, "/root")
from csi_spdk import contract, tls_psk
from target_driver import HOSTNQN, MiB, NVMET, Target, controllers, run, wait_dev, \
    write_read_back

T = Target()
K, api = T.keys, T.api
OTHER = contract.host_nqn("intruder")


def insert_psk(keyring, key, nqn):
    # the host's TLS PSK for (host NQN, subsystem NQN), identity version 0
    # ("NVMe0R01 <hostnqn> <subnqn>"), derived as the node derives it
    serial = tls_psk.insert(key, HOSTNQN, nqn, keyring=keyring)
    assert serial.isdigit(), "inserting the PSK failed"
    return serial


def readable(serial):
    # tlshd must be able to read it (else the refusal would be tlshd's, not the
    # handshake's): user read+view besides the possessor's rights
    assert run("keyctl", "setperm", serial, "0x3f0b0000").returncode == 0


def refused(label, p, nqn):
    assert p.returncode != 0, f"{label}: the kernel let it connect"
    assert controllers(nqn) == [], f"{label}: a controller appeared"
    print(f"REFUSED {label}", flush=True)


try:
    lvol, nqn = T.volume(16 * MiB)
    port = T.listen_on(nqn, tls=True)
    p1 = T.put_key("p1", "psk")
    api.host_add(nqn, HOSTNQN, psk=p1)
    if not T.real:   # the simulator's kernel port: TLS required
        kport = next(p for p in (NVMET / "ports").iterdir() if (p / "subsystems" / nqn).exists())
        assert (kport / "addr_tsas").read_text().strip() == "tls1.3"
        assert (kport / "addr_treq").read_text().strip().startswith("required")
    else:            # the real target: a secure-channel listener on that port
        (la,) = api.subsystem_get(nqn)["listen_addresses"]
        assert int(la["trsvcid"]) == port, la
    # a wrong PSK under the host's identity, in a keyring of its own (in the
    # simulator's guest, .nvme is also the target's keyring), given to the
    # kernel by its serial (nvme connect --tls-key=<serial>: tls_key=)
    ring = run("keyctl", "newring", "csi-wrong", "@u").stdout.strip()
    assert ring.isdigit(), "keyctl newring failed"
    assert run("keyctl", "setperm", ring, "0x3f3f0000").returncode == 0
    wrong = insert_psk("csi-wrong", K["psk_wrong"], nqn)
    readable(wrong)
    refused("wrong psk", T.connect(nqn, "--tls", f"--tls-key={wrong}", port=port), nqn)
    # the right interchange key, but the TLS PSK Debian 13's libnvme 1.13
    # derives from it (nvme check-tls-key --insert: HkdfLabel without length
    # bytes, libnvme's *_compat since 1.16): SPDK refuses it, so must the sim
    p = run("nvme", "check-tls-key", "--insert", "--keyring=csi-wrong", f"--hostnqn={HOSTNQN}",
            f"--subsysnqn={nqn}", "--identity=0", f"--keydata={K['psk']}")
    assert p.returncode == 0, "nvme check-tls-key --insert failed"
    compat = run("keyctl", "search", ring, "psk", f"NVMe0R01 {HOSTNQN} {nqn}").stdout.strip()
    assert compat.isdigit() and compat != wrong, "the libnvme-derived PSK is not in its keyring"
    readable(compat)
    refused("libnvme-derived psk", T.connect(nqn, "--tls", f"--tls-key={compat}", port=port), nqn)
    tlshd_log = Path("/tmp/tlshd.log").read_text(errors="replace")
    assert "Failed to read key" not in tlshd_log, "tlshd could not read the wrong PSK"
    assert "start ClientHello handshake" in tlshd_log, "no TLS handshake was tried"
    refused("plain", T.connect(nqn, port=port), nqn)
    api.host_add(nqn, OTHER)
    refused("no-psk identity", T.connect(nqn, "--tls", port=port, hostnqn=OTHER), nqn)
    api.host_remove(nqn, OTHER)
    insert_psk(".nvme", K["psk"], nqn)   # as the node does (the sim put the same there)
    print(run("keyctl", "show", "%:.nvme").stdout, flush=True)
    p = T.connect(nqn, "--tls", port=port)
    assert p.returncode == 0, "the host with the PSK was refused"
    dev = wait_dev(lvol, 20)
    write_read_back(dev)
    print("TLS-DATA-OK", flush=True)
    run("nvme", "disconnect", "-n", nqn)
    api.host_remove(nqn, HOSTNQN)
    refused("after host removal", T.connect(nqn, "--tls", port=port), nqn)
    print("TLS-OK", flush=True)
finally:
    T.cleanup()
"""

TLSHD = """
modprobe tls || true
printf '[debug]\\nloglevel=1\\ntls=0\\nnl=0\\n[authenticate]\\nkeyrings=.nvme\\n' \\
    > /etc/tlshd.conf
tlshd -s -c /etc/tlshd.conf > /tmp/tlshd.log 2>&1 &
"""


def test_guest_tls_psk_enforced_by_kernel(guest, host_rpc):
    keys = _keys()
    with TargetRun(host_rpc, keys) as tr:
        res = tr.run(guest, driver=TLS_DRIVER, timeout=600, setup=TLSHD, teardown="""
            echo "--- tlshd log ---"; tail -30 /tmp/tlshd.log
            echo "--- dmesg (nvme) ---"; dmesg | grep -i -E "nvme|tls|handshake" | tail -40
            """)
    assert_no_key_material(keys, res.output, res.console, target_log())
    assert res.exit_code == 0, res.describe()
    assert ("real spdk_tgt" in res.output) == bool(host_rpc), "ran against the wrong target"
    for marker in ("REFUSED wrong psk", "REFUSED libnvme-derived psk", "REFUSED plain",
                   "REFUSED no-psk identity",
                   "TLS-DATA-OK", "REFUSED after host removal", "TLS-OK"):
        assert marker in res.output, marker


CSI_TLS_DRIVER = r'''
import json, os, sys
from pathlib import Path

import grpc
from csi_spdk.proto import csi_pb2 as csi
from csi_spdk.proto import csi_pb2_grpc as csi_grpc

RUN = "/run/csi"
MiB = 1 << 20
SECRETS = json.loads(Path(RUN, "auth-keys.json").read_text())
ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{RUN}/controller.sock"))
node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{RUN}/node.sock"))
AM = csi.VolumeCapability.AccessMode
cap = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                           access_mode=AM(mode=AM.SINGLE_NODE_WRITER))
node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
vol = ctrl.CreateVolume(csi.CreateVolumeRequest(
    name="pvc-tls", capacity_range=csi.CapacityRange(required_bytes=16 * MiB),
    volume_capabilities=[cap], parameters={"auth": "tls"})).volume
assert vol.volume_context["auth"] == "tls", vol.volume_context
pc = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
    volume_id=vol.volume_id, node_id=node_id, volume_capability=cap,
    volume_context=dict(vol.volume_context))).publish_context)
print("publish_context", pc, flush=True)
TLS_PORT = os.environ.get("CSI_NVMF_TLS_PORT", "4421")
assert pc["auth"] == "tls" and pc["trsvcid"] == TLS_PORT, pc
if os.environ.get("GUEST_SPDK_RPC"):    # the real target: its listener on that port
    from csi_spdk.spdk.api import SpdkApi
    from csi_spdk.spdk.client import SpdkClient
    spdk = SpdkApi(SpdkClient(os.environ["GUEST_SPDK_RPC"]))
    sub = spdk.subsystem_get(pc["nqn"])
    assert [a["trsvcid"] for a in sub["listen_addresses"]] == [TLS_PORT], sub
    assert len(sub["hosts"]) == 1 and "psk" not in sub["hosts"][0], sub
else:
    port = next(p for p in Path("/sys/kernel/config/nvmet/ports").iterdir()
                if (p / "subsystems" / pc["nqn"]).exists())
    assert (port / "addr_tsas").read_text().strip() == "tls1.3"
staging, target = "/var/lib/kubelet/plugins/tls/staging", "/var/lib/kubelet/pods/p/tls"
os.makedirs(staging, exist_ok=True)
try:
    node.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=vol.volume_id, publish_context=pc, staging_target_path=staging,
        volume_capability=cap, volume_context=dict(vol.volume_context)))
    raise SystemExit("staged without the node-stage secret")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    print("NO-SECRET-REFUSED", e.details(), flush=True)
node.NodeStageVolume(csi.NodeStageVolumeRequest(
    volume_id=vol.volume_id, publish_context=pc, staging_target_path=staging,
    volume_capability=cap, volume_context=dict(vol.volume_context), secrets=SECRETS))
node.NodePublishVolume(csi.NodePublishVolumeRequest(
    volume_id=vol.volume_id, publish_context=pc, staging_target_path=staging,
    target_path=target, volume_capability=cap, volume_context=dict(vol.volume_context)))
data = os.urandom(MiB)
with open(target, "r+b") as f:
    f.write(data)
    os.fsync(f.fileno())
Path("/proc/sys/vm/drop_caches").write_text("3")
with open(target, "rb") as f:
    assert f.read(MiB) == data
print("CSI-TLS-DATA-OK", flush=True)
node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                        target_path=target))
node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                    staging_target_path=staging))
ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
    volume_id=vol.volume_id, node_id=node_id))
ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id))
print("CSI-TLS-OK", flush=True)
'''


def test_guest_csi_tls_volume(guest, host_rpc):
    """auth: tls through the driver: controller (PSK, TLS listener) and node
    plugin (PSK into .nvme, nvme connect --tls) against the 6.12 kernel; with
    a real target, the agent runs beside it on the host and writes the keys."""
    env = {}
    with contextlib.ExitStack() as stack:
        agent = (sock, log, keydir) = stack.enter_context(host_agent(host_rpc)) \
            if host_rpc else (None, None, None)
        if host_rpc:
            port = free_port()
            env = {"CSI_NVMF_PORT": str(port), "CSI_NVMF_TLS_PORT": str(free_port())}
        res = guest.run("""
            . /etc/guest/lib.sh
            printf '[authenticate]\\nkeyrings=.nvme\\n' > /etc/tlshd.conf
            tlshd -c /etc/tlshd.conf > /tmp/tlshd.log 2>&1 &
            csi_stack_start guest-node
            rc=0
            python3 /root/driver.py || rc=$?
            csi_stack_stop || rc=1
            [ "$rc" = 0 ] || { csi_stack_logs 60; dmesg | grep -i -E "nvme|tls" | tail -30; }
            exit $rc
            """, timeout=400, env=env, files={"/root/driver.py": CSI_TLS_DRIVER},
            options=GuestOptions(host_rpc=host_rpc, host_agent=agent[0]))
        agent_log = log.read_text(errors="replace") if log else ""
        left = sorted(p.name for p in keydir.iterdir()) if keydir and keydir.exists() else []
    assert res.exit_code == 0, res.describe() + "\n--- host agent log ---\n" + agent_log[-3000:]
    for marker in ("NO-SECRET-REFUSED", "CSI-TLS-DATA-OK", "CSI-TLS-OK",
                   "csi_stack: no key material"):
        assert marker in res.output, marker
    assert left == [], f"keys left in the host agent's key directory: {left}"
    for prefix in ("NVMeTLSkey-1:", "DHHC-1:"):     # the keys were generated in the guest
        assert prefix not in agent_log + target_log(), f"a {prefix} key in the agent/target log"
