"""Soak and fault run of the served stack: many concurrent clients mixing all four tasks over HTTP and gRPC while
a pipeline stage replica and a task-head replica are killed, and some clients hang up mid-stream.

    .venv/bin/python -m bench.soak                                # defaults: 64 clients, 240 s (~6 min in all)
    .venv/bin/python -m bench.soak --duration 300 --clients 64 --json soak.json
    .venv/bin/python -m bench.soak --hostile 0.1 --duration 60 --rounds 3   # clean / 10% hostile phases, compared

The scenario (shared with `tests/test_soak.py`, which runs a short version of it):
- the app runs 2 pipeline stages, Generation, 2 Classification replicas, Tagging, QA and the Gateway on a local
  Ray instance, with Serve's HTTP and gRPC proxies;
- each client loops until the deadline over a weighted mix (`MIX`): generate unary / SSE stream over HTTP, gRPC
  server-streaming Generate, classify / tag / answer over both protocols, and "disconnect" streams that the client
  closes (HTTP) or cancels (gRPC) after two chunks; every request has a client-side timeout (a timeout is a lost
  request);
- at `--stage-kill-at` the replica of `SeedOssStage1` is killed (`ray.kill(no_restart=True)`: Serve starts a new
  one; the engine retries the step and recomputes the lost KV cache, the task heads' prefill retries), at
  `--head-kill-at` (and not before the stage's replacement runs) one of the two Classification replicas (the
  Gateway re-sends the idempotent call to the other). Just before each kill a burst of heavier head requests is
  sent (classify/tag/answer for the stage kill, classify for the head kill) so that the victim is certainly serving
  calls when it dies, whatever the load mix happens to be doing at that moment.
  Generation itself is not killed: a stream that already sent tokens cannot be replayed transparently, so killing
  its replica ends open streams with an in-band `service_unavailable_error`, which is the documented behaviour
  and not what a soak measures.

With `--hostile SHARE` the app serves clean phases alternating (`--rounds` pairs) with phases in which each request
is, with probability SHARE, one of the hostile cases of `bench/hostile.py` (the table the tests check: bad JSON,
lone surrogates, token ids out of range, nesting and integer bombs, every limit exceeded; HTTP or gRPC) instead of
the mix; no kills. The report compares them: server errors, replica deaths (the replica actors before and after each
phase), and the normal requests' p99 latency in the hostile phases against the clean ones (goal: within 1.5x).

Outcomes: `ok`, `disconnected` (the client hung up on purpose), `refused` (a hostile request answered with a 4xx
or a client-error gRPC status), explicit retryable rejections (`http_429`, `grpc_RESOURCE_EXHAUSTED`,
`grpc_UNAVAILABLE`) and failures (any 5xx, other gRPC codes, an in-band stream error,
a malformed answer, a transport error, a timeout). The report has requests by task and protocol, errors by code,
latency p50/p99 per task (successful, non-disconnected requests), recovery after each kill (time from the kill to
the first successful request that started after it and needed the killed deployment; and until Serve reported the
replacement replica running), the engine and stage caches after the run (must be idle) and the replica processes'
RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from seedoss.deployments.serve_env import free_port

APP = "seedoss"
GRPC_METADATA = (("application", APP),)
OK = ("ok", "disconnected", "refused")  # refused: a hostile request answered 4xx / a client-error gRPC status
REJECTED = ("http_429", "grpc_RESOURCE_EXHAUSTED", "grpc_UNAVAILABLE")  # explicit, retryable
DISCONNECT_AFTER = 2  # chunks a "disconnect" client reads before hanging up

# (task, protocol, kind, weight)
MIX = [
    ("generate", "http", "unary", 2),
    ("generate", "http", "stream", 2),
    ("generate", "grpc", "stream", 2),
    ("generate", "http", "disconnect", 1),
    ("generate", "grpc", "disconnect", 1),
    ("classify", "http", "unary", 2),
    ("classify", "grpc", "unary", 2),
    ("tag", "http", "unary", 1),
    ("tag", "grpc", "unary", 1),
    ("answer", "http", "unary", 1),
    ("answer", "grpc", "unary", 1),
]
PROMPTS = [
    "Once upon a time", "The history of the city is long", "Hello world", "A recipe for bread:",
    "Ελληνικά και 日本語", "The committee met on Tuesday to discuss", "def fibonacci(n):", "Dear friend,",
]
TEXTS = [
    "what a lovely day", "this is terrible", "ça va très bien", "Ada Lovelace met Charles Babbage in London.",
    "Zoë lives in Zürich", "東京に住んでいます", "The service was slow but the food was great.",
]
QA = [
    ("Where did they meet?", "Ada Lovelace met Charles Babbage in London in 1833, at a party."),
    ("Who wrote the notes?", "The notes on the Analytical Engine were written by Ada Lovelace in 1843."),
    ("What colour is the sky?", "On a clear day the sky is blue, and at sunset it turns orange and red."),
]


# ------------------------------------------------------------------------------------------------ records


@dataclass
class Result:
    task: str
    protocol: str
    kind: str
    start: float  # seconds since the run started
    end: float
    outcome: str

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class Kill:
    name: str
    deployment: str
    tasks: tuple[str, ...]  # the tasks whose requests need the killed deployment
    at: float  # seconds since the run started
    burst: tuple[tuple[str, str], ...] = ()  # heavy (task, protocol) requests sent just before, to be in flight
    victim: str = ""
    in_flight: int = 0  # requests in flight at the kill (load + burst)
    replaced_after: float | None = None  # Serve reports the replacement replica running
    first_success_after: float | None = None  # the first successful request started after the kill ended


@dataclass
class Report:
    clients: int
    duration: float
    wall: float
    results: list[Result] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    end_state: dict = field(default_factory=dict)

    def outcomes(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome not in OK and r.outcome not in REJECTED]

    def server_errors(self) -> list[Result]:
        """5xx over HTTP, and what stands for it over gRPC (INTERNAL, UNKNOWN) or in a stream."""
        return [r for r in self.results if re.fullmatch(r"http_5\d\d", r.outcome)
                or r.outcome in ("grpc_INTERNAL", "grpc_UNKNOWN") or r.outcome.startswith("inband_")]

    def normal_latencies(self) -> list[float]:
        """Latencies of the successful requests of the normal mix (not hostile, not hung up on purpose)."""
        return [r.latency for r in self.results if r.task != "hostile" and r.outcome == "ok"]

    def compute_recovery(self) -> None:
        for kill in self.kills:
            after = [r.end for r in self.results if r.task in kill.tasks and r.outcome == "ok" and r.start >= kill.at]
            kill.first_success_after = min(after) - kill.at if after else None

    def to_dict(self) -> dict:
        return {"clients": self.clients, "duration": self.duration, "wall": self.wall,
                "outcomes": dict(self.outcomes()), "kills": [asdict(k) for k in self.kills],
                "end_state": self.end_state, "by_task": self.table_rows()}

    def table_rows(self) -> list[dict]:
        groups: dict[tuple, list[Result]] = defaultdict(list)
        for r in self.results:
            groups[(r.task, r.protocol)].append(r)
        rows = []
        for (task, protocol), rs in sorted(groups.items()):
            lat = [r.latency for r in rs if r.outcome == "ok"]
            rows.append({"task": task, "protocol": protocol, "requests": len(rs),
                         "ok": sum(r.outcome == "ok" for r in rs),
                         "disconnected": sum(r.outcome == "disconnected" for r in rs),
                         "rejected": sum(r.outcome in REJECTED for r in rs),
                         "failed": sum(r.outcome not in OK and r.outcome not in REJECTED for r in rs),
                         "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99)})
        return rows

    def markdown(self) -> str:
        lines = [f"{self.clients} clients, {self.duration:.0f} s of load ({self.wall:.0f} s until the last request "
                 f"ended), {len(self.results)} requests", "",
                 "| task | protocol | requests | ok | disconnected (on purpose) | rejected (429 / RESOURCE_EXHAUSTED / "
                 "UNAVAILABLE) | failed | p50 s | p99 s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in self.table_rows():
            lines.append(f"| {row['task']} | {row['protocol']} | {row['requests']} | {row['ok']} | "
                         f"{row['disconnected']} | {row['rejected']} | {row['failed']} | {_fmt(row['p50_s'])} | "
                         f"{_fmt(row['p99_s'])} |")
        by_task: dict[str, list[float]] = defaultdict(list)
        for r in self.results:
            if r.outcome == "ok":
                by_task[f"{r.task} ({r.kind})"].append(r.latency)
        lines += ["", "| task (kind) | ok requests | p50 s | p99 s | max s |", "|---|---:|---:|---:|---:|"]
        for name, lat in sorted(by_task.items()):
            lines.append(f"| {name} | {len(lat)} | {_fmt(percentile(lat, 0.5))} | {_fmt(percentile(lat, 0.99))} | "
                         f"{_fmt(max(lat))} |")
        errors = {k: v for k, v in self.outcomes().items() if k not in OK}
        lines += ["", "Errors by code: " + (", ".join(f"`{k}` {v}" for k, v in sorted(errors.items())) or "none")]
        lines += ["", "| kill | at s | requests in flight | victim | first success after, s | "
                  "replacement running after, s |", "|---|---:|---:|---|---:|---:|"]
        for k in self.kills:
            lines.append(f"| {k.name} | {k.at:.1f} | {k.in_flight} | `{k.victim}` | {_fmt(k.first_success_after)} | "
                         f"{_fmt(k.replaced_after)} |")
        if self.end_state:
            lines += ["", "End state: " + json.dumps(self.end_state, sort_keys=True)]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


# ------------------------------------------------------------------------------------------------ clients


class Soak:
    """The load: `clients` coroutines looping over MIX until `duration` has passed, plus the scheduled kills."""

    def __init__(self, http_url: str, grpc_target: str, *, clients: int, duration: float, request_timeout: float,
                 max_tokens: tuple[int, int] = (4, 16), disconnect_tokens: int = 48, seed: int = 0,
                 progress_every: float | None = None, burst_lead_s: float = 0.3, hostile: float = 0.0):
        self.http_url, self.grpc_target = http_url, grpc_target
        self.clients, self.duration, self.request_timeout = clients, duration, request_timeout
        self.max_tokens, self.disconnect_tokens, self.seed = max_tokens, disconnect_tokens, seed
        self.progress_every = progress_every
        self.burst_lead_s = burst_lead_s
        self.hostile = hostile  # share of requests drawn from bench/hostile.py instead of MIX
        self._in_flight = 0
        self._http = self._stub = None
        self.results: list[Result] = []
        self._t0 = 0.0
        self._stop_at = 0.0

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def run(self, kills: list[tuple[float, Kill, callable]] = ()) -> Report:
        """`kills`: (seconds after the start, the Kill record, a blocking function returning the name of the replica
        actor to kill; it runs in a thread). Returns when every started request has ended."""
        import grpc
        import httpx

        from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc

        limits = httpx.Limits(max_connections=self.clients * 2 + 8, max_keepalive_connections=self.clients * 2)
        async with httpx.AsyncClient(base_url=self.http_url, timeout=self.request_timeout, limits=limits) as http, \
                grpc.aio.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.SeedOssStub(channel)
            self._http, self._stub = http, stub
            self._t0 = time.monotonic()
            self._stop_at = self._t0 + self.duration
            tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
            killer = asyncio.create_task(self._kills(kills))
            progress = asyncio.create_task(self._progress()) if self.progress_every else None
            await asyncio.gather(*tasks)
            wall = self.now()
            if progress:
                progress.cancel()
            await killer  # raises when a kill could not be done: then the scenario did not happen
        report = Report(self.clients, self.duration, wall, self.results, [k for _, k, _ in kills])
        report.compute_recovery()
        return report

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.progress_every)
            counts = Counter(r.outcome for r in self.results)
            print(f"[soak {self.now():6.1f}s] {len(self.results)} requests: {dict(counts)}", file=sys.stderr,
                  flush=True)

    async def _kills(self, kills) -> None:
        """One after the other: a kill waits for its time and for the previous victim's replacement, so each
        recovery is measured on its own."""
        for at, kill, fn in kills:
            await self._kill(at, kill, fn)

    async def _kill(self, at: float, kill: Kill, find) -> None:
        """At `at`: find the victim, send the burst, let it reach the replicas, kill, then wait for the
        replacement. The burst's requests are recorded like the load's."""
        await asyncio.sleep(max(0.0, at - self.now()))
        victim = await asyncio.to_thread(find)
        rng = random.Random(self.seed)
        burst = [asyncio.create_task(self._record(-1, j, task, protocol, "unary", rng, heavy=True))
                 for j, (task, protocol) in enumerate(kill.burst)]
        await asyncio.sleep(self.burst_lead_s)
        kill.in_flight = self._in_flight
        await asyncio.to_thread(_kill_actor, victim)
        kill.victim, kill.at = victim, self.now()
        print(f"[soak {self.now():6.1f}s] killed {kill.name} with {kill.in_flight} requests in flight: {victim}",
              file=sys.stderr, flush=True)
        try:
            await asyncio.to_thread(wait_replaced, kill.deployment, kill.victim, 300.0)
            kill.replaced_after = self.now() - kill.at
            print(f"[soak {self.now():6.1f}s] {kill.deployment} replaced after {kill.replaced_after:.1f} s",
                  file=sys.stderr, flush=True)
        except TimeoutError:
            kill.replaced_after = None
        await asyncio.gather(*burst)

    async def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 100_003 + index)
        weights = [w for *_, w in MIX]
        n = 0
        while time.monotonic() < self._stop_at:
            if self.hostile and rng.random() < self.hostile:
                await self._record(index, n, "hostile", rng.choice(("http", "grpc")), "unary", rng)
            else:
                task, protocol, kind, _ = rng.choices(MIX, weights)[0]
                await self._record(index, n, task, protocol, kind, rng)
            n += 1

    async def _record(self, client: int, n: int, task: str, protocol: str, kind: str, rng, heavy=False) -> None:
        """One request with the client timeout, recorded with its outcome."""
        start = self.now()
        self._in_flight += 1
        try:
            outcome = await asyncio.wait_for(
                self._request(task, protocol, kind, rng, self._http, self._stub, client, n, heavy), self.request_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            outcome = "timeout"
        except Exception as e:  # transport problems: the request got no answer
            outcome = f"transport_{type(e).__name__}"
        finally:
            self._in_flight -= 1
        self.results.append(Result(task, protocol, kind, start, self.now(), outcome))

    async def _request(self, task, protocol, kind, rng, http, stub, client, n, heavy=False) -> str:
        """`heavy`: a larger input (several long texts), so the call stays in flight longer."""
        if task == "hostile":
            return await (self._http_hostile(http, rng) if protocol == "http" else self._grpc_hostile(stub, rng))
        if task == "generate":
            max_tokens = rng.randint(*self.max_tokens)
            body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": client * 1000 + n}
            if kind == "disconnect":
                body.update(max_tokens=self.disconnect_tokens, ignore_eos=True)
            if protocol == "http":
                return await (self._http_generate(http, body) if kind == "unary" else
                              self._http_stream(http, body, kind == "disconnect"))
            return await self._grpc_stream(stub, body, kind == "disconnect")
        if task == "classify":
            inputs = [" ".join(rng.sample(TEXTS, 4)) for _ in range(8)] if heavy else rng.sample(TEXTS, rng.randint(1, 3))
            if protocol == "http":
                return await self._http_unary(http, "/v1/classify", {"inputs": inputs}, "results", len(inputs))
            from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
            return await self._grpc_unary(stub.Classify(pb.ClassifyRequest(inputs=inputs), metadata=GRPC_METADATA,
                                                        timeout=self.request_timeout), "results", len(inputs))
        if task == "tag":
            inputs = [" ".join(rng.sample(TEXTS, 4)) for _ in range(4)] if heavy else rng.sample(TEXTS, rng.randint(1, 2))
            if protocol == "http":
                return await self._http_unary(http, "/v1/tag", {"inputs": inputs, "aggregation_strategy": "simple"},
                                              "results", len(inputs))
            from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
            return await self._grpc_unary(stub.TagTokens(pb.TagRequest(inputs=inputs), metadata=GRPC_METADATA,
                                                         timeout=self.request_timeout), "results", len(inputs))
        question, context = rng.choice(QA)
        if heavy:
            context = " ".join([context] + rng.sample(TEXTS, 4))
        if protocol == "http":
            return await self._http_unary(http, "/v1/answer", {"question": question, "context": context},
                                          "answers", None)
        from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
        return await self._grpc_unary(stub.AnswerQuestion(pb.AnswerRequest(question=question, context=context),
                                                          metadata=GRPC_METADATA, timeout=self.request_timeout),
                                      "answers", None)

    @staticmethod
    async def _http_hostile(http, rng) -> str:
        """One case of bench/hostile.py's table: "refused" for any 4xx (the limits differ from the test's app, so
        the status may be another 4xx than the table's), the status for anything else."""
        from bench.hostile import HTTP_BAD_INPUTS

        route, body, _, _ = rng.choice(HTTP_BAD_INPUTS)
        r = await (http.post(route, content=body) if isinstance(body, bytes) else http.post(route, json=body))
        return "refused" if 400 <= r.status_code < 500 else f"http_{r.status_code}"

    @staticmethod
    async def _grpc_hostile(stub, rng) -> str:
        import grpc

        from bench.hostile import grpc_bad_inputs

        rpc, request, _ = rng.choice(grpc_bad_inputs())
        try:
            response = getattr(stub, rpc)(request, metadata=GRPC_METADATA)
            if rpc == "Generate":
                async for _ in response:
                    pass
            else:
                await response
        except grpc.aio.AioRpcError as e:
            server = ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS")
            return f"grpc_{e.code().name}" if e.code().name in server else "refused"
        return "served"  # every case is a bad request: an answer is wrong

    @staticmethod
    async def _http_unary(http, route: str, body: dict, key: str, count: int | None) -> str:
        r = await http.post(route, json=body)
        if r.status_code != 200:
            return f"http_{r.status_code}"
        items = r.json().get(key)
        return "ok" if isinstance(items, list) and (len(items) == count if count else items) else "bad_answer"

    @staticmethod
    async def _http_generate(http, body: dict) -> str:
        r = await http.post("/v1/generate", json=body)
        if r.status_code != 200:
            return f"http_{r.status_code}"
        data = r.json()
        ok = data.get("choices") and data["choices"][0].get("finish_reason") and data.get("usage")
        return "ok" if ok else "bad_answer"

    @staticmethod
    async def _http_stream(http, body: dict, disconnect: bool) -> str:
        chunks, done, usage = 0, False, False
        async with http.stream("POST", "/v1/generate", json={**body, "stream": True}) as s:
            if s.status_code != 200:
                await s.aread()
                return f"http_{s.status_code}"
            async for line in s.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return f"inband_{chunk['error'].get('type')}"
                usage = usage or "usage" in chunk
                chunks += 1
                if disconnect and chunks >= DISCONNECT_AFTER:
                    return "disconnected"  # leaving the block closes the connection mid-stream
        return "ok" if done and usage else "bad_answer"

    @staticmethod
    async def _grpc_stream(stub, body: dict, disconnect: bool) -> str:
        import grpc

        from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb

        request = pb.GenerateRequest(prompt=body["prompt"], max_tokens=body["max_tokens"],
                                     temperature=body["temperature"], seed=body["seed"],
                                     ignore_eos=body.get("ignore_eos", False))
        call = stub.Generate(request, metadata=GRPC_METADATA)
        messages, usage = 0, False
        try:
            async for message in call:
                messages += 1
                usage = usage or message.HasField("usage")
                if disconnect and messages >= DISCONNECT_AFTER:
                    call.cancel()
                    return "disconnected"
        except grpc.aio.AioRpcError as e:
            return f"grpc_{e.code().name}"
        finally:
            call.cancel()  # no-op when finished; on a client timeout (our cancellation) it hangs up
        return "ok" if messages and usage else "bad_answer"

    @staticmethod
    async def _grpc_unary(call, key: str, count: int | None) -> str:
        import grpc

        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            return f"grpc_{e.code().name}"
        items = getattr(response, key)
        return "ok" if (len(items) == count if count else len(items) > 0) else "bad_answer"


