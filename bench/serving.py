"""Served generation over HTTP vs the in-process engine, in one run.

`python -m bench.serving` deploys the Serve app (2 pipeline stages + the generation head + gateway) on a local
Ray instance with the "small" demo preset, then for 1, 8 and 32 concurrent streaming clients (greedy, ignore_eos,
the same prompts for both; at least 4 requests a row, so 1 stream runs 4 one after another) measures output
tokens/s, per-request latency p50/p99 and time to first token p50/p99 — and the same numbers for the in-process
engine with 2 stages, so the table shows what serving costs. Each served run sends a fresh `cache_salt`: the
in-process engine is new each run, and the served app must not hit the prefix cache on an earlier row's prompts. The two run
back to back per concurrency (`--repeats N`: alternately N times each, the best kept), so load on a shared machine
hits both alike; each row notes the 1-minute load average.

Then a breakdown: where a served token's time goes, per concurrency, from timestamps carried through every step and
every stream chunk (deployments/timing.py): per pipeline step, the hop to each stage (Ray serialization, routing,
transfer, scheduling in the replica), each stage's unpacking, queueing behind an earlier micro-batch, compute and
packing, the return to the Generation replica, and the engine's own time between steps; per chunk, the relay from
the Generation replica to the gateway and from the gateway through Serve's proxy to the client; per request, the
first token's path; and the CPU milliseconds per output token of each server process (read from /proc).

`--lanes 1 2 --lane-concurrency 32 64` adds lane rows: the app redeployed with 1, then 2 generation lanes (each an
engine + one replica of each stage), the same streams, with each lane's share of the tokens (warm-up included), its mean sequences per
step, and the stage-cache miss rate (misses / sequence-steps, from every Generation replica's stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from pathlib import Path

from bench.generation import DEFAULT_CHECKPOINT, ensure_checkpoint, log, make_prompts
from bench.heads import CpuMeter


def machine() -> str:
    """CPU model, cores, the vector flags that matter for the model's kernels, torch and Ray versions."""
    import platform

    import ray
    import torch

    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    vector = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return (f"{model}, {os.cpu_count()} cores, flags: {' '.join(vector) or 'n/a'}; torch {torch.__version__}, "
            f"Ray {ray.__version__}")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(name: str, concurrency: int, wall: float, tokens: int, latencies: list[float], ttfts: list[float]) -> dict:
    return {"system": name, "concurrency": concurrency, "load_1m": os.getloadavg()[0], "tokens_per_s": tokens / wall,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99)}


MIN_REQUESTS = 4  # per row: at 1 stream, 4 requests one after another, so TTFT p50 is not one sample


def row_prompts(prompts: list, concurrency: int) -> list:
    return prompts[:max(concurrency, MIN_REQUESTS)]


async def in_streams(one, prompts: list, concurrency: int) -> list:
    """`one(prompt)` for every prompt, `concurrency` streams at a time, each running its share one after another."""
    async def stream(share):
        return [await one(p) for p in share]

    shares = await asyncio.gather(*[stream(prompts[i::concurrency]) for i in range(concurrency)])
    return [r for share in shares for r in share]


async def run_in_process(checkpoint, prompts, max_tokens, concurrency: int) -> dict:
    from seedoss.engine import LLMEngine
    from seedoss.sampling import SamplingParams

    engine = LLMEngine.from_checkpoint(checkpoint, num_stages=2)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(ids):
        start, first, n = time.perf_counter(), None, 0
        async for out in engine.generate(ids, params):
            n += len(out.outputs[0].token_ids) if out.outputs else 0
            first = first or time.perf_counter()
        return time.perf_counter() - start, first - start, n

    await asyncio.gather(*[one(p) for p in prompts[:2]])  # warm-up
    start = time.perf_counter()
    results = await in_streams(one, prompts, concurrency)
    wall = time.perf_counter() - start
    await engine.shutdown()
    return summarize("engine, 2 in-process stages", concurrency, wall, sum(r[2] for r in results),
                     [r[0] for r in results], [r[1] for r in results])


class Relay:
    """Sums of the stream-relay legs over the chunks of a run (seconds), from the stamps each chunk carries
    (deployments/timing.py) and the client's own clock."""

    LEGS = ("generation→gateway", "gateway→client")
    FIRST = ("client→gateway", "gateway→generation", "generation: prefill → first chunk")

    def __init__(self):
        self.legs, self.chunks = dict.fromkeys(self.LEGS, 0.0), 0
        self.first, self.requests = dict.fromkeys(self.FIRST, 0.0), 0

    def chunk(self, timing: dict, received: float, sent: float, first: bool) -> None:
        self.legs["generation→gateway"] += timing["gateway"] - timing["generation"]
        self.legs["gateway→client"] += received - timing["gateway"]
        self.chunks += 1
        if first:
            self.first["client→gateway"] += timing["gateway_start"] - sent
            self.first["gateway→generation"] += timing["generation_start"] - timing["gateway_start"]
            self.first["generation: prefill → first chunk"] += timing["generation"] - timing["generation_start"]
            self.requests += 1

    def means_ms(self) -> dict:
        return {**{k: 1e3 * v / max(self.chunks, 1) for k, v in self.legs.items()},
                **{f"first token: {k}": 1e3 * v / max(self.requests, 1) for k, v in self.first.items()}}


