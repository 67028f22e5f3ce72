"""`seedoss serve` stops cleanly on a Ctrl-C that arrives while it is still deploying (the serve-and-query path once
it is up is tests/test_wheel.py's)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from seedoss.deployments.serve_env import free_port

pytestmark = pytest.mark.timeout(600)


def test_a_ctrl_c_during_the_deploy_stops_the_server(demo_checkpoint, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "seedoss.deployments.cli", "serve", "--checkpoint", str(demo_checkpoint),
             "--port", str(free_port()), "--grpc-port", str(free_port()), "--ray-address", "local"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "deploying" not in log_path.read_text():  # Ray and Serve are up; `serve.run` has begun
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-5000:]
            time.sleep(0.2)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=300) == 0, log_path.read_text()[-5000:]
        output = log_path.read_text()
        assert "shutting down" in output and "Traceback" not in output, output[-5000:]
        assert "SeedOss Serve is up" not in output  # stopped, not served
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of its Ray instance outlived it
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
