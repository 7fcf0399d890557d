"""StorageClass dhchapDigest / dhchapDHGroup (controller/dhchap_strength.py):
validated with INVALID_ARGUMENT naming the allowed values; SPDK negotiates
from target-wide start-up lists only (nvmf_set_config), so such a volume is
placed only on a target whose lists hold nothing weaker, and publish checks
the target again. The agent forwards framework_get_config for nvmf only."""

from __future__ import annotations

import grpc
import pytest
from controller_fixtures import REAL_RPC, call, create_req, expect_code, make_env, publish_req

from csi_spdk import contract
from csi_spdk.agent import policy
from csi_spdk.controller import dhchap_strength as ds
from csi_spdk.errors import PermissionDenied

C = grpc.StatusCode


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path, n_targets=2)
    yield e
    e.close()


def _lists(env, target: str, digests=None, dhgroups=None) -> None:
    server = env.targets[target].server
    if server is None or REAL_RPC:
        pytest.skip("needs the simulator's start-up lists (a real target has its own)")
    if digests is not None:
        server.state.nvmf.dhchap_digests = list(digests)
    if dhgroups is not None:
        server.state.nvmf.dhchap_dhgroups = list(dhgroups)


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("dhchapDigest", "md5", "sha256, sha384, sha512"),
    ("dhchapDigest", "SHA512", "sha256, sha384, sha512"),
    ("dhchapDHGroup", "ffdhe1024", "null, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144, ffdhe8192"),
])
def test_bad_values_name_the_allowed_ones(env, key, value, allowed):
    err = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume",
                      create_req("v-bad", params={key: value}))
    assert key in err and allowed in err, err
    assert not env.t0.raw.lvols()


def test_only_for_dhchap(env):
    err = expect_code(C.INVALID_ARGUMENT, env.servicer, "CreateVolume", create_req(
        "v-none", params={"auth": "none", "dhchapDigest": "sha512"}))
    assert "auth: none" in err, err


def test_default_lists_allow_weaker_so_a_minimum_is_refused(env):
    """SPDK's default lists allow every digest and group: a host offering only
    sha256 + null would get them, so sha512 cannot be promised anywhere."""
    for t in env.targets.values():
        assert ds.target_lists(t.raw) == (list(ds.DIGESTS), list(ds.DHGROUPS))
    err = expect_code(C.FAILED_PRECONDITION, env.servicer, "CreateVolume", create_req(
        "v-strong", params={"dhchapDigest": "sha512", "dhchapDHGroup": "ffdhe4096"}))
    for t in env.targets:
        assert f"target {t}: it allows the weaker digest(s) sha256, sha384" in err, err
    assert "weaker DH group(s) null, ffdhe2048, ffdhe3072" in err, err
    assert "nvmf_set_config" in err, err
    assert not any(t.raw.lvols() for t in env.targets.values())


def test_placed_on_the_target_that_qualifies_and_context_carries_it(env):
    names = list(env.targets)
    _lists(env, names[1], digests=["sha384", "sha512"], dhgroups=["ffdhe4096", "ffdhe8192"])
    params = {"dhchapDigest": "sha384", "dhchapDHGroup": "ffdhe4096"}
    for i in range(3):   # whatever placement would prefer, only the strong target qualifies
        vol = call(env.servicer, "CreateVolume", create_req(f"v-s{i}", params=params)).volume
        assert contract.parse_id(vol.volume_id).target == names[1], vol.volume_id
        assert vol.volume_context["dhchapDigest"] == "sha384"
        assert vol.volume_context["dhchapDHGroup"] == "ffdhe4096"
    assert not env.targets[names[0]].raw.lvols()
    # a weaker minimum fits both; pinning to the weak target with the strong one is refused
    vol = call(env.servicer, "CreateVolume", create_req(
        "v-pin", params={"dhchapDigest": "sha256", "target": names[0]})).volume
    assert contract.parse_id(vol.volume_id).target == names[0]
    err = expect_code(C.FAILED_PRECONDITION, env.servicer, "CreateVolume", create_req(
        "v-pin2", params={**params, "target": names[0]}))
    assert f"target {names[0]}" in err and names[1] not in err, err


def test_publish_checks_the_target_again(env):
    names = list(env.targets)
    _lists(env, names[0], digests=["sha512"])
    _lists(env, names[1], digests=["sha512"])
    vol = call(env.servicer, "CreateVolume", create_req(
        "v-p", params={"dhchapDigest": "sha512"})).volume
    target = contract.parse_id(vol.volume_id).target
    req = publish_req(vol.volume_id, "node-a")
    req.volume_context.update(vol.volume_context)
    call(env.servicer, "ControllerPublishVolume", req)
    # the target restarts with SPDK's default lists: no new host may be let in
    _lists(env, target, digests=list(ds.DIGESTS))
    req2 = publish_req(vol.volume_id, "node-a")
    req2.volume_context.update(vol.volume_context)
    err = expect_code(C.FAILED_PRECONDITION, env.servicer, "ControllerPublishVolume", req2)
    assert "sha256, sha384" in err, err


def test_agent_forwards_framework_get_config_for_nvmf_only():
    policy.check("framework_get_config", {"name": "nvmf"}, lambda _n: None)
    for name in ("keyring", "bdev", None):
        with pytest.raises(PermissionDenied):
            policy.check("framework_get_config", {"name": name} if name else {}, lambda _n: None)


def test_sim_start_up_lists_and_the_kernel_data_plane_offers_the_strongest(tmp_path,
                                                                            monkeypatch):
    """``csi-spdk sim --dhchap-digests/--dhchap-dhgroups`` = spdk_tgt's start-up
    nvmf_set_config: framework_get_config reports them (the shape a real
    v25.09 target gives), and the nvmet data plane offers the strongest of
    each (SPDK picks the strongest a Linux host offers)."""
    import argparse

    from controller_fixtures import InProcClient

    from csi_spdk.sim import methods  # noqa: F401  (registers the RPC methods)
    from csi_spdk.sim.nvmet import DHCHAP_DHGROUP_ENV, DHCHAP_HASH_ENV, NvmetDataPlane
    from csi_spdk.sim.server import _dhchap_lists
    from csi_spdk.sim.state import SimState
    from csi_spdk.spdk.api import SpdkApi

    monkeypatch.delenv(DHCHAP_HASH_ENV, raising=False)
    monkeypatch.delenv(DHCHAP_DHGROUP_ENV, raising=False)
    dp = NvmetDataPlane(root=tmp_path / "nvmet", load_modules=False)
    state = SimState(tmp_path / "data", dp)
    _dhchap_lists(state, argparse.Namespace(dhchap_digests="sha512,sha384",
                                            dhchap_dhgroups="ffdhe8192,ffdhe4096"))
    api = SpdkApi(InProcClient(state))
    assert ds.target_lists(api) == (["sha384", "sha512"], ["ffdhe4096", "ffdhe8192"])
    assert (dp.dhchap_hash, dp.dhchap_dhgroup) == ("hmac(sha512)", "ffdhe8192")
    with pytest.raises(SystemExit, match="sha1"):
        _dhchap_lists(state, argparse.Namespace(dhchap_digests="sha1", dhchap_dhgroups=""))
