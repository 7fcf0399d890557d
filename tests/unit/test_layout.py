"""The package's architecture, checked on its import graph.

Wings (``controller/``, ``node/``, ``agent/``) never import each other; the
package root is shared plumbing and imports no wing (``dev.py``, the one place
that composes controller and node for a quick try, is the exception); nothing
but ``sim/``'s own files imports ``sim/`` (tests and benchmarks are outside the
package and may). The graph is read from the source with ``ast`` so a lazy
import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "csi_spdk"
WINGS = ("controller", "node", "agent")
COMPOSERS = {"csi_spdk.dev"}


def module_name(path: Path, root: Path = PKG) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = PKG) -> set[str]:
    """Absolute names of every module ``path`` imports (relative ones resolved)."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{a.name}" for a in node.names)
    return {m for m in out if m == "csi_spdk" or m.startswith("csi_spdk.")}


def graph(root: Path = PKG) -> dict[str, set[str]]:
    return {module_name(p, root): imports_of(p, root) for p in root.rglob("*.py")
            if "proto" not in p.relative_to(root).parts}


def wing_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in (*WINGS, "sim") else None


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(g.items()):
        own = wing_of(mod)
        for dep in sorted(deps):
            other = wing_of(dep)
            if other is None or other == own:
                continue
            if other == "sim":
                bad.append(f"{mod} imports the simulator ({dep})")
            elif own in WINGS:
                bad.append(f"wing {own}/ imports wing {other}/ ({mod} -> {dep})")
            elif own is None and mod not in COMPOSERS:
                bad.append(f"root module {mod} imports wing {other}/ ({dep})")
    return bad


def test_wings_and_simulator_stay_apart():
    g = graph()
    assert "csi_spdk.controller.service" in g and "csi_spdk.node.service" in g
    assert violations(g) == []


@pytest.mark.parametrize("src,line,expected", [
    ("node/service.py", "from ..controller import placement",
     "wing node/ imports wing controller/"),
    ("controller/service.py", "from ..node.mount import Mounter",
     "wing controller/ imports wing node/"),
    ("controller/target.py", "from ..sim.server import SimServer", "imports the simulator"),
    ("errors.py", "from .node import service", "root module csi_spdk.errors imports wing"),
    ("identity.py", "    import csi_spdk.controller.service", "root module"),
])
def test_the_check_catches_each_kind_of_violation(tmp_path, src, line, expected):
    """The same check on a copy of the package with one forbidden import added."""
    import shutil

    copy = tmp_path / "csi_spdk"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / src
    body = target.read_text()
    if line.startswith(" "):
        line = "def _injected():\n" + line
    target.write_text(body + "\n" + line + "\n")
    found = violations(graph(copy))
    assert any(expected in v for v in found), found
