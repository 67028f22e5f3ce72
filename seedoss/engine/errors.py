"""The engine's errors, importable without torch: `services/errors.py` maps them to HTTP and gRPC answers in
processes (the gateway) that never load a model."""

from __future__ import annotations

from collections.abc import Hashable


class RequestError(ValueError):
    """A request the engine cannot serve as asked; `field` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        return type(self), (str(self), self.field)


class StageUnavailable(RuntimeError):
    """A stage could not run the step (replica died or is restarting). The engine retries the step a bounded
    number of times; the restarted stage then reports missing caches and the sequences are recomputed."""


class KVCacheFull(RuntimeError):
    """Not enough free blocks for the requested tokens; nothing was allocated."""


class MissingSequenceCache(LookupError):
    """This stage does not hold the cached context a step assumed (restart, other replica, eviction, a prefix
    it never cached). `seq_ids` lists the affected sequences; the engine re-sends their whole context (recompute).
    """

    def __init__(self, seq_ids: list[Hashable]):
        super().__init__(f"stage holds no KV cache for sequence(s) {seq_ids}; re-send their context")
        self.seq_ids = list(seq_ids)

    def __reduce__(self):  # survive pickling between processes with seq_ids intact
        return type(self), (self.seq_ids,)
