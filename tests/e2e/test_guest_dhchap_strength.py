"""StorageClass ``dhchapDigest``/``dhchapDHGroup`` as minimums
(csi_spdk/controller/dhchap_strength.py), against the guest's real kernel.

SPDK negotiates from target-wide start-up lists (``nvmf_set_config``) and
picks the strongest pair the host offers; a Linux host offers every digest
and group (fixed in its driver), so only another initiator can ask for less.
Minimum here: sha384 / ffdhe2048. Two targets, one guest boot each:

* ``wide`` (lists sha256,sha384 / null,ffdhe2048): the controller's check
  (the one CreateVolume's placement and ControllerPublishVolume run) refuses
  it, naming sha256 and null; the kernel still negotiates the strongest,
  sha384/ffdhe2048. On a real spdk_tgt, SPDK's own initiator (bdev_nvme)
  offering only sha256/null gets in at sha256/null: the connection below the
  minimum that the refusal exists to prevent.
* ``at`` (lists sha384 / ffdhe2048): the check passes; the kernel connects at
  exactly the minimum, writes and reads back. On a real spdk_tgt the weak-only
  initiator is refused by SPDK ("no usable digests found").

The lists are start-up options, so against a real target this test starts its
own spdk_tgt per phase (``CSI_SPDK_TEST_SPDK_TGT``, with ``CSI_SPDK_TEST_RPC``
set to say a real target is wanted); on the simulator, ``csi-spdk sim
--dhchap-digests/--dhchap-dhgroups`` (its nvmet data plane enforces the
strongest of each, as SPDK would choose for a Linux host).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from guest.target_host import TargetRun, serving

from csi_spdk import nvme_keys

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]  # TCG guests on a loaded host

PHASES = {"wide": ("sha256,sha384", "null,ffdhe2048"), "at": ("sha384", "ffdhe2048")}

DRIVER = r"""
import sys
from pathlib import Path

sys.path.insert(0, "/root")
from csi_spdk.controller import dhchap_strength as ds
from csi_spdk.errors import FailedPrecondition
from csi_spdk.spdk.errors import SpdkError
from target_driver import HOSTNQN, MiB, NVMET, Target, controllers, run, wait_dev, \
    write_read_back

phase, digests, dhgroups = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
WANT = ds.Strength("sha384", "ffdhe2048")
T = Target()
K, api = T.keys, T.api
assert ds.target_lists(api) == (digests, dhgroups), ds.target_lists(api)


def rank(digest, dhgroup):
    return ds.DIGESTS.index(digest), ds.DHGROUPS.index(dhgroup)


def negotiated(nqn):
    # what the target enforces for the kernel's admin queue
    if T.real:
        (qp,) = [q for q in api.call("nvmf_subsystem_get_qpairs", {"nqn": nqn})
                 if q["hostnqn"] == HOSTNQN and q["qid"] == 0]
        assert qp["auth"]["state"] == "completed", qp
        return qp["auth"]["digest"], qp["auth"]["dhgroup"]
    host = NVMET / "hosts" / HOSTNQN
    return ((host / "dhchap_hash").read_text().strip().removeprefix("hmac(").rstrip(")"),
            (host / "dhchap_dhgroup").read_text().strip())


try:
    ds.check_target("guest", api, WANT)
    verdict = ""
except FailedPrecondition as e:
    verdict = str(e)
print("controller check:", verdict or "qualifies", flush=True)
if phase == "wide":
    assert "sha256" in verdict and "null" in verdict, verdict
    print("CONTROLLER-REFUSED", flush=True)
else:
    assert verdict == "", verdict
    print("CONTROLLER-ACCEPTED", flush=True)

