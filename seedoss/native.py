"""CPU kernels in C that torch has no op for, compiled on first use and called through ctypes.

`paged_decode_attention` (csrc/paged_attention.c) reads the paged KV cache in place for decode steps,
`paged_chunk_attention` (csrc/chunk_attention.c) for prompts and chunks of them over a cached context;
`rotary_store_kv` (csrc/fused_layer_ops.c) does a decoder layer's rotary + KV-cache write in one pass, `rms_norm`
(optionally after the residual add) and `silu_and_mul` the layer's other elementwise chains; all take
float32 or bfloat16 tensors (an entry point per type). Every csrc/*.c is built into one shared library with the
machine's C compiler (`$CC`, else `cc`; -O3 -march=native -fopenmp) in `$SEEDOSS_CACHE/kernels` (default
~/.cache/seedoss/kernels) under a name that hashes the sources and headers, the flags and the CPU (model name and
every /proc/cpuinfo flag: a `-march=native` build may use instructions another CPU lacks), so a build is reused by
every process on the machine and rebuilt when any of them changes. Loading a shared library
runs its code, so a cached one is loaded only when it is a regular file owned by this user and not writable by group
or others; otherwise a fresh build replaces it (and the log says so). A fresh build is loaded from its private
build directory before it is moved into the cache, so nothing can be swapped in between. Without a compiler, or
with SEEDOSS_NATIVE_KERNELS=0, callers fall back to their pure-torch path (same results within float rounding,
slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("SEEDOSS_CACHE") or Path.home() / ".cache" / "seedoss"
    return Path(root) / "kernels"


def cpu_identity(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its instruction-set flags (the first processor's: they describe the package)."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return platform.processor()
    wanted = {}
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features") and key not in wanted:  # Features: the flags on ARM
            wanted[key] = line.split(":", 1)[-1].strip()
    return "\n".join(f"{k}: {v}" for k, v in sorted(wanted.items())) or platform.processor()


def cache_key(compiler: str, cpu: str | None = None) -> str:
    parts = [*(src.read_bytes() for src in [*SOURCES, *HEADERS]), " ".join(FLAGS).encode(),
             (cpu or cpu_identity()).encode(), compiler.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def trusted(path: Path) -> bool:
    """Is `path` a regular file (not a symlink) owned by this user and writable by nobody else?"""
    st = path.lstat()
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _load(compiler: str) -> ctypes.CDLL:
    target = cache_dir() / f"kernels-{cache_key(compiler)}.so"
    if target.exists() or target.is_symlink():
        if trusted(target):
            return ctypes.CDLL(str(target))
        log.warning("not loading the cached kernel %s: not owned by this user, or writable by group/others; "
                    "building a fresh one in its place", target)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # 0700: only this user can touch the build
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), *map(str, SOURCES), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {', '.join(src.name for src in SOURCES)}: {result.stderr.strip()[-2000:]}")
        os.chmod(built, 0o755)  # whatever the umask: a group-writable build would never be trusted again
        lib = ctypes.CDLL(str(built))
        os.replace(built, target)  # atomic: concurrent builders each rename a complete file
    return lib


def library() -> ctypes.CDLL | None:
    """The kernel library, built on first call; None when native kernels are disabled or cannot be built."""
    global _lib, _tried
    if _tried:  # every layer asks on every step: no lock once decided
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SEEDOSS_NATIVE_KERNELS", "1") == "0":
            return None
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            log.warning("no C compiler found (set $CC): decode attention and fused layer ops use the slower "
                        "pure-torch path")
            return None
        try:
            lib = _load(compiler)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("native kernels unavailable, the pure-torch paths run: %s", e)
            return None
        ptr, i64, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for name, restype, argtypes in (
                ("paged_decode_attention", ctypes.c_int, [ptr] * 6 + [i64] * 5 + [ctypes.c_float, threads]),
                ("paged_chunk_attention", ctypes.c_int, [ptr] * 6 + [i64] * 5 + [ctypes.c_float, threads]),
                ("rotary_store_kv", None, [ptr] * 8 + [i64] * 4 + [threads]),
                ("rms_norm", None, [ptr] * 5 + [i64] * 2 + [ctypes.c_float, threads]),
                ("silu_and_mul", None, [ptr] * 2 + [i64] * 2 + [threads])):
            for typed in (name, name + "_bf16"):
                getattr(lib, typed).restype, getattr(lib, typed).argtypes = restype, argtypes
        _lib = lib
        return _lib


_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}


def _typed(name: str, *tensors: torch.Tensor):
    """The kernel `name` for these tensors' dtype, or None: not all contiguous CPU tensors of float32 or
    bfloat16, one dtype for all, or no native library."""
    dtype = tensors[0].dtype
    if dtype not in _SUFFIX or not all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
                                       for t in tensors):
        return None
    lib = library()
    return None if lib is None else getattr(lib, name + _SUFFIX[dtype])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                           lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of one query token per sequence over its cached context.

    q [B, heads, D]; k_cache/v_cache [num_slots, kv_heads, D] (one layer); slots [B, max_kv] int64 flat cache
    slots of each sequence's positions; lens [B] int64 context lengths (the query's own key included).
    Returns [B, heads, D], or None when this case is not covered here (not contiguous float32 or bfloat16 CPU
    tensors of one dtype, no native library): then the caller runs its torch path.
    """
    kernel = _typed("paged_decode_attention", q, k_cache, v_cache)
    if kernel is None or not (slots.dtype == lens.dtype == torch.int64 and slots.is_contiguous()
                              and lens.is_contiguous()):
        return None
    batch, heads, dim = q.shape
    out = torch.empty_like(q)
    failed = kernel(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), lens.data_ptr(), out.data_ptr(),
        batch, heads, k_cache.shape[1], dim, slots.shape[1], scale, torch.get_num_threads())
    if failed:
        raise MemoryError("paged_decode_attention: out of memory for the attention scores")
    return out


