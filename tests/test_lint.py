"""The tree is lint-clean (ruff, as configured in pyproject.toml) and the public entry points of the
recipe sections, the model plans and parallelize type-check (mypy), so a wrong section, a
misspelled plan style or a model missing what parallel/ asks of it fails here, not in a job."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TYPED = ["launcher.config", "launcher.config_keys", "launcher.log", "parallel.config", "models.config",
         "data.config", "models.parallel_plan", "models.registry", "parallel.parallelize", "parallel.tensor_parallel",
         "parallel.pipeline", "parallel.data_parallel", "parallel.vocab_parallel_loss"]


def test_ruff_is_clean():
    pytest.importorskip("ruff")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_public_modules_type_check(tmp_path):
    pytest.importorskip("mypy")
    (tmp_path / "longtrain").symlink_to(ROOT)  # the repository root is the package
    args = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
            "--cache-dir", str(tmp_path / "cache")]
    for module in TYPED:
        args += ["-p", f"longtrain.{module}"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "MYPYPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_longtrain_import_resolves():
    """Every `longtrain.x.y` module named in an import anywhere in the tree exists (a moved module
    left behind in a benchmark's lazy import fails here, not in a subprocess smoke test)."""
    import ast
    import importlib.util

    missing = []
    for path in ROOT.rglob("*.py"):
        if any(part in ("runs", ".git") for part in path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("longtrain.") and importlib.util.find_spec(name) is None:
                    missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing
