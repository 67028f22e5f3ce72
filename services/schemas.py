"""What the task services share: the request base model and field types, request parsing into `ServiceError`s,
the injected forward, and the numeric helpers of postprocessing.

Requests are strict (`"3"` is not an int) and closed (an unknown field such as a misspelt ``topk`` is an error
naming it, not silently ignored); front ends drop their transport fields (``model``, ``user``) before parsing.

A *forward* is whatever runs token-id sequences through the backbone and the task head:
``forward(list[list[int]]) -> head output`` for the sequences packed in order, returning the output or an awaitable
of it (a Ray deployment passes an async function calling the remote stages; `local_forward` runs in-process).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError

from .errors import InvalidRequest, from_exception

Forward = Callable[[list[list[int]]], Any | Awaitable[Any]]

Text = Annotated[str, StringConstraints(min_length=1)]
# One text or a non-empty list of texts; a single text is accepted as a list of one.
Texts = Annotated[list[Text], Field(min_length=1), BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


class ServiceModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Usage(BaseModel):
    prompt_tokens: int  # tokens run through the backbone (every window counted)


M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def parse(model: type[M], request: M | dict) -> M:
    """`request` as a `model` instance; a dict is validated, its problems raised as `InvalidRequest`."""
    if isinstance(request, model):
        return request
    try:
        return model.model_validate(request)
    except ValidationError as exc:
        raise from_exception(exc) from None


# Text work on at most this many characters (or token ids) runs on the event loop: a hop to the executor thread
# and back costs ~130 us of CPU here, 3x what tokenizing a 65-character sentence does (~40 us); 2,048 characters
# take ~0.5-1 ms, a stall other requests on the loop do not notice.
INLINE_SIZE = 2048


async def off_loop(executor: Executor | None, fn: Callable[..., T], *args: Any, size: int) -> T:
    """`fn(*args)` in `executor`: tokenization and its post-processing (offsets, word alignment) are CPU work that
    would otherwise stall every other request on the replica's event loop (a head replica serves many concurrently).
    Inline when `executor` is None (in-process use and tests) or when `size`, the request's text length
    (`text_size`), is at most `INLINE_SIZE`: a short text costs less than the thread hop."""
    if executor is None or size <= INLINE_SIZE:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))


def text_size(*texts: str | list) -> int:
    """Characters of `texts` (strings, or lists of strings or of token-id lists: their items' lengths)."""
    return sum(len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts)


async def run_forward(forward: Forward, sequences: list[list[int]]) -> Any:
    result = forward(sequences)
    return await result if inspect.isawaitable(result) else result


def local_forward(stage, head) -> Forward:
    """An in-process forward: one full-depth `Stage` (no KV cache) and a head from `seedoss.loader`, run in a
    worker thread so the event loop stays free."""
    import torch  # here, not at the top: the request models must stay importable without torch

    from seedoss.heads import SequenceClassificationHead
    from seedoss.model import StepBatch

    def run(sequences: list[list[int]]):
        batch = StepBatch(list(range(len(sequences))), [len(s) for s in sequences], [0] * len(sequences))
        with torch.inference_mode():
            hidden = stage(torch.tensor([t for s in sequences for t in s]), batch)
            return head(hidden, sequences) if isinstance(head, SequenceClassificationHead) else head(hidden)

    async def forward(sequences: list[list[int]]):
        return await asyncio.to_thread(run, sequences)

    return forward


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before every text (``[<seed:bos>]`` for SeedOss); found once per tokenizer (two
    encodes, which every request paid before)."""
    return list(_special_prefix(tokenizer))


@functools.lru_cache(maxsize=16)
def _special_prefix(tokenizer) -> tuple[int, ...]:
    full, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    if full[len(full) - len(plain):] != plain:
        raise ValueError("the tokenizer adds special tokens after the text; the services expect a prefix only")
    return tuple(full[: len(full) - len(plain)])


def fit_context(prefix: list[int], content: list[int], max_length: int, truncate: bool, index: int) -> list[int]:
    """``prefix + content`` of ``inputs[index]``, cut to `max_length` tokens when `truncate` (keeping the prefix),
    else an `InvalidRequest` naming ``inputs``."""
    if len(prefix) + len(content) <= max_length:
        return prefix + content
    if not truncate:
        raise InvalidRequest(
            f"inputs.{index}: {len(prefix) + len(content)} tokens, more than the model's {max_length}; shorten the "
            "text or set truncate", param="inputs", code="context_length_exceeded")
    return prefix + content[: max_length - len(prefix)]


def window_ranges(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Token ranges covering `n` tokens the way `tokenizers` splits overflowing input: windows of `size` tokens
    starting every ``size - stride`` tokens (``0 <= stride < size``), the last one reaching the end."""
    ranges, begin = [], 0
    while begin + size < n:
        ranges.append((begin, begin + size))
        begin += size - stride
    return ranges + [(begin, n)]


def as_numpy(x) -> np.ndarray:
    """A head output (torch tensor of any dtype, numpy array or nested list) as float32 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