try:
    lvol, nqn = T.volume(16 * MiB)
    port = T.listen_on(nqn)
    h, c = T.put_key("h", "host"), T.put_key("c", "ctrl")
    api.host_add(nqn, HOSTNQN, dhchap_key=h, dhchap_ctrlr_key=c)
    p = T.connect(nqn, f"--dhchap-secret={K['host']}", f"--dhchap-ctrl-secret={K['ctrl']}")
    assert p.returncode == 0, "the kernel was refused"
    write_read_back(wait_dev(lvol))
    got = negotiated(nqn)
    print("KERNEL-NEGOTIATED", *got, flush=True)
    # SPDK (and the simulator) pick the strongest pair a Linux host offers
    assert got == (digests[-1], dhgroups[-1]), got
    assert rank(*got) >= rank(WANT.digest, WANT.dhgroup), got
    run("nvme", "disconnect", "-n", nqn)
    assert controllers(nqn) == []
    if T.real:
        # SPDK's own initiator in the same target, offering only sha256/null
        api.call("bdev_nvme_set_options", {"dhchap_digests": ["sha256"],
                                           "dhchap_dhgroups": ["null"]})
        weak = {"name": T.name("weak"), "trtype": "tcp", "adrfam": "ipv4",
                "traddr": "127.0.0.1", "trsvcid": str(port), "subnqn": nqn,
                "hostnqn": HOSTNQN, "dhchap_key": h, "dhchap_ctrlr_key": c}
        try:
            api.call("bdev_nvme_attach_controller", weak)
            qps = api.call("nvmf_subsystem_get_qpairs", {"nqn": nqn})
            auth = sorted({(q["auth"]["digest"], q["auth"]["dhgroup"]) for q in qps})
            print("WEAK-HOST-GOT-IN", auth, flush=True)
            assert phase == "wide" and auth == [("sha256", "null")], auth
            api.call("bdev_nvme_detach_controller", {"name": weak["name"]})
        except SpdkError as e:
            print("WEAK-HOST-REFUSED", e, flush=True)
            assert phase == "at", e
            assert api.call("nvmf_subsystem_get_qpairs", {"nqn": nqn}) == []
    print("STRENGTH-OK", flush=True)
finally:
    T.cleanup()
"""


def _keys() -> dict[str, str]:
    return {k: nvme_keys.generate_dhchap_key().text for k in ("host", "ctrl")}


@contextlib.contextmanager
def own_target(digests: str, dhgroups: str):
    """A real spdk_tgt of this test, started with these DH-HMAC-CHAP lists
    (nvmf_set_config in its start-up JSON config); yields (rpc socket, log)."""
    binary = os.environ.get("CSI_SPDK_TEST_SPDK_TGT", "")
    if not binary:
        pytest.skip("the DH-HMAC-CHAP lists are spdk_tgt start-up options: a real-target run "
                    "of this test needs CSI_SPDK_TEST_SPDK_TGT (the binary) to start its own")
    work = Path(tempfile.mkdtemp(prefix="csi-strength-"))
    cfg = {"subsystems": [{"subsystem": "nvmf", "config": [{"method": "nvmf_set_config",
           "params": {"dhchap_digests": digests.split(","),
                      "dhchap_dhgroups": dhgroups.split(",")}}]}]}
    (work / "cfg.json").write_text(json.dumps(cfg))
    sock, log = work / "spdk.sock", work / "tgt.log"
    try:
        with serving(["nice", "-n", "15", "timeout", "900", binary, "--no-huge", "-s", "2048",
                      "-u", "-m", "0x1", "--disable-cpumask-locks", "-r", str(sock),
                      "--json", str(work / "cfg.json")], sock, log, "spdk_tgt"):
            yield str(sock), log
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_guest_dhchap_minimum(guest, host_rpc, phase):
    digests, dhgroups = PHASES[phase]
    keys = _keys()
    with contextlib.ExitStack() as stack:
        rpc, log = (stack.enter_context(own_target(digests, dhgroups)) if host_rpc
                    else (None, None))
        tr = stack.enter_context(TargetRun(rpc, keys))
        res = tr.run(guest, driver=DRIVER, timeout=600,
                     sim_args=f"--dhchap-digests {digests} --dhchap-dhgroups {dhgroups}",
                     body=f"python3 /root/driver.py {phase} {digests} {dhgroups}",
                     teardown='dmesg | grep -i -E "nvme|auth" | tail -20')
        tgt_log = log.read_text(errors="replace") if log else ""
    for name, key in keys.items():
        body = key.split(":")[2]
        assert body not in res.output + res.console + tgt_log, f"key {name} leaked"
    assert res.exit_code == 0, res.describe() + "\n--- target log ---\n" + tgt_log[-3000:]
    assert ("real spdk_tgt" in res.output) == bool(host_rpc)
    want = ["KERNEL-NEGOTIATED " + " ".join((digests.split(",")[-1], dhgroups.split(",")[-1])),
            "STRENGTH-OK", "CONTROLLER-REFUSED" if phase == "wide" else "CONTROLLER-ACCEPTED"]
    if host_rpc:
        want.append("WEAK-HOST-GOT-IN" if phase == "wide" else "WEAK-HOST-REFUSED")
        if phase == "at":
            assert "no usable digests found" in tgt_log, tgt_log[-2000:]
    for marker in want:
        assert marker in res.output, marker
