"""The Colab demo notebook (notebooks/jaxserve_colab_demo.ipynb) runs end to end on CPU.

It is executed with ``nbclient`` with ``TINY = True`` injected after its ``parameters`` cell
(papermill's convention), on 8 forced host CPU devices so that its mesh has both a ``tp`` and an
``sp`` axis. The kernel is this interpreter: a kernelspec written into a temporary directory
(``argv = [sys.executable, "-m", "ipykernel_launcher", ...]``) and handed to ``jupyter_client``
directly, so a fresh virtualenv with ipykernel installed needs no ``jupyter kernelspec install``
and never picks up some other ``python3`` spec on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

# Plain imports, no importorskip: the test extra declares nbclient, nbformat and ipykernel, and a
# skip would hide a CI install that lost them (the "the notebook test runs in CI").
import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager  # nbclient's dependency
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "jaxserve_colab_demo.ipynb"
KERNEL = "jaxserve-notebook-test"
DEVICES = 8
TINY_PROMPTS, TINY_NEW_TOKENS, TINY_LOADS = 4, 8, (2.0, 8.0)  # the notebook's TINY settings


def generator():
    spec = importlib.util.spec_from_file_location("make_colab_demo", ROOT / "notebooks" / "make_colab_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_parameters(nb, source: str):
    """A copy of ``nb`` with a cell running ``source`` right after the one tagged ``parameters``."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    injected.id = "injected-parameters"
    nb.cells.insert(tagged[0] + 1, injected)
    return nb


def kernel_manager(spec_dir: Path) -> KernelManager:
    """A manager for this interpreter's ipykernel on CPU, with ``DEVICES`` host devices."""
    (spec_dir / KERNEL).mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxserve test (this interpreter)",
        "language": "python",
        "env": {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
            "PYTHONPATH": str(ROOT),  # this checkout's jaxserve, whatever is installed
        },
    }
    (spec_dir / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]))


def cell_with(nb, marker: str):
    """The one code cell whose source contains ``marker``."""
    found = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, f"{len(found)} code cells contain {marker!r}"
    return found[0]


def printed(nb, marker: str) -> str:
    """What the code cell containing ``marker`` printed."""
    return "".join(o.get("text", "") for o in cell_with(nb, marker).outputs if o.output_type == "stream")


def test_committed_notebook_is_the_generators_with_outputs_cleared():
    assert NOTEBOOK.read_text() == generator().render(), "run python notebooks/make_colab_demo.py and commit"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_tiny_on_cpu(tmp_path):
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), "TINY = True")
    work = tmp_path / "work"  # the kernel's cwd: no configs/ there, so the notebook must find the checkout
    work.mkdir()
    client = nbclient.NotebookClient(nb, km=kernel_manager(tmp_path / "kernels"), timeout=300,
                                     resources={"metadata": {"path": str(work)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]

    assert f"configs from {ROOT}" in printed(nb, "def checkout_root")
    assert f"backend: cpu; {DEVICES} device(s)" in printed(nb, "jax.devices()")
    # the tiny model has 4 query / 2 KV heads: tp=4, and sp=2 covers the other devices
    assert "mesh over 8 device(s): tp=4 sp=2" in printed(nb, "engine_mesh(TP, SP)")
    generated = re.search(r"generated (\d+) tokens for (\d+) prompts in \S+ s: ([\d,]+) tokens/s", printed(nb, "llm.generate"))
    assert generated, printed(nb, "llm.generate")
    assert int(generated[1]) == TINY_PROMPTS * TINY_NEW_TOKENS and int(generated[2]) == TINY_PROMPTS
    assert int(generated[3].replace(",", "")) > 0

    outputs = cell_with(nb, "display(Markdown").outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), "the comparison plot is not shown"
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 1, "the summary table is not shown"
    lines = tables[0].splitlines()
    assert lines[0].startswith("| system | qps | requests | finished |") and "tbt_p99_ms" in lines[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert sorted((r[0], float(r[1])) for r in rows) == sorted((s, q) for s in ("vLLM", "Sarathi-Serve") for q in TINY_LOADS)
    assert all(int(r[3]) == int(r[2]) > 0 for r in rows), "every simulated request finishes"