def paged_chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                          runs: torch.Tensor, scale: float, out: torch.Tensor) -> bool:
    """Attention of prompts and prompt chunks over their cached context and themselves (causal, lower right),
    written into `out`: the run of n tokens at packed rows [start, start + n) of sequence row `row`, with `ctx`
    tokens cached before it, has query i attend to keys 0 .. ctx + i at slots[row] (its own keys stored there).

    q, out [T, heads, D]; k_cache/v_cache [num_slots, kv_heads, D] (one layer); slots [B, max_kv] int64;
    runs [runs, 4] int64 rows of (start, n, ctx, row). False when not covered here (not contiguous float32 or
    bfloat16 CPU tensors of one dtype, D not a multiple of 16, no native library): then the caller runs its torch
    path."""
    kernel = _typed("paged_chunk_attention", q, k_cache, v_cache, out)
    if kernel is None or q.shape[-1] % 16 or not (slots.dtype == runs.dtype == torch.int64 and slots.is_contiguous()
                                                   and runs.is_contiguous()):
        return False
    heads, dim = q.shape[1], q.shape[2]
    failed = kernel(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), runs.data_ptr(), out.data_ptr(),
        runs.shape[0], heads, k_cache.shape[1], dim, slots.shape[1], scale, torch.get_num_threads())
    if failed:
        raise MemoryError("paged_chunk_attention: out of memory for its buffers")
    return True


def rotary_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, write: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """NeoX rotary of q and k plus the KV-cache write, in one pass: qkv [T, heads + 2 kv_heads, D] (the fused
    projection), cos/sin [T, D], k_cache/v_cache [num_slots, kv_heads, D] (one layer), write [T] int64 flat slots.
    Stores token t's rotated key and its value at slot write[t]; returns (rotated q [T, heads, D], rotated k
    [T, kv_heads, D]), or None when not covered here (then the caller runs its torch path)."""
    kernel = _typed("rotary_store_kv", qkv, cos, sin, k_cache, v_cache)
    if kernel is None or not (write.dtype == torch.int64 and write.is_contiguous()):
        return None
    tokens, dim, kv_heads = qkv.shape[0], qkv.shape[2], k_cache.shape[1]
    heads = qkv.shape[1] - 2 * kv_heads
    q, k = qkv.new_empty(tokens, heads, dim), qkv.new_empty(tokens, kv_heads, dim)
    kernel(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(), k_cache.data_ptr(),
           v_cache.data_ptr(), write.data_ptr(), tokens, heads, kv_heads, dim, torch.get_num_threads())
    return q, k


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`weight * rms_norm(x)` over the last dim; with `residual`, the residual add first: (x + residual, weight *
    rms_norm(x + residual)), one pass. None when not covered here (not contiguous float32 or bfloat16 CPU tensors of
    one dtype, a weight or residual of another shape, no native library): then the caller runs its torch path."""
    kernel = _typed("rms_norm", *((x, weight) if residual is None else (x, residual, weight)))
    if kernel is None or weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape):
        return None
    out, summed = torch.empty_like(x), None if residual is None else torch.empty_like(x)
    dim = x.shape[-1]
    kernel(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
           None if summed is None else summed.data_ptr(), out.data_ptr(), x.numel() // max(dim, 1), dim, eps,
           torch.get_num_threads())
    return out if summed is None else (summed, out)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """`silu(gate) * up` for gate_up [..., 2 * inter] (gate ; up) → [..., inter], one pass; None when not covered
    here (then the caller runs its torch path)."""
    kernel = _typed("silu_and_mul", gate_up)
    if kernel is None:
        return None
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    kernel(gate_up.data_ptr(), out.data_ptr(), out.numel() // max(inter, 1), inter, torch.get_num_threads())
    return out
