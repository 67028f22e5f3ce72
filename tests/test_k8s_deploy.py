"""The committed cpu-demo `serveConfigV2` really deploys: on a local 3-node Ray cluster shaped like the overlay's
RayCluster (a head with `num-cpus: 0`, two CPU workers), `serve run` of that config brings the app up and all four
tasks answer over HTTP, and over gRPC on the configured port.

The config is taken from k8s/overlays/cpu-demo/serve-config.yaml the way KubeRay hands it to Ray: the operator
parses the `spec.serveConfigV2` YAML string and submits the result as is. Only what a local run must change is
changed — `applications[0].args.checkpoint` (`/models/demo`, baked into the CPU image) becomes the
`demo_checkpoint` fixture, the HTTP/gRPC ports (8000/9000) become free local ports and the HTTP host 127.0.0.1 —
and a test checks that nothing else differs. `proxy_location: EveryNode` is kept: three proxies then share each
port on this one machine (Serve's HTTP proxy sets SO_REUSEPORT, gRPC servers do by default on Linux).

Deployed with the real CLI: `serve run --non-blocking --address <GCS address> <yaml>`, a subprocess of the venv's
`serve` with RAY_AUTH_MODE=disabled, run from a directory other than the repo (the app is imported from the
installed package, as in the image). With a config file, `serve run` starts Serve with the file's
proxy/http/gRPC options and submits the whole config to the controller (`deploy_apps`, the call `serve deploy`
and KubeRay's dashboard PUT end in), then returns; the controller is detached, so the app outlives the CLI. This
needs no dashboard, unlike `serve deploy`/`serve shutdown`/`serve status` (dashboard REST API): the cluster runs
with include_dashboard=False, as the other cluster tests do, and the test process reads the status with
`serve.status()` and shuts Serve down with `serve.shutdown()` after `ray.init(address=...)`.

Note: `serve run` reports a failed submission by printing the traceback and exiting 0, so its output is checked
for the success line, not only its exit status.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import yaml

from seedoss.deployments.config import TASK_DEPLOYMENTS, AppConfig
from seedoss.deployments.k8s import APP_NAME, GRPC_PORT, HTTP_PORT, OVERLAYS_DIR, PATCH_FILE, deployment_options
from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc
from seedoss.config import SeedOssConfig
from seedoss.demo import head_dir
from seedoss.deployments.serve_env import free_port

pytestmark = pytest.mark.timeout(600)

OVERLAY = "cpu-demo"
SERVE_CLI = Path(sys.prefix) / "bin" / "serve"
METADATA = (("application", APP_NAME),)
WORKER_CPUS = 2  # per worker node; the head has none (KubeRay head `num-cpus: "0"`)
READY_DEADLINE_S = 300
DEPLOYMENTS = {"Gateway", "Generation", "SeedOssStage0", "SeedOssStage1"}  # the heads run in the gateway


def committed_serve_config(overlay: str = OVERLAY) -> dict:
    """`spec.serveConfigV2` of the committed overlay patch, parsed as KubeRay parses it before submitting it."""
    patch = yaml.safe_load((OVERLAYS_DIR / overlay / PATCH_FILE).read_text())
    raw = patch["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 is a YAML string in the RayService CRD"
    return yaml.safe_load(raw)


def localize(config: dict, checkpoint: str, http_port: int, grpc_port: int) -> dict:
    """The committed config with the checkpoint path and ports a local run needs; everything else untouched."""
    local = copy.deepcopy(config)
    local["http_options"].update(host="127.0.0.1", port=http_port)
    local["grpc_options"]["port"] = grpc_port
    (app,) = local["applications"]
    app["args"]["checkpoint"] = checkpoint
    return local


def _leaves(value, path=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _leaves(v, f"{path}.{k}" if path else str(k))
        return out or {path: {}}
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out |= _leaves(v, f"{path}[{i}]")
        return out or {path: []}
    return {path: value}


def _cpu_use() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)


def _wait_ready(url: str, deadline: float) -> dict:
    """Poll `/health/ready` until 200; fail early (with Serve's message) if the application fails to deploy."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    last = None
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get("/health/ready")
                last = f"{r.status_code} {r.text[:300]}"
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError as e:
                last = repr(e)
            app = serve.status().applications.get(APP_NAME)
            if app is not None and app.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
                pytest.fail(f"application {app.status}: {app.message}\n"
                            + "\n".join(f"{n}: {d.status} {d.message}" for n, d in app.deployments.items()))
            time.sleep(2)
    app = serve.status().applications.get(APP_NAME)
    pytest.fail(f"/health/ready not 200 after {READY_DEADLINE_S}s (last: {last}); serve status: {app}")


@pytest.fixture(scope="module")
def deployed(demo_checkpoint, tmp_path_factory):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # as on KubeRay (k8s/README.md): Serve's proxy on every node
        yield from _deploy(demo_checkpoint, tmp_path_factory)


def _deploy(demo_checkpoint, tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    work = tmp_path_factory.mktemp("k8s_deploy")
    http_port, grpc_port = free_port(), free_port()
    config = localize(committed_serve_config(), str(demo_checkpoint), http_port, grpc_port)
    config_file = work / "serve-config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": str(tmp_path_factory.mktemp("ray"))})
    try:
        workers = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        t0 = time.monotonic()
        cli = subprocess.run(
            [str(SERVE_CLI), "run", "--non-blocking", "--address", cluster.address, str(config_file)],
            cwd=work, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=240)
        output = cli.stdout + cli.stderr
        assert cli.returncode == 0 and "Submitted deploy config successfully" in output, output[-4000:]
        url = f"http://127.0.0.1:{http_port}"
        health = _wait_ready(url, t0 + READY_DEADLINE_S)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        http = httpx.Client(base_url=url, timeout=120)
        try:
            yield SimpleNamespace(config=config, url=url, http=http, stub=pb_grpc.SeedOssStub(channel),
                                  health=health, checkpoint=demo_checkpoint, head=cluster.head_node, workers=workers)
        finally:
            http.close()
            channel.close()
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


