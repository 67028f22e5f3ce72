"""Lane autoscaling: the Generation deployment scales on its engines' own load, and every stage deployment follows
the lane count, so each lane keeps a replica of each stage (see `deployments/routing.py`).

Both policies run in Serve's controller, one process, each control-loop tick. `LanePolicy` (Generation) sizes the
lane count from the load its replicas report through `Generation.record_autoscaling_stats`: sequences running or
waiting, against `target_sequences` per lane, and KV cache usage, against `target_kv_usage` per lane — whichever
asks for more lanes. It publishes the lane count Serve settled on (after its delays and bounds) in
`deployments/lane_count.py`; `FollowLanes` (each stage) returns it. Ray 2.60's application-level autoscaling policy would express this
in one function but is marked "not yet supported"; two deployment-level policies sharing the controller's memory
work today. After a controller restart `FollowLanes` holds its stage at its current size until the Generation
policy has run once again.
"""

from __future__ import annotations

import math

from . import lane_count

LOAD_SEQUENCES = "seedoss_lane_sequences"
LOAD_KV = "seedoss_lane_kv_usage"


class LanePolicy:
    def __init__(self, target_sequences: float, target_kv_usage: float):
        self.target_sequences, self.target_kv_usage = target_sequences, target_kv_usage

    def __call__(self, ctx) -> tuple[int, dict]:
        lane_count.TARGETS[ctx.app_name] = ctx.target_num_replicas
        metrics = ctx.aggregated_metrics or {}
        sequences = sum(metrics.get(LOAD_SEQUENCES, {}).values())
        kv = sum(metrics.get(LOAD_KV, {}).values())
        if not metrics:  # no lane has reported yet (starting up): stay
            return ctx.target_num_replicas, {}
        wanted = max(1, math.ceil(sequences / self.target_sequences), math.ceil(kv / self.target_kv_usage))
        return wanted, {}


class FollowLanes:
    def __call__(self, ctx) -> tuple[int, dict]:
        return lane_count.TARGETS.get(ctx.app_name, ctx.target_num_replicas), {}
