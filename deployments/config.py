"""One pydantic config drives the whole Serve app: checkpoint, stage split, and per-deployment options."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from seedoss.engine import EngineConfig
from services.limits import Limits

TASK_DEPLOYMENTS = {"classify": "Classification", "tag": "Tagging", "qa": "QA"}


def checked_api_keys(keys: list[str], source: str) -> list[str]:
    """`keys` unchanged, or ValueError: auth must fail closed, so a key that is empty, blank or padded with
    whitespace (which no client's header can match, or which ``Authorization: Bearer `` would) stops the config
    from loading instead of being skipped or accepted."""
    for i, key in enumerate(keys):
        if not key.strip() or key != key.strip():
            raise ValueError(f"{source}: key {i} is empty or has surrounding whitespace")
    return keys


def resolve_api_keys(api_keys: list[str] | None, env: str, required: bool) -> list[str]:
    """The keys a gateway accepts: the config's plus `env` (``SEEDOSS_API_KEYS``: comma-separated, items stripped;
    unset or blank means none, an empty item is an error); ValueError when `required` and there are none."""
    env_keys = checked_api_keys([k.strip() for k in env.split(",")], "SEEDOSS_API_KEYS") if env.strip() else []
    keys = [*(api_keys or []), *env_keys]
    if required and not keys:
        raise ValueError("require_api_keys is set but no key is configured (api_keys or SEEDOSS_API_KEYS)")
    return keys


class DeploymentOptions(BaseModel):
    """What Serve needs to place and scale one deployment (see DESIGN.md §3 for the defaults we override)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(1, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="per caller; -1 is unbounded (never use in production)")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})

    @field_validator("autoscaling_config")
    @classmethod
    def _valid_autoscaling(cls, value: dict | None) -> dict | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig.model_validate(value)
        return value

    @model_validator(mode="after")
    def _one_scaling_mode(self):
        if self.autoscaling_config is not None:
            self.num_replicas = None  # autoscaling decides; Serve rejects both
        return self

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class AppConfig(BaseModel):
    """`serve run deployments.app:build_app checkpoint=... num_stages=2` or a Serve config's `args:`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    model_name: str = Field("seedoss", description="the model id clients ask for (OpenAI `model`)")
    api_keys: list[str] | None = Field(None, description="bearer tokens accepted (also SEEDOSS_API_KEYS, comma-separated)")
    require_api_keys: bool = Field(
        False, description="the gateway refuses to start without a key (api_keys or SEEDOSS_API_KEYS): fail closed")
    limits: Limits = Field(default_factory=Limits, description="per-request limits (services/limits.py, README)")
    head_checkpoints: dict[Literal["classify", "tag", "qa"], str] | None = Field(
        None, description="task → HF checkpoint with that head; default: the demo layout's heads/<task>/ when present")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where stage replicas keep weights and KV cache; auto: the GPU a replica was given, if any")
    num_stages: int = Field(2, ge=1)
    layers_per_stage: list[int] | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="scheduling limits; kv_budget_bytes and block_size apply to each stage replica")
    pin_stages: bool = Field(False, description="stage k asks for custom resource `stage{k}: 1` (one node per stage)")
    stage: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=64, max_queued_requests=256))
    generation: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, max_queued_requests=512))
    classify: DeploymentOptions = Field(default_factory=DeploymentOptions)
    tag: DeploymentOptions = Field(default_factory=DeploymentOptions)
    qa: DeploymentOptions = Field(default_factory=DeploymentOptions)
    gateway: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, max_queued_requests=512))

    @field_validator("api_keys")
    @classmethod
    def _keys_fail_closed(cls, keys: list[str] | None) -> list[str] | None:
        if keys is not None and not keys:
            raise ValueError("an empty list would turn auth off (likely a templating mistake); "
                             "use null to serve without keys")
        return keys if keys is None else checked_api_keys(keys, "api_keys")

    @field_validator("checkpoint")
    @classmethod
    def _expand_home(cls, path: str) -> str:
        return str(Path(path).expanduser())

    def heads(self) -> dict[str, str]:
        if self.head_checkpoints is not None:
            return dict(self.head_checkpoints)
        root = Path(self.checkpoint) / "heads"
        return {task: str(root / task) for task in TASK_DEPLOYMENTS if (root / task / "config.json").exists()}

    def stage_options(self, k: int) -> dict[str, Any]:
        options = self.stage.serve_options()
        if self.pin_stages:
            actor = dict(options.get("ray_actor_options", {}))
            actor["resources"] = {**actor.get("resources", {}), f"stage{k}": 1}
            options["ray_actor_options"] = actor
        return options
