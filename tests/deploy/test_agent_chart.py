"""The chart's storage agent: container, certificates, NetworkPolicy, and the
controller config pointing at it. The certificates the chart generates are
used for real: an agent serves with the server Secret over a simulator and a
client with the controller's Secret reaches it by the configured address."""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, VALUE_SETS, by_kind, containers, one, python, render_docs, run

AGENT_TLS_DIR = "/etc/csi-spdk/agent-tls"


def _agent_flags() -> set[str]:
    out = run([python(), "-m", "csi_spdk", "agent", "--help"], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def _config(objs) -> dict:
    """The rendered controller config ({} when it comes from an existing Secret)."""
    cm = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-config")]
    return yaml.safe_load(cm[0]["data"]["config.yaml"]) if cm else {}


def _volumes(workload) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def _mounts(container) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def test_agent_container_beside_spdk_tgt():
    objs = render_docs("spdk-tgt")
    ds = one(objs, "DaemonSet", "-spdk-tgt")
    cs = containers(ds)
    assert set(cs) == {"spdk-tgt", "agent"}
    agent, tgt = cs["agent"], cs["spdk-tgt"]
    args = agent["args"]
    assert args[0] == "agent"
    accepted = _agent_flags()
    for arg in args[1:]:
        assert arg.split("=", 1)[0] in accepted, arg
    sock = tgt["args"][tgt["args"].index("-r") + 1]
    assert f"--spdk-rpc=unix://{sock}" in args
    assert _mounts(agent)["spdk-rpc"] == _mounts(tgt)["spdk-rpc"] == str(Path(sock).parent)
    assert "--listen=0.0.0.0:5261" in args
    for flag, name in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"),
                       ("--tls-client-ca", "ca.crt")):
        assert f"{flag}={AGENT_TLS_DIR}/{name}" in args
    vols = _volumes(ds)
    assert _mounts(agent)["agent-tls"] == AGENT_TLS_DIR
    assert vols["agent-tls"]["secret"]["secretName"] == "csi-spdk-agent-server"
    assert vols["agent-state"]["hostPath"] == {"path": "/var/lib/csi-spdk-agent",
                                               "type": "DirectoryOrCreate"}
    assert "--state-dir=/var/lib/csi-spdk-agent" in args
    assert agent["securityContext"].get("privileged") is not True
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_controller_config_points_at_the_agents():
    checked = 0
    for value_set in sorted(VALUE_SETS):
        objs = render_docs(value_set)
        for t in _config(objs).get("targets", []):
            checked += 1
            assert "rpc" not in t or t["rpc"].startswith("unix:"), (value_set, t)
            agent = t.get("agent")
            if agent and not agent["address"].startswith("unix:"):
                assert set(agent["tls"]) == {"caFile", "certFile", "keyFile"}
    assert checked >= 6
    objs = render_docs("spdk-tgt")
    dep = one(objs, "Deployment", "-controller")
    (t,) = [t for t in _config(objs)["targets"] if "agent" in t]
    assert t["agent"]["tls"] == {"caFile": f"{AGENT_TLS_DIR}/ca.crt",
                                 "certFile": f"{AGENT_TLS_DIR}/tls.crt",
                                 "keyFile": f"{AGENT_TLS_DIR}/tls.key"}
    assert _mounts(containers(dep)["csi-spdk"])["agent-tls"] == AGENT_TLS_DIR
    assert _volumes(dep)["agent-tls"]["secret"]["secretName"] == "csi-spdk-agent-client"


def test_existing_secrets_are_used_and_nothing_generated():
    objs = render_docs("multi-target")
    assert not [s for s in by_kind(objs, "Secret") if "agent" in s["metadata"]["name"]]
    dep = one(objs, "Deployment", "-controller")
    assert _volumes(dep)["agent-tls"]["secret"]["secretName"] == "cert-manager-agent-client"
    targets = {t["name"]: t for t in _config(objs)["targets"]}
    # a target's own tls stays as given
    assert targets["target-b"]["agent"]["tls"]["caFile"] == "/etc/csi-spdk/secrets/agent-b/ca.crt"
    assert targets["target-a"]["agent"]["serverName"] == "storage-a.example.com"


def test_defaults_generate_no_certificates():
    objs = render_docs("defaults")
    assert not by_kind(objs, "Secret") and not by_kind(objs, "NetworkPolicy")
    dep = one(objs, "Deployment", "-controller")
    assert _volumes(dep)["agent-tls"]["secret"]["secretName"] == "csi-spdk-agent-client"


