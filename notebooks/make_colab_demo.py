"""Writes ``notebooks/jaxserve_colab_demo.ipynb`` (outputs cleared) from the cells below.

Edit the cells here and run ``python notebooks/make_colab_demo.py``; tests/test_notebook.py checks
that the committed notebook is exactly what this script writes, then executes it on CPU with the
``TINY`` settings. The cell tagged ``parameters`` follows papermill's convention: a runner inserts
a cell after it that overrides its values (``papermill -p TINY True`` works too).
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jaxserve_colab_demo.ipynb")
PARAMETERS_TAG = "parameters"  # papermill's tag of the cell a runner overrides

INTRO = """\
# jaxserve on whatever accelerator this runtime has

jaxserve is a JAX framework for LLM serving: schedulers are pure functions that
emit batch plans, and either a real jit-compiled Flax model or a discrete-event simulator executes
them. This notebook installs it, serves a small Llama-family model on every device it finds (a
Colab TPU, a GPU, or the CPU) and compares two schedulers in the simulator.

On Colab choose *Runtime → Change runtime type → TPU* (or a GPU) before running; every cell also
runs on a CPU-only runtime, just slower."""

INSTALL_MD = """\
## 1. Install

The cell below clones the repository and installs it with pip (its `configs/` directory of
experiment configs lives beside the package, not inside it, hence a clone rather than
`pip install git+...`). **Set `REPO_URL` to the repository's git URL** (what you would pass to
`git clone`) before running it on Colab; where `jaxserve` is already importable (a local checkout)
it installs nothing. Colab's TPU runtimes ship `jax` with TPU support; on a bare TPU VM run
`pip install -U "jax[tpu]"` first."""

INSTALL = """\
REPO_URL = ""  # the repository's git URL, e.g. the https address of its GitHub page + ".git"

import os
import subprocess
import sys

# On a TPU VM without TPU-enabled jax, first: !pip install -U "jax[tpu]"
try:
    import jaxserve
except ImportError:
    if not REPO_URL:
        raise RuntimeError("jaxserve is not installed: set REPO_URL in this cell to the repository's git URL") from None
    if not os.path.isdir("jaxserve-src"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "jaxserve-src"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "./jaxserve-src"], check=True)
    import jaxserve


def checkout_root() -> str:
    \"\"\"The directory holding configs/ (a checkout: jaxserve's parent, the clone above, or the
    notebook's directory or its parent).\"\"\"
    here = os.getcwd()
    for root in (os.path.dirname(os.path.dirname(jaxserve.__file__)), "jaxserve-src", here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(root, "configs", "default.py")):
            return os.path.abspath(root)
    raise FileNotFoundError("no configs/default.py found: run this notebook from a jaxserve checkout or set REPO_URL")


ROOT = checkout_root()
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `import configs` (the experiment configs)
print("jaxserve from", os.path.dirname(jaxserve.__file__), "| configs from", ROOT)"""

PARAMETERS_MD = """\
## 2. Parameters

`TINY = True` shrinks the model and the workloads to seconds on a CPU (the project's test runs the
notebook that way); `MODEL_DIR` points at a local Hugging Face model directory (`config.json`,
`*.safetensors`, optionally `tokenizer.json`) to serve instead of a random Llama."""

PARAMETERS = """\
TINY = False
MODEL_DIR = \"\""""

SETTINGS_MD = """\
The sizes each setting implies (edit freely): the random model's shape, the prompts, and the
arrival rates of the simulator comparison."""

SETTINGS = """\
if TINY:
    SHAPE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=128, max_position_embeddings=256)
    NUM_PROMPTS, PROMPT_LEN, MAX_NEW_TOKENS = 4, 12, 8
    SIM_LOADS, SIM_REQUESTS = (2.0, 8.0), 60
else:
    # ~190M parameters: 8 query / 4 KV heads of 128 dimensions (Llama 2/3's head size, and the
    # TPU's 128-wide vector lanes), an MLP of 4096 and a 32000-token vocabulary, which split evenly
    # over 1, 2, 4 or 8 devices.
    SHAPE = dict(num_layers=8, hidden_size=1024, num_heads=8, num_kv_heads=4, head_dim=128,
                 intermediate_size=4096, vocab_size=32000, max_position_embeddings=2048)
    NUM_PROMPTS, PROMPT_LEN, MAX_NEW_TOKENS = 16, 128, 128
    SIM_LOADS, SIM_REQUESTS = (2.0, 4.0, 6.0, 8.0, 10.0), 1000"""

