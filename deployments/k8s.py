"""KubeRay `serveConfigV2`, generated from `AppConfig` (the one source of truth), and its checker.

Each kustomize overlay under `k8s/overlays/` has an `AppConfig` here (`OVERLAYS`). `seedoss k8s render` turns it
into the Serve config that `serve deploy` takes (applications → `seedoss.deployments.app:build_app` with the AppConfig as
`args`, HTTP on 8000, gRPC on 9000, proxies on every node) and writes it as the overlay's `serve-config.yaml`, a
strategic-merge patch of the base `RayService`; tests/test_k8s.py fails when the committed file differs.

`serve_config_errors()` checks a Serve config as strictly as our own code is checked:
- Ray's `ServeDeploySchema` (types, ranges), which ignores unknown keys: we reject keys that no field of Ray's
  schema models names, at every level;
- `AutoscalingConfig` for each deployment's `autoscaling_config` (Ray's schema leaves it a dict);
- our app's `args` with `AppConfig` (extra="forbid"; the engine section is walked for unknown keys too), and the
  options of every deployment the app builds (stage k with its `stage{k}` pin, heads, gateway) as Ray's
  `DeploymentSchema`, including `ray_actor_options` and `autoscaling_config`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from seedoss.config import SeedOssConfig
from seedoss.engine import EngineConfig
from seedoss.planner import GiB, plan

from .batching import BatchingConfig
from .config import REQUEST_TIMEOUT_S, TASK_DEPLOYMENTS, AppConfig, DeploymentOptions, GenerationOptions, LaneConfig

REPO = Path(__file__).resolve().parent.parent
K8S_DIR = REPO / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
PATCH_FILE = "serve-config.yaml"

RAYSERVICE_NAME = "seedoss"
APP_NAME = "seedoss"
IMPORT_PATH = "seedoss.deployments.app:build_app"
HTTP_PORT = 8000
GRPC_PORT = 9000
GRPC_SERVICER = "seedoss.proto.seedoss.v1.seedoss_pb2_grpc.add_SeedOssServicer_to_server"

# gpu-pipeline: Seed-OSS-36B (its config.json is k8s/overlays/gpu-pipeline/model-config.json) in 4 stages, one
# 80 GiB GPU each, 90% of it for weights + KV cache. k8s/overlays/gpu-pipeline/workers.yaml is sized from this plan.
GPU_MODEL_CONFIG = OVERLAYS_DIR / "gpu-pipeline" / "model-config.json"
GPU_NUM_STAGES = 4
GPU_MEM_GIB = 80
GPU_MEM_UTIL = 0.9
GPU_LANES = LaneConfig(min=1, max=2, target_sequences=192, upscale_delay_s=30, downscale_delay_s=600,
                       look_back_period_s=30)  # max: the stage groups' maxReplicas in workers.yaml
LM_HEAD_RESOURCE = "lm_head"  # advertised by the last stage's worker group: Generation (LM head) sits beside it
HEAD_SERVICES_RESOURCE = "head_services"  # advertised by the CPU worker group: classify/tag/qa heads + gateway


def gpu_plan():
    return plan(SeedOssConfig.from_pretrained(GPU_MODEL_CONFIG), "bfloat16", num_stages=GPU_NUM_STAGES,
                gpus_per_node=1, gpu_mem_gib=GPU_MEM_GIB, mem_util=GPU_MEM_UTIL)


def cpu_demo_app(checkpoint: str = "/models/demo") -> AppConfig:
    """The tiny demo checkpoint (written by the pods' init container), 2 stages, everything on CPU workers; the
    heads run in the gateway replicas (the default `head_placement`)."""
    return AppConfig(
        checkpoint=checkpoint, model_name="seedoss-demo", dtype="float32", num_stages=2, pin_stages=False,
        stage_threads=2,  # half a 4-core worker pod (k8s/overlays/cpu-demo/workers.yaml), where two stages may land
        require_api_keys=False,  # the demo's opt-out (k8s/overlays/cpu-demo/demo-without-keys.yaml)
        engine=EngineConfig(max_num_seqs=64, max_batched_tokens=512, kv_budget_bytes=256 << 20),
        # the head runs no replica (num-cpus 0): every deployment asks for some CPU so it lands on the worker
        stage=DeploymentOptions(max_ongoing_requests=64, max_queued_requests=256, ray_actor_options={"num_cpus": 0.5}),
        generation=GenerationOptions(max_ongoing_requests=256, max_queued_requests=512,
                                     ray_actor_options={"num_cpus": 0.5}),
        # a gateway replica batches the head requests it holds: it scales out only when 32 are ongoing on average
        gateway=DeploymentOptions(
            autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
            max_ongoing_requests=256, max_queued_requests=512, ray_actor_options={"num_cpus": 0.25}),
    )


def gpu_pipeline_app(checkpoint: str = "/models/seed-oss-36b") -> AppConfig:
    """Seed-OSS-36B from the read-only model PVC: one stage per GPU node (pinned by `stage{k}`), Generation (LM head)
    beside the last stage, the other heads and the gateway autoscaling on the CPU worker group."""
    p = gpu_plan()
    kv_budget = p.kv_budget_bytes // GiB * GiB  # whole GiB every stage can give after its weights

    def head(min_replicas: int, max_replicas: int, target: float, max_ongoing: int, max_queued: int,
             num_cpus: float) -> DeploymentOptions:
        return DeploymentOptions(
            autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                                "target_ongoing_requests": target, "upscale_delay_s": 10, "downscale_delay_s": 300},
            max_ongoing_requests=max_ongoing, max_queued_requests=max_queued,
            ray_actor_options={"num_cpus": num_cpus, "resources": {HEAD_SERVICES_RESOURCE: 1}})

    return AppConfig(
        checkpoint=checkpoint, model_name="seed-oss-36b", dtype="bfloat16", num_stages=GPU_NUM_STAGES, pin_stages=True,
        stage_threads=4,  # the stage's num_cpus: the GPU does the math, these threads only feed it
        require_api_keys=True,  # keys come from the required seedoss-api-keys secret (SEEDOSS_API_KEYS)
        engine=EngineConfig(max_num_seqs=256, max_batched_tokens=4096, max_model_len=32768, kv_budget_bytes=kv_budget),
        # one Generation replica and one replica of each stage per lane, the lane count autoscaling on engine load
        lanes=GPU_LANES,
        stage=DeploymentOptions(max_ongoing_requests=64, max_queued_requests=256,
                                ray_actor_options={"num_cpus": 4, "num_gpus": 1}),
        generation=GenerationOptions(max_ongoing_requests=512, max_queued_requests=1024,
                                     ray_actor_options={"num_cpus": 4, "resources": {LM_HEAD_RESOURCE: 1}}),
        # head batches no larger than an engine step; the heads run in the gateway replicas, which batch the head
        # requests they hold (scale at 64 ongoing)
        batching=BatchingConfig(max_batch_tokens=4096),
        gateway=head(2, 8, 64, 256, 512, 2),
    )


def gpu_vllm_app(checkpoint: str = "/models/seed-oss-36b") -> AppConfig:
    """Seed-OSS-36B on vLLM (`generation.backend: vllm`) on gpu-pipeline's worker groups: per lane, one Generation
    replica runs `AsyncLLM` with pipeline-parallel degree 4 over a placement group of one GPU bundle per stage node
    (`stage{k}`, strictly spread; the replica itself in bundle 0, on the stage-0 node), so a lane still takes one GPU
    pod of each stage group. vLLM owns those GPUs (90% of their memory for weights + KV cache), so no stage
    deployment runs, and therefore no head either (`head_checkpoints: {}`: classify/tag/qa/embeddings answer 404);
    the gateway autoscales on the CPU group."""
    base = gpu_pipeline_app(checkpoint)
    return AppConfig.model_validate({
        **base.args(), "device": "cuda", "head_checkpoints": {},
        "generation": {**base.generation.model_dump(exclude_none=True), "backend": "vllm",
                       "vllm": {"gpu_memory_utilization": GPU_MEM_UTIL},
                       "ray_actor_options": {"num_cpus": 4}},  # beside vLLM's stage-0 worker, in bundle 0
    })


@dataclass(frozen=True)
class Overlay:
    name: str
    summary: str
    app: Callable[[], AppConfig]


OVERLAYS = {
    o.name: o for o in (
        Overlay("cpu-demo", "demo checkpoint, 2 stages, CPU workers", cpu_demo_app),
        Overlay("gpu-pipeline", "Seed-OSS-36B, 4 GPU stages + CPU head services", gpu_pipeline_app),
        Overlay("gpu-vllm", "Seed-OSS-36B on vLLM, pipeline-parallel 4 over gpu-pipeline's GPU groups", gpu_vllm_app),
    )
}


def serve_config(app: AppConfig, *, proxy_location: str = "EveryNode") -> dict[str, Any]:
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": "0.0.0.0", "port": HTTP_PORT, "request_timeout_s": REQUEST_TIMEOUT_S},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [GRPC_SERVICER]},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": app.args()},
        ],
    }


# ---------------------------------------------------------------------------------------------------------- checks

class ServeConfigError(ValueError):
    def __init__(self, errors: list[str]):
        super().__init__("invalid Serve config:\n  " + "\n  ".join(errors))
        self.errors = errors


def unknown_keys(model: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """Keys in `data` that no field (or alias) of `model` names, recursively through nested models, lists, dicts
    and unions; free-form fields (`dict`, `Dict[str, Any]`) are not entered."""
    if not isinstance(data, dict):
        return []
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        fields[name] = info.annotation
        if info.alias:
            fields[info.alias] = info.annotation
    errors = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            errors.append(f"{where}: unknown key (not a field of {model.__name__})")
        else:
            errors += _unknown_in(fields[key], value, where)
    return errors


def _unknown_in(annotation: Any, value: Any, path: str) -> list[str]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _unknown_in(args[0], value, path)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_keys(annotation, value, path)
    if origin in (Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(value, dict) and len(models) == 1:  # e.g. Dict | AutoscalingConfig: hold it to the model
            return unknown_keys(models[0], value, path)
        if isinstance(value, list):
            lists = [a for a in args if get_origin(a) in (list, tuple)]
            return _unknown_in(lists[0], value, path) if len(lists) == 1 else []
        return []
    if origin in (list, tuple) and args and isinstance(value, list):
        return [e for i, item in enumerate(value) for e in _unknown_in(args[0], item, f"{path}[{i}]")]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return [e for k, item in value.items() for e in _unknown_in(args[1], item, f"{path}.{k}")]
    return []


def _pydantic_errors(exc: ValidationError, path: str) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = ".".join(part for part in (path, loc) if part) or "<root>"
        out.append(f"{where}: {err['msg']}")
    return out


def deployment_options(app: AppConfig) -> dict[str, dict[str, Any]]:
    """Deployment name → the Serve options build_app gives it (with `head_placement: deployments`, every head the
    config names, present or not; the stages when it deploys them)."""
    num_stages = app.stage_count() if app.deploys_stages() else 0
    options = {f"SeedOssStage{k}": app.stage_options(k) for k in range(num_stages)}
    options["Generation"] = app.generation_options()
    if app.head_placement == "deployments":
        options.update({name: app.head_options(task) for task, name in TASK_DEPLOYMENTS.items()})
    options["Gateway"] = app.gateway_options()
    return options


def _deployment_errors(name: str, options: dict[str, Any], path: str) -> list[str]:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    body = {"name": name, **options}
    errors = unknown_keys(DeploymentSchema, body, path)
    try:
        DeploymentSchema.model_validate(body)
    except ValidationError as e:
        errors += _pydantic_errors(e, path)
    scaling = options.get("autoscaling_config")
    if isinstance(scaling, dict):
        try:
            AutoscalingConfig.model_validate(scaling)
        except ValidationError as e:
            errors += _pydantic_errors(e, f"{path}.autoscaling_config")
    return errors


def app_config_errors(args: Any, path: str = "args") -> list[str]:
    """Our app's `args`: AppConfig (unknown keys rejected everywhere) and the options of each deployment it builds."""
    if not isinstance(args, dict):
        return [f"{path}: must be a mapping (AppConfig), got {type(args).__name__}"]
    errors = unknown_keys(AppConfig, args, path)
    try:
        app = AppConfig.model_validate(args)
    except ValidationError as e:
        return errors + _pydantic_errors(e, path)
    for name, options in deployment_options(app).items():
        errors += _deployment_errors(name, options, f"{path}[{name}]")
    return errors


def serve_config_errors(config: dict[str, Any] | str) -> list[str]:
    """Everything wrong with a Serve config (dict or YAML text); [] when it is valid."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError as e:
            return [f"not valid YAML: {e}"]
    if not isinstance(config, dict):
        return [f"a Serve config is a mapping, got {type(config).__name__}"]
    errors = unknown_keys(ServeDeploySchema, config)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        errors += _pydantic_errors(e, "")
    for i, application in enumerate(config.get("applications") or []):
        if not isinstance(application, dict):
            continue
        where = f"applications[{i}]"
        for j, deployment in enumerate(application.get("deployments") or []):
            scaling = deployment.get("autoscaling_config") if isinstance(deployment, dict) else None
            if isinstance(scaling, dict):
                try:
                    AutoscalingConfig.model_validate(scaling)
                except ValidationError as e:
                    errors += _pydantic_errors(e, f"{where}.deployments[{j}].autoscaling_config")
        if application.get("import_path") == IMPORT_PATH:
            errors += app_config_errors(application.get("args"), f"{where}.args")
    return errors


def check_serve_config(config: dict[str, Any] | str) -> dict[str, Any]:
    """The config (parsed) if valid, else ServeConfigError listing every problem."""
    errors = serve_config_errors(config)
    if errors:
        raise ServeConfigError(errors)
    return yaml.safe_load(config) if isinstance(config, str) else config


# --------------------------------------------------------------------------------------------------------- render

class _Block(str):
    """A string YAML writes as a literal block (`|`)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Block, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def render_serve_config(name: str) -> str:
    """The Serve config of overlay `name` as YAML text (checked)."""
    config = check_serve_config(serve_config(OVERLAYS[name].app()))
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)