# ------------------------------------------------------------------------------------- cluster-side helpers
# These need `ray` initialised in this process (the driver of the cluster serving the app).


def stage_info(k: int) -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"SeedOssStage{k}", APP).info.remote().result(timeout_s=60)


def generation_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generation", APP).stats.remote().result(timeout_s=60)


def replica_names(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def stage_replica(k: int):
    """A function naming the replica actor of stage k (from its own `info()`)."""
    return lambda: stage_info(k)["actor_name"]


def a_replica(deployment: str):
    """A function naming one replica actor of `deployment`."""
    return lambda: replica_names(deployment)[0]


def _kill_actor(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def wait_replaced(deployment: str, victim: str, timeout: float) -> None:
    """Until Serve runs the deployment's target replica count again, none of them the killed one."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments[deployment]
        running = status.replica_states.get("RUNNING", 0)
        names = replica_names(deployment)
        if victim not in names and names and running == len(names) and str(status.status).endswith("HEALTHY"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{deployment} was not replaced within {timeout:.0f} s")


def wait_idle(num_stages: int, timeout: float) -> dict:
    """Poll until the engine runs nothing and holds no KV, and every stage's cache is empty (frees are
    fire-and-forget); returns the last observation either way."""
    deadline = time.monotonic() + timeout
    while True:
        stats = generation_stats()
        blocks = [stage_info(k)["blocks_in_use"] for k in range(num_stages)]
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_usage"] == 0.0 and not any(blocks)
        if idle or time.monotonic() > deadline:
            return {"num_running": stats["num_running"], "num_waiting": stats["num_waiting"],
                    "kv_usage": stats["kv_usage"], "stage_blocks_in_use": blocks, "idle": idle}
        time.sleep(0.5)


def replica_rss() -> dict[int, tuple[str, int]]:
    """pid → (deployment, RSS bytes) of this app's Serve replica processes on this host (by process title)."""
    import psutil

    pattern = re.compile(rf"ServeReplica:{APP}:(\w+)")
    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            m = pattern.search(" ".join(p.info["cmdline"] or ()))
            if m:
                out[p.info["pid"]] = (m.group(1), p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def rss_growth(before: dict, after: dict) -> dict[str, float]:
    """MiB of RSS growth per deployment, for the replica processes alive both times."""
    growth: dict[str, float] = {}
    for pid, (deployment, rss) in after.items():
        if pid in before:
            growth[deployment] = max(growth.get(deployment, float("-inf")), (rss - before[pid][1]) / 2**20)
    return growth


# ---------------------------------------------------------------------------------------------- the server


def app_config(checkpoint, engine_retry_s: float = 120.0) -> dict:
    """The soak's app: 2 stages, 2 Classification replicas (one survives the kill), an engine that rides out a stage
    replica restart (retries of 0.5 s up to `engine_retry_s`)."""
    return {"checkpoint": str(checkpoint), "num_stages": 2, "classify": {"num_replicas": 2},
            "head_placement": "deployments",
            "retry": {"attempts": int(engine_retry_s / 0.5), "total_s": engine_retry_s, "backoff_s": 0.5,
                      "max_backoff_s": 0.5}}


def start_server(checkpoint, temp_dir: str, num_cpus: int = 2) -> SimpleNamespace:
    """A local Ray instance with Serve's HTTP and gRPC proxies running the soak app; `.shutdown()` stops it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import grpc
    import ray
    from ray import serve

    from seedoss.deployments.app import build_app

    from seedoss.deployments import serve_env

    serve_env.apply()  # the switches `seedoss serve` starts Ray with
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly",
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [
                    "seedoss.proto.seedoss.v1.seedoss_pb2_grpc.add_SeedOssServicer_to_server"]})
    serve.run(build_app(app_config(checkpoint)), name=APP, route_prefix="/")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=120)
    channel.close()

    def shutdown():
        serve.shutdown()
        ray.shutdown()

    return SimpleNamespace(http_url=f"http://127.0.0.1:{http_port}", grpc_target=f"127.0.0.1:{grpc_port}",
                           num_stages=2, shutdown=shutdown)


def standard_kills(stage_at: float, head_at: float) -> list[tuple[float, Kill, callable]]:
    """The stage kill (with a burst of head requests, so prefills are in flight in the stages) and the head kill
    (with a burst of classify requests, so both Classification replicas are serving calls when one dies)."""
    heads = tuple((task, protocol) for task in ("classify", "tag", "answer") for protocol in ("http", "grpc"))
    return [(stage_at, Kill("stage replica (SeedOssStage1)", "SeedOssStage1",
                            ("generate", "classify", "tag", "answer"), stage_at, burst=heads), stage_replica(1)),
            (head_at, Kill("head replica (Classification, 1 of 2)", "Classification", ("classify",), head_at,
                           burst=(("classify", "http"), ("classify", "grpc")) * 5), a_replica("Classification"))]


async def _abandon_the_first_stream(http, timeout: float) -> None:
    """The Generation replica's very first request is a stream that the client abandons while other requests share
    its micro-batches; they must still complete. (The first request creates the engine, whose loop task inherits
    that request's Serve context: if the engine's stage calls counted as that request's children, Serve would
    cancel them with it, and the engine loop would die with every sequence in flight.)"""
    others = []
    async with http.stream("POST", "/v1/generate", json={"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0,
                                                         "ignore_eos": True, "stream": True}) as s:
        received = 0
        async for line in s.aiter_lines():
            received += line.startswith("data: ")
            if received == 1 and not others:
                others = [asyncio.create_task(http.post("/v1/generate", json={
                    "prompt": p, "max_tokens": 48, "temperature": 0, "ignore_eos": True})) for p in PROMPTS[1:5]]
            if received == 12:
                break  # leaving the block closes the connection: the proxy cancels the request
    statuses = [r.status_code for r in await asyncio.wait_for(asyncio.gather(*others), timeout)]
    if statuses != [200] * len(others):
        raise RuntimeError(f"warm-up: requests sharing batches with an abandoned stream got {statuses}")


async def warm_up(server, rounds: int = 2, timeout: float = 120.0) -> None:
    """A few requests of every kind, so replicas have loaded and allocated before the RSS baseline; first of all
    `_abandon_the_first_stream`."""
    soak = Soak(server.http_url, server.grpc_target, clients=len(MIX), duration=0, request_timeout=timeout)
    import grpc
    import httpx

    from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc

    async with httpx.AsyncClient(base_url=server.http_url, timeout=timeout) as http, \
            grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.SeedOssStub(channel)
        await _abandon_the_first_stream(http, timeout)
        for r in range(rounds):
            rng = random.Random(r)
            kinds = [(t, p, k, False) for t, p, k, _ in MIX] + [(t, p, "unary", True) for t in ("classify", "tag", "answer")
                                                                for p in ("http", "grpc")]
            outcomes = await asyncio.wait_for(asyncio.gather(*[soak._request(t, p, k, rng, http, stub, i, r, heavy)
                                                               for i, (t, p, k, heavy) in enumerate(kinds)]), timeout)
            bad = [(m, o) for m, o in zip(kinds, outcomes) if o not in OK]
            if bad:
                raise RuntimeError(f"warm-up failed: {bad}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def all_replicas() -> set[str]:
    """Every replica actor of the app: a replica that died and was replaced shows up as a changed set."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def hostile_comparison(clean: Report, hostile: Report, share: float, deaths: dict[str, list[str]]) -> str:
    """The `--hostile` verdict: server errors, replica deaths, and normal-request p99 against the clean phase."""
    clean_p99, hostile_p99 = percentile(clean.normal_latencies(), 0.99), percentile(hostile.normal_latencies(), 0.99)
    ratio = hostile_p99 / clean_p99 if clean_p99 and hostile_p99 else None
    sent = Counter(r.outcome for r in hostile.results if r.task == "hostile")
    lines = [f"## Hostile share {share:.0%} against the clean soak (same app, phases alternating, no kills)", "",
             "| phase | requests | hostile | normal ok | 5xx / INTERNAL / in-band | other failures | replicas died | "
             "normal p50 s | normal p99 s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, report in (("clean", clean), ("hostile", hostile)):
        lat = report.normal_latencies()
        lines.append(f"| {name} | {len(report.results)} | {sum(r.task == 'hostile' for r in report.results)} | "
                     f"{len(lat)} | {len(report.server_errors())} | "
                     f"{len(report.failures()) - len(report.server_errors())} | {len(deaths[name])} | "
                     f"{_fmt(percentile(lat, 0.5))} | {_fmt(percentile(lat, 0.99))} |")
    lines += ["", f"Normal-request p99, hostile / clean: {_fmt(ratio)}x (goal <= 1.5x)",
              "Hostile requests by outcome: " + ", ".join(f"`{k}` {v}" for k, v in sorted(sent.items()))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="default: the tiny demo checkpoint (created if absent)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=240.0, help="seconds of load")
    p.add_argument("--stage-kill-at", type=float, default=None, help="seconds (default: 25%% of the duration)")
    p.add_argument("--head-kill-at", type=float, default=None, help="seconds (default: 55%% of the duration)")
    p.add_argument("--request-timeout", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--hostile", type=float, default=0.0,
                   help="share of requests drawn from bench/hostile.py: runs a clean phase, then a phase with this "
                        "share, on the same app and without kills, and compares them")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --hostile: clean/hostile phase pairs, alternating (each --duration long)")
    args = p.parse_args(argv)

    import tempfile

    from seedoss.cli import ensure_demo_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_demo_checkpoint()
    stage_at = args.stage_kill_at if args.stage_kill_at is not None else 0.25 * args.duration
    head_at = args.head_kill_at if args.head_kill_at is not None else 0.55 * args.duration
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="soak-ray-") as tmp:
        t = time.monotonic()
        server = start_server(checkpoint, tmp)
        print(f"app up in {time.monotonic() - t:.0f} s; load average {loads[0]}", file=sys.stderr, flush=True)
        try:
            asyncio.run(warm_up(server))
            before = replica_rss()
            sampler_stop = threading.Event()

            def sample_load():
                while not sampler_stop.wait(30):
                    loads.append(load_average())

            threading.Thread(target=sample_load, daemon=True).start()
            def phase(hostile: float, kills) -> Report:
                soak = Soak(server.http_url, server.grpc_target, clients=args.clients, duration=args.duration,
                            request_timeout=args.request_timeout, seed=args.seed, progress_every=15, hostile=hostile)
                return asyncio.run(soak.run(kills))

            if args.hostile:  # clean and hostile phases alternate, so drifting machine load hits both alike
                reports = {name: Report(args.clients, 0.0, 0.0) for name in ("clean", "hostile")}
                deaths: dict[str, list[str]] = {"clean": [], "hostile": []}
                for _ in range(args.rounds):
                    for name, share in (("clean", 0.0), ("hostile", args.hostile)):
                        replicas = all_replicas()
                        part = phase(share, [])
                        deaths[name] += sorted(replicas - all_replicas())
                        reports[name].results += part.results
                        reports[name].duration += part.duration
                        reports[name].wall += part.wall
                        print(f"[soak] {name} phase done; load average {load_average()}", file=sys.stderr,
                              flush=True)
                report = reports["hostile"]
            else:
                report = phase(0.0, standard_kills(stage_at, head_at))
            sampler_stop.set()
            report.end_state = wait_idle(server.num_stages, 120)
            growth = rss_growth(before, replica_rss())
            report.end_state["rss_growth_mib"] = {k: round(v, 1) for k, v in sorted(growth.items())}
            report.end_state["load_average_samples"] = loads
        finally:
            server.shutdown()
    if args.hostile:
        print("## Clean phase\n\n" + reports["clean"].markdown() + "\n\n## Hostile phase\n\n" + report.markdown())
        print("\n" + hostile_comparison(reports["clean"], report, args.hostile, deaths))
    else:
        print(report.markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))


if __name__ == "__main__":
    main()
