"""Every topology key the docs and the chart mention is one the driver
reports, or a label an operator configures; following an example must never
make Pods unschedulable (the chart and DESIGN.md once used
``topology.csi-spdk.io/target``, which no node reports)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from csi_spdk import contract

REPO = Path(__file__).resolve().parents[2]
# Where a person reads about topology or copies it from.
SOURCES = ["README.md", "docs", "deploy", "tests/deploy/values"]
KEY = re.compile(r"(?<![\w.-])((?:[a-z0-9-]+\.)*(?:topology|ssd)\.[a-z0-9.-]+/"
                 r"[A-Za-z0-9<>._-]*[A-Za-z0-9>_])")
DRIVER_DOMAINS = (contract.TOPOLOGY_DOMAIN + "/", contract.TOPOLOGY_SSD_PREFIX)


def files() -> list[Path]:
    out = []
    for src in SOURCES:
        p = REPO / src
        out += [p] if p.is_file() else sorted(
            f for f in p.rglob("*") if f.is_file() and f.suffix in (".md", ".yaml", ".yml",
                                                                    ".json", ".tpl", ".txt"))
    return out


def bad_key(key: str) -> str | None:
    """Why ``key`` is not one a node reports or an operator configures."""
    if key == contract.TOPOLOGY_NODE_KEY:
        return None
    if key.startswith(contract.TOPOLOGY_SSD_PREFIX):
        cls = key[len(contract.TOPOLOGY_SSD_PREFIX):]
        if cls.startswith("<vendor>-<model") or re.fullmatch(r"[a-z0-9]+(-[a-z0-9.]+)+", cls):
            return None
        return f"{key}: not an SSD class label (ssd.csi-spdk.io/<vendor>-<model class>)"
    if key.startswith(DRIVER_DOMAINS):
        return f"{key}: in the driver's domain, but no node reports it"
    return None  # another domain: a label the operator gives targets and nodes


def mentioned_keys() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in files():
        for m in KEY.finditer(f.read_text(errors="replace")):
            found.setdefault(m.group(1), []).append(str(f.relative_to(REPO)))
    return found


def test_the_scan_sees_the_documented_keys():
    keys = mentioned_keys()
    assert contract.TOPOLOGY_NODE_KEY in keys
    assert "topology.kubernetes.io/zone" in keys
    assert any(k.startswith(contract.TOPOLOGY_SSD_PREFIX) for k in keys)


def test_every_mentioned_key_is_reported_or_configured():
    problems = [f"{why} (in {', '.join(sorted(set(where)))})"
                for key, where in sorted(mentioned_keys().items()) if (why := bad_key(key))]
    assert problems == []


@pytest.mark.parametrize("key,ok", [
    ("topology.csi-spdk.io/target", False),
    ("topology.csi-spdk.io/node", True),
    ("ssd.csi-spdk.io/samsung-mzql21t9hcjr-00a07", True),
    ("ssd.csi-spdk.io/Samsung SSD", False),
    ("topology.kubernetes.io/zone", True),
])
def test_the_check_itself(key, ok):
    assert (bad_key(key) is None) is ok


def _value_files() -> list[Path]:
    return [REPO / "deploy/helm/csi-spdk/values.yaml",
            *sorted((REPO / "tests/deploy/values").glob("*.yaml"))]


@pytest.mark.parametrize("path", _value_files(), ids=lambda p: p.name)
def test_allowed_topologies_in_chart_values_can_match(path):
    """A StorageClass's allowedTopologies key must be reported by nodes: the
    node key, an SSD class, or a label set on the nodes (node.topology) that
    some target also carries (config.targets[].topology)."""
    values = yaml.safe_load(path.read_text()) or {}
    node_labels = set((values.get("node") or {}).get("topology") or {})
    target_labels = {k for t in (values.get("config") or {}).get("targets") or []
                     for k in (t.get("topology") or {})}
    for sc in values.get("storageClasses") or []:
        for term in sc.get("allowedTopologies") or []:
            for expr in term.get("matchLabelExpressions") or []:
                key = expr["key"]
                if key == contract.TOPOLOGY_NODE_KEY or key.startswith(
                        contract.TOPOLOGY_SSD_PREFIX):
                    assert bad_key(key) is None, key
                    continue
                assert key in node_labels and key in target_labels, (
                    f"{path.name}: StorageClass {sc.get('name')} allows {key}, which nodes "
                    f"report only when node.topology sets it ({sorted(node_labels)}) and a "
                    f"target carries it ({sorted(target_labels)})")
