"""Logs: the stages' per-step access logs are off by default and request-level ones on; JSON logs are one switch;
library records (weight-loading progress) reach a replica's Serve log, set up by Serve's own logger code."""

from __future__ import annotations

import json
import logging

import pytest
from ray.serve.schema import LoggingConfig

from seedoss.deployments.config import AppConfig
from seedoss.deployments.k8s import deployment_options
from seedoss.deployments.logs import SERVE_LOGGER
from seedoss.loader import load_stage


def test_stage_access_logs_off_request_level_on(demo_checkpoint):
    options = deployment_options(AppConfig(checkpoint=str(demo_checkpoint), num_stages=2))
    assert set(options) == {"SeedOssStage0", "SeedOssStage1", "Generation", "Gateway"}  # heads in the gateway
    options = deployment_options(AppConfig(checkpoint=str(demo_checkpoint), num_stages=2,
                                           head_placement="deployments"))
    assert set(options) == {"SeedOssStage0", "SeedOssStage1", "Generation", "Classification", "Tagging", "QA",
                            "Embedding", "Gateway"}
    for name, opts in options.items():
        config = LoggingConfig.model_validate(opts["logging_config"])  # what Serve will take
        assert config.enable_access_log is (not name.startswith("SeedOssStage")), name
        assert config.encoding == "TEXT"


def test_json_logs_and_access_logs_are_options(demo_checkpoint):
    app = AppConfig(checkpoint=str(demo_checkpoint), logs={"encoding": "JSON", "stage_access_log": True,
                                                           "level": "DEBUG"})
    for name, opts in deployment_options(app).items():
        config = LoggingConfig.model_validate(opts["logging_config"])
        assert (config.encoding, config.log_level, config.enable_access_log) == ("JSON", "DEBUG", True), name
    app = AppConfig(checkpoint=str(demo_checkpoint), logs={"access_log": False})
    for name, opts in deployment_options(app).items():
        assert LoggingConfig.model_validate(opts["logging_config"]).enable_access_log is False, name
    with pytest.raises(ValueError, match="encoding"):
        AppConfig(checkpoint=str(demo_checkpoint), logs={"encoding": "XML"})


@pytest.fixture
def replica_logger(tmp_path):
    """Serve's logger configured in this process the way Serve configures it in a stage replica."""
    from ray.serve._private.common import ServeComponentType
    from ray.serve._private.logging_utils import configure_component_logger

    serve_logger = logging.getLogger(SERVE_LOGGER)
    saved = serve_logger.handlers[:], serve_logger.propagate, serve_logger.level

    def configure(app: AppConfig):
        configure_component_logger(
            component_name="SeedOssStage0", component_id="r1", component_type=ServeComponentType.REPLICA,
            logging_config=LoggingConfig.model_validate({**app.stage_options(0)["logging_config"],
                                                         "logs_dir": str(tmp_path)}),
            max_bytes=1 << 20, backup_count=1)
        return tmp_path

    yield configure
    for handler in serve_logger.handlers:
        handler.close()
    serve_logger.handlers[:], serve_logger.propagate = saved[0], saved[1]
    serve_logger.setLevel(saved[2])


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
def test_load_progress_reaches_the_replica_log(demo_checkpoint, replica_logger, encoding):
    app = AppConfig(checkpoint=str(demo_checkpoint), logs={"encoding": encoding})
    logs_dir = replica_logger(app)
    load_stage(demo_checkpoint, 0, 1)
    # an access-log record of a stage call: filtered out (stage access logs are off by default)
    logging.getLogger(SERVE_LOGGER).info("POST forward OK 1.0ms", extra={"serve_access_log": True})
    for handler in logging.getLogger(SERVE_LOGGER).handlers:
        handler.flush()
    (log_file,) = logs_dir.glob("*SeedOssStage0*")
    lines = log_file.read_text().splitlines()
    messages = [json.loads(line)["message"] for line in lines] if encoding == "JSON" else lines
    progress = [m for m in messages if "stage layers 0-0" in m]
    assert progress and "loading" in progress[0] and "loaded" in progress[-1], messages
    assert not any("POST forward" in m for m in messages)
