"""generation_config.json sampling defaults (services/defaults.py) and the AppConfig switch."""

import json

import pytest

from seedoss.services.defaults import apply_defaults, generation_defaults


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 0, "eos_token_id": 2, "do_sample": True, "temperature": 1.1, "top_p": 0.95,
        "max_new_tokens": 64, "top_k": None}))
    return tmp_path


def test_model_card_defaults_fill_unset_fields_only(checkpoint):
    defaults = generation_defaults(checkpoint)
    assert defaults == {"temperature": 1.1, "top_p": 0.95, "max_tokens": 64}
    body = {"prompt": "x", "temperature": 0, "max_tokens": None}
    assert apply_defaults(body, defaults) == {"prompt": "x", "temperature": 0, "max_tokens": None, "top_p": 0.95}
    assert apply_defaults({"prompt": "x"}, {}) == {"prompt": "x"}


def test_none_mode_and_missing_file(checkpoint, tmp_path_factory):
    assert generation_defaults(checkpoint, "none") == {}
    assert generation_defaults(tmp_path_factory.mktemp("empty")) == {}


def test_app_config_field(demo_checkpoint):
    from seedoss.deployments.config import AppConfig

    assert AppConfig(checkpoint=str(demo_checkpoint)).generation_config == "auto"
    assert AppConfig(checkpoint=str(demo_checkpoint), generation_config="none").generation_config == "none"
    with pytest.raises(ValueError):
        AppConfig(checkpoint=str(demo_checkpoint), generation_config="vllm")
