"""What Serve's own switches (`deployments/serve_env.py`) are worth, on a toy app with nothing of ours in it.

`python -m bench.serve_switches` runs one app — an ingress deployment that calls a second one twice with a small
numpy array (the shape of a decode step's hidden states), so one HTTP request is three Serve hops — on a fresh local
Ray instance per configuration, because Serve reads these switches when its processes start:

- `serve defaults`: Ray 2.60 as installed (Python proxy, Ray actor calls, user code and routers on threads of their own);
- `seedoss serve`: each replica's user code and routers on its event loop, handle calls (the proxy's too) over gRPC
  by value — `serve_env`'s switches;
- `+ HAProxy ingress`: that plus HAProxy in place of Serve's Python proxy (`seedoss serve`'s default, see `serve_env`).

For each it prints HTTP requests/s and p50 at 1 and 16 concurrent clients (aiohttp, in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from bench.serving import machine
from seedoss.deployments.serve_env import free_port

SAME_LOOP_GRPC = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                  "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
CONFIGS = {
    "serve defaults": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
                       "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "seedoss serve": SAME_LOOP_GRPC,
    "+ HAProxy ingress": {**SAME_LOOP_GRPC, "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def serve_app(port: int):
    import numpy as np
    from ray import serve

    @serve.deployment(max_ongoing_requests=64)
    class Inner:
        async def __call__(self, x):
            return x * 1.0

    @serve.deployment(max_ongoing_requests=64)
    class Outer:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, request=None):
            x = np.ones((4, 256), np.float32)
            for _ in range(2):
                x = await self.inner.remote(x)
            return {"sum": float(x.sum())}

    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(Outer.bind(Inner.bind()), name="toy", route_prefix="/")


async def measure(url: str, requests: int, clients: int) -> tuple[float, float]:
    import aiohttp

    latencies = []
    async with aiohttp.ClientSession() as session:
        async def client():
            for _ in range(requests // clients):
                start = time.perf_counter()
                async with session.post(url, json={}) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        return len(latencies) / (time.perf_counter() - start), statistics.median(latencies) * 1e3


def child(requests: int) -> None:
    """One configuration (already in this process's environment): serve the toy app, print one JSON line."""
    import ray

    from seedoss.deployments.serve_env import apply

    apply()  # with HAProxy: its private paths and ports; the switches themselves come from the parent
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve_app(port)
    url = f"http://127.0.0.1:{port}/"
    asyncio.run(measure(url, 50, 1))  # warm-up
    row = {}
    for clients in (1, 16):
        row[f"rps_{clients}"], row[f"p50_{clients}"] = asyncio.run(measure(url, requests, clients))
    print(json.dumps(row), flush=True)
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=800, help="requests per cell")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.requests)
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print("| configuration | 1 client req/s | 1 client p50 ms | 16 clients req/s | 16 clients p50 ms |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, switches in CONFIGS.items():
        print(f"{name} …", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "bench.serve_switches", "--child", "--requests",
                               str(args.requests)], env={**os.environ, **switches}, capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        base = base or row
        print(f"| {name} | {row['rps_1']:.0f} | {row['p50_1']:.2f} | {row['rps_16']:.0f} "
              f"({row['rps_16'] / base['rps_16']:.2f}x) | {row['p50_16']:.1f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