def test_network_policy_admits_only_the_controller_to_the_agent_port():
    objs = render_docs("spdk-tgt")
    (np,) = by_kind(objs, "NetworkPolicy")
    ds = one(objs, "DaemonSet", "-spdk-tgt")
    assert np["spec"]["podSelector"]["matchLabels"] == ds["spec"]["selector"]["matchLabels"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    controller_labels = one(objs, "Deployment", "-controller")["spec"]["selector"]["matchLabels"]
    rules = np["spec"]["ingress"]
    agent_rules = [r for r in rules if {"protocol": "TCP", "port": 5261} in r.get("ports", [])]
    assert len(agent_rules) == 1
    assert agent_rules[0]["from"] == [{"podSelector": {"matchLabels": controller_labels}}]
    open_ports = {p["port"] for r in rules if "from" not in r for p in r["ports"]}
    assert 5261 not in open_ports
    assert {4420, 4421} <= open_ports   # NVMe/TCP of the configured targets


def _secret_files(objs, name: str, where: Path) -> dict[str, Path]:
    (sec,) = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == name]
    assert sec["type"] == "kubernetes.io/tls"
    where.mkdir()
    out = {}
    for key, b64 in sec["data"].items():
        out[key] = where / key
        out[key].write_bytes(base64.b64decode(b64))
        out[key].chmod(0o600)
    assert set(out) == {"tls.crt", "tls.key", "ca.crt"}
    return out


def test_generated_certificates_work_for_the_agent_channel(tmp_path):
    pytest.importorskip("cryptography")
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from agent_fixtures import Cert, start_agent

    from csi_spdk.sim.server import SimServer
    from csi_spdk.spdk.agent_client import AgentClient, ClientTls
    from csi_spdk.spdk.api import SpdkApi
    from csi_spdk.spdk.errors import SpdkTransportError

    objs = render_docs("spdk-tgt")
    server = _secret_files(objs, "csi-spdk-agent-server", tmp_path / "server")
    client = _secret_files(objs, "csi-spdk-agent-client", tmp_path / "client")
    assert server["ca.crt"].read_bytes() == client["ca.crt"].read_bytes()
    sim = SimServer(str(tmp_path / "spdk.sock"), str(tmp_path / "data"))
    sim.start()
    agent = start_agent(str(tmp_path / "spdk.sock"), tmp_path / "state", "127.0.0.1:0",
                        Cert(server["tls.crt"], server["tls.key"]), server["ca.crt"])
    tls = ClientTls(str(client["ca.crt"]), str(client["tls.crt"]), str(client["tls.key"]))
    try:
        # the target's configured address and the chart's service name are in the cert
        for name in ("192.168.10.5", "csi-spdk-agent"):
            with AgentClient(agent.address, tls, name, timeout=5) as c:
                assert SpdkApi(c).version()["version"].startswith("SPDK")
        with AgentClient(agent.address, tls, "somewhere-else", timeout=5) as c, \
                pytest.raises(SpdkTransportError):
            SpdkApi(c).version()
    finally:
        agent.stop()
        sim.stop()


# --- pools ------------------------------------------------------------------------------

POOL_FILE = "/etc/csi-spdk/pools/pools.yaml"


def _pool_file(objs, tmp_path: Path) -> Path:
    (cm,) = [o for o in by_kind(objs, "ConfigMap")
             if o["metadata"]["name"] == "csi-spdk-agent-pools"]
    path = tmp_path / "pools.yaml"
    path.write_text(cm["data"]["pools.yaml"])
    return path


def test_pools_render_into_the_agents_pool_file(tmp_path):
    """The values become the file the agent reads with --pools, parsed here by
    the agent's own parser: every field arrives, in the agent's units."""
    from csi_spdk.agent.pools import Device, PoolSpec, load_spec

    objs = render_docs("agent-pools")
    ds = one(objs, "DaemonSet", "-spdk-tgt")
    cs = containers(ds)
    agent, tgt = cs["agent"], cs["spdk-tgt"]
    assert f"--pools={POOL_FILE}" in agent["args"]
    assert _mounts(agent)["agent-pools"] == str(Path(POOL_FILE).parent)
    assert _volumes(ds)["agent-pools"]["configMap"]["name"] == "csi-spdk-agent-pools"
    assert load_spec(_pool_file(objs, tmp_path)) == [
        PoolSpec("nvme0", Device("nvme", "0000:01:00.0", initialize=True),
                 cluster_size=4 << 20, metadata_ratio=100),
        PoolSpec("disk1", Device("aio", "/dev/disk/by-id/nvme-Example_SSD_1234"),
                 cluster_size=1 << 20),
        PoolSpec("file2", Device("uring", "/var/lib/spdk-pools/file2.img")),
    ]
    # the file's directory is the same path in spdk_tgt (which opens it) and
    # the agent (which probes it first); /dev is in both for the block device
    assert _mounts(tgt)["pool-dir-0"] == _mounts(agent)["pool-dir-0"] == "/var/lib/spdk-pools"
    assert _volumes(ds)["pool-dir-0"]["hostPath"] == {"path": "/var/lib/spdk-pools",
                                                      "type": "Directory"}
    assert _mounts(agent)["dev"] == _mounts(tgt)["dev"] == "/dev"
    assert [m for m in agent["volumeMounts"] if m["name"] == "dev"][0]["readOnly"] is True
    # probing a block device takes a privileged container; nothing else does
    assert agent["securityContext"]["privileged"] is True


