"""Seed-OSS reasoning split: thinking (`<seed:think>...</seed:think>`) apart from the answer.

Semantics follow vLLM's `seed_oss` reasoning parser (DeepSeek-R1 style): the output is reasoning until
`</seed:think>` and the answer after it; the opening tag may be missing (the chat template can open the block, as
Seed-OSS's does for `thinking_budget: 0`), so an output with no closing tag is all reasoning. Budget notes
(`<seed:cot_budget_reflect>...</seed:cot_budget_reflect>`) are part of the thinking and stay in the reasoning.

One state machine serves both forms, so a streamed response always adds up to the non-streamed one: `split` is a
single `feed(text, final=True)`. A tag cut across deltas is held back until it is complete or ruled out.
Text before the opening tag stays reasoning (as in vLLM 0.32; earlier vLLM dropped it when not streaming).
Deliberate difference from vLLM: a second `</seed:think>` in the answer stays text (vLLM drops it). Checked against
vLLM's parser by tests/vllm/test_parsers_match_vllm.py.
"""

from __future__ import annotations

THINK_START = "<seed:think>"
THINK_END = "</seed:think>"


def partial_tag_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (to hold back)."""
    longest = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest


class ReasoningStream:
    """Splits streamed text into (reasoning, content) deltas. `in_reasoning=False` starts in the answer (a request
    whose output is constrained from its first token has no thinking)."""

    def __init__(self, in_reasoning: bool = True):
        self.in_reasoning = in_reasoning
        self._seen_start = False
        self._pending = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of text; `final` flushes what was held back."""
        if not self.in_reasoning:
            return "", delta
        pending, reasoning = self._pending + delta, ""
        while True:
            start = -1 if self._seen_start else pending.find(THINK_START)
            end = pending.find(THINK_END)
            if start != -1 and (end == -1 or start < end):
                reasoning += pending[:start]
                pending = pending[start + len(THINK_START):]
                self._seen_start = True
                continue
            if end != -1:
                self.in_reasoning, self._pending = False, ""
                return reasoning + pending[:end], pending[end + len(THINK_END):]
            break
        tags = (THINK_END,) if self._seen_start else (THINK_START, THINK_END)
        hold = 0 if final else partial_tag_suffix(pending, tags)
        self._pending = pending[len(pending) - hold:]
        return reasoning + pending[:len(pending) - hold], ""


def split(text: str, in_reasoning: bool = True) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; an empty part is None (as vLLM reports it)."""
    reasoning, content = ReasoningStream(in_reasoning).feed(text, final=True)
    return reasoning or None, content or None


class ChoiceSplitter:
    """The reasoning split of every choice of one native stream: `apply(chunk)` moves each choice's thinking from
    `text` to `reasoning` (the gRPC chat path; the OpenAI mapper does the same per choice)."""

    def __init__(self, in_reasoning: bool = True):
        self.in_reasoning = in_reasoning
        self._streams: dict[int, ReasoningStream] = {}

    def apply(self, chunk: dict) -> dict:
        choices = []
        for c in chunk["choices"]:
            stream = self._streams.setdefault(c["index"], ReasoningStream(self.in_reasoning))
            reasoning, content = stream.feed(c["text"], final=c.get("finish_reason") is not None)
            choices.append({**c, "text": content, "reasoning": reasoning})
        return {**chunk, "choices": choices}
