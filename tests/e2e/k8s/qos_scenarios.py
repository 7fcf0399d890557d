"""QoS through VolumeAttributesClasses (issue #15), against an ``Env`` of
scenarios.py: external-provisioner passes a PVC's class to CreateVolume as
mutable_parameters; switching the PVC's spec.volumeAttributesClassName makes
external-resizer call ControllerModifyVolume. The SPDK side is read from
``bdev_get_bdevs`` ``assigned_rate_limits`` (what SPDK enforces)."""

from __future__ import annotations

import json

from csi_spdk import contract

from .cluster import DRIVER
from .scenarios import Env, expect_event, leftovers, unique

OFF = {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0,
       "w_mbytes_per_sec": 0}


def limits_of(env: Env, pv: dict) -> dict:
    oid = contract.parse_id(pv["spec"]["csi"]["volumeHandle"])
    bdev = env.spdk.apis[oid.target].bdev_get(oid.lvol_uuid)
    assert bdev is not None, f"no bdev for {oid}"
    return bdev["assigned_rate_limits"]


def _vac(env: Env, name: str, params: dict[str, str]) -> None:
    env.kubectl.create({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttributesClass",
                        "metadata": {"name": name}, "driverName": DRIVER,
                        "parameters": params})


def _switch(env: Env, pvc: str, vac: str) -> None:
    env.kubectl.run("patch", "pvc", pvc, "-n", env.namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"volumeAttributesClassName": vac}}))


def _current_class(env: Env, pvc: str) -> str | None:
    return (env.get_pvc(pvc) or {}).get("status", {}).get("currentVolumeAttributesClassName")


def volume_attributes_classes(env: Env) -> None:
    """Create with class gold, switch to silver (online change), then to a
    class with a value the driver refuses: a VolumeModifyFailed Event with the
    driver's message, the PVC keeps silver and SPDK keeps silver's limits."""
    baseline = {lv["uuid"] for lv in env.driver_lvols()}
    tag = unique("q")
    gold, silver, bad = f"{tag}-gold", f"{tag}-silver", f"{tag}-bad"
    _vac(env, gold, {"maxIOPS": "2000", "maxMBps": "40"})
    _vac(env, silver, {"maxIOPS": "1000", "maxWriteMBps": "10"})
    _vac(env, bad, {"maxIOPS": "1500"})
    name = unique("vac")
    try:
        env.kubectl.create({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": env.namespace},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": env.sc_immediate,
                     "volumeAttributesClassName": gold,
                     "resources": {"requests": {"storage": "64Mi"}}}})
        pvc, pv = env.wait_bound(name)
        assert limits_of(env, pv) == {**OFF, "rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 40}
        assert pv["spec"].get("volumeAttributesClassName") == gold, pv["spec"]
        ctx = pv["spec"]["csi"].get("volumeAttributes", {})
        assert ctx.get("maxIOPS") == "2000" and ctx.get("maxMBps") == "40", ctx
        env.wait(f"PVC {name} status.currentVolumeAttributesClassName {gold}",
                 lambda: _current_class(env, name) == gold)

        # Online change. CSI: keys the new class does not name stay as they are.
        _switch(env, name, silver)
        want = {"rw_ios_per_sec": 1000, "rw_mbytes_per_sec": 40, "r_mbytes_per_sec": 0,
                "w_mbytes_per_sec": 10}
        env.wait(f"SPDK limits of {name} switched to {silver}",
                 lambda: limits_of(env, pv) == want)
        env.wait(f"PVC {name} status.currentVolumeAttributesClassName {silver}",
                 lambda: _current_class(env, name) == silver)
        expect_event(env, name, "VolumeModifySuccessful", silver)

        # A value the driver refuses: the driver's message reaches the PVC.
        _switch(env, name, bad)
        message = expect_event(env, name, "VolumeModifyFailed",
                               "maxIOPS=1500 is not accepted")
        assert "multiple of 1000" in message, message
        status = env.get_pvc(name)["status"]
        assert status.get("currentVolumeAttributesClassName") == silver, status
        modify = status.get("modifyVolumeStatus") or {}
        assert modify.get("targetVolumeAttributesClassName") == bad, status
        assert modify.get("status") == "Infeasible", status
        assert limits_of(env, pv) == want
    finally:
        env.delete_pvc(name)
        for vac in (gold, silver, bad):
            env.kubectl.delete("volumeattributesclass", vac)
    env.wait_gone("pvc", name, env.namespace)
    leftovers(env, baseline)
