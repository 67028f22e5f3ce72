"""The two generation backends served side by side, in one run: parity, then throughput.

`python -m bench.backends` (from a venv with vllm: `.venv-vllm` on CPU, the one `bench/gpu_check.sh` builds on a GPU
machine) deploys the app twice on one local Ray instance, `generation.backend: seedoss` (our engine over the stage
deployments) and `vllm` (vLLM's AsyncLLM, pipeline-parallel degree = `--num-stages`), same checkpoint, dtype and
stage count, no heads. Then:

- parity: greedy answers with logprobs for a few prompts from both. Tokens must agree up to the first position
  where ours is a near-tie (its top-2 logprob margin below `--tol`: there either argmax is right), and the sampled
  tokens' logprobs must agree within `--tol` up to there. float32: `--tol` 1e-3 (equal tokens, logprobs to float
  noise); bfloat16: 0.15 (bf16 keeps ~3 significant digits and the two backends round at different places);
- throughput: 1/8/32 concurrent streams (`bench.serving.run_served`: greedy, ignore_eos, the same prompts) per
  backend. The backends run one after the other, each alone on the machine (on a GPU each needs the memory);
  report ratios (vllm / ours) of the same run, never absolute numbers across runs, and on a shared machine note
  its load.

`--device cuda` requires a CUDA GPU and stops with an error without one: it never falls back to CPU. Exit status 1
when parity fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

from bench.generation import DEFAULT_CHECKPOINT, ensure_checkpoint, log, make_prompts
from bench.serving import run_served

PARITY_PROMPTS = ["The quick brown fox", "Once upon a time there was", "In 1854 the city council", "def main():"]


def check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench.backends: --device cuda but torch sees no CUDA GPU; refusing to fall back to CPU")


def start_ray(args) -> int:
    """A local Ray instance (never an existing cluster) with Serve's HTTP proxy on a free port; the port."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from seedoss.deployments import serve_env

    serve_env.apply()  # the switches `seedoss serve` starts Ray with
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             **({} if args.device == "cuda" else {"num_cpus": 2}))
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return port


def deploy(backend: str, checkpoint: Path, port: int, args) -> str:
    """The app with `backend` (and no heads); its base URL. On cuda our stages share the GPUs (a fraction each);
    vLLM takes one GPU per stage through its placement group."""
    from ray import serve

    from seedoss.deployments.app import build_app

    log(f"deploying backend {backend} ({args.num_stages} stages, {args.dtype}, {args.device}) …")
    gpus = {"num_gpus": round(1 / args.num_stages, 3)} if args.device == "cuda" else {}
    vllm = {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {}
    config = {"checkpoint": str(checkpoint), "num_stages": args.num_stages, "dtype": args.dtype,
              "device": args.device, "head_checkpoints": {},
              "engine": {"max_num_seqs": max(args.concurrency), "max_model_len": args.max_model_len},
              "stage": {"ray_actor_options": {"num_cpus": 0, **gpus}},
              "generation": {"backend": backend, **({"vllm": vllm} if backend == "vllm" else {})}}
    serve.run(build_app(config), name=backend, route_prefix=f"/{backend}")
    return f"http://127.0.0.1:{port}/{backend}"


async def greedy(url: str, prompt: str, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        r = await client.post("/v1/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                    "logprobs": 2})
        r.raise_for_status()
        return r.json()["choices"][0]


def parity(answers: dict[str, list[dict]], tol: float) -> list[dict]:
    """One row per prompt: tokens compared, where they first differ, the largest logprob difference."""
    rows = []
    for prompt, ours, theirs in zip(PARITY_PROMPTS, answers["seedoss"], answers["vllm"]):
        compared, differ_at, max_diff, ok = 0, None, 0.0, True
        for i, (a, b) in enumerate(zip(ours["logprobs"], theirs["logprobs"])):
            top = a["top_logprobs"]
            near_tie = len(top) > 1 and top[0]["logprob"] - top[1]["logprob"] < tol
            if a["token_id"] != b["token_id"]:
                differ_at, ok = i, near_tie
                break
            max_diff = max(max_diff, abs(a["logprob"] - b["logprob"]))
            compared += 1
            if near_tie:  # past a near-tie either continuation is right: stop comparing
                break
        ok = ok and max_diff <= tol
        rows.append({"prompt": prompt, "tokens_compared": compared, "first_difference": differ_at,
                     "max_logprob_diff": max_diff, "ok": ok})
        log(f"parity {'ok  ' if ok else 'FAIL'} {prompt!r}: {compared} tokens equal, first difference at "
            f"{differ_at}, max |Δ logprob| {max_diff:.2e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="default: the 'small' demo preset")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float,
                        help="vLLM's share of device memory (default: vLLM's on cuda; 0.3 on cpu, which vllm-cpu checks "
                             "against the host's memory, DESIGN.md §5)")
    parser.add_argument("--tol", type=float, help="parity tolerance (default 1e-3 float32, 0.15 bfloat16/float16)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", help="also write the parity and throughput rows to this file")
    args = parser.parse_args()
    check_device(args.device)
    if args.device == "cpu" and args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.3
    tol = args.tol if args.tol is not None else (1e-3 if args.dtype == "float32" else 0.15)
    checkpoint = Path(args.checkpoint) if args.checkpoint != str(DEFAULT_CHECKPOINT) else ensure_checkpoint(
        DEFAULT_CHECKPOINT)
    started = time.perf_counter()
    port = start_ray(args)
    prompts = make_prompts(checkpoint, max(args.concurrency), 64, 128)
    answers, rows = {}, []
    for backend in ("seedoss", "vllm"):  # one at a time: each gets the whole machine (GPU memory included)
        from ray import serve

        url = deploy(backend, checkpoint, port, args)
        answers[backend] = [asyncio.run(greedy(url, p, args.max_tokens)) for p in PARITY_PROMPTS]
        for c in [] if args.skip_throughput else args.concurrency:
            log(f"{backend}: {c} concurrent streams …")
            rows.append({**asyncio.run(run_served(url, prompts[:c], args.max_tokens, c)),
                         "system": f"served, backend {backend}"})
        serve.delete(backend)
    parity_rows = parity(answers, tol)
    if rows:
        print(f"\n{'system':28} {'conc':>4} {'tok/s':>8} {'lat p50':>8} {'ttft p50':>8}")
        for r in rows:
            print(f"{r['system']:28} {r['concurrency']:>4} {r['tokens_per_s']:>8.1f} {r['latency_p50_s']:>8.2f} "
                  f"{r['ttft_p50_s']:>8.3f}")
        by = {(r["system"], r["concurrency"]): r["tokens_per_s"] for r in rows}
        for c in args.concurrency:
            print(f"vllm / ours throughput at {c:>2}: "
                  f"{by[('served, backend vllm', c)] / by[('served, backend seedoss', c)]:.2f}")
    log(f"done in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "parity": parity_rows, "throughput": rows},
                                              indent=2))
    if not all(r["ok"] for r in parity_rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
