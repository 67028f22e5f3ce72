"""Head services under many small requests (issue 18): classify, tag and QA, one input per request, over HTTP and
gRPC, beside HF in process on the same head and inputs — in one run.

`python -m bench.heads` deploys the app as `seedoss serve` does (the tiny demo checkpoint, 2 stage deployments, one
replica per head, default `batching`) on a local Ray instance of its own with the HTTP and gRPC proxies. For each
task it times HF in process (the app idling), runs closed-loop clients (each sends its next request when the last
is answered) at 1/4/16/32/64 concurrent clients, HTTP then gRPC at each count, `--seconds` each after a short
warm-up, and times HF again: the ratios to HF are against the mean of the two timings, since this kind of
machine's speed moves by a quarter within minutes. It reports requests/s, p50 and p95 latency, non-OK answers, and
where the CPU went: CPU milliseconds per request of each server process (the Serve proxy, the Gateway, the head,
each stage; read from /proc for the processes this run started) and of the clients, which run in this process on
the same cores.
HF is the text-classification and token-classification pipeline with `batch_size=32` over the same inputs, and
for QA (transformers 5 has no QA pipeline any more) the HF tokenizer + `AutoModelForQuestionAnswering` in padded
batches of 32: the pipeline's compute without its span decoding. Prints the CPU model and flags and the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from seedoss.deployments.serve_env import free_port

APP = "seedoss"
TASKS = ("classify", "tag", "qa")
ROUTES = {"classify": "/v1/classify", "tag": "/v1/tag", "qa": "/v1/answer"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def cpu_info() -> str:
    model, flags = platform.processor() or "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    simd = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(simd)}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_inputs(n: int = 256) -> dict[str, list]:
    """Short single inputs from the demo corpus: sentences (classify, tag) and question/context pairs (QA)."""
    corpus = (Path(__file__).resolve().parent.parent / "seedoss" / "data" / "corpus.txt").read_text()
    sentences = [s.strip() + "." for s in corpus.replace("\n", " ").split(". ") if 20 <= len(s.strip()) <= 120]
    sentences = (sentences * (n // max(1, len(sentences)) + 1))[:n]
    questions = ["Where did they go?", "Who repaired it?", "What was forgotten?", "When did it happen?"]
    qa = [{"question": questions[i % len(questions)], "context": " ".join(sentences[i: i + 3])} for i in range(n)]
    return {"classify": sentences, "tag": sentences, "qa": qa}


# --------------------------------------------------------------------------------------------------- the server


def start_server(checkpoint: Path, head_placement: str, app_config: dict | None = None) -> tuple[str, str]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from seedoss.deployments import serve_env
    from seedoss.deployments.app import build_app

    port, grpc_port = free_port(), free_port()
    # a Ray instance of our own ("local"), never one another process on this machine started, with the switches
    # `seedoss serve` starts Ray with (switches set in the environment win; RAY_SERVE_ENABLE_HA_PROXY=0 keeps Serve's proxy)
    serve_env.apply()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="bench-heads-ray-"))
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly",
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [
                    "seedoss.proto.seedoss.v1.seedoss_pb2_grpc.add_SeedOssServicer_to_server"]})
    log(f"deploying the Serve app (2 stages + heads + generation + gateway, heads in the {head_placement}) …")
    serve.run(build_app({"checkpoint": str(checkpoint), "num_stages": 2, "head_placement": head_placement,
                         **(app_config or {})}),
              name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"


# --------------------------------------------------------------------------------------------------- CPU use


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def server_processes() -> dict[int, str]:
    """pid → role ("proxy", "Gateway", "SeedOssStage0", …) of the Ray workers (and HAProxy) this process
    started (its descendants: other Ray instances on the machine are not counted)."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                names[int(entry.name)] = (entry / "cmdline").read_text().split("\0")[0]
            except (OSError, IndexError, ValueError):
                continue
    roles = {}
    for pid, name in names.items():
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, os.getpid()):
            ancestor = parents.get(ancestor)
        if ancestor == os.getpid() and Path(name).name == "haproxy":  # Serve's HAProxy ingress (serve_env)
            roles[pid] = "proxy"
        elif ancestor == os.getpid() and name.startswith("ray::"):
            role = name.removeprefix("ray::").split(".")[0]
            roles[pid] = "proxy" if "proxy" in role.lower() else role.rsplit(":", 1)[-1].strip()
    return roles