async def run_served(url: str, prompts, max_tokens, concurrency: int) -> dict:
    import httpx

    relay = Relay()
    # The served app outlives a run; the in-process engine is new each run: without a fresh salt the served rows
    # would hit the prefix cache on prompts earlier rows sent, and the in-process rows would not
    salt = os.urandom(8).hex()

    async def one(client, ids, timed):
        body = {"prompt_token_ids": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "cache_salt": salt}
        sent, start, first, n = time.time(), time.perf_counter(), None, 0
        async with client.stream("POST", "/v1/generate", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    received = time.time()
                    chunk = json.loads(line[6:])
                    n += sum(len(c["token_ids"]) for c in chunk["choices"])
                    if timed and "timing" in chunk:
                        relay.chunk(chunk["timing"], received, sent, first is None)
                    first = first or time.perf_counter()
        return time.perf_counter() - start, first - start, n

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*[one(client, p, False) for p in prompts[:2]])  # warm-up
        before = await asyncio.to_thread(step_timing)  # handle calls' .result() may not block this loop
        meter = CpuMeter()
        meter.start()
        start = time.perf_counter()
        results = await in_streams(lambda p: one(client, p, True), prompts, concurrency)
        wall = time.perf_counter() - start
        cpu = meter.stop(sum(r[2] for r in results))
        steps = await asyncio.to_thread(step_timing, before)
    row = summarize("served over HTTP (2 stage deployments)", concurrency, wall, sum(r[2] for r in results),
                    [r[0] for r in results], [r[1] for r in results])
    busy = {f"stage{k} busy, % of wall time": 100 * steps[f"step: stage{k}_compute"] * steps["steps timed"] / 1e3 / wall
            for k in range(2)}  # how well the micro-batches keep both stages at work
    # CPU per output token by process (the clients and the in-process engine share this one, left out): what the
    # hops and the stream relay cost in cores, beside the stages' compute
    cpu_rows = {f"cpu ms per token: {role}": ms for role, ms in sorted(cpu.items()) if role != "clients"}
    row["breakdown_ms"] = {**steps, **busy, **relay.means_ms(), **cpu_rows,
                           "cpu ms per token: all server processes": sum(cpu_rows.values())}
    return row


def step_timing(before: dict | None = None) -> dict:
    """The Generation replicas' step timing sums (deployments/timing.py); given an earlier reading, the mean ms
    per step of each component since then."""
    totals: dict = {"steps": 0, "engine_samples": 0, "seconds": {}}
    for s in lane_stats():
        t = s["timing"]
        totals["steps"] += t["steps"]
        totals["engine_samples"] += t["engine_samples"]
        for k, v in t["seconds"].items():
            totals["seconds"][k] = totals["seconds"].get(k, 0.0) + v
    if before is None:
        return totals
    steps = max(totals["steps"] - before["steps"], 1)
    out = {}
    for k, v in totals["seconds"].items():
        if k == "engine":
            n = max(totals["engine_samples"] - before["engine_samples"], 1)
            out["step: engine between steps (pipeline idle)"] = 1e3 * (v - before["seconds"][k]) / n
        else:
            out[f"step: {k}"] = 1e3 * (v - before["seconds"][k]) / steps
    out["step: pipeline (send → result)"] = sum(v for k, v in out.items() if "engine" not in k)
    out["steps timed"] = steps
    return out


def print_breakdown(rows: list[dict]) -> None:
    """One column per served concurrency: mean ms per step (the pipeline), per chunk (the stream relay) and per
    request (the first token's path); and each stage's compute as a share of the run's wall time."""
    served = [r for r in rows if "breakdown_ms" in r]
    if not served:
        return
    names = list(dict.fromkeys(name for r in served for name in r["breakdown_ms"]))  # processes differ by row
    print(f"\n{'where a served token spends its time (mean ms)':58}" + "".join(f"{r['concurrency']:>10}" for r in served))
    for name in names:
        print(f"{name:58}" + "".join(f"{r['breakdown_ms'].get(name, float('nan')):>10.2f}" for r in served))


def lane_stats(app: str = "seedoss") -> list[dict]:
    """`Generation.stats()` of every lane (asked until each replica has answered)."""
    from ray import serve

    running = serve.status().applications[app].deployments["Generation"].replica_states.get("RUNNING", 0)
    handle = serve.get_deployment_handle("Generation", app)
    stats: dict[str, dict] = {}
    for _ in range(200):
        s = handle.stats.remote().result()
        stats[s["replica"]] = s
        if len(stats) >= running:
            break
    return sorted(stats.values(), key=lambda s: s["lane"])


