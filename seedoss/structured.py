"""Structured outputs: a grammar per sequence that masks the logits at every step (constrained decoding).

The grammar library is llguidance (Microsoft's Rust engine behind vLLM's `guidance` backend). Chosen over xgrammar
for this CPU-first server: its wheel is self-contained (xgrammar's pulls triton and a TVM runtime), it computes one
token mask on the CPU in about a millisecond for the first step and tens of microseconds after, from the Earley
parser state without any pre-compiled per-vocabulary tables, and it reads JSON schema, regex, Lark and GBNF
directly. It is imported only when a request is constrained.

`StructuredOutputs` is vLLM's `structured_outputs` request object (exactly one of `json`, `regex`, `choice`,
`grammar`, `json_object`); it travels inside `SamplingParams`. `compile_grammar` turns it into an llguidance
grammar, `check` validates it against a tokenizer (the gateway answers 400 before generating), and
`GrammarConstraint` is the per-sequence state the sampler asks for a mask and the engine feeds accepted tokens.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

_KINDS = ("json_schema", "regex", "choice", "grammar", "json_object")


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (the successor of its removed `guided_*` fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF (`::=` rules)
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object "
                             f"(got {[k.replace('json_schema', 'json') for k in given] or 'none'})")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if isinstance(self.json_schema, str):
            try:
                json.loads(self.json_schema)
            except ValueError:
                raise ValueError("structured_outputs.json is not a valid JSON schema text") from None
        return self


def compile_grammar(spec: StructuredOutputs) -> str:
    """The llguidance grammar for `spec` (not yet checked: see `check`)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if spec.json_schema is not None or spec.json_object:
        # compact JSON: with free whitespace a weak model can pad forever between tokens (vLLM's
        # `disable_any_whitespace`); the text is the same JSON either way
        schema = spec.json_schema if spec.json_schema is not None else {"type": "object"}
        return LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    if spec.regex is not None:
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in spec.choice))
    return LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))  # Lark as is; GBNF (`::=`) converted


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer_json: str, eos_token_id: int):
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer_json, eos_token=eos_token_id)


def ll_tokenizer(tokenizer):
    """llguidance's view of a `SeedOssTokenizer` (built once per tokenizer: about 0.1 s for 4K tokens, seconds
    for 155K)."""
    cached = getattr(tokenizer, "_llguidance", None)
    if cached is None:
        cached = _ll_tokenizer(tokenizer._tokenizer.to_str(), tokenizer.eos_token_id)
        tokenizer._llguidance = cached
    return cached


@lru_cache(maxsize=1)
def _executor():
    """llguidance's thread pool for batched masks (one per process; as many threads as torch uses)."""
    from llguidance import LLExecutor

    return LLExecutor(num_threads=max(1, torch.get_num_threads()))


def check(spec: StructuredOutputs, tokenizer) -> str | None:
    """None when `spec` compiles for `tokenizer`, else llguidance's error (for a 400)."""
    try:
        grammar = compile_grammar(spec)
    except (ValueError, TypeError) as e:
        return str(e)
    ok, error = _validate(grammar, tokenizer)
    return None if ok else error


def _validate(grammar: str, tokenizer) -> tuple[bool, str]:
    from llguidance import LLMatcher

    matcher = LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
    return (not matcher.is_error(), matcher.get_error())


class GrammarConstraint:
    """One sequence's grammar state. `allowed(vocab_size)` is the mask for the next token; `accept` advances it.
    A matcher in error (a token the mask did not allow, e.g. after a replay) allows only eos, which ends the
    sequence instead of sampling from an empty distribution."""

    def __init__(self, spec: StructuredOutputs, tokenizer):
        from llguidance import LLMatcher

        self.eos_token_id = tokenizer.eos_token_id
        ll = ll_tokenizer(tokenizer)
        self._matcher_vocab = ll.vocab_size
        self._matcher = LLMatcher(ll, compile_grammar(spec), log_level=0)

    def accept(self, token_id: int) -> None:
        if not self._matcher.is_error():
            self._matcher.consume_token(token_id)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar accepts next."""
        return self.allowed_batch([self], vocab_size)[0]

    @staticmethod
    def allowed_batch(constraints: list[GrammarConstraint], vocab_size: int) -> list[torch.Tensor]:
        """The masks of many sequences in one call: llguidance computes them on its own threads (GIL released)
        into one buffer, unpacked once. A sequence whose grammar allows nothing (an error) gets eos only."""
        words = (constraints[0]._matcher_vocab + 31) // 32
        buffer = np.zeros((len(constraints), words), dtype=np.int32)
        live = [(c._matcher, k) for k, c in enumerate(constraints) if not c._matcher.is_error()]
        if live:
            _executor().unsafe_compute_mask_ptr(live, buffer.ctypes.data, words * 4, len(constraints))
        bits = np.unpackbits(buffer.view(np.uint8), axis=1, bitorder="little")
        if bits.shape[1] < vocab_size:  # a tokenizer smaller than the model's vocabulary
            bits = np.pad(bits, ((0, 0), (0, vocab_size - bits.shape[1])))
        masks = torch.from_numpy(bits[:, :vocab_size].view(np.bool_))
        for k, c in enumerate(constraints):
            if not masks[k].any():
                masks[k, c.eos_token_id] = True
        return list(masks)


class ThinkingBudget:
    """A hard cap on thinking (`thinking_token_budget`): once a sequence has written `budget` tokens without
    closing its thinking, the only allowed token is `</seed:think>`, so the answer starts. The soft budget
    (`chat_template_kwargs.thinking_budget`) only asks the model, through the template; this one enforces."""

    def __init__(self, budget: int, think_end_id: int):
        self.budget, self.think_end_id = budget, think_end_id
        self._thinking_tokens, self._ended = 0, False

    def accept(self, token_id: int) -> None:
        if token_id == self.think_end_id:
            self._ended = True
        elif not self._ended:
            self._thinking_tokens += 1

    @staticmethod
    def allowed_batch(constraints: list[ThinkingBudget], vocab_size: int) -> list[torch.Tensor | None]:
        return [c.allowed(vocab_size) for c in constraints]

    def allowed(self, vocab_size: int) -> torch.Tensor | None:
        if self._ended or self._thinking_tokens < self.budget:
            return None  # no restriction this step
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.think_end_id] = True
        return mask


THINK_END = "</seed:think>"


def constraint_for(params, tokenizer) -> GrammarConstraint | ThinkingBudget | None:
    """The constraint a sequence with these `SamplingParams` needs (None when unconstrained). A grammar wins over a
    thinking budget: a constrained output is an answer from its first token."""
    spec = getattr(params, "structured_outputs", None)
    if spec is not None:
        return GrammarConstraint(spec, tokenizer)
    budget = getattr(params, "thinking_token_budget", None)
    if budget is not None:
        ids = tokenizer.encode(THINK_END, add_special_tokens=False)
        if len(ids) == 1:  # a tokenizer without the tag token has no thinking to cap
            return ThinkingBudget(budget, ids[0])
    return None
