"""Shared fixtures: HF-saved random checkpoints (the reference) and the demo checkpoint."""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))
try:  # every Ray instance a test starts runs with the switches `seedoss serve` uses
    from seedoss.deployments import serve_env
except ImportError:  # Ray is not installed (library-only checkout)
    pass
else:
    serve_env.apply()


@pytest.fixture(scope="session", autouse=True)
def _ray_default_temp_dir():
    """`ray.cluster_utils.Cluster.add_node` records the cluster's address in Ray's default temp dir even when the
    head node was given its own: on a fresh machine that directory does not exist yet."""
    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:  # Ray is not installed (library-only checkout)
        return
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)


@contextlib.contextmanager
def local_serve(tmp_path_factory, *, grpc: bool = False, metrics: bool = False, nodes: dict | None = None,
                **ray_init):
    """A test module's own Ray instance (2 CPUs, no dashboard) with Serve started on free ports: HTTP, gRPC with our
    servicer when `grpc`, Ray's metrics endpoint when `metrics` (single node only). `nodes` (name → `Cluster.add_node` arguments) makes
    it a multi-node `ray.cluster_utils.Cluster`. Yields the addresses and nodes; shuts Serve and Ray down after."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from seedoss.deployments.k8s import GRPC_SERVICER
    from seedoss.deployments.serve_env import free_port

    if metrics and nodes is not None:
        raise ValueError("local_serve: the metrics endpoint is set up for a single-node instance only")
    temp_dir = str(tmp_path_factory.mktemp("ray"))
    found = SimpleNamespace(nodes={}, grpc=None, metrics=None)
    cluster = None
    if nodes is not None:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "temp_dir": temp_dir})
        found.nodes = {name: cluster.add_node(**args) for name, args in nodes.items()}
        ray.init(address=cluster.address, log_to_driver=False, **ray_init)
    else:
        if metrics:
            ray_init["_metrics_export_port"] = metrics_port = free_port()
            found.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir, **ray_init)
    try:
        port = free_port()
        found.url = f"http://127.0.0.1:{port}"
        options = {}
        if grpc:
            grpc_port = free_port()
            found.grpc = f"127.0.0.1:{grpc_port}"
            options["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly", **options)
        yield found
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


def hf_config(**overrides):
    """A tiny transformers SeedOssConfig (head_dim 32 ≠ hidden/heads by default)."""
    from transformers import SeedOssConfig

    fields = dict(
        vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, attention_bias=True,
        attention_out_bias=False, mlp_bias=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    fields.update(overrides)
    return SeedOssConfig(**fields)


def save_hf_model(cls, config, path, seed: int = 0, scale_init: bool = True):
    """Instantiate an HF SeedOss class with seeded random weights, save it with save_pretrained, return it (eval)."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    if scale_init:  # HF's 0.02-std init gives near-uniform logits; spread them so argmax has clear winners
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
                elif "norm" in name:
                    p.normal_(1.0, 0.1)
                else:
                    p.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    from seedoss.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "tiny")