def run_lanes(url: str, prompts, max_tokens, lanes: int) -> dict:
    before = {s["replica"]: s for s in lane_stats()}
    row = asyncio.run(run_served(url, prompts, max_tokens, len(prompts)))
    after = lane_stats()

    def delta(s, key):
        return s[key] - before.get(s["replica"], {}).get(key, 0)

    steps = sum(delta(s, "steps") for s in after)
    tokens = [delta(s, "generation_tokens") for s in after]
    row.update(system=f"served, {lanes} lane(s)", lanes=lanes,
               miss_rate=sum(delta(s, "cache_misses") for s in after) / max(steps, 1), lane_tokens=tokens,
               seqs_per_step=[round(delta(s, "steps") / max(delta(s, "batches"), 1), 1) for s in after])
    return row


def start_server(checkpoint, app_config: dict) -> str:
    """A local Ray instance with Serve's HTTP proxy on a free port, running the app with one lane; its URL."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["SEEDOSS_STREAM_TIMING"] = "1"  # chunks carry their relay stamps; replicas inherit the environment
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from seedoss.deployments import serve_env

    serve_env.apply()  # the switches `seedoss serve` starts Ray with
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    deploy(checkpoint, lanes=1, app_config=app_config)
    return f"http://127.0.0.1:{port}"


def deploy(checkpoint, lanes: int, app_config: dict) -> None:
    from ray import serve

    from seedoss.deployments.app import build_app

    log(f"deploying the Serve app (2 stages x {lanes} lane(s) + gateway) …")
    serve.run(build_app({"checkpoint": str(checkpoint), "num_stages": 2, "head_checkpoints": {},
                         "lanes": {"min": lanes, "max": lanes}, **app_config}), name="seedoss", route_prefix="/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each system per concurrency; the best is kept")
    parser.add_argument("--lanes", type=int, nargs="*", default=[], help="lane counts for the lane rows, e.g. 1 2")
    parser.add_argument("--lane-concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--app-config", type=json.loads, default={},
                        help='more AppConfig fields for the served app, as JSON, e.g. \'{"stage_threads": 2}\'')
    args = parser.parse_args()
    checkpoint = ensure_checkpoint(Path(args.checkpoint))
    log(f"machine: {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    prompts = make_prompts(checkpoint, max(args.concurrency + args.lane_concurrency), 64, 128)
    url = start_server(checkpoint, args.app_config)
    local, served = [], []
    for c in args.concurrency:  # the two systems back to back per concurrency: a shared machine's load drifts
        runs = {"engine": [], "served": []}
        for i in range(args.repeats):
            log(f"in-process engine, {c} concurrent (run {i + 1}/{args.repeats}) …")
            runs["engine"].append(asyncio.run(run_in_process(checkpoint, row_prompts(prompts, c), args.max_tokens, c)))
            log(f"served, {c} concurrent streams (run {i + 1}/{args.repeats}) …")
            runs["served"].append(asyncio.run(run_served(url, row_prompts(prompts, c), args.max_tokens, c)))
        local.append(max(runs["engine"], key=lambda r: r["tokens_per_s"]))
        served.append(max(runs["served"], key=lambda r: r["tokens_per_s"]))
    rows = local + served
    print(f"\n{'system':42} {'conc':>4} {'tok/s':>8} {'lat p50':>8} {'lat p99':>8} {'ttft p50':>8} {'ttft p99':>8} "
          f"{'load 1m':>7}")
    for r in rows:
        print(f"{r['system']:42} {r['concurrency']:>4} {r['tokens_per_s']:>8.1f} {r['latency_p50_s']:>8.2f} "
              f"{r['latency_p99_s']:>8.2f} {r['ttft_p50_s']:>8.3f} {r['ttft_p99_s']:>8.3f} {r['load_1m']:>7.1f}")
    by = {(r["system"].split(",")[0].split(" ")[0], r["concurrency"]): r for r in rows}
    for c in args.concurrency:
        served, local = by[("served", c)], by[("engine", c)]
        print(f"served / in-process throughput at {c:>2}: {served['tokens_per_s'] / local['tokens_per_s']:.2f}; "
              f"TTFT p50 added by serving: {1e3 * (served['ttft_p50_s'] - local['ttft_p50_s']):.0f} ms")
    print_breakdown(rows)
    lane_rows = []
    for lanes in args.lanes:
        deploy(checkpoint, lanes, args.app_config)
        for c in args.lane_concurrency:
            log(f"served, {lanes} lane(s), {c} concurrent streams …")
            lane_rows.append(run_lanes(url, prompts[:c], args.max_tokens, lanes))
    if lane_rows:
        print(f"\n{'lanes':>5} {'conc':>4} {'tok/s':>8} {'lat p50':>8} {'ttft p50':>8} {'miss rate':>9}  tokens per lane"
              "  sequences per step")
        for r in lane_rows:
            print(f"{r['lanes']:>5} {r['concurrency']:>4} {r['tokens_per_s']:>8.1f} {r['latency_p50_s']:>8.2f} "
                  f"{r['ttft_p50_s']:>8.3f} {r['miss_rate']:>9.4f}  {r['lane_tokens']}  {r['seqs_per_step']}")
        rows += lane_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