def render_patch(name: str) -> str:
    """The overlay's `serve-config.yaml`: a strategic-merge patch setting the RayService's serveConfigV2."""
    if name not in OVERLAYS:
        raise ValueError(f"unknown overlay {name!r} (known: {', '.join(OVERLAYS)})")
    patch = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE_NAME},
        "spec": {"serveConfigV2": _Block(render_serve_config(name))},
    }
    header = (f"# GENERATED by `seedoss k8s render --overlay {name}` from deployments/k8s.py "
              f"({OVERLAYS[name].summary}).\n"
              "# Do not edit: change the AppConfig there, then run `seedoss k8s render --out k8s/overlays`.\n")
    return header + yaml.dump(patch, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def render(overlay: str | None = None, out: str | Path | None = None) -> list[Path]:
    """`seedoss k8s render`: print the patch of one overlay (or all, as a YAML stream), or with `out` write each to
    OUT/<overlay>/serve-config.yaml (OUT is the overlays directory, e.g. k8s/overlays)."""
    names = [overlay] if overlay else list(OVERLAYS)
    texts = {name: render_patch(name) for name in names}
    if out is None:
        sys.stdout.write("---\n".join(texts.values()))
        return []
    written = []
    for name, text in texts.items():
        path = Path(out) / name / PATCH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
        print(f"wrote {path}", file=sys.stderr)
    return written
