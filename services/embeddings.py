"""Embeddings from the bare backbone (transformers' `SeedOssModel`), with the contracts of OpenAI's
``POST /v1/embeddings`` and vLLM's ``/pooling``.

- The backbone's last hidden state (after the final norm, as `SeedOssModel` returns it) is pooled per input:
  ``last`` (the right-most token; inputs are never padded here, so it is the last one — the decoder default, and
  vLLM's for ``--convert embed``), ``mean`` over the input's tokens, or ``cls`` (position 0, ``<seed:bos>``).
- Then optionally L2-normalised (``normalize``, default from the checkpoint, else true like vLLM), and cut to
  ``dimensions`` (Matryoshka-style, OpenAI's field: the first `dimensions` values, normalised again when
  ``normalize`` is on, as OpenAI's shortened embeddings are).
- The checkpoint says which pooling it wants when a sentence-transformers layout sits beside it: ``modules.json``
  naming a ``Pooling`` module whose ``config.json`` sets ``pooling_mode_{lasttoken,mean_tokens,cls_token}``, and a
  ``Normalize`` module (see `PoolingConfig.from_checkpoint`).
- Texts get the tokenizer's special tokens (``<seed:bos>``); token-id inputs are used as given. An input longer than
  the model's context is an error naming ``input`` unless ``truncate`` keeps its first tokens (like classify).
- ``encoding_format: base64`` packs each vector as little-endian float32 bytes, base64-encoded (OpenAI's format).
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import Executor
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, Field

from .errors import InvalidRequest
from .limits import Limits
from .schemas import (
    Forward, ServiceModel, Usage, as_numpy, fit_context, off_loop, parse, run_forward, special_prefix, text_size,
)

Pooling = Literal["last", "mean", "cls"]


def _inputs(value):
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of such lists → a non-empty
    list of non-empty texts, or of non-empty token-id lists (not both)."""
    def is_id(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(value, str) or (isinstance(value, list) and value and all(is_id(v) for v in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("give a text, a list of texts, a list of token ids or a list of such lists")
    texts = all(isinstance(v, str) for v in value)
    if not texts and not all(isinstance(v, list) for v in value):
        raise ValueError("give all texts or all token-id lists, not both")
    for i, v in enumerate(value):
        if not v:
            raise ValueError(f"input {i} is empty")
        if not texts and not all(is_id(t) and t >= 0 for t in v):
            raise ValueError(f"input {i}: token ids must be integers >= 0")
    return value


def _input_schema(schema: dict) -> None:
    """`input` in the OpenAPI document (clients, schema-driven fuzzing): the forms `_inputs` accepts."""
    schema.pop("type", None)
    schema.pop("items", None)
    texts = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    schema["anyOf"] = [{"type": "string", "minLength": 1}, texts, ids, {"type": "array", "minItems": 1, "items": ids}]


class PoolingConfig(BaseModel):
    pooling: Pooling = "last"
    normalize: bool = True

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> "PoolingConfig":
        """The sentence-transformers pooling beside the checkpoint (``modules.json`` → ``<Pooling dir>/config.json``,
        a ``Normalize`` module), else the decoder default: last token, normalised."""
        modules_file = Path(checkpoint) / "modules.json"
        if not modules_file.exists():
            return cls()
        modules = json.loads(modules_file.read_text())
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        config = cls(normalize="Normalize" in kinds)
        if "Pooling" in kinds:
            settings = json.loads((Path(checkpoint) / kinds["Pooling"].get("path", "") / "config.json").read_text())
            modes = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
                     "pooling_mode_cls_token": "cls"}
            chosen = [mode for key, mode in modes.items() if settings.get(key)]
            if len(chosen) != 1:
                raise ValueError(f"{modules_file.parent}: the Pooling module must set exactly one of {sorted(modes)} "
                                 f"(supported here), got {chosen or 'none'}")
            config.pooling = chosen[0]
        return config


class EmbeddingRequest(ServiceModel):
    input: Annotated[list, BeforeValidator(_inputs)] = Field(json_schema_extra=lambda schema: _input_schema(schema))
    # "none": no pooling, every token's hidden state (vLLM's `/pooling`)
    pooling: Literal["last", "mean", "cls", "none"] | None = Field(None, description="default: the checkpoint's")
    normalize: bool | None = Field(None, description="L2-normalise; default: the checkpoint's")
    dimensions: int | None = Field(None, ge=1, description="keep the first N values (Matryoshka)")
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = False


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[list[float]] | str  # per token with pooling none; str: base64 of float32 LE


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    usage: Usage


def pool(hidden: np.ndarray, lengths: list[int], pooling: Pooling) -> np.ndarray:
    """[sum(lengths), hidden] packed per-token states → [len(lengths), hidden] one vector per input."""
    out, start = [], 0
    for n in lengths:
        rows = hidden[start: start + n]
        out.append(rows[-1] if pooling == "last" else rows[0] if pooling == "cls" else rows.mean(axis=0))
        start += n
    return np.stack(out)


def finish(vectors: np.ndarray, normalize: bool, dimensions: int | None) -> np.ndarray:
    if dimensions is not None:
        if dimensions > vectors.shape[1]:
            raise InvalidRequest(f"dimensions: {dimensions} is more than the model's {vectors.shape[1]}",
                                 param="dimensions")
        vectors = vectors[:, :dimensions]
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class EmbeddingService:
    """`forward(sequences)` returns the backbone's final hidden states, packed [sum(len), hidden]."""

    def __init__(self, tokenizer, forward: Forward, *, max_length: int, vocab_size: int,
                 pooling: PoolingConfig | None = None, limits: Limits | None = None, executor: Executor | None = None):
        self.tokenizer, self.forward = tokenizer, forward
        self.executor = executor  # where tokenization runs (`off_loop`)
        self.max_length, self.vocab_size = max_length, vocab_size
        self.pooling = pooling or PoolingConfig()
        self.limits = limits or Limits()

    def sequences(self, request: EmbeddingRequest) -> list[list[int]]:
        """Token ids per input, within the limits the other heads have (inputs, characters, backbone tokens)."""
        if isinstance(request.input[0], str):
            self.limits.check_texts("input", request.input)
            prefix = special_prefix(self.tokenizer)
            contents = self.tokenizer.encode_batch(request.input, add_special_tokens=False)
        else:
            prefix, contents = [], request.input
            self.limits.check_texts("input", [""] * len(contents))  # the count only: no characters here
            for i, ids in enumerate(contents):
                bad = [t for t in ids if t >= self.vocab_size]
                if bad:
                    raise InvalidRequest(f"input.{i}: token ids {bad[:5]} are outside the vocabulary "
                                         f"[0, {self.vocab_size})", param="input")
        sequences = [self._fit(prefix, ids, request.truncate, i) for i, ids in enumerate(contents)]
        self.limits.check_task_tokens("input", sum(map(len, sequences)))
        return sequences

    def _fit(self, prefix, ids, truncate, index):
        try:
            return fit_context(prefix, list(ids), self.max_length, truncate, index)
        except InvalidRequest as e:  # classify names its field `inputs`; OpenAI's is `input`
            raise InvalidRequest(e.message.replace("inputs.", "input.", 1), param="input", code=e.code) from None

    async def hidden_states(self, sequences: list[list[int]]) -> np.ndarray:
        return as_numpy(await run_forward(self.forward, sequences))

    async def embed(self, request: EmbeddingRequest | dict) -> EmbeddingResponse:
        request = parse(EmbeddingRequest, request)
        sequences = await off_loop(self.executor, self.sequences, request, size=text_size(request.input))
        hidden = await self.hidden_states(sequences)
        lengths = [len(s) for s in sequences]
        normalize = self.pooling.normalize if request.normalize is None else request.normalize
        if request.pooling == "none":  # per token, as they are (vLLM's /pooling): normalised only when asked
            starts = np.cumsum([0] + lengths)
            outputs = [finish(hidden[a:b], bool(request.normalize), request.dimensions)
                       for a, b in zip(starts[:-1], starts[1:])]
        else:
            outputs = finish(pool(hidden, lengths, request.pooling or self.pooling.pooling), normalize,
                             request.dimensions)
        return EmbeddingResponse(
            data=[Embedding(index=i, embedding=encode(v, request.encoding_format)) for i, v in enumerate(outputs)],
            usage=Usage(prompt_tokens=sum(lengths)))
