"""What a platform team checks first in the rendered overlays: every built-in resource valid against Kubernetes'
own schemas (offline, kubernetes-validate, strict: unknown fields rejected), a PodDisruptionBudget per worker group,
a NetworkPolicy that admits only the gateway's ports from outside, resources and probes on every container, and
the upgrade strategies (NewCluster; NewClusterWithIncrementalUpgrade in its own overlay). The RayService itself is
checked against the KubeRay CRD in tests/test_k8s.py; here too for the incremental-upgrade overlay."""

from __future__ import annotations

import copy

import pytest
from test_k8s import OVERLAY_NAMES, needs_kuberay, rayservice, rayservice_errors, rendered

from seedoss.deployments.k8s import GRPC_PORT, HTTP_PORT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

INCREMENTAL = "gpu-pipeline-incremental"
ALL_OVERLAYS = [*OVERLAY_NAMES, INCREMENTAL]
K8S_VERSION = "1.33.0"  # the oldest Kubernetes we support; policy/v1 and networking.k8s.io/v1 are GA there
POD_LABELS = {"app.kubernetes.io/name": "seedoss-serve", "app.kubernetes.io/instance": "seedoss"}
GATEWAY_PORTS = {HTTP_PORT, GRPC_PORT}


def builtin(name: str) -> list[dict]:
    return [d for d in rendered(name) if d["kind"] != "RayService"]


