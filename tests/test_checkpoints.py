"""Config parsing and checkpoint loading: sharded sets, dtypes, and clear errors for bad inputs."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import hf_config, save_hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SeedOssForCausalLM

from seedoss import weights
from seedoss.config import ConfigError, SeedOssConfig
from seedoss.loader import load_head, load_stage
from seedoss.model import StepBatch
from seedoss.weights import Checkpoint, CheckpointError

CONFIG_36B = "tests/data/seed_oss_36b_config.json"


def test_36b_config_loads_in_both_rope_styles():
    raw = json.loads(open(CONFIG_36B).read())
    legacy = SeedOssConfig.from_dict(raw)
    assert (legacy.hidden_size, legacy.num_attention_heads, legacy.head_dim, legacy.num_key_value_heads) == (5120, 80, 128, 8)
    assert legacy.rope.rope_type == "default" and legacy.rope.rope_theta == 1e7
    assert legacy.kv_bytes_per_token_per_layer * legacy.num_hidden_layers == 256 * 1024
    modern = dict(raw)
    modern.pop("rope_scaling")
    modern["rope_parameters"] = {"rope_type": "default", "rope_theta": modern.pop("rope_theta")}
    assert SeedOssConfig.from_dict(modern) == legacy
    assert SeedOssConfig.from_dict(legacy.to_dict()) == legacy


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("hidden_size"), "'hidden_size'"),
        (lambda r: r.update(num_key_value_heads=7), "'num_key_value_heads'"),
        (lambda r: r.update(rope_scaling={"rope_type": "longrope2"}), "unknown rope type 'longrope2'"),
        (lambda r: r.update(rope_scaling={"rope_type": "linear"}), "rope_parameters.factor"),
        (lambda r: r.update(rope_scaling={"rope_type": "default", "fctor": 2}), "fctor"),
        (lambda r: r.update(num_hidden_layers=0), "'num_hidden_layers'"),
        (lambda r: r.update(hidden_act="gelu"), "'hidden_act'"),
    ],
)
def test_bad_config_names_the_key(change, message):
    raw = json.loads(open(CONFIG_36B).read())
    change(raw)
    with pytest.raises(ConfigError, match=message):
        SeedOssConfig.from_dict(raw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = save_hf_model(SeedOssForCausalLM, hf_config(), path, seed=21)
    return path, model


def test_sharded_checkpoint_loads_like_single_file(saved, tmp_path):
    path, model = saved
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="150KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    ids = torch.arange(5, 25)
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    ckpt = Checkpoint(sharded)
    stage = load_stage(sharded, 1, 3, checkpoint=ckpt)
    files = {ckpt.files[n] for n in ckpt.read_log}
    assert files < set(sharded.glob("model-*.safetensors"))  # only the shards holding layers 1-2 were opened
    full = load_stage(sharded)
    ours = load_head(sharded, "generate")(full(ids, StepBatch([0], [20], [0])))
    assert (ours - ref).abs().max().item() <= 1e-4
    assert stage.start == 1


def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_stage(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_stage(tmp_path)


def test_index_naming_missing_shard(saved, tmp_path):
    path, model = saved
    model.save_pretrained(tmp_path, max_shard_size="150KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_stage(tmp_path)


def test_wrong_shape_names_tensor_and_file(saved, tmp_path):
    path, _ = saved
    shutil.copytree(path, tmp_path / "c")
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape \(3, 3\)") as e:
        load_stage(tmp_path / "c")
    assert "model.safetensors" in str(e.value)


def test_missing_and_unexpected_tensors(saved, tmp_path):
    path, _ = saved
    shutil.copytree(path, tmp_path / "c")
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.2\.self_attn\.k_proj\.bias"):
        load_stage(tmp_path / "c")
    load_stage(tmp_path / "c", 0, 2)  # a stage that does not need the missing tensor still loads
    tensors["model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*rotary"):
        load_stage(tmp_path / "c", 0, 2)


def test_truncated_safetensors_names_file(saved, tmp_path):
    path, _ = saved
    shutil.copytree(path, tmp_path / "c")
    file = tmp_path / "c" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_stage(tmp_path / "c")


def test_unknown_rope_type_names_file_and_key(saved, tmp_path):
    path, _ = saved
    shutil.copytree(path, tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "config.json").read_text())
    raw["rope_parameters"]["rope_type"] = "su"
    (tmp_path / "c" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json.*unknown rope type 'su'"):
        load_stage(tmp_path / "c")


def test_bad_dtype(saved):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_stage(saved[0], dtype="int8")


def test_loading_a_sharded_checkpoint_logs_progress_while_it_runs(saved, tmp_path, caplog, monkeypatch):
    path, model = saved
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="150KB")
    monkeypatch.setattr(weights, "PROGRESS_INTERVAL_S", 0.0)  # a line per tensor: the throttle is tested below
    caplog.set_level(logging.INFO, logger="seedoss.load")
    ckpt = Checkpoint(sharded)
    load_stage(sharded, 0, 3, checkpoint=ckpt)
    records = [r for r in caplog.records if r.name == "seedoss.load"]
    *running, final = records
    assert final.load_done and not any(r.load_done for r in running)
    assert all(r.load_label == "stage layers 0-2" for r in records) and "stage layers 0-2" in final.getMessage()
    # lines while it runs, each before all bytes were read, each further than the one before
    during = [r for r in running if 0 < r.load_bytes < r.load_total]
    assert len(during) >= 2 and all("ETA" in r.getMessage() and "/s" in r.getMessage() for r in during)
    assert [r.load_bytes for r in records] == sorted({r.load_bytes for r in records})
    # the bytes add up: every tensor the stage read, as stored in its shard
    stored = 0
    for file in {ckpt.files[n] for n in ckpt.read_log}:
        with safe_open(str(file), framework="pt") as f:
            stored += sum(f.get_tensor(n).nbytes for n in ckpt.read_log if n in f.keys())
    assert final.load_bytes == final.load_total == stored
    assert len({ckpt.files[n] for n in ckpt.read_log}) > 2  # it did span several shards


def test_load_progress_is_throttled(saved, caplog):
    path, _ = saved
    caplog.set_level(logging.INFO, logger="seedoss.load")
    load_head(path, "generate")  # far faster than PROGRESS_INTERVAL_S: the start and the end line only
    lines = [r.getMessage() for r in caplog.records if r.name == "seedoss.load"]
    assert len(lines) == 2 and lines[0].startswith("generate head: loading ") and "loaded" in lines[1]


def test_load_progress_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="seedoss.load")
    ticks = iter([0.0, 4.0, 7.0, 10.0])
    progress = weights.LoadProgress("stage layers 0-9", 3 << 30, files=2, clock=lambda: next(ticks))
    progress.add(1 << 30)
    progress.add(2 << 30)  # all read: no progress line, the final one follows
    progress.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "stage layers 0-9: loading 3.00 GiB from 2 file(s)",
        "stage layers 0-9: 1.00 GiB / 3.00 GiB (33%), 256.0 MiB/s, ETA 8s",
        "stage layers 0-9: loaded 3.00 GiB in 10.0s (307.2 MiB/s)"]
