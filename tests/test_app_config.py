"""The Serve config in the repo validates with Ray's schema and builds our app; config errors are clear."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from seedoss.deployments.app import build_app
from seedoss.deployments.config import AppConfig, DeploymentOptions

SERVE_CONFIG = "deployments/serve_config.yaml"


def test_repo_serve_config_validates_and_builds(demo_checkpoint):
    raw = yaml.safe_load(open(SERVE_CONFIG))
    ServeDeploySchema.model_validate(raw)
    args = raw["applications"][0]["args"]
    cfg = AppConfig.model_validate({**args, "checkpoint": str(demo_checkpoint)})
    AutoscalingConfig.model_validate(cfg.gateway.autoscaling_config)
    assert cfg.gateway.serve_options().get("num_replicas") is None
    assert cfg.args() == AppConfig.model_validate(cfg.args()).args()
    app = build_app(cfg)
    assert app is not None
    assert AppConfig.model_validate({**args}).checkpoint.endswith(".cache/seedoss/demo-tiny")  # ~ expanded
    assert cfg.heads() == {**{t: str(demo_checkpoint / "heads" / t) for t in ("classify", "tag", "qa")},
                           "embed": str(demo_checkpoint)}  # embeddings: the backbone itself


def test_stage_pinning_and_bounded_queues(demo_checkpoint):
    cfg = AppConfig(checkpoint=str(demo_checkpoint), num_stages=3, pin_stages=True)
    for k in range(3):
        options = cfg.stage_options(k)
        assert options["ray_actor_options"]["resources"] == {f"stage{k}": 1}
        assert options["max_queued_requests"] > 0 and options["max_ongoing_requests"] > 0
    for name in ["generation", "classify", "tag", "qa", "gateway"]:
        assert getattr(cfg, name).max_queued_requests > 0


@pytest.mark.parametrize("bad, field", [
    ({"num_stages": 0}, "num_stages"),
    ({"dtype": "int4"}, "dtype"),
    ({"stage": {"replicas": 2}}, "replicas"),
    ({"classify": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}}, "autoscaling_config"),
    ({"unknown_key": 1}, "unknown_key"),
])
def test_bad_app_config_names_the_field(demo_checkpoint, bad, field):
    with pytest.raises(ValidationError, match=field):
        AppConfig.model_validate({"checkpoint": str(demo_checkpoint), **bad})


def test_head_deployment_options_are_refused_where_no_head_deployment_exists(demo_checkpoint):
    """Under the default head_placement (gateway) a `classify:` block would configure nothing: an error, not a no-op;
    with head_placement: deployments it configures the Classification deployment, and `args()` keeps it."""
    options = {"classify": {"num_replicas": 2}, "qa": {"max_queued_requests": 8}}
    with pytest.raises(ValidationError, match="classify, qa: .* head_placement: deployments"):
        AppConfig.model_validate({"checkpoint": str(demo_checkpoint), **options})
    cfg = AppConfig.model_validate({"checkpoint": str(demo_checkpoint), "head_placement": "deployments", **options})
    assert cfg.head_options("classify")["num_replicas"] == 2
    assert cfg.args()["classify"]["num_replicas"] == 2 and AppConfig.model_validate(cfg.args()) == cfg
    default = AppConfig(checkpoint=str(demo_checkpoint))
    assert not {"classify", "tag", "qa", "embed"} & set(default.args())
    assert AppConfig.model_validate(default.args()) == default


def test_layer_split_errors_are_clear(demo_checkpoint):
    with pytest.raises(ValueError, match="sum to num_hidden_layers"):
        build_app({"checkpoint": str(demo_checkpoint), "layers_per_stage": [1, 1]})
    assert DeploymentOptions().serve_options()["ray_actor_options"] == {"num_cpus": 0}


def test_repo_serve_config_is_safe_by_default():
    """HTTP on loopback; gRPC (Serve binds it on every interface) behind required keys."""
    raw = yaml.safe_load(open(SERVE_CONFIG))
    assert raw["http_options"]["host"] == "127.0.0.1"
    assert raw["applications"][0]["args"]["require_api_keys"] is True


def test_multithreaded_stages_get_a_short_openmp_spin(demo_checkpoint, monkeypatch):
    """Stages with more than one torch thread start with GOMP_SPINCOUNT in their environment (an idle team must not
    hold cores the other replicas need); set in the stage's options or the launching environment, that value wins;
    single-threaded stages and the other deployments get none."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)

    def stage_env(**args):
        options = AppConfig.model_validate({"checkpoint": str(demo_checkpoint), **args}).stage_options(0)
        return options["ray_actor_options"]["runtime_env"]["env_vars"]

    assert stage_env(stage_threads=2)["GOMP_SPINCOUNT"] == "2000"
    assert "GOMP_SPINCOUNT" not in stage_env() and "GOMP_SPINCOUNT" not in stage_env(stage_threads=1)
    own = {"ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "50"}}}}
    assert stage_env(stage_threads=2, stage=own)["GOMP_SPINCOUNT"] == "50"
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert stage_env(stage_threads=2)["GOMP_SPINCOUNT"] == "300000"
    config = AppConfig.model_validate({"checkpoint": str(demo_checkpoint), "stage_threads": 2})
    assert "GOMP_SPINCOUNT" not in config.generation_options()["ray_actor_options"]["runtime_env"]["env_vars"]