class CpuMeter:
    """CPU seconds used by each server role and by this process (the clients) between `start` and `stop`."""

    def start(self) -> None:
        self.roles = server_processes()
        self.before = {pid: _cpu_seconds(pid) for pid in [*self.roles, os.getpid()]}

    def stop(self, requests: int) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, before in self.before.items():
            try:
                role = self.roles.get(pid, "clients")
                used[role] = used.get(role, 0.0) + _cpu_seconds(pid) - before
            except OSError:  # the process went away
                continue
        return {role: 1000 * seconds / max(1, requests) for role, seconds in used.items() if seconds > 0.01}


# --------------------------------------------------------------------------------------------------- the clients


def http_sender(session, url: str, task: str):
    import aiohttp

    route = url + ROUTES[task]

    async def send(item) -> bool:
        body = {"inputs": item} if task != "qa" else item
        try:
            async with session.post(route, json=body) as response:
                await response.read()
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):  # counted as not OK (a timeout is a failure too)
            return False

    return send


def grpc_sender(stub, task: str):
    import grpc

    from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb

    metadata = (("application", APP),)

    async def send(item) -> bool:
        try:
            if task == "classify":
                await stub.Classify(pb.ClassifyRequest(inputs=[item]), metadata=metadata, timeout=60)
            elif task == "tag":
                await stub.TagTokens(pb.TagRequest(inputs=[item]), metadata=metadata, timeout=60)
            else:
                await stub.AnswerQuestion(pb.AnswerRequest(**item), metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError:
            return False
        return True

    return send


async def closed_loop(send, items: list, clients: int, seconds: float, warmup_s: float, meter: CpuMeter) -> dict:
    latencies, failures = [], 0
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + seconds
    asyncio.get_running_loop().call_later(warmup_s, meter.start)

    async def client(k: int):
        nonlocal failures
        i = k
        while (now := time.perf_counter()) < end:
            ok = await send(items[i % len(items)])
            i += clients
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)
                failures += not ok

    await asyncio.gather(*[client(k) for k in range(clients)])
    wall = time.perf_counter() - measure_from
    return {"clients": clients, "requests_per_s": len(latencies) / wall, "p50_ms": 1000 * percentile(latencies, 0.5),
            "p95_ms": 1000 * percentile(latencies, 0.95), "requests": len(latencies), "not_ok": failures,
            "cpu_ms_per_request": meter.stop(len(latencies))}


async def run_served(task: str, url: str, grpc_target: str, items: list, concurrency: list[int], seconds: float,
                     warmup_s: float) -> list[dict]:
    """One task's cells: for each client count, HTTP then gRPC (so the two are measured under the same load)."""
    import aiohttp
    import grpc

    from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc

    rows = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session, \
            grpc.aio.insecure_channel(grpc_target) as channel:
        senders = {"http": http_sender(session, url, task),
                   "grpc": grpc_sender(seedoss_pb2_grpc.SeedOssStub(channel), task)}
        for clients in concurrency:
            for front_end, send in senders.items():
                row = await closed_loop(send, items, clients, seconds, warmup_s, CpuMeter())
                row.update(task=task, system=front_end, load=load())
                log(f"{front_end:4} {task:8} {clients:>2} clients: {row['requests_per_s']:7.1f} req/s  "
                    f"p50 {row['p50_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms  not ok {row['not_ok']}  "
                    f"(load {row['load']})")
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- HF in process


def run_hf(checkpoint: Path, task: str, items: list, batch_size: int = 32, repeats: int = 2) -> dict:
    """HF in process on the same head and inputs: inputs/s, the best of `repeats` timed passes."""
    import torch
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        pipeline,
    )

    from seedoss.demo import head_dir

    path = head_dir(checkpoint, task)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == "qa":
        model = AutoModelForQuestionAnswering.from_pretrained(path).eval()

        def run():
            with torch.inference_mode():
                for i in range(0, len(items), batch_size):
                    chunk = items[i: i + batch_size]
                    enc = tokenizer([x["question"] for x in chunk], [x["context"] for x in chunk], padding=True,
                                    truncation="only_second", max_length=384, return_tensors="pt")
                    model(**enc)
        name = f"HF tokenizer + QA model, batch {batch_size}"
    else:
        cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForTokenClassification
        kind = "text-classification" if task == "classify" else "token-classification"
        pipe = pipeline(kind, model=cls.from_pretrained(path).eval(), tokenizer=tokenizer, batch_size=batch_size)

        def run():
            pipe(items)
        name = f"HF {kind} pipeline, batch {batch_size}"
    run()  # warm-up
    best = min(_timed(run) for _ in range(repeats))
    row = {"task": task, "system": name, "inputs_per_s": len(items) / best, "load": load()}
    log(f"{name:48} {task:8} {row['inputs_per_s']:7.1f} inputs/s  (load {row['load']})")
    return row


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- report


