"""The engine's settings (the Serve app passes them through `AppConfig.engine`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class EngineConfig(BaseModel):
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once")
    max_batched_tokens: int = Field(512, ge=16, description="tokens per micro-batch (prompt chunk size bound)")
    max_model_len: int | None = Field(None, ge=2, description="prompt + output limit; default: the model's")
    kv_budget_bytes: int = Field(256 << 20, ge=1, description="KV cache bytes per stage")
    block_size: int = Field(16, ge=1)
    enable_prefix_caching: bool = Field(True, description="reuse the KV of full blocks a prompt shares with "
                                                          "earlier sequences (hash chain of their tokens)")
    # In the Serve app the pipeline itself re-sends a step under `AppConfig.retry` and these are not used
    # (deployments/generation.py sets max_step_retries to 0): they serve other pipelines.
    max_step_retries: int = Field(20, ge=0, description="retries of a step whose stage is unavailable")
    retry_backoff_s: float = Field(0.5, ge=0, description="wait before retrying such a step")
