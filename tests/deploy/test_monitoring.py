"""The monitoring the chart ships: PrometheusRule alerts and the Grafana
dashboard ConfigMap, off by default. The PrometheusRule is validated against
the Prometheus Operator's own CRD (kubeconform, test_chart.py, value set
"monitoring") and its shape here; every metric and label the rules and the
dashboard use must be one ``csi_spdk/metrics.py`` exports."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.metrics import MetricWrapperBase

from csi_spdk import metrics

from .conftest import CHART, by_kind, one, render_docs
from .test_chart import kubeconform

ALERTS = {"CsiSpdkTargetDown", "CsiSpdkPoolNearlyFull", "CsiSpdkRpcErrors",
          "CsiSpdkSpdkRpcTransportErrors", "CsiSpdkSlowStaging"}
# labels Prometheus adds to every scraped series, and histogram buckets'
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
# PromQL words that look like metric names
PROMQL = {"sum", "max", "min", "avg", "by", "rate", "histogram_quantile", "label_values",
          "without", "on", "ignoring", "and", "or", "unless", "bool", "offset", "count"}


def exported() -> dict[str, set[str]]:
    """Series name -> label names, as Prometheus sees csi_spdk/metrics.py."""
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        name, labels = obj._name, set(obj._labelnames)
        kind = obj._type
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


def check_expr(expr: str) -> list[str]:
    """Problems with the metric names and label matchers of one PromQL expr."""
    known = exported()
    problems = []
    names = set(re.findall(r"\b(csi_spdk_[a-z_]+)\b", expr))
    if not names:
        problems.append(f"no csi_spdk metric in {expr!r}")
    for name in names:
        if name not in known:
            problems.append(f"{name} is not a metric of csi_spdk/metrics.py")
    for name, selector in re.findall(r"\b(csi_spdk_[a-z_]+)\{([^}]*)\}", expr):
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
            if name in known and label not in known[name] | SCRAPE_LABELS:
                problems.append(f"{name} has no label {label!r}")
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        labels = {g.strip() for g in grouping.split(",") if g.strip()}
        allowed = set().union(*(known.get(n, set()) for n in names)) | SCRAPE_LABELS
        problems += [f"grouping by unknown label {x!r} in {expr!r}" for x in labels - allowed]
    return problems


def test_off_by_default():
    kinds = {o["kind"] for o in render_docs("defaults")}
    assert "PrometheusRule" not in kinds
    assert not [o for o in by_kind(render_docs("defaults"), "ConfigMap")
                if o["metadata"]["name"].endswith("-dashboard")]


def test_prometheus_rule_shape():
    rule = one(render_docs("monitoring"), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == ALERTS
    for name, r in rules.items():
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert re.fullmatch(r"\d+[smh]", r["for"]), name
        assert r["labels"]["severity"] in ("warning", "critical"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        assert "{{ $labels." in r["annotations"]["summary"] + r["annotations"]["description"]
        assert check_expr(r["expr"]) == [], name
    # the values reach the rules
    assert rules["CsiSpdkPoolNearlyFull"]["expr"].rstrip().endswith("< 0.15")
    assert rules["CsiSpdkSlowStaging"]["expr"].rstrip().endswith("> 45")
    assert 'method="NodeStageVolume"' in rules["CsiSpdkSlowStaging"]["expr"]
    assert rules["CsiSpdkTargetDown"]["expr"] == \
        "max by (namespace, target) (csi_spdk_target_up) == 0"


def test_the_metric_check_catches_mistakes():
    assert check_expr("rate(csi_spdk_rpc_requests_total[5m])") == []
    assert check_expr("rate(csi_spdk_rpc_request_total[5m])") == [
        "csi_spdk_rpc_request_total is not a metric of csi_spdk/metrics.py"]
    assert check_expr('csi_spdk_lvstore_free_bytes{pool="a"}') == [
        "csi_spdk_lvstore_free_bytes has no label 'pool'"]
    assert check_expr("sum by (volume) (csi_spdk_lvstore_free_bytes)")


def test_a_broken_rule_fails_the_crd_schema(kubeconform_schemas):
    rule = one(render_docs("monitoring"), "PrometheusRule")
    assert kubeconform([rule], kubeconform_schemas).returncode == 0
    bad = json.loads(json.dumps(rule))
    bad["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    bad["spec"]["groups"][0]["rules"][1]["exprr"] = "1"
    out = kubeconform([bad], kubeconform_schemas)
    assert out.returncode != 0, "the PrometheusRule CRD schema accepted a broken rule"


def test_dashboard_configmap():
    cms = [o for o in by_kind(render_docs("monitoring"), "ConfigMap")
           if o["metadata"]["name"].endswith("-dashboard")]
    (cm,) = cms
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "storage"
    dash = json.loads(cm["data"]["csi-spdk.json"])
    assert dash == json.loads((CHART / "dashboards" / "csi-spdk.json").read_text())
    assert dash["uid"] == "csi-spdk" and dash["title"] == "csi-spdk"


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out += [p] + p.get("panels", [])
    return [p for p in out if p["type"] != "row"]


def test_dashboard_queries_use_real_metrics():
    dash = json.loads((CHART / "dashboards" / "csi-spdk.json").read_text())
    panels = _panels(dash)
    assert len(panels) >= 8
    used = set()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr = t["expr"].replace("$job", "x")
            assert check_expr(expr) == [], (p["title"], expr)
            used |= set(re.findall(r"\b(csi_spdk_[a-z_]+)\b", expr))
    # every metric the controller and node export is on the dashboard (as some
    # series of it); the agent's (csi_spdk_agent_*) wait for the chart to
    # deploy the agent
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported()
                if not n.startswith("csi_spdk_agent_")}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, families - shown
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "job"}


@pytest.mark.parametrize("key", ["poolFreeRatio", "rpcErrorRatio"])
def test_schema_bounds_the_ratios(key, tmp_path):
    from .conftest import RENDER_KUBE_VERSION, run, tool
    f = tmp_path / "v.yaml"
    f.write_text(f"monitoring:\n  prometheusRule:\n    enabled: true\n    {key}: 5\n")
    out = run([tool("helm"), "template", "x", str(CHART), "--kube-version",
               RENDER_KUBE_VERSION, "-f", str(f)])
    assert out.returncode != 0 and key in out.stderr