def test_no_pools_no_pool_file_and_an_unprivileged_agent():
    objs = render_docs("spdk-tgt")
    agent = containers(one(objs, "DaemonSet", "-spdk-tgt"))["agent"]
    assert not [a for a in agent["args"] if a.startswith("--pools")]
    assert not [o for o in by_kind(objs, "ConfigMap") if "pools" in o["metadata"]["name"]]
    assert "dev" not in _mounts(agent)
    assert agent["securityContext"].get("privileged") is not True


def test_file_pools_keep_the_agent_unprivileged(tmp_path):
    from csi_spdk.agent.pools import load_spec

    from .conftest import CHART, RENDER_KUBE_VERSION, docs, tool
    values = yaml.safe_load((ROOT / "tests/deploy/values/agent-pools.yaml").read_text())
    values["agent"]["pools"] = [values["agent"]["pools"][2]]
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(values))
    out = run([tool("helm"), "template", "csi-spdk", str(CHART), "--namespace", "csi-spdk",
               "--kube-version", RENDER_KUBE_VERSION, "-f", str(f)])
    assert out.returncode == 0, out.stderr
    objs = docs(out.stdout)
    agent = containers(one(objs, "DaemonSet", "-spdk-tgt"))["agent"]
    assert agent["securityContext"].get("privileged") is not True
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "dev" not in _mounts(agent)
    assert [s.name for s in load_spec(_pool_file(objs, tmp_path))] == ["file2"]


def _pools(*pools) -> dict:
    return {"spdkTgt": {"enabled": True, "image": {"repository": "r", "tag": "t"}},
            "agent": {"pools": list(pools)}}


NVME = {"pci": "0000:01:00.0"}


@pytest.mark.parametrize("values,error", [
    (_pools({"name": "p", "devices": [{"pci": "01:00.0"}]}), "pci"),
    (_pools({"name": "p", "devices": [NVME, {"pci": "0000:02:00.0"}]}), "devices"),
    (_pools({"name": "p", "devices": []}), "devices"),
    (_pools({"name": "p", "devices": [{"pci": "0000:01:00.0", "path": "/x"}]}), "devices"),
    (_pools({"name": "p", "devices": [{"path": "relative.img"}]}), "path"),
    (_pools({"name": "p", "devices": [{"path": "/x.img", "io": "spdk"}]}), "io"),
    (_pools({"name": "p", "devices": [NVME], "clusterSize": "big"}), "clusterSize"),
    (_pools({"name": "p", "devices": [NVME], "clusterSize": 512}), "clusterSize"),
    (_pools({"name": "p", "devices": [NVME], "metadataRatio": 0}), "metadataRatio"),
    (_pools({"name": "p/q", "devices": [NVME]}), "name"),
    (_pools({"devices": [NVME]}), "name"),
    (_pools({"name": "p", "devices": [NVME], "cluster_size": "4MiB"}), "cluster_size"),
])
def test_schema_rejects_wrong_pools(values, error, tmp_path):
    from .conftest import CHART, RENDER_KUBE_VERSION, tool
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(values))
    out = run([tool("helm"), "template", "x", str(CHART), "--kube-version", RENDER_KUBE_VERSION,
               "-f", str(f)])
    assert out.returncode != 0, f"schema accepted {values}"
    assert "schema" in out.stderr and error in out.stderr, out.stderr


def _node_pools(nodes) -> dict:
    return {"spdkTgt": {"enabled": True, "image": {"repository": "r", "tag": "t"}},
            "agent": {"nodePools": nodes}}


