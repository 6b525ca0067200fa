"""The layer order of docs/architecture.md, checked by import-linter (contracts in pyproject.toml):
no module imports upward, none imports its siblings in a circle, and nothing beneath the executors
imports jax. The second test proves the check bites: an upward import added to a copy of the
package breaks the layers contract."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def lint_imports(cwd: pathlib.Path, package_parent: pathlib.Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    # package_parent first on the path: the linter analyses that copy of jaxserve, not the installed one.
    env = {"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_layers_hold():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(ROOT / "jaxserve", tmp_path / "jaxserve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kv_config = tmp_path / "jaxserve" / "kv" / "config.py"
    kv_config.write_text(kv_config.read_text() + "\n\ndef _upward():\n    from jaxserve.sim import simulate  # the kv layer reaching up\n")
    result = lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "jaxserve.kv is not allowed to import jaxserve.sim" in result.stdout, result.stdout
    assert "jaxserve.kv.config -> jaxserve.sim" in result.stdout
