"""Module boundaries the architecture promises (DESIGN §1): the model library never reaches into the Serve
wrappers, and the gateway maps engine errors without loading torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_seedoss_imports_nothing_from_deployments():
    offenders = []
    for path in (ROOT / "seedoss").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "deployments"]
    assert offenders == []


def test_engine_errors_map_without_torch():
    code = ("import sys; from seedoss.services.errors import from_exception; from seedoss.engine import RequestError; "
            "e = from_exception(RequestError('bad', 'max_tokens')); "
            "assert e.param == 'max_tokens', e; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
