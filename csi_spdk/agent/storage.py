"""The agent's storage side in one object: pools, desired state, supervisor.

``csi-spdk agent`` wires it in ``agent/main.py``::

    side = storage.StorageSide.from_args(args).start()
    ...
    side.record(method, params, result)      # after each successful forwarded call
    side.pool_report()                       # pools and SSDs (csi_spdk_get_pools)
    side.stop()

Its flags (``--pools``, ``--spdk-tgt-cmd``, ``--spdk-tgt-log``,
``--spdk-poll-interval``, ``--no-hugepage-check``, plus the server's
``--spdk-rpc`` and ``--state-dir``) are declared in ``cli.py`` (the root may
not import a wing); ``from_args`` takes the defaults for any that is missing.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from .. import metrics
from ..spdk.api import SpdkApi
from ..spdk.client import SpdkClient
from .pools import Pools, volume_io_source
from .state import DesiredState
from .supervisor import Supervisor, SupervisorConfig

log = logging.getLogger("csi_spdk.agent.storage")



@dataclass
class StorageSide:
    """Concurrency: ``record`` and ``pools.report`` are thread-safe; the
    supervisor recovers on its own thread. Idempotency: see the parts."""

    pools: Pools | None
    state: DesiredState
    supervisor: Supervisor

    @classmethod
    def from_args(cls, args: argparse.Namespace, rpc_socket: str | None = None) -> StorageSide:
        def arg(name: str, default: Any) -> Any:
            value = getattr(args, name, None)
            return default if value in (None, "") else value

        rpc = rpc_socket or arg("spdk_rpc", "unix:///var/tmp/spdk.sock")
        state = DesiredState(Path(arg("state_dir", "/var/lib/csi-spdk-agent")) / "desired.json")
        api = SpdkApi(SpdkClient(rpc, timeout=60))
        pools = Pools(arg("pools", ""), api, node=arg("node_name", "")) \
            if arg("pools", "") else None
        cmd_line = arg("spdk_tgt_cmd", "")
        cfg = SupervisorConfig(rpc, command=SupervisorConfig.parse_command(cmd_line)
                               if cmd_line else None,
                               poll_interval=float(arg("spdk_poll_interval", 0.5)),
                               check_memory=not arg("no_hugepage_check", False),
                               log_file=arg("spdk_tgt_log", None))
        REGISTRY.register(metrics.VolumeIoCollector(volume_io_source(api)))
        return cls(pools, state, Supervisor(cfg, pools, state))

    def start(self) -> StorageSide:
        self.supervisor.start()
        return self

    def stop(self) -> None:
        self.supervisor.stop()
        self.state.close()

    def record(self, method: str, params: dict[str, Any] | None, result: Any = None) -> None:
        self.state.record(method, params, result)

    def pool_report(self) -> list[dict[str, Any]] | None:
        """The pools with their state and reason (None without a pool file); a
        refused pool is reported from the agent's own record: SPDK never saw it."""
        return self.pools.report() if self.pools is not None else None

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """True once spdk_tgt answered and the first recovery ran."""
        return bool(self.supervisor.wait_recoveries(1, timeout))

