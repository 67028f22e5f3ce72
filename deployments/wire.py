"""Tensors between replicas as numpy arrays (zero-copy through Ray's object store; bfloat16, which numpy
lacks, travels as its raw 16-bit pattern).

A wire value is ``(array, dtype)``, or on the generation step path ``(array, dtype, stamps)`` where `stamps` are
the `StageStamps` of the stages the step went through so far (deployments/timing.py)."""

from __future__ import annotations

import numpy as np
import torch


def pack(t: torch.Tensor, *stamps) -> tuple:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return (t.view(torch.int16).numpy(), "bfloat16", *stamps)
    return (t.numpy(), str(t.dtype).removeprefix("torch."), *stamps)


def unpack(wire: tuple) -> torch.Tensor:
    array, dtype = wire[0], wire[1]
    t = torch.from_numpy(np.array(array))  # arrays from the object store are read-only: own a copy
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def stamps(wire: tuple) -> tuple:
    """The stage stamps a step's wire value carries (empty for the first stage's input)."""
    return wire[2] if len(wire) > 2 else ()