DEVICES_MD = """\
## 3. The accelerator

`jax.devices()` lists what this runtime has: TPU cores, GPUs, or the CPU. Everything below uses all
of them."""

DEVICES = """\
import jax

devices = jax.devices()
BACKEND = jax.default_backend()
print(f"backend: {BACKEND}; {len(devices)} device(s): {devices[0].device_kind}")"""

MODEL_MD = """\
## 4. A small model

Without `MODEL_DIR`, a randomly initialised Llama of the shape above is written as a Hugging Face
checkpoint (`config.json` + `model.safetensors`) into a temporary directory by jaxserve's own
writer, so nothing is downloaded; its outputs are random tokens, but the work per token is a real
model's."""

MODEL = """\
import tempfile

from jaxserve.model.config import ModelConfig
from jaxserve.model.export import save_hf_checkpoint
from jaxserve.model.llama import params_of, random_model

if MODEL_DIR:
    model_dir = MODEL_DIR
else:
    model_dir = tempfile.mkdtemp(prefix="jaxserve-random-llama-")
    random_cfg = ModelConfig(**SHAPE, rms_norm_eps=1e-5, dtype="float32")
    save_hf_checkpoint(model_dir, random_cfg, params_of(random_model(random_cfg, seed=0)))
cfg = ModelConfig.from_dir(model_dir)
print(f"{cfg.model_type}: {cfg.num_params / 1e6:.1f}M parameters, {cfg.num_layers} layers, "
      f"{cfg.num_heads} query / {cfg.num_kv_heads} KV heads, in {model_dir}")"""

MESH_MD = """\
## 5. A mesh over every device

Tensor parallelism splits attention heads, the MLP and the vocabulary over a mesh axis `tp`; the
largest `tp` that divides the device count and that the model's head counts allow
(`check_tensor_parallel`) is taken, and the remaining factor becomes `sp`, over which each step's
token rows are split, so the mesh covers every device."""

MESH = """\
from jaxserve.parallel.tensor_parallel import check_tensor_parallel, engine_mesh


def splits_over(tp: int) -> bool:
    try:
        check_tensor_parallel(cfg, tp)
        return True
    except ValueError:
        return False


n = jax.device_count()
TP = max(tp for tp in range(1, n + 1) if n % tp == 0 and splits_over(tp))
SP = n // TP
mesh = engine_mesh(TP, SP)
print(f"mesh over {mesh.size} device(s): tp={TP} sp={SP}", dict(mesh.shape))"""

GENERATE_MD = """\
## 6. Generate

`jaxserve.LLM` puts the model on the mesh and serves every prompt through a scheduler (vLLM's by
default), a paged KV cache and one jitted step per batch plan. The first call compiles the steps it
needs; the second, timed on its own, shows the serving speed. Prompts are text when the model
directory has a tokenizer, random token ids otherwise."""

GENERATE = """\
import time

import numpy as np

DTYPE = "float32" if BACKEND == "cpu" else "bfloat16"
llm = jaxserve.LLM(model_dir, tp=TP, sp=SP, dtype=DTYPE)
if llm.tokenizer is not None:
    texts = ["The capital of France is", "Paged attention stores the KV cache in", "JAX compiles a function",
             "A scheduler decides which requests"]
    prompts = [texts[i % len(texts)] for i in range(NUM_PROMPTS)]
else:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, size=PROMPT_LEN).tolist() for _ in range(NUM_PROMPTS)]
sampling = jaxserve.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)

start = time.perf_counter()
llm.generate(prompts, sampling)
first_s = time.perf_counter() - start
start = time.perf_counter()
outs = llm.generate(prompts, sampling)
second_s = time.perf_counter() - start
generated = sum(len(o.token_ids) for o in outs)
print(f"generated {generated} tokens for {len(prompts)} prompts in {second_s:.3f} s: "
      f"{generated / second_s:,.0f} tokens/s on {n} {BACKEND} device(s) (first call, compiling included: {first_s:.1f} s)")
for o in outs[:2]:
    print(o.request_id, o.finish_reason, o.text if o.text is not None else list(o.token_ids[:16]))"""

