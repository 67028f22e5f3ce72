"""k8s/observability: the Grafana dashboard queries only metrics the server exports (deployments/metrics.py, or Ray
Serve's own) and README.md lists, and charts every one of ours; the PodMonitor scrapes Ray's metrics port on every
pod of every overlay."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from test_k8s import KUSTOMIZE, OVERLAY_NAMES, kustomize, rayservice, rendered
from test_k8s_platform import admits, pod_labels, pod_templates, selects

REPO = Path(__file__).resolve().parent.parent
OBSERVABILITY = REPO / "k8s" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
RAY_METRICS_PORT = 8080  # KubeRay starts every Ray node with --metrics-export-port=8080
SUFFIXES = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}


def our_metrics() -> dict[str, list[str]]:
    """Metric name (as defined) → the Prometheus series Ray exports for it: `ray_` prefix; counters `_total`,
    histograms `_bucket/_sum/_count`. Read from the source, so a renamed or removed metric is seen at once."""
    tree = ast.parse((REPO / "deployments" / "metrics.py").read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in SUFFIXES:
            name = node.args[0].value
            out[name] = [f"ray_{name}{suffix}" for suffix in SUFFIXES[node.func.id]]
    return out


def ray_serve_metric_exists(series: str) -> bool:
    """A `ray_serve_*` gauge Ray Serve itself defines (in the installed Ray)."""
    import ray.serve

    name = series.removeprefix("ray_")
    source = Path(ray.serve.__file__).parent / "_private"
    return any(f'"{name}"' in f.read_text() for f in source.rglob("*.py"))


def readme_metrics() -> set[str]:
    return set(re.findall(r"`((?:ray_)?seedoss_\w+|ray_serve_\w+)", (REPO / "README.md").read_text()))


def queried(dashboard: dict) -> set[str]:
    """Every metric name in the dashboard's PromQL (the `ray_...` identifiers; functions and labels are not)."""
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return {m for expr in exprs for m in re.findall(r"\b(ray_\w+)", expr)}


def problems(dashboard: dict, listed: set[str] | None = None) -> list[str]:
    exported = {s for series in our_metrics().values() for s in series}
    listed = readme_metrics() if listed is None else listed
    out = []
    for series in sorted(queried(dashboard)):
        if series not in exported and not (series.startswith("ray_serve_") and ray_serve_metric_exists(series)):
            out.append(f"{series}: not exported by the server")
        base = re.sub(r"_(bucket|sum|count)$", "", series)
        if not {base, base.removeprefix("ray_")} & listed:
            out.append(f"{series}: not listed in README.md")
    return out


def test_dashboard_queries_only_exported_and_documented_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert problems(dashboard) == []
    assert "ray_serve_deployment_replica_healthy" in queried(dashboard)  # lanes


def test_dashboard_charts_every_metric():
    used = queried(json.loads(DASHBOARD.read_text()))
    for name, series in our_metrics().items():
        assert set(series) & used, f"{name} has no panel"
    assert len(our_metrics()) >= 13  # the parse found them (a change to metrics.py's style must not hide them)


@pytest.mark.parametrize("expr, expected", [
    ("rate(ray_seedoss_request_total[5m])", "not exported"),  # typo
    ("ray_seedoss_running_sequences_total", "not exported"),  # a gauge has no _total
    ("ray_serve_no_such_metric", "not exported"),
])
def test_dashboard_check_catches_unknown_metrics(expr, expected):
    dashboard = {"panels": [{"targets": [{"expr": expr}]}]}
    assert any(expected in p for p in problems(dashboard)), problems(dashboard)


def test_dashboard_check_catches_undocumented_metrics():
    dashboard = {"panels": [{"targets": [{"expr": "ray_seedoss_kv_cache_usage"}]}]}
    assert problems(dashboard, listed={"seedoss_requests_total"}) == [
        "ray_seedoss_kv_cache_usage: not listed in README.md"]


def test_dashboard_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert all(t["refId"] and t["expr"] for t in panel["targets"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource"}


@pytest.mark.skipif(KUSTOMIZE is None, reason="needs kustomize (configMapGenerator)")
def test_pod_monitor_scrapes_every_pod_of_every_overlay():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = {d["kind"]: d for d in kustomize(OBSERVABILITY)}
    assert set(docs) == {"PodMonitor", "ConfigMap"}
    config_map = docs["ConfigMap"]
    kubernetes_validate.validate(config_map, "1.33.0", strict=True)
    assert json.loads(config_map["data"]["grafana-dashboard.json"]) == json.loads(DASHBOARD.read_text())
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    # no PodMonitor schema offline (the Prometheus Operator's CRD is not here): the fields we rely on
    monitor = docs["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    for name in OVERLAY_NAMES:
        (policy,) = [d for d in rendered(name) if d["kind"] == "NetworkPolicy"]
        for group, template in pod_templates(rayservice(name)).items():
            assert selects(monitor["spec"]["selector"], pod_labels(group, template)), (name, group)
            container = template["spec"]["containers"][0]  # the Ray container
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == RAY_METRICS_PORT, (name, group)
        prometheus = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
        assert admits(policy, prometheus, RAY_METRICS_PORT), name