@pytest.mark.parametrize("values,error", [
    (_node_pools({"Storage_2": [{"name": "p", "devices": [NVME]}]}), "Storage_2"),
    (_node_pools({"storage-2": [{"name": "p"}]}), "devices"),
    (_node_pools({"storage-2": [{"name": "p", "devices": [{"pci": "1:0.0"}]}]}), "pci"),
    (_node_pools([{"name": "p", "devices": [NVME]}]), "nodePools"),
])
def test_schema_rejects_wrong_node_pools(values, error, tmp_path):
    test_schema_rejects_wrong_pools(values, error, tmp_path)


def test_node_pools_give_each_node_its_own_pool_file_entry(tmp_path):
    """agent.nodePools: one pool file for the DaemonSet, parsed here by the
    agent's own parser as each node's agent reads it (--node-name from the
    Pod's spec.nodeName): a named node gets its list, any other node gets
    agent.pools. The one Pod spec mounts what any node needs."""
    from csi_spdk.agent.pools import Device, PoolSpec, load_spec

    objs = render_docs("agent-node-pools")
    ds = one(objs, "DaemonSet", "-spdk-tgt")
    cs = containers(ds)
    agent, tgt = cs["agent"], cs["spdk-tgt"]
    assert f"--pools={POOL_FILE}" in agent["args"]
    assert "--node-name=$(NODE_NAME)" in agent["args"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} \
        in agent["env"]
    path = _pool_file(objs, tmp_path)
    assert load_spec(path, node="storage-2") == [
        PoolSpec("pool0", Device("aio", "/var/lib/spdk-pools/pool0.img")),
        PoolSpec("pool1", Device("uring", "/var/lib/spdk-pools/pool1.img"), metadata_ratio=50),
    ]
    assert load_spec(path, node="storage-3.example.com") == [
        PoolSpec("pool0", Device("aio", "/dev/disk/by-id/nvme-Other_SSD_5678"))]
    for other in ("storage-1", ""):
        assert load_spec(path, node=other) == [
            PoolSpec("pool0", Device("nvme", "0000:01:00.0"), cluster_size=4 << 20)]
    # a directory one node's pools need: in every Pod, created where missing
    assert _mounts(tgt)["pool-dir-0"] == _mounts(agent)["pool-dir-0"] == "/var/lib/spdk-pools"
    assert _volumes(ds)["pool-dir-0"]["hostPath"] == {"path": "/var/lib/spdk-pools",
                                                      "type": "DirectoryOrCreate"}
    # storage-3 probes a block device: the agent container is privileged
    assert agent["securityContext"]["privileged"] is True
    assert _mounts(agent)["dev"] == "/dev"


def test_node_pools_alone_are_enough_for_a_pool_file(tmp_path):
    from csi_spdk.agent.pools import load_spec

    from .conftest import CHART, RENDER_KUBE_VERSION, docs, tool
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(_node_pools({"storage-2": [
        {"name": "p", "devices": [{"path": "/srv/p.img"}]}]})))
    out = run([tool("helm"), "template", "csi-spdk", str(CHART), "--namespace", "csi-spdk",
               "--kube-version", RENDER_KUBE_VERSION, "-f", str(f)])
    assert out.returncode == 0, out.stderr
    objs = docs(out.stdout)
    agent = containers(one(objs, "DaemonSet", "-spdk-tgt"))["agent"]
    assert f"--pools={POOL_FILE}" in agent["args"]
    assert agent["securityContext"].get("privileged") is not True     # a file only
    path = _pool_file(objs, tmp_path)
    assert [s.name for s in load_spec(path, node="storage-2")] == ["p"]
    assert load_spec(path, node="storage-1") == []                  # no pools elsewhere


@pytest.mark.parametrize("values,error", [
    (_pools({"name": "p", "devices": [NVME]}, {"name": "p", "devices": [{"path": "/a.img"}]}),
     'agent.pools: pool "p" is defined twice'),
    (_node_pools({"storage-2": [{"name": "p", "devices": [NVME]},
                                {"name": "p", "devices": [{"path": "/a.img"}]}]}),
     'agent.nodePools.storage-2: pool "p" is defined twice'),
    ({"agent": {"pools": [{"name": "p", "devices": [NVME]}]}}, "spdkTgt.enabled"),
    ({"agent": {"nodePools": {"n": [{"name": "p", "devices": [NVME]}]}}}, "spdkTgt.enabled"),
])
def test_chart_refuses_pools_the_agent_would_refuse(values, error, tmp_path):
    from .conftest import CHART, RENDER_KUBE_VERSION, tool
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(values))
    out = run([tool("helm"), "template", "x", str(CHART), "--kube-version", RENDER_KUBE_VERSION,
               "-f", str(f)])
    assert out.returncode != 0 and error in out.stderr, out.stderr
