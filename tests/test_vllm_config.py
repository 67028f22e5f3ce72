"""The vLLM generation backend's configuration, without vllm installed: `generation.backend`, what the app deploys
with it, vLLM's engine arguments on CPU and GPU, and the GPU placement (one bundle per pipeline stage). The backend
itself is exercised by tests/vllm/ (in .venv-vllm)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve.schema import DeploymentSchema

from seedoss.deployments.config import AppConfig
from seedoss.deployments.vllm_backend import engine_args
from seedoss.engine import EngineConfig


def test_backend_defaults_to_ours_and_bad_values_name_the_field(demo_checkpoint):
    assert AppConfig(checkpoint=str(demo_checkpoint)).generation.backend == "seedoss"
    for bad, field in (({"backend": "tgi"}, "backend"), ({"vllm": {"tensor_parallel_size": 0}}, "tensor_parallel_size"),
                       ({"vllm": {"gpu_memory_utilization": 1.5}}, "gpu_memory_utilization"),
                       ({"vllm": {"unknown": 1}}, "unknown")):
        with pytest.raises(ValidationError, match=field):
            AppConfig.model_validate({"checkpoint": str(demo_checkpoint), "generation": bad})


def test_vllm_backend_deploys_stages_only_for_the_heads(demo_checkpoint):
    vllm = {"backend": "vllm"}
    assert AppConfig(checkpoint=str(demo_checkpoint), generation=vllm).deploys_stages()  # heads use the stages
    assert not AppConfig(checkpoint=str(demo_checkpoint), generation=vllm, head_checkpoints={}).deploys_stages()
    assert AppConfig(checkpoint=str(demo_checkpoint), head_checkpoints={}).deploys_stages()  # our engine needs them
    options = AppConfig(checkpoint=str(demo_checkpoint), generation=vllm).generation_options()
    assert "backend" not in options and "vllm" not in options  # ours, not Serve's
    DeploymentSchema.model_validate({"name": "Generation", **options})


def test_gpu_placement_is_one_bundle_per_stage(demo_checkpoint):
    cfg = AppConfig(checkpoint=str(demo_checkpoint), device="cuda", num_stages=4, pin_stages=True,
                    generation={"backend": "vllm", "vllm": {"tensor_parallel_size": 2}})
    options = cfg.generation_options()
    assert options["placement_group_bundles"] == [{"GPU": 2, f"stage{k}": 1} for k in range(4)]
    assert options["placement_group_strategy"] == "STRICT_SPREAD"
    DeploymentSchema.model_validate({"name": "Generation", **options})
    unpinned = AppConfig(checkpoint=str(demo_checkpoint), device="cuda", layers_per_stage=[2, 2],
                         generation={"backend": "vllm"}).generation_options()
    assert unpinned["placement_group_bundles"] == [{"GPU": 1}, {"GPU": 1}]
    assert "placement_group_bundles" not in AppConfig(checkpoint=str(demo_checkpoint), device="cuda").generation_options()


def test_engine_args_cpu_multiprocessing_and_gpu_ray():
    engine = EngineConfig(max_num_seqs=8, max_batched_tokens=256, max_model_len=1024)
    cpu = engine_args("/ckpt", "float32", 2, engine, {"gpu_memory_utilization": 0.3}, "cpu")
    assert cpu == {"model": "/ckpt", "tokenizer": "/ckpt", "dtype": "float32", "pipeline_parallel_size": 2,
                   "max_num_seqs": 8, "max_num_batched_tokens": 256, "max_model_len": 1024, "seed": 0,
                   "disable_log_stats": False, "gpu_memory_utilization": 0.3, "distributed_executor_backend": "mp",
                   "compilation_config": {"mode": 2, "backend": "eager"}}
    gpu = engine_args("/ckpt", "bfloat16", 4, engine, {"tensor_parallel_size": 1, "engine_args": {"enable_prefix_caching": True}},
                      "cuda")
    assert gpu["distributed_executor_backend"] == "ray" and gpu["tensor_parallel_size"] == 1
    assert gpu["enable_prefix_caching"] is True and "compilation_config" not in gpu
    # the placement group's GPUs are reached through Ray even for one stage (the replica holds no GPU itself)
    assert engine_args("/ckpt", "bfloat16", 1, engine, {}, "cuda")["distributed_executor_backend"] == "ray"
    assert "distributed_executor_backend" not in engine_args("/ckpt", "bfloat16", 1, engine, {}, "local-cuda")


def test_gpu_vllm_overlay_runs_one_placement_group_per_lane_on_the_stage_nodes():
    """k8s/overlays/gpu-vllm (rendered from deployments/k8s.py:gpu_vllm_app, validated with the other overlays by
    tests/test_k8s*.py): Seed-OSS-36B on vLLM over gpu-pipeline's four GPU groups, no stage deployment, no head."""
    import yaml

    from seedoss.deployments.k8s import OVERLAYS, OVERLAYS_DIR, deployment_options

    app = OVERLAYS["gpu-vllm"].app()
    assert app.generation.backend == "vllm" and app.device == "cuda" and app.pin_stages
    assert app.heads() == {} and not app.deploys_stages()
    options = deployment_options(app)
    assert not any(name.startswith("SeedOssStage") for name in options)
    generation = options["Generation"]
    assert generation["placement_group_strategy"] == "STRICT_SPREAD"
    assert generation["placement_group_bundles"] == [{"GPU": 1, "stage0": 1, "CPU": 4}, {"GPU": 1, "stage1": 1},
                                                     {"GPU": 1, "stage2": 1}, {"GPU": 1, "stage3": 1}]
    assert generation["autoscaling_config"]["max_replicas"] == 2  # lanes: one placement group each
    kustomization = yaml.safe_load((OVERLAYS_DIR / "gpu-vllm" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../gpu-pipeline"]  # the same cluster: worker groups, image, PVC
