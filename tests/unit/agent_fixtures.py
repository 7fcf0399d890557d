"""Test material for the storage agent: a running agent and its environment.

``start_agent`` runs the agent's gRPC server in this process over a given
SPDK socket, on a Unix socket or on 127.0.0.1 with mutual TLS (certificates:
``agent_pki.Pki``, which needs the ``cryptography`` package; this module does
not, so the controller tests run without it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from csi_spdk.agent.main import agent_server
from csi_spdk.spdk.agent_client import AgentClient, ClientTls

SERVER_NAME = "agent.test"


@dataclass
class Cert:
    cert: Path
    key: Path


def agent_args(spdk_rpc: str, state_dir: Path, listen: str, server: Cert | None = None,
               client_ca: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        listen=listen, spdk_rpc=spdk_rpc, state_dir=str(state_dir),
        tls_cert=str(server.cert) if server else "", tls_key=str(server.key) if server else "",
        tls_client_ca=str(client_ca) if client_ca else "", rpc_timeout=30.0,
        metrics_address="", log_level="debug")


class RunningAgent:
    """An in-process agent; ``address`` is what a client dials."""

    def __init__(self, args: argparse.Namespace, state=None) -> None:
        self.args = args
        self.server = agent_server(args, state)
        self.server.start()
        self.address = args.listen if args.listen.startswith("unix:") \
            else f"127.0.0.1:{self.server.port}"

    def client(self, tls: ClientTls | None = None, server_name: str = "",
               timeout: float = 10.0) -> AgentClient:
        return AgentClient(self.address, tls, server_name, timeout=timeout)

    def stop(self) -> None:
        self.server.stop(grace=0.5)


def start_agent(spdk_rpc: str, state_dir: Path, listen: str, server: Cert | None = None,
                client_ca: Path | None = None, state=None) -> RunningAgent:
    return RunningAgent(agent_args(spdk_rpc, state_dir, listen, server, client_ca), state)


class AgentEnv:
    """SPDK (simulator or CSI_SPDK_TEST_RPC) with a fresh lvstore, direct access
    (``raw``) for assertions, and an agent on a Unix socket (``api``)."""

    def __init__(self, spdk_rpc: str, tmp: Path, lvs_mib: int = 64) -> None:
        import uuid

        from csi_spdk.spdk.api import SpdkApi
        from csi_spdk.spdk.client import SpdkClient

        self.tmp = tmp
        self.rpc = spdk_rpc
        self.suffix = uuid.uuid4().hex[:8]
        self.raw = SpdkApi(SpdkClient(spdk_rpc, timeout=30))
        self.malloc = f"agenttest{self.suffix}"
        self.lvs = f"agentlvs{self.suffix}"
        self.raw.malloc_create(self.malloc, lvs_mib << 20)
        self.raw.lvstore_create(self.malloc, self.lvs, cluster_sz=1 << 20)
        self.agent = start_agent(spdk_rpc, tmp / "agent-state", f"unix://{tmp}/agent.sock")
        self.client = self.agent.client()
        self.api = SpdkApi(self.client)

    def close(self) -> None:
        import contextlib

        from csi_spdk import contract
        from csi_spdk.spdk.errors import SpdkError

        self.client.close()
        self.agent.stop()
        for sub in self.raw.subsystems():
            if sub["nqn"].startswith(contract.NQN_PREFIX) and self.suffix in sub["nqn"]:
                with contextlib.suppress(SpdkError):
                    self.raw.subsystem_delete(sub["nqn"])
        for _ in range(5):
            lvols = self.raw.lvols(self.lvs)
            if not lvols:
                break
            for lv in lvols:
                with contextlib.suppress(SpdkError):
                    self.raw.subsystem_delete(contract.subsystem_nqn(lv["uuid"]))
                with contextlib.suppress(SpdkError):
                    self.raw.lvol_delete(lv["uuid"])
        for method, params in (("bdev_lvol_delete_lvstore", {"lvs_name": self.lvs}),
                               ("bdev_malloc_delete", {"name": self.malloc})):
            with contextlib.suppress(SpdkError):
                self.raw.call(method, params)
        self.raw.client.close()
