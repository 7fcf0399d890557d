"""config.load: the documented format, defaults, and clear errors."""

from __future__ import annotations

import json

import pytest

from csi_spdk.controller import config

GOOD = """
targets:
  - name: target-a
    rpc: unix:///var/tmp/spdk.sock
    rpcTimeout: 30
    nvmf:
      listenAddress: 127.0.0.1
      port: 4420
      dialAddress: 10.0.2.2
    lvstores: [lvs0]
    node: worker-1
    topology:
      topology.kubernetes.io/zone: a
  - name: target-b
    agent:
      address: 10.0.0.5:5261
      serverName: agent.storage-b
      tls: {caFile: /etc/tls/ca.crt, certFile: /etc/tls/tls.crt, keyFile: /etc/tls/tls.key}
    nvmf: {listenAddress: "fd00::1"}
thinOvercommitRatio: 2.0
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_yaml(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    a, b = cfg.targets
    assert a.name == "target-a" and a.rpc == "unix:///var/tmp/spdk.sock"
    assert a.rpc_timeout == 30 and a.port == 4420 and a.dial == "10.0.2.2"
    assert a.lvstores == ("lvs0",) and a.node == "worker-1"
    # only configured labels constrain volumes; the hosting node does not
    assert a.segment() == {"topology.kubernetes.io/zone": "a"}
    assert b.port == 4420 and b.dial == "fd00::1" and b.adrfam == "ipv6"
    assert b.lvstores == () and b.segment() == {}
    assert cfg.thin_overcommit_ratio == 2.0
    assert cfg.default_volume_size == config.DEFAULT_VOLUME_SIZE
    assert cfg.target("target-b") is b and cfg.target("nope") is None
    assert a.make_api().client.address == a.rpc and a.agent is None
    assert b.agent.address == b.rpc == "10.0.0.5:5261"
    assert b.agent.server_name == "agent.storage-b"
    assert (b.agent.tls.ca_file, b.agent.tls.cert_file, b.agent.tls.key_file) == (
        "/etc/tls/ca.crt", "/etc/tls/tls.crt", "/etc/tls/tls.key")


def test_same_host_agent_needs_no_tls(tmp_path):
    from csi_spdk.spdk.agent_client import AgentClient

    cfg = config.load(write(tmp_path, "targets: [{name: a, agent: {address: "
                                      "'unix:///run/csi-spdk/agent.sock'}, "
                                      "nvmf: {listenAddress: 1.2.3.4}}]"))
    api = cfg.targets[0].make_api()
    assert isinstance(api.client, AgentClient)
    assert api.client.address == "unix:///run/csi-spdk/agent.sock"
    api.client.close()


def test_rpc_host_port_is_refused_with_a_pointer_to_the_agent(tmp_path):
    path = write(tmp_path, "targets: [{name: a, rpc: '10.0.0.5:5260', "
                           "nvmf: {listenAddress: 1.2.3.4}}]")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    msg = str(err.value)
    assert "targets[a].rpc" in msg and "10.0.0.5:5260" in msg
    assert "without authentication" in msg and "agent: {address: HOST:PORT" in msg


def test_load_json(tmp_path):
    data = {"targets": [{"name": "t1", "rpc": "/tmp/x.sock",
                         "nvmf": {"listenAddress": "127.0.0.1", "port": 4421}}]}
    cfg = config.load(write(tmp_path, json.dumps(data), "c.json"))
    assert cfg.targets[0].port == 4421 and cfg.thin_overcommit_ratio == 1.0


BAD = [
    ("[]", "top level"),
    ("targets: []", "non-empty"),
    ("targets: [{name: A, rpc: /x, nvmf: {listenAddress: 1.2.3.4}}]", "DNS label"),
    ("targets: [{name: a, nvmf: {listenAddress: 1.2.3.4}}]", "rpc"),
    ("targets: [{name: a, rpc: 'nohost', nvmf: {listenAddress: 1.2.3.4}}]", "rpc"),
    ("targets: [{name: a, rpc: /x}]", "nvmf"),
    ("targets: [{name: a, rpc: /x, nvmf: {port: 1}}]", "listenAddress"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4, port: 70000}}]", "65535"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4, port: x}}]", "integer"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4, bogus: 1}}]", "bogus"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}, extra: 1}]", "extra"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}, lvstores: x}]",
     "lvstores"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}, topology: [1]}]",
     "topology"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}, topology: "
     "{topology.csi-spdk.io/node: b}}]", "set by the driver"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}},"
     " {name: a, rpc: /y, nvmf: {listenAddress: 1.2.3.4}}]", "twice"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}}]\n"
     "thinOvercommitRatio: 0", "thinOvercommitRatio"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}}]\n"
     "thinOvercommitRatio: many", "thinOvercommitRatio"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}}]\nfoo: 1", "foo"),
    ("targets: [{name: a, rpc: /x, nvmf: {listenAddress: 1.2.3.4}}", "YAML"),
    ("targets: [{name: a, rpc: '[fd00::1]:5260', nvmf: {listenAddress: 1.2.3.4}}]",
     "storage agent"),
    ("targets: [{name: a, rpc: /x, agent: {address: 'unix:///a'}, "
     "nvmf: {listenAddress: 1.2.3.4}}]", "not both"),
    ("targets: [{name: a, agent: {address: '10.0.0.1:5261'}, nvmf: {listenAddress: 1.2.3.4}}]",
     "mutually authenticated TLS"),
    ("targets: [{name: a, agent: {address: '10.0.0.1:5261', tls: {caFile: /c, certFile: /t}},"
     " nvmf: {listenAddress: 1.2.3.4}}]", "tls.keyFile"),
    ("targets: [{name: a, agent: {address: '10.0.0.1:5261', tls: {caFile: /c, certFile: /t,"
     " keyFile: /k, pem: 1}}, nvmf: {listenAddress: 1.2.3.4}}]", "pem"),
    ("targets: [{name: a, agent: {address: 'nohost'}, nvmf: {listenAddress: 1.2.3.4}}]",
     "HOST:PORT"),
    ("targets: [{name: a, agent: {address: '10.0.0.1:99999', tls: {}},"
     " nvmf: {listenAddress: 1.2.3.4}}]", "HOST:PORT"),
    ("targets: [{name: a, agent: {address: 'unix:///a', serverName: x},"
     " nvmf: {listenAddress: 1.2.3.4}}]", "on this host"),
    ("targets: [{name: a, agent: {}, nvmf: {listenAddress: 1.2.3.4}}]", "agent.address"),
    ("targets: [{name: a, agent: 'x:1', nvmf: {listenAddress: 1.2.3.4}}]", "mapping"),
]


@pytest.mark.parametrize("text,fragment", BAD)
def test_bad_configs(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.yaml")
