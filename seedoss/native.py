"""CPU kernels in C that torch has no op for, compiled on first use and called through ctypes.

`paged_decode_attention` (csrc/paged_attention.c) reads the paged KV cache in place for decode steps. The shared
library is built with the machine's C compiler (`$CC`, else `cc`; -O3 -march=native -fopenmp) into
`$SEEDOSS_CACHE/kernels` (default ~/.cache/seedoss/kernels) under a name that hashes the source, the flags and
the CPU, so a build is reused by every process on the machine and rebuilt when any of them changes. Without a
compiler, or with SEEDOSS_NATIVE_KERNELS=0, callers fall back to their pure-torch path (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("SEEDOSS_CACHE") or Path.home() / ".cache" / "seedoss"
    return Path(root) / "kernels"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), _cpu_model().encode(),
                                     compiler.encode()])).hexdigest()[:16]
    target = cache_dir() / f"paged_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders each rename a complete file
    return target


def library() -> ctypes.CDLL | None:
    """The kernel library, built on first call; None when native kernels are disabled or cannot be built."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SEEDOSS_NATIVE_KERNELS", "1") == "0":
            return None
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            log.warning("no C compiler found (set $CC): decode attention uses the slower pure-torch path")
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("native kernels unavailable, decode attention uses the pure-torch path: %s", e)
            return None
        fn = lib.paged_decode_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
        _lib = lib
        return _lib


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                           lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of one query token per sequence over its cached context.

    q [B, heads, D]; k_cache/v_cache [num_slots, kv_heads, D] (one layer); slots [B, max_kv] int64 flat cache
    slots of each sequence's positions; lens [B] int64 context lengths (the query's own key included).
    Returns [B, heads, D], or None when this case is not covered here (not a contiguous float32 CPU tensor,
    no native library): then the caller runs its torch path.
    """
    tensors = (q, k_cache, v_cache, slots, lens)
    if (q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype != torch.float32
            or slots.dtype != torch.int64 or lens.dtype != torch.int64
            or not all(t.is_contiguous() for t in tensors)):
        return None
    lib = library()
    if lib is None:
        return None
    batch, heads, dim = q.shape
    out = torch.empty_like(q)
    failed = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), lens.data_ptr(), out.data_ptr(),
        batch, heads, k_cache.shape[1], dim, slots.shape[1], scale, torch.get_num_threads())
    if failed:
        raise MemoryError("paged_decode_attention: out of memory for the attention scores")
    return out