# ----------------------------------------------------------------------------------------- the config itself

def test_local_config_is_the_committed_one_but_for_checkpoint_and_ports():
    committed = committed_serve_config()
    local = localize(committed, "/tmp/ckpt", 18000, 19000)
    before, after = _leaves(committed), _leaves(local)
    assert set(before) == set(after)
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert changed == {
        "applications[0].args.checkpoint": ("/models/demo", "/tmp/ckpt"),
        "http_options.host": ("0.0.0.0", "127.0.0.1"),
        "http_options.port": (HTTP_PORT, 18000),
        "grpc_options.port": (GRPC_PORT, 19000),
    }
    # what the local cluster's shape relies on: every deployment asks for some CPU (none can land on the 0-CPU
    # head), and the replicas the app starts with fit on the two workers
    cpus = {name: options["ray_actor_options"]["num_cpus"]
            for name, options in deployment_options(AppConfig.model_validate(committed["applications"][0]["args"]))
            .items()}
    assert all(c > 0 for c in cpus.values()), cpus
    assert committed["proxy_location"] == "EveryNode"


# --------------------------------------------------------------------------------------------- the cluster

def _expected_cpu_use(config: dict) -> float:
    """CPUs the app holds at its initial size: num_replicas (one per lane for stages and Generation), or
    min_replicas when autoscaling, as the app builder resolves them."""
    total = 0.0
    for options in deployment_options(AppConfig.model_validate(config["applications"][0]["args"])).values():
        scaling = options.get("autoscaling_config")
        replicas = scaling["min_replicas"] if scaling else options.get("num_replicas", 1)
        total += replicas * options["ray_actor_options"]["num_cpus"]
    return total


def test_the_application_runs_as_configured(deployed):
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    # EveryNode: a proxy on the head (the controller's node) and on each worker holding replicas (at least one:
    # the replicas need 2.5 CPUs, a worker has 2), all bound to the same ports on this one machine. The app is
    # ready once the head's proxy answers; a worker's proxy may still be STARTING then (seen in CI), so it gets a
    # bounded while to become HEALTHY
    deadline = time.monotonic() + 60
    status = serve.status()
    while not all(s == "HEALTHY" for s in status.proxies.values()) and time.monotonic() < deadline:
        time.sleep(1)
        status = serve.status()
    assert deployed.head.node_id in status.proxies and len(status.proxies) >= 2, status.proxies
    assert all(s == "HEALTHY" for s in status.proxies.values()), status.proxies
    app = status.applications[APP_NAME]
    assert app.status == ApplicationStatus.RUNNING, app.message
    assert set(app.deployments) == DEPLOYMENTS
    assert all(d.status == "HEALTHY" for d in app.deployments.values()), app.deployments
    assert deployed.health == {"status": "ready", "heads": {t: "ready" for t in ("generate", *TASK_DEPLOYMENTS)}}
    # the ray_actor_options of the config were applied: the replicas hold exactly the CPUs it asks for (2.5 of 4;
    # controller, proxies and the build task hold none), all of it on the workers since the head has no CPU
    expected, deadline = _expected_cpu_use(deployed.config), time.monotonic() + 60
    while abs(_cpu_use() - expected) > 1e-6 and time.monotonic() < deadline:
        time.sleep(1)  # resource reports lag the scheduler a little
    assert _cpu_use() == pytest.approx(expected), (expected, _cpu_use())


