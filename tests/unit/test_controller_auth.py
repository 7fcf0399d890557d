"""Controller side of data-path authentication (controller/auth.py): per-volume
DH-HMAC-CHAP keys, their custody on the target (0600 files + keyring_file),
the host entry with key NAMES, cleanup on unpublish/delete, and no key
material in contexts or logs."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import grpc
import pytest
from controller_fixtures import (
    call,
    create_req,
    expect_code,
    make_env,
    mount_cap,
    publish_req,
    uuid_of,
)

from csi_spdk import contract, nvme_keys
from csi_spdk.controller.auth import VolumeKeys
from csi_spdk.controller.service import ControllerServicer
from csi_spdk.proto import csi_pb2

C = grpc.StatusCode
NODE = "node-a"


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    e.close()


def _publish(env, vol, node=NODE, secrets=None):
    req = publish_req(vol.volume_id, node)
    req.volume_context.update(vol.volume_context)
    req.secrets.update(secrets or {})
    return call(env.servicer, "ControllerPublishVolume", req)


def _unpublish(env, vol, node=NODE):
    call(env.servicer, "ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id=node))


def _host_entry(env, uuid):
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    return sub["hosts"] if sub else None


def test_dhchap_is_the_default_and_publish_attaches_keys_by_name(env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    vol = call(env.servicer, "CreateVolume", create_req("v-auth")).volume
    uuid = uuid_of(vol.volume_id)
    assert vol.volume_context[contract.VC_AUTH] == "dhchap"
    keys = env.secrets.get(uuid)
    nvme_keys.parse_dhchap_key(keys.dhchap_key)
    nvme_keys.parse_dhchap_key(keys.dhchap_ctrl_key)
    assert keys.dhchap_key != keys.dhchap_ctrl_key

    ctx = _publish(env, vol).publish_context
    assert ctx[contract.PC_AUTH] == "dhchap"
    names = keys.names(uuid)
    assert _host_entry(env, uuid) == [{"nqn": contract.host_nqn(NODE), **names}]
    ring = {k["name"]: k for k in env.t0.raw.keyring_keys()}
    assert set(ring) == set(names.values())
    # the key files: the agent's (through the agent) or this host's key dir
    key_dirs = {os.path.dirname(ring[n]["path"]) for n in ring}
    assert len(key_dirs) == 1
    key_dir = Path(key_dirs.pop())
    if not env.through_agent:
        assert key_dir == tmp_path / "keys" / env.t0.name
    assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700
    for name, material in keys.material(uuid).items():
        path = ring[name]["path"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert Path(path).read_text() == material

    # idempotent publish: same entry, no second key
    _publish(env, vol)
    assert len(env.t0.raw.keyring_keys()) == 2

    _unpublish(env, vol)
    assert _host_entry(env, uuid) is None
    assert env.t0.raw.keyring_keys() == []
    assert list(key_dir.iterdir()) == []
    call(env.servicer, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert env.secrets.get(uuid) is None

    secrets = (keys.dhchap_key, keys.dhchap_ctrl_key)
    text = caplog.text + repr(dict(ctx)) + repr(dict(vol.volume_context))
    assert not any(s.split(":")[2] in text for s in secrets), "key material leaked"


def _published_to_two_nodes(env, name: str):
    """A read-only many-node volume published to node-a and node-b: (volume, uuid)."""
    req = create_req(name, caps=[mount_cap(csi_pb2.VolumeCapability.AccessMode
                                           .MULTI_NODE_READER_ONLY)])
    vol = call(env.servicer, "CreateVolume", req).volume
    for node in ("node-a", "node-b"):
        r = publish_req(vol.volume_id, node, cap=req.volume_capabilities[0], readonly=True)
        r.volume_context.update(vol.volume_context)
        call(env.servicer, "ControllerPublishVolume", r)
    return vol, uuid_of(vol.volume_id)


def test_keys_stay_while_another_node_is_published(env):
    vol, uuid = _published_to_two_nodes(env, "v-multi")
    names = env.secrets.get(uuid).names(uuid)
    assert sorted(h["nqn"] for h in _host_entry(env, uuid)) == sorted(
        contract.host_nqn(n) for n in ("node-a", "node-b"))
    assert all(h["dhchap_key"] == names["dhchap_key"] for h in _host_entry(env, uuid))
    _unpublish(env, vol, "node-a")
    assert len(env.t0.raw.keyring_keys()) == 2
    _unpublish(env, vol, "node-b")
    assert env.t0.raw.keyring_keys() == []


def test_controller_publish_secret_wins(env):
    vol = call(env.servicer, "CreateVolume", create_req("v-pubsecret")).volume
    uuid = uuid_of(vol.volume_id)
    given = VolumeKeys.generate()
    _publish(env, vol, secrets=given.secrets())
    assert _host_entry(env, uuid)[0]["dhchap_key"] == given.names(uuid)["dhchap_key"]
    bad = {contract.SECRET_DHCHAP_KEY: "DHHC-1:00:bm90IGEga2V5:"}
    msg = expect_code(C.INVALID_ARGUMENT, env.servicer, "ControllerPublishVolume",
                      _req_with(vol, bad))
    assert "bm90IGEga2V5" not in msg and contract.SECRET_DHCHAP_KEY in msg


def _req_with(vol, secrets):
    req = publish_req(vol.volume_id, NODE)
    req.volume_context.update(vol.volume_context)
    req.secrets.update(secrets)
    return req


def test_missing_keys_are_failed_precondition(env):
    vol = call(env.servicer, "CreateVolume", create_req("v-lost")).volume
    env.secrets.delete(uuid_of(vol.volume_id))
    msg = expect_code(C.FAILED_PRECONDITION, env.servicer, "ControllerPublishVolume",
                      _req_with(vol, {}))
    assert "keys" in msg
    assert _host_entry(env, uuid_of(vol.volume_id)) in (None, [])


def test_auth_none_warns_once_per_volume_and_publishes_without_keys(env, caplog):
    caplog.set_level(logging.WARNING, logger="csi_spdk.auth")
    for _ in range(2):
        vol = call(env.servicer, "CreateVolume", create_req("v-none",
                                                            params={"auth": "none"})).volume
    assert vol.volume_context[contract.VC_AUTH] == "none"
    warnings = [r for r in caplog.records if "auth: none" in r.getMessage()]
    assert len(warnings) == 1
    ctx = _publish(env, vol).publish_context
    assert contract.PC_AUTH not in ctx
    assert _host_entry(env, uuid_of(vol.volume_id)) == [{"nqn": contract.host_nqn(NODE)}]
    assert env.secrets.get(uuid_of(vol.volume_id)) is None


@pytest.mark.parametrize("value", ["chap", "DHCHAP", "TLS"])
def test_bad_auth_parameter(env, value):
    msg = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume",
                      create_req("v-bad", params={"auth": value}))
    assert "auth" in msg


def test_no_secret_store_is_failed_precondition(env, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    ctl = ControllerServicer(env.config, "csi-spdk.io",
                             apis={n: t.api for n, t in env.targets.items()})
    assert ctl.auth.store is None   # not in a cluster, no static file
    msg = expect_code(C.FAILED_PRECONDITION, ctl, "CreateVolume", create_req("v-nostore"))
    assert "auth: none" in msg and "staticSecretsFile" in msg
    assert not any(lv["name"].startswith("csi-") for lv in env.t0.raw.lvols(env.t0.lvs))
    vol = call(ctl, "CreateVolume", create_req("v-nostore2", params={"auth": "none"})).volume
    assert vol.volume_context[contract.VC_AUTH] == "none"


def test_tls_gets_a_psk_and_a_secure_channel_listener_of_its_own(env):
    vol = call(env.servicer, "CreateVolume", create_req("v-tls", params={"auth": "tls"})).volume
    uuid = uuid_of(vol.volume_id)
    assert vol.volume_context[contract.VC_AUTH] == "tls"
    keys = env.secrets.get(uuid)
    nvme_keys.parse_tls_psk(keys.tls_psk)
    assert not keys.dhchap_key and set(keys.secrets()) == {contract.SECRET_TLS_PSK}
    ctx = _publish(env, vol).publish_context
    port = env.config.targets[0].port
    assert ctx[contract.PC_AUTH] == "tls" and ctx[contract.PC_TRSVCID] == str(port + 1)
    sub = env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid))
    assert [a["trsvcid"] for a in sub["listen_addresses"]] == [str(port + 1)]
    cfg = [c["params"] for c in _nvmf_config(env)
           if c["method"] == "nvmf_subsystem_add_listener"
           and c["params"]["nqn"] == contract.subsystem_nqn(uuid)]
    assert [c["secure_channel"] for c in cfg] == [True]
    hosts = [c["params"] for c in _nvmf_config(env) if c["method"] == "nvmf_subsystem_add_host"
             and c["params"]["nqn"] == contract.subsystem_nqn(uuid)]
    assert hosts == [{"nqn": contract.subsystem_nqn(uuid), "host": contract.host_nqn(NODE),
                      "psk": keys.names(uuid, "tls")["psk"]}]
    _publish(env, vol)   # idempotent: the entry stays
    assert len(env.t0.raw.keyring_keys()) == 1
    _unpublish(env, vol)
    assert env.t0.raw.keyring_keys() == []


def _nvmf_config(env):
    subsystems = env.t0.raw.call("framework_get_config", {"name": "nvmf"})
    return subsystems


def test_unpublish_without_a_node_unpublishes_every_node(env):
    """CSI: an unset node_id MAY unpublish from all nodes: the subsystem goes
    with both hosts, and so do the volume's keys on the target; ListVolumes
    then names no node; the volume itself stays."""
    vol, uuid = _published_to_two_nodes(env, "v-all")
    assert len(_host_entry(env, uuid)) == 2 and len(env.t0.raw.keyring_keys()) == 2
    call(env.servicer, "ControllerUnpublishVolume",
         csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id))
    assert env.t0.raw.subsystem_get(contract.subsystem_nqn(uuid)) is None
    assert env.t0.raw.keyring_keys() == []
    listed = call(env.servicer, "ListVolumes", csi_pb2.ListVolumesRequest()).entries
    assert [(e.volume.volume_id, list(e.status.published_node_ids)) for e in listed] == \
        [(vol.volume_id, [])]
    assert env.t0.raw.bdev_get(uuid) is not None
