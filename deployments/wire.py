"""Tensors between replicas as numpy arrays (zero-copy through Ray's object store; bfloat16, which numpy
lacks, travels as its raw 16-bit pattern)."""

from __future__ import annotations

import numpy as np
import torch


def pack(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def unpack(wire: tuple[np.ndarray, str]) -> torch.Tensor:
    array, dtype = wire
    t = torch.from_numpy(np.array(array))  # arrays from the object store are read-only: own a copy
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