SIM_MD = """\
## 7. A simulator comparison: vLLM against Sarathi-Serve

The simulator replays the Azure 2023 conversation trace (shipped with the package) at several
arrival rates on a simulated A100-80GB serving Llama-3-8B (the configs' defaults). vLLM runs whole
prompts in a step and stalls the decodes beside them; Sarathi-Serve's chunked prefills keep the
time between tokens flat at the cost of some time to first token."""

SIM = """\
from configs import sarathi, vllm
from jaxserve.sim import simulate

SYSTEMS = {"vLLM": vllm, "Sarathi-Serve": sarathi}
rows = []
for system, module in SYSTEMS.items():
    for qps in SIM_LOADS:
        config = module.get_config()
        config.workload.qps = qps
        config.workload.max_requests = SIM_REQUESTS
        m = simulate(config).metrics
        rows.append({"system": system, "qps": qps, "requests": m["num_requests"], "finished": m["num_finished"],
                     "ttft_p50_s": m["ttft_s"]["p50"], "ttft_p99_s": m["ttft_s"]["p99"],
                     "tbt_p99_ms": 1e3 * m["tbt_s"]["p99"], "throughput_tok_s": m["throughput_tok_s"],
                     "preemptions": m["num_preemptions"]})
print(f"simulated {len(rows)} runs")"""

PLOT_MD = """\
P99 time to first token, P99 time between tokens and output throughput against the arrival rate."""

PLOT = """\
import io

from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure

fig = Figure(figsize=(13, 3.6))
panels = (("ttft_p99_s", "P99 TTFT (s)"), ("tbt_p99_ms", "P99 TBT (ms)"), ("throughput_tok_s", "output tokens/s"))
for ax, (key, label) in zip(fig.subplots(1, 3), panels):
    for system in SYSTEMS:
        mine = [r for r in rows if r["system"] == system]
        ax.plot([r["qps"] for r in mine], [r[key] for r in mine], marker="o", label=system)
    ax.set(xlabel="arrival rate (req/s)", ylabel=label)
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle(f"{config.model.name} on a simulated {config.hardware.name}, Azure 2023 conversation trace")
fig.tight_layout()
png = io.BytesIO()
fig.savefig(png, format="png", dpi=90)  # shown as a PNG: no matplotlib backend needed
display(Image(png.getvalue()))



def fmt(v) -> str:
    return (f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}") if isinstance(v, float) else str(v)


columns = list(rows[0])
table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
table += ["| " + " | ".join(fmt(v) for v in r.values()) + " |" for r in rows]
display(Markdown("\\n".join(table)))"""

NEXT_MD = """\
## Next

`python -m jaxserve.experiment --config=configs/sarathi.py` runs one experiment from the command
line (`--config_help` lists every key), `experiments/` holds the papers' comparisons, and the
README shows how to write a scheduler of your own."""


def build() -> nbformat.NotebookNode:
    """The notebook: markdown and code cells in order, outputs empty, stable cell ids."""
    cells = [
        new_markdown_cell(INTRO), new_markdown_cell(INSTALL_MD), new_code_cell(INSTALL),
        new_markdown_cell(PARAMETERS_MD), new_code_cell(PARAMETERS, metadata={"tags": [PARAMETERS_TAG]}),
        new_markdown_cell(SETTINGS_MD), new_code_cell(SETTINGS),
        new_markdown_cell(DEVICES_MD), new_code_cell(DEVICES),
        new_markdown_cell(MODEL_MD), new_code_cell(MODEL),
        new_markdown_cell(MESH_MD), new_code_cell(MESH),
        new_markdown_cell(GENERATE_MD), new_code_cell(GENERATE),
        new_markdown_cell(SIM_MD), new_code_cell(SIM),
        new_markdown_cell(PLOT_MD), new_code_cell(PLOT),
        new_markdown_cell(NEXT_MD),
    ]  # fmt: skip
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"  # nbformat's default ids are random: the file would change every run
    metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",  # Colab opens it on a TPU runtime
        "colab": {"provenance": []},
    }
    return new_notebook(cells=cells, metadata=metadata)


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main() -> int:
    with open(NOTEBOOK, "w") as f:
        f.write(render())
    print("wrote", NOTEBOOK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
