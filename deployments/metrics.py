"""Prometheus metrics through `ray.serve.metrics` (Ray's metrics agent exports them on each node's
`metrics_export_port`, prefixed `ray_`)."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from seedoss.engine import EngineObserver

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

REQUESTS = Counter("seedoss_requests", description="requests answered, by route and HTTP status",
                   tag_keys=("route", "status"))
LATENCY = Histogram("seedoss_request_latency_seconds", description="time to response headers, by route",
                    boundaries=LATENCY_BUCKETS, tag_keys=("route",))
HEAD_REQUESTS = Counter("seedoss_head_requests", description="head service calls, by task and outcome",
                        tag_keys=("task", "outcome"))
HEAD_LATENCY = Histogram("seedoss_head_latency_seconds", description="head service call latency, by task",
                         boundaries=LATENCY_BUCKETS, tag_keys=("task",))
# what batching across requests achieves (TEI's te_batch_next_size / te_batch_next_tokens): per forward of a head's
# batcher (batcher="classify", ...) and of a stage's cache-less prefill batcher (batcher="stage0-1", ...)
BATCH_SEQUENCES = Histogram("seedoss_batch_sequences", description="sequences per batched forward, by batcher",
                            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("batcher",))
BATCH_TOKENS = Histogram("seedoss_batch_tokens", description="tokens per batched forward, by batcher",
                         boundaries=[16, 64, 256, 1024, 4096, 16384], tag_keys=("batcher",))


class GenerationMetrics(EngineObserver):
    def __init__(self):
        self.ttft = Histogram("seedoss_time_to_first_token_seconds", description="time to first token",
                              boundaries=LATENCY_BUCKETS)
        self.itl = Histogram("seedoss_inter_token_latency_seconds", description="time between output tokens",
                             boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5])
        self.prompt_tokens = Counter("seedoss_prompt_tokens", description="prompt tokens admitted")
        self.generation_tokens = Counter("seedoss_generation_tokens", description="tokens generated")
        self.running = Gauge("seedoss_running_sequences", description="sequences in the running batch")
        self.waiting = Gauge("seedoss_waiting_sequences", description="sequences waiting for admission")
        self.kv_usage = Gauge("seedoss_kv_cache_usage", description="fraction of KV cache blocks in use")
        self.steps = Counter("seedoss_sequence_steps", description="sequence-steps run through the stages")
        self.cache_misses = Counter("seedoss_kv_cache_misses", description="sequence-steps a stage replica "
                                    "answered without the sequence's KV cache (recomputed; lane moved or replica lost)")
        self.prefix_queries = Counter("seedoss_prefix_cache_queries", description="prompt tokens looked up in the "
                                      "prefix cache at admission")
        self.prefix_hits = Counter("seedoss_prefix_cache_hits", description="of those, tokens whose KV was cached")

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def on_next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generation_tokens.inc()

    def on_prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def on_step(self, sequences: int, cache_misses: int) -> None:
        self.steps.inc(sequences)
        if cache_misses:
            self.cache_misses.inc(cache_misses)

    def on_prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_queries.inc(queries)
        if hits:
            self.prefix_hits.inc(hits)

    def update_gauges(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
