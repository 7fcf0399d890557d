"""Two controller replicas (the chart's default): one acts, the other waits,
and a killed active replica is replaced with the volume operations converging.

The rig's controller "Pod" (driver + the chart's four sidecars as processes)
is joined by a second one on its own CSI socket, with its own identity in the
driver's Lease. Proven on the real kube-apiserver: the Lease names the first;
the second answers Probe not ready and its sidecars never call it (its driver
counts zero Controller calls) while PVCs are provisioned, snapshotted and
deleted; after SIGKILLing every process of the active Pod, the standby takes
the Lease, its sidecars take theirs, a PVC deletion that the dead Pod never
finished and a new PVC both converge, and SPDK holds exactly the lvols of the
live PVCs. In the rig every sidecar's leader-election identity is the host
name (one machine), so the standby's sidecars find their leases "theirs"
and act at once; in a cluster each Pod has its own name and they wait one
more lease duration for the dead Pod's sidecar leases to expire. The rig is
then handed back (first Pod restarted, second killed) so the other tests find
it as it was.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from csi_spdk import contract

from . import scenarios
from .cluster import DRIVER, NAMESPACE, wait_until

pytestmark = pytest.mark.timeout(600)
LEASE = DRIVER.replace(".", "-") + "-controller"
B = "-b"
# the Controller service (Identity's GetPluginInfo/Probe are how a standby's
# sidecars learn it is not ready)
CONTROLLER_RPCS = {"CreateVolume", "DeleteVolume", "ControllerPublishVolume",
                   "ControllerUnpublishVolume", "ValidateVolumeCapabilities", "ListVolumes",
                   "GetCapacity", "ControllerGetCapabilities", "CreateSnapshot",
                   "DeleteSnapshot", "ListSnapshots", "ControllerExpandVolume",
                   "ControllerGetVolume", "ControllerModifyVolume"}


def holder(rig, lease: str) -> str:
    obj = rig.kubectl.get("lease", lease, NAMESPACE) or {}
    return (obj.get("spec") or {}).get("holderIdentity") or ""


def sidecar_leases(rig) -> dict[str, str]:
    return {o["metadata"]["name"]: o["spec"].get("holderIdentity", "")
            for o in rig.kubectl.get("leases", namespace=NAMESPACE)
            if o["metadata"]["name"] != LEASE}


def controller_calls(rig, pod: str) -> int:
    """Controller-service calls that replica's driver handled (its metrics)."""
    cmd = rig.procs[f"csi-spdk-controller{pod}"].cmd
    address = next(a.split("=", 1)[1] for a in cmd if a.startswith("--metrics-address="))
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for m in re.finditer(r'^csi_spdk_rpc_requests_total\{[^}]*method="(\w+)"[^}]*\} (\S+)$',
                         text, re.M):
        if m.group(1) in CONTROLLER_RPCS:
            total += float(m.group(2))
    return int(total)


def volume_lvols(env) -> set[str]:
    return {lv["name"] for lv in env.driver_lvols() if contract.is_volume_lvol(lv["name"])}


def test_one_replica_acts_and_a_killed_one_is_replaced(rig, env):
    k = rig.kubectl
    assert holder(rig, LEASE) == rig.pod_name(), k.get("lease", LEASE, NAMESPACE)
    rig.start_controller_pod(B, wait_leases=False)
    try:
        assert rig.probe("") is True and rig.probe(B) is False
        # the active Pod serves PVCs; the standby is never called
        keep, gone = scenarios.unique("ha-keep"), scenarios.unique("ha-gone")
        for name in (keep, gone):
            env.pvc(name, env.sc_immediate, "16Mi")
        pvs = {name: env.wait_bound(name)[1] for name in (keep, gone)}
        assert controller_calls(rig, B) == 0
        assert holder(rig, LEASE) == rig.pod_name()
        # the active Pod dies, with a deletion it will never run
        rig.kill_controller_pod("")
        t0 = time.monotonic()
        env.delete_pvc(gone)
        wait_until("the standby takes the driver's Lease", lambda: (
            holder(rig, LEASE) == rig.pod_name(B)), 60, 1, rig.logs)
        took_lease = time.monotonic() - t0
        assert rig.probe(B) is True
        env.wait_gone("pv", pvs[gone]["metadata"]["name"], timeout=120)
        new = scenarios.unique("ha-new")
        env.pvc(new, env.sc_immediate, "16Mi")
        pvs[new] = env.wait_bound(new, timeout=120)[1]
        converged = time.monotonic() - t0
        assert controller_calls(rig, B) > 0
        expected = {contract.volume_lvol_name(pvs[n]["metadata"]["name"]) for n in (keep, new)}
        wait_until("SPDK holds the live PVCs' lvols", lambda: expected <= volume_lvols(env)
                   and contract.volume_lvol_name(pvs[gone]["metadata"]["name"])
                   not in volume_lvols(env), 60, 1, rig.logs)
        print(f"\nfailover: driver lease taken {took_lease:.1f} s after the kill, deletion "
              f"and new PVC converged after {converged:.1f} s; sidecar leases "
              f"{sidecar_leases(rig)}")
        for name in (keep, new):
            env.delete_pvc(name)
            env.wait_gone("pv", pvs[name]["metadata"]["name"], timeout=120)
    finally:
        # hand the rig back: the first Pod again, the second gone
        if not rig.procs["csi-spdk-controller"].alive():
            rig.start_controller_pod("", wait_leases=False)
        rig.kill_controller_pod(B)
        wait_until("the first Pod is active again", lambda: (
            rig.probe("") is True and holder(rig, LEASE) == rig.pod_name()), 90, 1, rig.logs)
