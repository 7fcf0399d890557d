"""The agent's channel: gRPC over mutually authenticated TLS.

Each refusal (no client certificate, one from another CA, an expired one on
either side, a certificate for another name) is checked twice: the call
fails as UNAVAILABLE naming the agent, and SPDK is unchanged (the lvol the
call would have created does not exist, the bdev list is the same)."""

from __future__ import annotations

import argparse

import grpc
import pytest
from agent_fixtures import SERVER_NAME, AgentEnv, start_agent

from csi_spdk.agent.main import agent_server
from csi_spdk.controller import config as cfgmod
from csi_spdk.errors import InvalidArgument
from csi_spdk.proto import agent_pb2, agent_pb2_grpc
from csi_spdk.spdk.agent_client import AgentClient, ClientTls
from csi_spdk.spdk.api import SpdkApi
from csi_spdk.spdk.errors import SpdkTransportError

MiB = 1 << 20


@pytest.fixture
def tls_env(spdk_rpc, short_tmp, pki):
    env = AgentEnv(spdk_rpc, short_tmp)
    env.tls_agent = start_agent(spdk_rpc, short_tmp / "tls-state", "127.0.0.1:0",
                                pki.server, pki.ca)
    yield env
    env.tls_agent.stop()
    env.close()


def snapshot_of_spdk(env) -> tuple:
    return (sorted(b["name"] for b in env.raw.bdevs()),
            sorted(s["nqn"] for s in env.raw.subsystems()))


def try_create(env, client) -> None:
    """A mutating call through ``client``: must be refused, SPDK untouched."""
    before = snapshot_of_spdk(env)
    with pytest.raises(SpdkTransportError) as err:
        SpdkApi(client).lvol_create(env.lvs, "csi-through-tls", 4 * MiB, False)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert client.address in err.value.message
    assert env.raw.bdev_get(f"{env.lvs}/csi-through-tls") is None
    assert snapshot_of_spdk(env) == before


def test_mutual_tls_with_the_right_certificates_works(tls_env, pki):
    with tls_env.tls_agent.client(pki.client_tls(), SERVER_NAME) as client:
        uuid = SpdkApi(client).lvol_create(tls_env.lvs, "csi-through-tls", 4 * MiB, False)
    assert tls_env.raw.bdev_get(uuid)["aliases"] == [f"{tls_env.lvs}/csi-through-tls"]


def test_the_address_is_the_default_server_name(tls_env, pki):
    """The server certificate has 127.0.0.1 as an IP SAN: no serverName needed."""
    with tls_env.tls_agent.client(pki.client_tls()) as client:
        assert SpdkApi(client).version()["version"].startswith("SPDK")


