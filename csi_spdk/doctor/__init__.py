"""``csi-spdk doctor node|storage|agent``: preflight checks with the fix for each.

Run on a Kubernetes node before installing the node plugin, on a storage
host before starting ``spdk_tgt``, and where the controller runs to check the
storage agents it reaches (certificates, reachability, spdk_tgt, pools).
Each check is one line (pass, warn for an optional feature that is missing,
fail for what would break the driver) with what it found and what to do;
``--format json`` for machines. Exit code 1 when a check failed. Reads only:
it never loads modules or changes anything.
"""

from __future__ import annotations

import argparse

from .host import Host
from .node_checks import node_checks
from .report import FAIL, as_json, text
from .storage_checks import storage_checks


def _agent(args: argparse.Namespace) -> list:
    from .agent_checks import AgentTarget, agent_checks, targets_from_config
    from .report import fail

    if bool(args.config) == bool(args.address):
        return [fail("agent", "give either --config (the controller's config) or --address",
                     "csi-spdk doctor agent --config /etc/csi-spdk/config.yaml")]
    try:
        targets = targets_from_config(args.config) if args.config else [AgentTarget(
            args.address, args.address, args.ca_file, args.cert_file, args.key_file,
            args.server_name, args.lvstore)]
    except ValueError as err:
        return [fail("controller config", str(err), "give the path of the config file")]
    if not targets:
        return [fail("agent", f"{args.config} names no target with an agent",
                     "targets[].agent: {address, tls} (docs/operator.md)")]
    return [c for t in targets
            for c in agent_checks(t, args.expiry_warn_days, args.timeout)]


def main(args: argparse.Namespace) -> int:
    host = Host(args.root)
    if args.role == "node":
        checks = node_checks(host, args.node_id or host.hostname, args.state_dir,
                             args.kubelet_dir)
    elif args.role == "agent":
        checks = _agent(args)
    else:
        checks = storage_checks(host, args.hugepages_mib, args.ssd, args.spdk_rpc)
    where = f"{host.hostname} (kernel {host.release})"
    print(as_json(args.role, where, checks) if args.format == "json"
          else text(args.role, where, checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
