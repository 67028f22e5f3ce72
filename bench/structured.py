"""Cost of constrained decoding (structured outputs) at 32 concurrent sequences, in-process.

`python -m bench.structured` runs the engine on the "small" demo checkpoint (bench/generation.py makes it) with 32
sequences of 64-128-token prompts, `--tokens` new tokens each (ignore_eos, so every row makes the same number of
tokens), sampled (temperature 1, seeded), in three configurations timed round-robin (`--repeats` rounds, median):

- `free`: no constraint;
- `json`: every sequence constrained by a JSON schema (an object holding an array of {name, n} objects; a grammar
  that stays open for long outputs) through llguidance, the mask applied in the sampler;
- `mixed`: 16 constrained + 16 free rows in the same batches.

Reported per configuration: output tokens per second of wall time and per second of this process's CPU time (all
its threads, llguidance's included), and the slowdowns against `free` of the same round (same-run ratios). On a
shared, loaded machine the wall-time ratio swings with other processes; the CPU-time ratio is the cost of the
work itself. Also the machine's CPU flags and load average, and the mask time per constrained row and step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from bench.generation import DEFAULT_CHECKPOINT, ensure_checkpoint, machine_description, make_prompts

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["name", "n"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False}


def params(count: int, constrained: int, tokens: int):
    from seedoss.sampling import SamplingParams
    from seedoss.structured import StructuredOutputs

    spec = StructuredOutputs(json=SCHEMA)
    return [SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True,
                           structured_outputs=spec if i < constrained else None) for i in range(count)]


async def _run(engine, prompts, params_list) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process)."""
    from seedoss.engine import collect

    start, cpu = time.perf_counter(), time.process_time()
    outs = await asyncio.gather(*[collect(engine.generate(p, sp)) for p, sp in zip(prompts, params_list)])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / elapsed, tokens / cpu


def mask_cost(checkpoint: Path, steps: int = 64) -> float:
    """Mean seconds to compute one constrained row's mask (llguidance + unpack), over a random-walk of `steps`."""
    import torch

    from seedoss.structured import GrammarConstraint, StructuredOutputs
    from seedoss.tokenizer import SeedOssTokenizer

    tokenizer = SeedOssTokenizer.from_pretrained(checkpoint)
    constraint = GrammarConstraint(StructuredOutputs(json=SCHEMA), tokenizer)
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        allowed = constraint.allowed(tokenizer.vocab_size)
        total += time.perf_counter() - start
        choices = allowed.nonzero().flatten()
        constraint.accept(int(choices[torch.randint(len(choices), (1,), generator=g)]))
    return total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    from seedoss.engine import LLMEngine

    torch.set_num_threads(args.threads)
    checkpoint = ensure_checkpoint(args.checkpoint)
    prompts = make_prompts(checkpoint, args.sequences, 64, 128)
    configs = {"free": 0, "json": args.sequences, "mixed": args.sequences // 2}
    engine = LLMEngine.from_checkpoint(checkpoint, num_stages=1)

    async def rounds():
        await _run(engine, prompts[:4], params(4, 2, 8))  # warm-up (and the llguidance tokenizer)
        out = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, constrained in configs.items():
                out[name].append(await _run(engine, prompts, params(args.sequences, constrained, args.tokens)))
        await engine.shutdown()
        return out

    machine = machine_description(args.threads)
    rates = asyncio.run(rounds())
    machine["load_after"] = os.getloadavg()
    per_mask = mask_cost(checkpoint)
    report = {"machine": machine, "sequences": args.sequences, "tokens": args.tokens, "repeats": args.repeats,
              "mask_ms_per_row_step": per_mask * 1e3, "raw": rates}
    for which, clock in ((0, "wall"), (1, "cpu")):
        report[f"tokens_per_{clock}_s"] = {k: statistics.median(r[which] for r in v) for k, v in rates.items()}
        report[f"slowdown_vs_free_{clock}"] = {
            k: statistics.median(f[which] / c[which] for f, c in zip(rates["free"], v))
            for k, v in rates.items() if k != "free"}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
