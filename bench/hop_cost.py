"""What one call between two processes costs on this machine, three ways (issue 15).

`python -m bench.hop_cost` starts a local Ray instance with `seedoss serve`'s switches (`serve_env`) and times a
caller that sends a [1, 768] float32 array (a decode step's hidden states in the small preset) to a callee that
returns it, one call at a time:

- `serve handle`: a Serve deployment calling another through its DeploymentHandle (gRPC by value, router on the
  replica's loop: how a Generation replica calls a stage with `stage_transport: serve`);
- `ray actor call`: a Ray actor calling another actor's async method (what Serve's calls are built on);
- `plain tcp`: the same two actors, the array sent over an asyncio TCP connection between them and echoed back
  (no framing beyond the fixed size: the floor of any process-to-process data plane, and what
  `stage_transport: direct` builds on).

For each: the mean round trip, and the CPU milliseconds per call in the caller and in the callee (their
`getrusage`), best of `--repeats`. Prints the CPU model and flags and the load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time

from bench.serving import machine

PAYLOAD_SHAPE = (1, 768)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timed(call, calls: int, callee_cpu) -> tuple[float, float, float]:
    """(round trip s, caller CPU s, callee CPU s) per call of `call()`, after one untimed call."""
    await call()
    caller, callee = cpu_seconds(), await callee_cpu()
    start = time.perf_counter()
    for _ in range(calls):
        await call()
    wall = time.perf_counter() - start
    return wall / calls, (cpu_seconds() - caller) / calls, (await callee_cpu() - callee) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per way (interleaved); the best is kept")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import numpy as np
    import ray
    from ray import serve

    from seedoss.deployments import serve_env
    from seedoss.deployments.config import same_loop

    payload = np.zeros(PAYLOAD_SHAPE, np.float32)
    print(f"machine: {machine()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    serve_env.apply()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    @serve.deployment
    class Callee:
        async def echo(self, x):
            return x

        def cpu(self) -> float:
            return cpu_seconds()

    @serve.deployment
    class Caller:
        def __init__(self, callee):
            self.callee = callee

        async def run(self, calls: int):
            return await timed(lambda: self.callee.echo.remote(payload), calls, lambda: self.callee.cpu.remote())

    @ray.remote(num_cpus=0)
    class ActorCallee:
        async def echo(self, x):
            return x

        def cpu(self) -> float:
            return cpu_seconds()

        async def listen(self) -> int:
            async def echo(reader, writer):
                try:
                    while True:
                        writer.write(await reader.readexactly(payload.nbytes))
                except asyncio.IncompleteReadError:  # the caller closed the connection
                    writer.close()

            self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
            return self.server.sockets[0].getsockname()[1]

    @ray.remote(num_cpus=0)
    class ActorCaller:
        def __init__(self, callee):
            self.callee = callee

        async def run(self, calls: int):
            return await timed(lambda: self.callee.echo.remote(payload), calls, lambda: self.callee.cpu.remote())

        async def run_tcp(self, port: int, calls: int):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = payload.tobytes()

            async def call():
                writer.write(data)
                await reader.readexactly(len(data))

            try:
                return await timed(call, calls, lambda: self.callee.cpu.remote())
            finally:
                writer.close()

    options = same_loop({"ray_actor_options": {"num_cpus": 0}})
    serve.start(proxy_location="Disabled")
    handle = serve.run(Caller.options(**options).bind(Callee.options(**options).bind()), name="hop_cost",
                       route_prefix=None)
    callee = ActorCallee.remote()
    caller = ActorCaller.remote(callee)
    port = ray.get(callee.listen.remote())
    ways = {
        "serve handle": lambda: handle.run.remote(args.calls).result(),
        "ray actor call": lambda: ray.get(caller.run.remote(args.calls)),
        "plain tcp": lambda: ray.get(caller.run_tcp.remote(port, args.calls)),
    }
    results: dict[str, list[tuple[float, float, float]]] = {way: [] for way in ways}
    for i in range(args.repeats):  # interleaved: a drifting machine load hits every way alike
        for way, run in ways.items():
            results[way].append(run())
            print(f"[{i + 1}/{args.repeats}] {way}: {1e3 * results[way][-1][0]:.3f} ms", flush=True)
    print(f"\n{'way':16} {'round trip ms':>14} {'caller cpu ms':>14} {'callee cpu ms':>14}")
    for way, rows in results.items():
        wall, caller_cpu, callee_cpu = min(rows)
        print(f"{way:16} {1e3 * wall:>14.3f} {1e3 * caller_cpu:>14.3f} {1e3 * callee_cpu:>14.3f}")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ray.shutdown()


if __name__ == "__main__":
    main()