def test_no_client_certificate_is_refused(tls_env, pki):
    before = snapshot_of_spdk(tls_env)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    channel = grpc.secure_channel(tls_env.tls_agent.address, creds,
                                  options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    try:
        stub = agent_pb2_grpc.AgentStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Call(agent_pb2.CallRequest(
                method="bdev_lvol_create",
                params_json=f'{{"lvs_name": "{tls_env.lvs}", "lvol_name": "csi-through-tls", '
                            '"size_in_mib": 4}'), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
    assert tls_env.raw.bdev_get(f"{tls_env.lvs}/csi-through-tls") is None
    assert snapshot_of_spdk(tls_env) == before


def test_client_certificate_from_another_ca_is_refused(tls_env, pki):
    with tls_env.tls_agent.client(pki.client_tls(pki.other_client), SERVER_NAME,
                                  timeout=5) as client:
        try_create(tls_env, client)


def test_expired_client_certificate_is_refused(tls_env, pki):
    with tls_env.tls_agent.client(pki.client_tls(pki.expired_client), SERVER_NAME,
                                  timeout=5) as client:
        try_create(tls_env, client)


def test_expired_server_certificate_is_refused(tls_env, pki):
    agent = start_agent(tls_env.rpc, tls_env.tmp / "exp-state", "127.0.0.1:0",
                        pki.expired_server, pki.ca)
    try:
        with agent.client(pki.client_tls(), SERVER_NAME, timeout=5) as client:
            try_create(tls_env, client)
    finally:
        agent.stop()


def test_wrong_server_name_is_refused(tls_env, pki):
    # the right agent, but the controller expects another name
    with tls_env.tls_agent.client(pki.client_tls(), "other.test", timeout=5) as client:
        try_create(tls_env, client)
    # an agent whose certificate names another host, dialled by address
    agent = start_agent(tls_env.rpc, tls_env.tmp / "wrong-state", "127.0.0.1:0",
                        pki.wrong_name_server, pki.ca)
    try:
        with agent.client(pki.client_tls(), timeout=5) as client:
            try_create(tls_env, client)
    finally:
        agent.stop()


def test_agent_not_trusted_by_the_controller_is_refused(tls_env, pki):
    with tls_env.tls_agent.client(pki.client_tls(ca=pki.other_ca), SERVER_NAME,
                                  timeout=5) as client:
        try_create(tls_env, client)


def _args(listen, **tls) -> argparse.Namespace:
    return argparse.Namespace(listen=listen, spdk_rpc="/nonexistent.sock", state_dir="/tmp/x",
                              tls_cert=tls.get("cert", ""), tls_key=tls.get("key", ""),
                              tls_client_ca=tls.get("ca", ""), rpc_timeout=1.0)


def test_agent_refuses_plaintext_tcp(short_tmp, pki):
    with pytest.raises(InvalidArgument, match="mutual TLS"):
        agent_server(_args("127.0.0.1:0"))
    with pytest.raises(InvalidArgument, match="mutual TLS"):
        agent_server(_args("0.0.0.0:5261", cert=str(pki.server.cert), key=str(pki.server.key)))
    with pytest.raises(InvalidArgument, match="Unix socket"):
        agent_server(_args(f"unix://{short_tmp}/a.sock", cert=str(pki.server.cert)))


def test_controller_config_reaches_the_agent_over_tls(tls_env, pki):
    tls = {"caFile": str(pki.ca), "certFile": str(pki.client.cert),
           "keyFile": str(pki.client.key)}
    cfg = cfgmod.parse({"targets": [{
        "name": "remote", "agent": {"address": tls_env.tls_agent.address,
                                    "serverName": SERVER_NAME, "tls": tls},
        "nvmf": {"listenAddress": "127.0.0.1"}}]})
    api = cfg.targets[0].make_api()
    try:
        assert isinstance(api.client, AgentClient)
        assert api.lvstores(tls_env.lvs)[0]["name"] == tls_env.lvs
    finally:
        api.client.close()


def test_unreachable_agent_is_unavailable_naming_it(pki, short_tmp):
    tls = ClientTls(str(pki.ca), str(pki.client.cert), str(pki.client.key))
    with AgentClient("127.0.0.1:1", tls, SERVER_NAME, timeout=2, name="far-away") as client, \
            pytest.raises(SpdkTransportError) as err:
        SpdkApi(client).version()
    assert "127.0.0.1:1" in err.value.message and "far-away" in err.value.message
    with AgentClient(f"unix://{short_tmp}/none.sock", timeout=2) as client, \
            pytest.raises(SpdkTransportError) as err:
        SpdkApi(client).version()
    assert "none.sock" in err.value.message


def test_missing_tls_file_is_a_start_up_error_naming_it(tmp_path, pki):
    cfg = cfgmod.parse({"targets": [{
        "name": "remote", "agent": {"address": "127.0.0.1:5261", "tls": {
            "caFile": str(pki.ca), "certFile": str(tmp_path / "gone.crt"),
            "keyFile": str(pki.client.key)}},
        "nvmf": {"listenAddress": "127.0.0.1"}}]})
    with pytest.raises(cfgmod.ConfigError, match="remote.*gone.crt"):
        cfg.targets[0].make_api()


def test_renewed_certificates_are_used_without_a_restart(tls_env, pki, tmp_path):
    """cert-manager renews the Secret in place: the next connection uses it."""
    import shutil
    import time as _time

    from agent_fixtures import Cert
    from agent_pki import Pki

    live = tmp_path / "live"
    live.mkdir()
    for src, dst in ((pki.server.cert, "tls.crt"), (pki.server.key, "tls.key"),
                     (pki.ca, "ca.crt")):
        shutil.copy(src, live / dst)
    agent = start_agent(tls_env.rpc, tls_env.tmp / "rot-state", "127.0.0.1:0",
                        Cert(live / "tls.crt", live / "tls.key"), live / "ca.crt")
    new = Pki(tmp_path / "new")   # a new CA, server and client certificate
    try:
        with agent.client(pki.client_tls(), SERVER_NAME, timeout=5) as client:
            assert SpdkApi(client).version()
        _time.sleep(0.01)
        for src, dst in ((new.server.cert, "tls.crt"), (new.server.key, "tls.key"),
                         (new.ca, "ca.crt")):
            shutil.copy(src, live / dst)
        with agent.client(new.client_tls(), SERVER_NAME, timeout=5) as client:
            assert SpdkApi(client).version()
        with agent.client(pki.client_tls(), SERVER_NAME, timeout=5) as client:
            try_create(tls_env, client)   # the old CA is no longer accepted
    finally:
        agent.stop()