def report(served: list[dict], hf: list[dict], concurrency: list[int], tasks=TASKS) -> str:
    """Markdown tables. HF ran right before and right after each task's served cells (this machine's speed moves
    by a quarter within minutes): the ratios are against the mean of the two."""
    lines = []
    for task in tasks:
        before, after = (r for r in hf if r["task"] == task)
        reference = (before["inputs_per_s"] + after["inputs_per_s"]) / 2
        lines += [f"#### {task}: {before['system']}: {before['inputs_per_s']:.0f} inputs/s before, "
                  f"{after['inputs_per_s']:.0f} after (mean {reference:.0f})", "",
                  ("| clients | HTTP req/s | HTTP p50 ms | HTTP p95 ms | gRPC req/s | gRPC p50 ms | gRPC p95 ms | "
                   "HTTP / HF | gRPC / HF | not OK |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in concurrency:
            h, g = (next(r for r in served if r["task"] == task and r["system"] == s and r["clients"] == c)
                    for s in ("http", "grpc"))
            lines.append(f"| {c} | {h['requests_per_s']:.0f} | {h['p50_ms']:.1f} | {h['p95_ms']:.1f} | "
                         f"{g['requests_per_s']:.0f} | {g['p50_ms']:.1f} | {g['p95_ms']:.1f} | "
                         f"{h['requests_per_s'] / reference:.2f}x | {g['requests_per_s'] / reference:.2f}x | "
                         f"{h['not_ok'] + g['not_ok']} |")
        lines.append("")
    if "classify" not in tasks:
        return "\n".join(lines)
    seen = {role for row in served for role in row["cpu_ms_per_request"]}  # Classification: only as a deployment
    roles = [r for r in ("proxy", "Gateway", "Classification", "SeedOssStage0", "SeedOssStage1", "clients")
             if r in seen]
    lines += ["#### CPU ms per classify request, by process", "",
              "| front end | clients | " + " | ".join(roles) + " | server total |",
              "|---|---:|" + "---:|" * (len(roles) + 1)]
    for row in served:
        if row["task"] == "classify":
            cpu = row["cpu_ms_per_request"]
            total = sum(v for k, v in cpu.items() if k != "clients")
            lines.append(f"| {row['system']} | {row['clients']} | " + " | ".join(f"{cpu.get(r, 0):.1f}" for r in roles)
                         + f" | {total:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a demo-layout checkpoint (default: the tiny demo, created if missing)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    parser.add_argument("--head-placement", choices=["gateway", "deployments"], default="gateway",
                        help="AppConfig.head_placement (deployments: a Serve call more per request)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="the tasks to measure")
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--app-config", type=json.loads, default={},
                        help='more AppConfig fields for the served app, as JSON, e.g. \'{"stage_threads": 2}\'')
    args = parser.parse_args()

    from seedoss.cli import ensure_demo_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_demo_checkpoint()
    log(f"CPU: {cpu_info()}")
    log(f"load average at start: {load()}")
    inputs = make_inputs()
    url, grpc_target = start_server(checkpoint, args.head_placement, args.app_config)
    hf, served = [], []
    for task in args.tasks:  # HF right before and right after the task's served cells: the same minutes
        hf.append(run_hf(checkpoint, task, inputs[task]))
        served += asyncio.run(run_served(task, url, grpc_target, inputs[task], args.concurrency, args.seconds,
                                         args.warmup))
        hf.append(run_hf(checkpoint, task, inputs[task]))
    print("\n" + report(served, hf, args.concurrency, args.tasks))
    log(f"load average at end: {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_info(), "hf": hf, "served": served}, indent=2))


if __name__ == "__main__":
    main()
