"""A fresh clone runs the main job on its own: no ../shared beside it, no $JAXSERVE_TRACES (the
default workload is the Azure sample shipped inside the package)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the project's git checkout to copy")
def test_main_job_runs_from_a_clone_with_no_shared_traces(tmp_path):
    clone = tmp_path / "lonely" / "jaxserve"  # nothing beside it: no ../shared
    for f in tracked_files():
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, clone / f)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k != "JAXSERVE_TRACES"}
    env.update(PYTHONPATH=str(clone), JAX_PLATFORMS="cpu")
    where = subprocess.run([sys.executable, "-c", "import jaxserve; print(jaxserve.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(clone), where  # the clone's code, not an installed copy
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxserve.experiment", "--config=configs/sarathi.py", f"--config.output_dir={out}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_requests"] == 2867 and metrics["num_finished"] > 0
    assert (out / "requests.csv").is_file()
