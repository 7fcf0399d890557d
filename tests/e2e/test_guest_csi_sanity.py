"""csi-sanity, every spec including the Node Service ones, against controller +
node plugin in the QEMU guest, where NodeStageVolume really connects over
NVMe/TCP (to the simulator's kernel data plane, or to the host's spdk_tgt when
CSI_SPDK_TEST_RPC is set)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from guest.harness import GuestOptions

# csi-sanity in the guest runs up to 15 min (ginkgo and guest.run both allow it);
# the suite-wide 300 s would cut it first on a loaded machine.
pytestmark = [pytest.mark.guest, pytest.mark.sanity, pytest.mark.timeout(960)]

SCRIPT = r"""
. /etc/guest/lib.sh
[ -x /usr/local/bin/csi-sanity ] || { echo "NO-CSI-SANITY"; exit 3; }
csi_stack_start guest-node
mkdir -p /tmp/csi/mnt /tmp/csi/stage
rc=0
csi-sanity \
  --csi.endpoint=unix://$CSI_RUN/node.sock \
  --csi.controllerendpoint=unix://$CSI_RUN/controller.sock \
  --csi.mountdir=/tmp/csi/mnt/target \
  --csi.stagingdir=/tmp/csi/stage/staging \
  --csi.testvolumesize=67108864 \
  --csi.testvolumeexpandsize=134217728 \
  --csi.testvolumemutableparameters=/root/mutable.yaml \
  --csi.junitfile=/tmp/junit.xml \
  --csi.secrets=$CSI_RUN/csi-sanity-secrets.yaml \
  --ginkgo.no-color --ginkgo.timeout=15m ${SANITY_SKIP:+"--ginkgo.skip=$SANITY_SKIP"} \
  > /tmp/sanity.log 2>&1 || rc=$?
tail -n 60 /tmp/sanity.log
csi_stack_stop || rc=1
[ "$rc" = 0 ] || csi_stack_logs 80
python3 /root/summary.py /tmp/junit.xml || rc=1
echo "kernel objects left:"; nvmet_objects
[ -z "$(nvmet_objects)" ] || rc=1
echo "nvme controllers left:"; ls /sys/class/nvme
[ -z "$(ls /sys/class/nvme)" ] || rc=1
exit $rc
"""


# Runs in the guest: the same junit summariser the host csi-sanity test uses.
SUMMARY = (Path(__file__).resolve().parents[1] / "sanity" / "junit_summary.py").read_text()
# The same mutable parameters as the host run (junit_summary.MUTABLE_PARAMETERS_YAML).
MUTABLE = 'maxIOPS: "2000"\nmaxMBps: "50"\n'


def test_guest_csi_sanity_all_specs(guest, host_rpc):
    # CSI_SPDK_GUEST_SANITY_SKIP: a ginkgo skip regex, e.g. for a known failure
    env = {"SANITY_SKIP": os.environ.get("CSI_SPDK_GUEST_SANITY_SKIP", "")}
    res = guest.run(SCRIPT, timeout=900, env=env, files={"/root/summary.py": SUMMARY,
                                                             "/root/mutable.yaml": MUTABLE},
                    options=GuestOptions(host_rpc=host_rpc))
    if "NO-CSI-SANITY" in res.output:
        pytest.skip("csi-sanity is not installed on the host (go install ...csi-sanity)")
    m = re.search(r"^SANITY-SUMMARY (\d+) (\d+) (\d+)$", res.output, re.M)
    assert m, f"no csi-sanity summary\n{res.describe()}"
    passed, failed, skipped = map(int, m.groups())
    print(f"csi-sanity in guest: {passed} passed, {failed} failed, {skipped} skipped")
    failures = re.findall(r"^SANITY-FAILURE (.*)$", res.output, re.M)
    assert failed == 0, "\n".join(failures) + "\n" + res.describe()
    missing = re.findall(r"^SANITY-MODIFY-MISSING (.*)$", res.output, re.M)
    assert not missing, f"ModifyVolume specs that did not pass: {missing}\n{res.describe()}"
    assert res.exit_code == 0, res.describe()
    assert passed >= 60, f"only {passed} specs passed\n{res.describe()}"
