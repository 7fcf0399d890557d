"""``csi-spdk doctor node|storage``: preflight checks with the fix for each.

Run on a Kubernetes node before installing the node plugin, and on a storage
host before starting ``spdk_tgt``. Each check is one line (pass, warn for an
optional feature that is missing, fail for what would break the driver) with
what it found and what to do; ``--format json`` for machines. Exit code 1
when a check failed. Reads only: it never loads modules or changes anything.
"""

from __future__ import annotations

import argparse

from .host import Host
from .node_checks import node_checks
from .report import FAIL, as_json, text
from .storage_checks import storage_checks


def main(args: argparse.Namespace) -> int:
    host = Host(args.root)
    if args.role == "node":
        checks = node_checks(host, args.node_id or host.hostname, args.state_dir,
                             args.kubelet_dir)
    else:
        checks = storage_checks(host, args.hugepages_mib, args.ssd, args.spdk_rpc)
    where = f"{host.hostname} (kernel {host.release})"
    print(as_json(args.role, where, checks) if args.format == "json"
          else text(args.role, where, checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
