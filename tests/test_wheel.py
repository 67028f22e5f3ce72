"""The package as a user gets it: the wheel installs one top-level package (`seedoss`; the repository's services/,
deployments/ and proto/ folders become seedoss.services, seedoss.deployments and seedoss.proto), and `seedoss serve`
run from that wheel, in a directory outside the repository, answers HTTP and gRPC.

The wheel is built from a copy of the files the images copy (so the build leaves nothing in the checkout) and
installed into a fresh venv with `--no-deps`: a `.pth` line lends it this environment's dependencies (torch, Ray),
while `seedoss` itself can only come from the wheel (this environment's editable-install hook is a .pth file in a
directory that the line adds, and Python only runs .pth files of site directories)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from seedoss.deployments.serve_env import free_port

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "seedoss", "services", "deployments", "proto")
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
        else:
            shutil.copy2(path, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (whl,) = out.glob("seedoss_serve-*.whl")
    return whl


def test_the_wheel_installs_only_the_seedoss_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"seedoss", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for module in ("seedoss/services/qa.py", "seedoss/deployments/app.py", "seedoss/engine/engine.py",
                   "seedoss/proto/seedoss/v1/seedoss_pb2_grpc.py", "seedoss/proto/seedoss/v1/seedoss.proto",
                   "seedoss/csrc/"):
        assert any(n.startswith(module) for n in names), f"{module} missing from the wheel"
    # every source module of the four folders made it in (a package left out of pyproject's list would not)
    for folder, prefix in (("seedoss", "seedoss"), ("services", "seedoss/services"),
                           ("deployments", "seedoss/deployments"), ("proto", "seedoss/proto")):
        for py in (REPO / folder).rglob("*.py"):
            assert f"{prefix}/{py.relative_to(REPO / folder).as_posix()}" in names, py


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    lent = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in lent))
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def _outside_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv),
            "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def test_no_generic_top_level_names_are_importable(venv, tmp_path):
    """`proto` may well exist: proto-plus (a Google client dependency) installs a top-level `proto` package, which
    is how the old layout collided in practice. Ours must not be what it finds."""
    probe = ("import importlib.util, seedoss, seedoss.services.qa, seedoss.deployments.app, "
             "seedoss.proto.seedoss.v1.seedoss_pb2_grpc\n"
             "print(seedoss.__file__, [n for n in ('services', 'deployments', 'proto.seedoss') if importlib.util.find_spec(n)])")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env=_outside_env(venv), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    where, found = out.stdout.rsplit(" [", 1)
    assert where.startswith(str(venv)) and found.strip() == "]", out.stdout


@pytest.mark.slow
def test_seedoss_serve_from_the_installed_wheel_outside_the_repository(venv, demo_checkpoint, tmp_path):
    import grpc

    from seedoss.proto.seedoss.v1 import seedoss_pb2, seedoss_pb2_grpc

    port, grpc_port = free_port(), free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(venv / "bin" / "seedoss"), "serve", "--checkpoint", str(demo_checkpoint), "--port", str(port),
         "--grpc-port", str(grpc_port), "--ray-address", "local"],
        cwd=tmp_path, env=_outside_env(venv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 600
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-5000:]
                # the CLI's own "up" line as well as readiness: the gateway can answer ready while `serve.run` still
                # waits for the last deployment (a SIGINT then stops it unserved: tests/test_cli_serve.py)
                try:
                    if ("SeedOss Serve is up" in (tmp_path / "serve.log").read_text()
                            and client.get("/health/ready").status_code == 200):
                        break
                except httpx.TransportError:
                    pass
                time.sleep(2)
            r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
            r = client.post("/v1/classify", json={"inputs": ["a short text"]})
            assert r.status_code == 200 and r.json()["results"][0]["predictions"], r.text
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = seedoss_pb2_grpc.SeedOssStub(channel)
            replies = list(stub.Generate(seedoss_pb2.GenerateRequest(prompt="Hello", max_tokens=3, temperature=0),
                                         metadata=(("application", "seedoss"),), timeout=120))
            assert sum(len(c.token_ids) for r in replies for c in r.choices) == 3
    finally:
        server.send_signal(signal.SIGINT)  # the CLI's own shutdown: serve.shutdown() and ray.shutdown()
        try:
            stopped = server.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever of the local Ray cluster outlived it
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            log.close()
    output = (tmp_path / "serve.log").read_text()
    assert stopped == 0 and "SeedOss Serve is up" in output and "shutting down" in output, output[-5000:]
