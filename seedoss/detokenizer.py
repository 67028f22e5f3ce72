"""Incremental detokenization and stop-string matching for streaming generation.

`IncrementalDetokenizer` turns output token ids into text deltas without ever emitting half a
UTF-8 character: byte-level BPE tokens can end in the middle of a multi-byte character (CJK,
emoji, accents), which decodes to U+FFFD until the remaining bytes arrive. It uses the
prefix/read-offset technique of vLLM and TGI: decode a small window made of a few
already-emitted tokens (the context, so tokenizers whose text depends on the previous token decode
the new ones the same way a full decode would) plus the pending tokens, and emit what the pending
tokens add to the context's text, except any trailing U+FFFD run, which is held until it resolves.

`StopStringMatcher` works on those text deltas: it holds back trailing text that may still grow
into a stop string, and truncates at the first stop string to complete.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # already-emitted tokens kept in the decode window (vLLM uses 5 too)


class Detokenizable(Protocol):
    all_special_ids: Sequence[int]

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Streams the text of a sequence's output tokens.

    ``add(token_id)`` returns the newly final text (possibly ""); ``flush()`` returns what is
    still held at the end (an incomplete character decodes to U+FFFD there, as in a full decode).
    Concatenating every delta and the flush gives ``tokenizer.decode(output_ids,
    skip_special_tokens=...)`` for byte-level BPE tokenizers. With ``skip_special_tokens``,
    special tokens produce no text and are left out of the decode window.
    """

    def __init__(self, tokenizer: Detokenizable, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self.output_token_ids: list[int] = []
        context = [t for t in prompt_token_ids if t not in self._skipped][-CONTEXT_TOKENS:]
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: the output's first bytes would complete it and
            # rewrite context text. Decode the output on its own instead, like a full decode.
            context, context_text = [], ""
        self._window: list[int] = context  # context tokens + pending tokens
        self._context_len = len(context)  # tokens
        self._context_chars = len(context_text)  # len(decode(window[:context_len]))
        self._emitted = 0  # chars of the pending tokens' text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add(self, token_id: int) -> str:
        """Record one output token; return the text that became final."""
        self.output_token_ids.append(token_id)
        if token_id in self._skipped:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)[self._context_chars :]
        stable = text.rstrip(REPLACEMENT_CHAR)
        delta = stable[self._emitted :]
        self._emitted = max(self._emitted, len(stable))
        if len(stable) == len(text) and len(text) > 0:
            # Clean boundary (no partial character pending): the pending tokens become context.
            context = self._window[-CONTEXT_TOKENS:]
            self._window = context
            self._context_len = len(context)
            self._context_chars = len(self._decode(context))
            self._emitted = 0
        return delta

    def flush(self) -> str:
        """Return everything still held back (end of generation)."""
        text = self._decode(self._window)[self._context_chars :]
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return delta


class StopStringMatcher:
    """Applies stop strings to a stream of text deltas.

    ``feed(delta)`` returns ``(emit_text, stopped, matched_stop)``. Text that could still be the
    beginning of a stop string is held back; when a stop string completes, the output is cut
    right before it (or right after it with ``include_stop_str_in_output``) and the matcher is
    done: later feeds return ``("", True, matched_stop)``. When several stop strings match, the
    one that completes first in the text wins (ties: the longer one, which starts earlier), so the
    result does not depend on how the text was split into deltas. ``flush()`` releases the held
    text at the end of a generation that did not stop on a string.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        if any(s == "" for s in stop):
            raise ValueError("stop cannot contain an empty string")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self.matched_stop: str | None = None
        self._held = ""
        self._max_held = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, delta: str) -> tuple[str, bool, str | None]:
        if self.stopped:
            return "", True, self.matched_stop
        text = self._held + delta
        match = None  # (end, -start, stop) of the first stop string to complete
        for s in self.stop:
            start = text.find(s)
            if start != -1:
                key = (start + len(s), -start, s)
                match = key if match is None or key < match else match
        if match is not None:
            end, neg_start, s = match
            self.stopped, self.matched_stop, self._held = True, s, ""
            return text[: end if self.include_stop_str_in_output else -neg_start], True, s
        keep = self._held_suffix(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False, None

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(self._max_held, len(text)), 0, -1):
            tail = text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        held, self._held = ("" if self.stopped else self._held), ""
        return held
