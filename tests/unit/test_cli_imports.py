"""Start-up cost of the subcommands: each loads only what it runs.

In a slow node (a TCG guest, a loaded host) every module a process imports
is paid at every container start: the chart's node Pod starts three Python
processes at once, and a registrar that also loaded the controller's
Kubernetes client and cryptography was killed by its liveness probe before
it served. Each check runs a fresh interpreter (this test process has
imported everything already) and lists what the subcommand's entry module
pulls in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HEAVY = ("kubernetes", "cryptography", "yaml", "jsonschema", "csi_spdk.controller",
         "csi_spdk.agent", "csi_spdk.sim")


def loaded(code: str) -> set[str]:
    """Top-level and csi_spdk.* module names a fresh interpreter has after ``code``."""
    probe = (f"import sys, json\n{code}\n"
             "print(json.dumps(sorted(sys.modules)))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    names = json.loads(res.stdout.splitlines()[-1])
    return set(names) | {n.split(".")[0] for n in names}


def heavy(mods: set[str], allowed: tuple[str, ...] = ()) -> set[str]:
    return {h for h in HEAVY if h in mods and h not in allowed}


def test_building_the_parser_loads_no_grpc():
    """``--help``, ``sim``, ``--version``: argument parsing alone loads no gRPC."""
    mods = loaded("from csi_spdk import cli; cli.build_parser().parse_args(['sim', "
                  "'--rpc-socket', '/x'])")
    assert "grpc" not in mods and "google" not in mods
    assert not heavy(mods)


@pytest.mark.parametrize("argv", [
    ["registrar", "--csi-address", "/csi/csi.sock", "--kubelet-registration-path", "/k"],
    ["livenessprobe", "--csi-address", "/csi/csi.sock"],
])
def test_kubelet_helpers_load_only_grpc_and_the_protos(argv):
    mods = loaded("from csi_spdk import cli; import importlib\n"
                  f"a = cli.build_parser().parse_args({argv!r})\n"
                  "importlib.import_module(a.impl.partition(':')[0])")
    assert "csi_spdk.kubelet_plugin" in mods and "grpc" in mods
    assert not heavy(mods), heavy(mods)
    assert "prometheus_client" not in mods and "csi_spdk.node" not in mods


def test_node_plugin_loads_no_controller_side_modules():
    mods = loaded("import csi_spdk.node.main")
    assert not heavy(mods), heavy(mods)


def test_sim_loads_no_grpc():
    mods = loaded("import csi_spdk.sim.server")
    assert "grpc" not in mods
    assert not heavy(mods, allowed=("csi_spdk.sim",))