# ------------------------------------------------------------------------------------------------ the tasks

def test_generate_over_http(deployed):
    body = {"prompt": "Hello world", "max_tokens": 12, "temperature": 0}
    r = deployed.http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    (choice,) = out["choices"]
    assert choice["token_ids"] and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] == len(choice["token_ids"]) <= 12
    assert out["usage"]["prompt_tokens"] > 0
    again = deployed.http.post("/v1/generate", json=body).json()["choices"][0]
    assert again["token_ids"] == choice["token_ids"]  # greedy is deterministic across requests
    with deployed.http.stream("POST", "/v1/generate", json={**body, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        chunks, done = [], False
        for line in s.iter_lines():
            if line == "data: [DONE]":
                done = True
                break
            if line.startswith("data: "):
                chunks.append(json.loads(line[len("data: "):]))
    assert done and "usage" in chunks[-1]
    assert sum((c["choices"][0]["token_ids"] for c in chunks if c["choices"]), []) == choice["token_ids"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]


def test_classify_tag_and_answer_over_http(deployed):
    labels = set(SeedOssConfig.from_pretrained(head_dir(deployed.checkpoint, "classify")).labels)
    inputs = ["what a lovely day", "this is terrible"]
    r = deployed.http.post("/v1/classify", json={"inputs": inputs, "top_k": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(inputs)
    for result in results:
        assert len(result["predictions"]) == 2
        assert {p["label"] for p in result["predictions"]} <= labels
        assert all(0.0 <= p["score"] <= 1.0 for p in result["predictions"])
    assert r.json()["usage"]["prompt_tokens"] > 0

    tag_labels = set(SeedOssConfig.from_pretrained(head_dir(deployed.checkpoint, "tag")).labels)
    texts = ["Ada Lovelace met Charles Babbage in London.", "Zoë lives in Zürich"]
    r = deployed.http.post("/v1/tag", json={"inputs": texts, "ignore_labels": []})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(texts)
    for text, entities in zip(texts, results):
        assert entities, "with ignore_labels=[] every token is an entity"
        for e in entities:
            assert 0 <= e["start"] < e["end"] <= len(text) and 0.0 <= e["score"] <= 1.0
            assert e["entity"] in tag_labels

    context = "Ada Lovelace met Charles Babbage in London in 1833, at a party."
    r = deployed.http.post("/v1/answer", json={"question": "Where did they meet?", "context": context, "top_k": 2})
    assert r.status_code == 200, r.text
    answers = r.json()["answers"]
    assert 1 <= len(answers) <= 2
    for a in answers:
        assert a["answer"] == context[a["start"]:a["end"]] and a["answer"].strip()
        assert 0.0 <= a["score"] <= 1.0


def test_grpc_on_the_configured_port(deployed):
    stub = deployed.stub
    assert stub.Health(pb.HealthRequest(), metadata=METADATA, timeout=60).status == "ready"
    messages = list(stub.Generate(pb.GenerateRequest(prompt="Hello world", max_tokens=12, temperature=0),
                                  metadata=METADATA, timeout=120))
    assert messages and messages[-1].HasField("usage")
    token_ids = [t for m in messages for c in m.choices for t in c.token_ids]
    http = deployed.http.post("/v1/generate", json={"prompt": "Hello world", "max_tokens": 12, "temperature": 0})
    assert token_ids == http.json()["choices"][0]["token_ids"]
    assert messages[-1].usage.completion_tokens == len(token_ids)

    inputs = ["what a lovely day", "this is terrible"]
    response = stub.Classify(pb.ClassifyRequest(inputs=inputs, top_k=1), metadata=METADATA, timeout=60)
    http = deployed.http.post("/v1/classify", json={"inputs": inputs, "top_k": 1}).json()
    assert [[p.label for p in c.predictions] for c in response.results] == \
        [[p["label"] for p in c["predictions"]] for c in http["results"]]
