"""Where a served token's time goes, measured with timestamps carried through each step and each stream chunk.

Steps (always on: a handful of `time.time()` calls and floats per step, no per-token work). The Generation replica
stamps a step when it sends it; each stage appends one `StageStamps` (entry, inputs unpacked, compute started and
ended in its worker thread, outputs packed) to the step's wire tuple and hands it to the next stage; the Generation
replica stamps the reply. `StepTimings` turns the stamps into durations and sums them per component, and
`Generation.stats()["timing"]` reports the sums (bench/serving.py divides deltas by the step count):

- ``hop{k}``: from the sender's stamp (the Generation replica for stage 0, stage k-1's exit otherwise) to stage k's
  entry: Ray serialization, Serve routing (for k > 0 also the caller noticing stage k-1's result and resolving it),
  object transfer, the replica's scheduling of the call.
- ``stage{k}_unpack`` / ``stage{k}_queue`` / ``stage{k}_compute`` / ``stage{k}_pack``: turning the wire arrays
  into tensors, waiting for the stage's worker thread (an earlier micro-batch), the layers, packing the output.
- ``return``: the last stage's exit to the Generation replica holding the result.
- ``engine``: time the pipeline stood idle between a step's return and the next step's send (sampling with the LM
  head, publishing outputs, scheduling) — counted only while no other step was in flight, so it is what a lone
  stream waits for.

Timestamps of different processes are compared, so hops are exact on one host and include clock skew across
nodes (NTP: well under a millisecond on a LAN).

Streams (only with ``SEEDOSS_STREAM_TIMING=1`` in the replicas' environment, as bench/serving.py sets it): each
chunk carries ``timing`` — when the Generation replica got the request (``generation_start``) and yielded the chunk
(``generation``), and when the gateway created the stream (``gateway_start``) and received the chunk
(``gateway``); the client adds its own clock. Off, chunks are unchanged.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

STREAM_TIMING = os.environ.get("SEEDOSS_STREAM_TIMING", "") == "1"


def now() -> float:
    return time.time()  # wall clock: comparable between processes


class StageStamps(NamedTuple):
    entered: float
    unpacked: float
    started: float
    ended: float
    packed: float


class StepTimings:
    """Per-component sums over the steps a pipeline ran (seconds), plus the number of steps timed."""

    def __init__(self, num_stages: int):
        per_stage = [(f"hop{k}", f"stage{k}_unpack", f"stage{k}_queue", f"stage{k}_compute", f"stage{k}_pack")
                     for k in range(num_stages)]
        self.totals = dict.fromkeys(["engine", *(name for names in per_stage for name in names), "return"], 0.0)
        self.steps = 0
        self.engine_samples = 0
        self._in_flight = 0
        self._idle_since: float | None = None

    def sent(self) -> float:
        """A step is about to be sent; its send stamp."""
        t = now()
        if self._in_flight == 0 and self._idle_since is not None:
            self.totals["engine"] += t - self._idle_since
            self.engine_samples += 1
        self._in_flight += 1
        return t

    def returned(self, sent: float, stages: list[StageStamps] | None) -> None:
        """The step's result (or failure: `stages` None) is back in the caller."""
        t = now()
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle_since = t
        if not stages:
            return
        previous = sent
        for k, s in enumerate(stages):
            self.totals[f"hop{k}"] += s.entered - previous
            self.totals[f"stage{k}_unpack"] += s.unpacked - s.entered
            self.totals[f"stage{k}_queue"] += s.started - s.unpacked
            self.totals[f"stage{k}_compute"] += s.ended - s.started
            self.totals[f"stage{k}_pack"] += s.packed - s.ended
            previous = s.packed
        self.totals["return"] += t - previous
        self.steps += 1

    def as_dict(self) -> dict:
        return {"steps": self.steps, "engine_samples": self.engine_samples, "seconds": dict(self.totals)}
