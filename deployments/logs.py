"""Logging of the Serve app.

- `LogOptions` (AppConfig `logs`): Serve's per-deployment `logging_config` — text or JSON lines (JSON carries the
  request id, deployment and replica of each record), the level, and access logs: one line per call a replica
  answers. Request-level calls (gateway, Generation streams, head calls) keep theirs unless `access_log: false`
  (each line is formatted and written twice, to the replica's log file and its stderr, which Ray forwards to the
  driver: 5-20% of the gateway's CPU per one-text classify request in alternated runs); the stages' per-step and
  per-forward calls are off by default (one line per decode step per stage replica otherwise).
- `forward_library_logs()`: records of the model library (`seedoss.*`, e.g. weight-loading progress) go to Serve's
  logger, which Serve sets up in each replica: they land in the replica's log file and, through Ray's log
  forwarding, on the console of the driver (`seedoss serve`). Without it a replica drops them (no root handler).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SERVE_LOGGER = "ray.serve"
LIBRARY_LOGGER = "seedoss"


class LogOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoding: Literal["TEXT", "JSON"] = Field("TEXT", description="JSON: one object a line, with request_id")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = Field(True, description="access-log lines for request-level calls (gateway, Generation, "
                                               "heads): 5-20% of the gateway's CPU per small request")
    stage_access_log: bool = Field(False, description="access-log lines for the stages' per-step calls")

    def serve_logging(self, stage: bool = False) -> dict[str, Any]:
        """A deployment's Serve `logging_config` (`stage`: a stage's, whose calls are per step)."""
        return {"encoding": self.encoding, "log_level": self.level,
                "enable_access_log": self.stage_access_log if stage else self.access_log}


class ToServeLogger(logging.Handler):
    """Hands a record to the handlers of Serve's logger that its own propagation does not reach already (where
    one handler sits on both, as test harnesses arrange, it must not see the record twice)."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if not serve_logger.filter(record):
            return
        reached, logger = set(), logging.getLogger(record.name)
        while logger:
            reached.update(logger.handlers)
            logger = logger.parent if logger.propagate else None
        for handler in serve_logger.handlers:
            if handler not in reached and record.levelno >= handler.level:
                handler.handle(record)


def forward_library_logs() -> None:
    """Idempotent; called when the package is imported, which every replica does (it imports its deployment)."""
    library = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, ToServeLogger) for h in library.handlers):
        library.addHandler(ToServeLogger())
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)
