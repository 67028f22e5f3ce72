"""Sampling parameters and the batched sampler of the generation engine.

Semantics follow vLLM (V1 sampler), step by step for every row of a batch:

1. returned logprobs come from the RAW logits: ``log_softmax(logits)`` before any processing;
2. ``min_tokens``: eos and ``stop_token_ids`` are masked while the sequence has fewer than
   ``min_tokens`` output tokens;
3. penalties: repetition over prompt + output tokens (``logit > 0 ? logit / p : logit * p``),
   then frequency (``- f * count``) and presence (``- p * [count > 0]``) over output tokens;
4. ``temperature < 1e-5`` means greedy: argmax of the penalised logits;
5. otherwise ``logits / temperature``, then min_p, top_k, top_p filtering, then a draw.

Structured outputs (seedoss/structured.py): a row whose ``SamplingState`` carries a grammar constraint has every
token its grammar rejects set to -inf before step 2 (vLLM applies the grammar bitmask to the logits first too), so
greedy, penalties and filters all choose among allowed tokens; unconstrained rows in the same batch are untouched.

The draw is an exponential race, ``argmax(probs / q)`` with ``q ~ Exp(1)`` per token, which
samples exactly from ``probs``. A request with a ``seed`` draws its ``q`` from its own
``torch.Generator`` (one per sequence, in :class:`SamplingState`), one vector of ``V`` numbers
per step, so its tokens depend only on its seed, its own logits and its step count, never on
which other requests share the batch or where its row sits. Every processing step above is
row-local (row-wise elementwise ops, softmax, sort, cumsum) for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .structured import StructuredOutputs

SAMPLING_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below this are greedy
MAX_LOGPROBS = 20  # vLLM's default max_logprobs / OpenAI's top_logprobs limit
_SEED_MASK = (1 << 64) - 1
_FORK_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads fork indices over the seed space


class SamplingParams(BaseModel):
    """vLLM's sampling parameters (same names, defaults and ranges), immutable.

    ``top_k`` of -1 is accepted and normalised to 0 (disabled). ``stop`` accepts a single
    string. ``max_tokens=None`` means "up to the model's context length" (engine's business),
    as do ``n`` (forking) and ``ignore_eos`` (stop logic; the min_tokens mask still covers eos).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    max_tokens: int | None = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None
    thinking_token_budget: int | None = Field(None, ge=0)  # hard cap on thinking tokens (structured.ThinkingBudget)

    @field_validator("top_k")
    @classmethod
    def _normalise_top_k(cls, v: int) -> int:
        return 0 if v == -1 else v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop cannot contain an empty string")
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids_as_list(cls, v):
        return [] if v is None else v

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_le_max(cls, v: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")  # declared before min_tokens, so already here
        if max_tokens is not None and v > max_tokens:
            raise ValueError(f"min_tokens ({v}) must be less than or equal to max_tokens ({max_tokens})")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SamplingState:
    """Per-sequence sampling state, created once per sequence by the engine.

    The engine must call :meth:`append` with every token it accepts (the sampler does not):
    penalties and ``min_tokens`` read ``output_token_ids``. ``fork_index`` (the sequence's index
    among the ``n`` forks of one request) is mixed into the seed so seeded forks differ; fork 0
    uses ``seed`` unchanged.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        eos_token_id: int | Sequence[int] | None,
        vocab_size: int,
        fork_index: int = 0,
        constraint=None,
    ) -> None:
        self.params = params
        self.constraint = constraint  # structured.GrammarConstraint / ThinkingBudget, fed every accepted token
        self.eos_token_id = eos_token_id  # one id, or all of a model's eos ids
        self.vocab_size = vocab_size
        self.fork_index = fork_index
        self.output_token_ids: list[int] = []
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        masked = set(params.stop_token_ids) | set(eos)
        self.min_tokens_masked_ids = sorted(t for t in masked if 0 <= t < vocab_size)
        self.seed = None if params.seed is None else (params.seed + fork_index * _FORK_MIX) & _SEED_MASK
        self._generator: torch.Generator | None = None
        self._skipped_draws = 0  # seeded draws already made by another engine (a resumed sequence)
        # Penalty inputs, only kept when a penalty is active: the distinct prompt ids, and the
        # output ids in a growable buffer (so a step slices it instead of copying a list).
        self._prompt_ids = None
        self._out_buf = None
        if params.repetition_penalty != 1.0:
            ids = sorted({t for t in prompt_token_ids if 0 <= t < vocab_size})
            self._prompt_ids = torch.tensor(ids, dtype=torch.long)
        if params.has_penalties:
            self._out_buf = torch.empty(64, dtype=torch.long)

    def append(self, token_id: int) -> None:
        """Record an accepted output token."""
        n = len(self.output_token_ids)
        self.output_token_ids.append(token_id)
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if self._out_buf is not None:
            if n == self._out_buf.numel():
                self._out_buf = torch.cat([self._out_buf, torch.empty_like(self._out_buf)])
            self._out_buf[n] = token_id

    def skip_draws(self, steps: int) -> None:
        """Continue a seeded sequence after `steps` tokens sampled elsewhere: its generator starts past the draws
        those steps made (one vector of vocabulary size each, see `Sampler._race`)."""
        self._skipped_draws = steps

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This sequence's own generator (None when unseeded), created on first use on `device`."""
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            for _ in range(self._skipped_draws):
                torch.empty(self.vocab_size, device=device).exponential_(generator=self._generator)
        elif self._generator.device != torch.device(device):
            raise ValueError(f"seeded sequence moved from {self._generator.device} to {device}")
        return self._generator

    @property
    def needs_min_tokens_mask(self) -> bool:
        return len(self.output_token_ids) < self.params.min_tokens and bool(self.min_tokens_masked_ids)

    def _output_ids_tensor(self) -> torch.Tensor:
        return self._out_buf[: len(self.output_token_ids)]


@dataclass
class SamplingOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # raw log_softmax of the sampled token; None where params.logprobs is None
    top_logprobs: list[list[tuple[int, float]] | None]  # None where params.logprobs is None


class Sampler:
    """Samples one token per row from a batch of logits.

    ``generator`` is shared by all unseeded rows (None: torch's global RNG). Seeded rows use
    their own :meth:`SamplingState.generator`.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, requests: list[SamplingState]) -> SamplingOutput:
        logits = self._check(logits, requests)
        # raw (unprocessed) log-probabilities, computed only when a request asked for them
        wanted = any(r.params.logprobs is not None for r in requests)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wanted else None
        logits, greedy, random, probs = self._process(logits, requests)
        token_ids = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if greedy is not None:
            token_ids[greedy] = logits[greedy].argmax(dim=-1)
        if random is not None:
            token_ids[random] = self._race(probs, [requests[i] for i in random.tolist()])
        return self._output(token_ids, raw_logprobs, requests)

    def probs(self, logits: torch.Tensor, requests: list[SamplingState]) -> torch.Tensor:
        """The distribution each row is sampled from, [B, V] float32 (one-hot for greedy rows).

        The same processing as ``__call__``, without the draw; for tests and diagnostics.
        """
        logits, greedy, random, probs = self._process(self._check(logits, requests), requests)
        out = torch.zeros_like(logits)
        if greedy is not None:
            out[greedy] = torch.nn.functional.one_hot(logits[greedy].argmax(dim=-1), logits.shape[1]).float()
        if random is not None:
            out[random] = probs
        return out

    def _process(self, logits: torch.Tensor, requests: list[SamplingState]):
        """Constrain and penalise all rows; returns (logits, greedy rows, random rows, random rows' probs)."""
        logits = self.apply_penalties(self.apply_constraints(logits, requests), requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        random = [i for i, r in enumerate(requests) if not r.params.greedy]
        g = _index(greedy, logits.device) if greedy else None
        r = _index(random, logits.device) if random else None
        probs = self.filtered_probs(logits[r], [requests[i] for i in random]) if random else None
        return logits, g, r, probs

    @staticmethod
    def _check(logits: torch.Tensor, requests: list[SamplingState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
        for r in requests:
            if r.vocab_size != logits.shape[1]:
                raise ValueError(f"vocab_size {r.vocab_size} != logits width {logits.shape[1]}")
        return logits.to(torch.float32, copy=True)  # a private float32 copy: edited in place below

    @staticmethod
    def apply_constraints(logits: torch.Tensor, requests: list[SamplingState]) -> torch.Tensor:
        """-inf on every token a constrained row's grammar (or spent thinking budget) rejects, in place, one
        masked_fill for all such rows; a constraint with nothing to restrict this step answers None."""
        groups: dict[type, list[int]] = {}  # constraints of one kind compute their masks together
        for i, r in enumerate(requests):
            if r.constraint is not None:
                groups.setdefault(type(r.constraint), []).append(i)
        rows, masks = [], []
        for kind, members in groups.items():
            for i, mask in zip(members, kind.allowed_batch([requests[i].constraint for i in members], logits.shape[1])):
                if mask is not None:
                    rows.append(i)
                    masks.append(mask)
        if rows:
            allowed = torch.stack(masks).to(logits.device)
            idx = _index(rows, logits.device)
            logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        return logits

    @staticmethod
    def apply_penalties(logits: torch.Tensor, requests: list[SamplingState]) -> torch.Tensor:
        """min_tokens mask, then repetition / frequency / presence penalties (in place)."""
        device, V = logits.device, logits.shape[1]
        rows, cols = [], []
        for i, r in enumerate(requests):
            if r.needs_min_tokens_mask:
                rows += [i] * len(r.min_tokens_masked_ids)
                cols += r.min_tokens_masked_ids
        if rows:
            logits[_index(rows, device), _index(cols, device)] = float("-inf")

        pen = [i for i, r in enumerate(requests) if r.params.has_penalties]
        if not pen:
            return logits
        states = [requests[i] for i in pen]
        idx = _index(pen, device)
        sub = logits[idx]
        counts = _bin_counts([s._output_ids_tensor() for s in states], V, device)
        rep = torch.tensor([s.params.repetition_penalty for s in states], device=device).unsqueeze(1)
        if (rep != 1.0).any():
            empty = torch.empty(0, dtype=torch.long)
            prompt = [s._prompt_ids if s._prompt_ids is not None else empty for s in states]
            seen = (_bin_counts(prompt, V, device) > 0) | (counts > 0)
            penalised = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen, penalised, sub)
        freq = torch.tensor([s.params.frequency_penalty for s in states], device=device).unsqueeze(1)
        pres = torch.tensor([s.params.presence_penalty for s in states], device=device).unsqueeze(1)
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits[idx] = sub
        return logits

    @staticmethod
    def filtered_probs(logits: torch.Tensor, requests: list[SamplingState]) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p; returns probabilities. Rows are non-greedy."""
        device, V = logits.device, logits.shape[1]
        temp = torch.tensor([r.params.temperature for r in requests], device=device).unsqueeze(1)
        logits = logits / temp

        rows = [i for i, r in enumerate(requests) if r.params.min_p > 0.0]
        if rows:  # drop tokens whose probability is below min_p * (max probability)
            idx = _index(rows, device)
            sub = logits[idx]
            probs = sub.softmax(dim=-1)
            min_p = torch.tensor([requests[i].params.min_p for i in rows], device=device).unsqueeze(1)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p
            logits[idx] = sub.masked_fill(probs < threshold, float("-inf"))

        rows = [i for i, r in enumerate(requests) if 0 < r.params.top_k < V or r.params.top_p < 1.0]
        if rows:
            idx = _index(rows, device)
            k = [requests[i].params.top_k for i in rows]
            k = torch.tensor([kk if 0 < kk < V else V for kk in k], device=device)
            p = torch.tensor([requests[i].params.top_p for i in rows], device=device)
            logits[idx] = _top_k_top_p(logits[idx], k, p)
        return logits.softmax(dim=-1)

    def _race(self, probs: torch.Tensor, requests: list[SamplingState]) -> torch.Tensor:
        """Exponential race: argmax(probs / q), q ~ Exp(1) i.i.d., is a draw from `probs`."""
        q = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.seed is None]
        if unseeded:
            noise = torch.empty((len(unseeded), probs.shape[1]), device=probs.device)
            q[_index(unseeded, probs.device)] = noise.exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.seed is not None:
                q[i].exponential_(generator=r.generator(probs.device))
        # q == 0 would turn a filtered token (p == 0) into 0/0 = NaN, which argmax prefers.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _output(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, requests) -> SamplingOutput:
        if raw_logprobs is None:
            n = len(requests)
            return SamplingOutput(token_ids=token_ids.tolist(), logprobs=[None] * n, top_logprobs=[None] * n)
        sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
        k_max = max((r.params.logprobs or 0) for r in requests)
        top_vals = top_ids = None
        if k_max > 0:
            vals, ids = raw_logprobs.topk(min(k_max, raw_logprobs.shape[1]), dim=-1)
            top_vals, top_ids = vals.tolist(), ids.tolist()
        top: list[list[tuple[int, float]] | None] = []
        for i, r in enumerate(requests):
            k = r.params.logprobs
            if k is None:
                top.append(None)
                sampled[i] = None
            else:
                top.append(list(zip(top_ids[i][:k], top_vals[i][:k])) if k > 0 else [])
        return SamplingOutput(token_ids=token_ids.tolist(), logprobs=sampled, top_logprobs=top)


def _index(rows: list[int], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _bin_counts(seqs: list[torch.Tensor], vocab_size: int, device) -> torch.Tensor:
    """[len(seqs), V] float32 occurrence counts of the token ids in each 1-D tensor."""
    counts = torch.zeros((len(seqs), vocab_size + 1), device=device)
    if max(s.numel() for s in seqs) > 0:
        # pad with an extra column V, dropped afterwards
        padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=vocab_size)
        padded = padded.to(device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """vLLM's apply_top_k_top_p: sort ascending, mask below the k-th largest value (ties kept),
    then mask the low tail whose cumulative probability is <= 1 - p (the top token always stays),
    i.e. keep the smallest set of most likely tokens whose mass reaches p."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    kth = logits_sort.gather(1, (logits.shape[1] - k).unsqueeze(1))
    logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    tail = cum <= (1 - p).unsqueeze(1)
    tail[:, -1] = False
    logits_sort.masked_fill_(tail, float("-inf"))
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)