def pod_templates(doc: dict) -> dict[str, dict]:
    """Ray group name (KubeRay's ray.io/group label; the head's is `headgroup`) → pod template."""
    cluster = doc["spec"]["rayClusterConfig"]
    out = {"headgroup": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


def pod_labels(group: str, template: dict) -> dict[str, str]:
    """The labels a pod of this group carries: the template's plus those KubeRay adds."""
    return {**template.get("metadata", {}).get("labels", {}), "ray.io/group": group}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector feature not modelled: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# ------------------------------------------------------------------------------------------- schema validation

@pytest.mark.parametrize("name", ALL_OVERLAYS)
def test_builtin_resources_are_valid_kubernetes(name):
    docs = builtin(name)
    assert {d["kind"] for d in docs} == {"PodDisruptionBudget", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("breakage, doc_kind", [
    (lambda d: d["spec"].update(maxUnavailable=[1]), "PodDisruptionBudget"),
    (lambda d: d["spec"].update(maxUnavailabe=1), "PodDisruptionBudget"),  # typo: strict rejects unknown fields
    (lambda d: d["spec"]["ingress"][1]["ports"][0].update(protocol=6), "NetworkPolicy"),
    (lambda d: d["spec"].update(policyType=["Ingress"]), "NetworkPolicy"),
])
def test_schema_validation_catches_broken_resources(breakage, doc_kind):
    doc = copy.deepcopy(next(d for d in builtin("cpu-demo") if d["kind"] == doc_kind))
    breakage(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@needs_kuberay
def test_incremental_upgrade_overlay_is_a_valid_rayservice():
    assert rayservice_errors(rayservice(INCREMENTAL)) == []


# ------------------------------------------------------------------------------------------ upgrade strategies

def test_upgrade_strategies():
    for name in OVERLAY_NAMES:
        assert rayservice(name)["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    incremental, base = rayservice(INCREMENTAL), rayservice("gpu-pipeline")
    strategy = incremental["spec"]["upgradeStrategy"]
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"
    options = strategy["clusterUpgradeOptions"]
    assert options["gatewayClassName"] and 0 < options["stepSizePercent"] <= options["maxSurgePercent"] <= 100
    assert options["intervalSeconds"] >= 30  # a stage pod loads tens of GiB before it takes traffic
    assert incremental["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True  # KubeRay requires it
    # otherwise the gpu-pipeline overlay, unchanged
    incremental["spec"]["upgradeStrategy"] = base["spec"]["upgradeStrategy"]
    assert incremental == base and builtin(INCREMENTAL) == builtin("gpu-pipeline")


# ------------------------------------------------------------------------------------ resources and probes

@pytest.mark.parametrize("name", ALL_OVERLAYS)
def test_every_container_has_resources_and_probes(name):
    doc = rayservice(name)
    for group, template in pod_templates(doc).items():
        spec = template["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (group, container["name"], kind)
        for container in spec["containers"]:  # init containers take no probes (Kubernetes rejects them)
            assert {"readinessProbe", "livenessProbe"} <= set(container), (group, container["name"])
    # the autoscaler sidecar KubeRay adds to the head
    scaler = doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["resources"]
    assert {"cpu", "memory"} <= set(scaler["requests"]) and {"cpu", "memory"} <= set(scaler["limits"])


# -------------------------------------------------------------------------------------- disruption budgets

@pytest.mark.parametrize("name", ALL_OVERLAYS)
def test_a_disruption_budget_per_worker_group(name):
    budgets = [d for d in builtin(name) if d["kind"] == "PodDisruptionBudget"]
    templates = pod_templates(rayservice(name))
    for group, template in templates.items():
        assert selects({"matchLabels": POD_LABELS}, pod_labels(group, template)), group
        covering = [b["metadata"]["name"] for b in budgets if selects(b["spec"]["selector"], pod_labels(group, template))]
        assert covering == ([] if group == "headgroup" else [f"seedoss-{group}"]), group
    for budget in budgets:
        # never 0 unavailable / minAvailable = replicas: that would block node drains for good
        assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}
        assert any(selects(budget["spec"]["selector"], pod_labels(g, t)) for g, t in templates.items())
    if name.startswith("gpu-pipeline"):
        assert {b["metadata"]["name"] for b in budgets} == {f"seedoss-{g}" for g in
                                                            ("stage0", "stage1", "stage2", "stage3", "head-services")}


# ------------------------------------------------------------------------------------------ network policy

OWN_POD = {"namespace": "same", "labels": POD_LABELS}
OUTSIDER = {"namespace": "other", "labels": {"app": "client"}}
NEIGHBOUR = {"namespace": "same", "labels": {"app": "client"}}
OPERATOR = {"namespace": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
PROMETHEUS = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "agent": 52365, "raylet": 40000}


def admits(policy: dict, source: dict, port: int) -> bool:
    """Whether one NetworkPolicy's ingress rules let `source` reach `port` (TCP) on the pods it selects, for the
    rule shapes Kubernetes defines: no `from` = any source; a peer with only podSelector = pods of the policy's
    namespace; with namespaceSelector {} = any namespace; no `ports` = every port."""
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", []) if p.get("protocol", "TCP") == "TCP"}
        if rule.get("ports") and port not in ports:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            assert set(peer) <= {"podSelector", "namespaceSelector"} and peer.get("namespaceSelector", {}) == {}, peer
            in_namespace = "namespaceSelector" in peer or source["namespace"] == "same"
            if in_namespace and selects(peer.get("podSelector", {}), source["labels"]):
                return True
    return False


@pytest.mark.parametrize("name", ALL_OVERLAYS)
def test_network_policy_admits_only_the_gateway_from_outside(name):
    (policy,) = [d for d in builtin(name) if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for group, template in pod_templates(rayservice(name)).items():  # it covers every pod of the RayService
        assert selects(policy["spec"]["podSelector"], pod_labels(group, template)), group
        for container in template["spec"]["containers"]:
            serve_ports = {p["containerPort"] for p in container["ports"] if p["name"] in ("serve", "serve-grpc")}
            assert serve_ports == GATEWAY_PORTS, group
    for port in GATEWAY_PORTS:
        assert all(admits(policy, source, port) for source in (OUTSIDER, NEIGHBOUR, OWN_POD))
    for port in RAY_PORTS.values():
        assert admits(policy, OWN_POD, port)  # Ray's own traffic between the RayService's pods
        assert not admits(policy, OUTSIDER, port) and not admits(policy, NEIGHBOUR, port), port
    # the operator deploys the app through the head's dashboard and reads Serve's status from the agent
    assert admits(policy, OPERATOR, RAY_PORTS["dashboard"]) and admits(policy, OPERATOR, RAY_PORTS["agent"])
    assert not admits(policy, OPERATOR, RAY_PORTS["gcs"])
    assert admits(policy, PROMETHEUS, RAY_PORTS["metrics"]) and not admits(policy, PROMETHEUS, RAY_PORTS["gcs"])


def test_network_policy_check_is_not_lax():
    (policy,) = [d for d in builtin("cpu-demo") if d["kind"] == "NetworkPolicy"]
    opened = copy.deepcopy(policy)
    opened["spec"]["ingress"][1]["ports"].append({"port": 8265, "protocol": "TCP"})
    assert admits(opened, OUTSIDER, 8265) and not admits(policy, OUTSIDER, 8265)

