"""The number of compiled step shapes is bounded whatever the config: every shipped config on the
engine gets the map-budget cap, and the one whose warm-up grid is largest compiles at most the cap
(a full warm-up of it would otherwise compile hundreds of shapes and, on XLA:CPU, exhaust the
process's memory maps: the crash of issue 15)."""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest

from jaxserve.config import override
from jaxserve.engine.compilation import MAPS_PER_SHAPE, default_max_compiled_shapes, max_map_count
from jaxserve.engine.model_runner import bucket_shapes
from jaxserve.engine.serve_config import build_engine, serve_engine, warmup_limits

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def shipped_config(name: str, model_dir: str, **values):
    """configs/<name>.py on the engine backend with the tiny model and a small synthetic workload
    (the shipped workloads are for simulated 7-8B models); its scheduler options are kept."""
    sys.path.insert(0, str(ROOT))
    try:
        config = importlib.import_module(f"configs.{name}").get_config()
    finally:
        sys.path.remove(str(ROOT))
    base = {"backend": "engine", "model.path": model_dir, "workload.kind": "poisson", "workload.qps": 50.0,
            "workload.num_requests": 300, "workload.clients": "", "workload.lengths.kind": "fixed",
            "workload.lengths.prompt_len": 24, "workload.lengths.output_len": 3, "sim.max_time_s": None,
            "kv.block_size": 4}  # fmt: skip
    return override(config, {**base, **values})


def warmup_grid(run) -> int:
    max_decode, max_blocks = warmup_limits(run)
    return len(bucket_shapes(run.runner.spec, max_decode, max_blocks))


def test_shipped_configs_are_all_covered():
    assert {"default", "orca", "sarathi", "static", "vllm", "vtc"} <= set(SHIPPED)


@pytest.fixture(scope="module")
def grids(llama):
    """Per shipped config: its runner's cap and the size of its full warm-up grid."""
    out = {}
    for name in SHIPPED:
        run = build_engine(shipped_config(name, llama[0]))
        out[name] = (run.runner.max_compiled_shapes, warmup_grid(run))
    return out


def test_every_shipped_config_gets_the_map_budget_cap(grids):
    cap = default_max_compiled_shapes()
    assert 8 <= cap <= 256 and cap * MAPS_PER_SHAPE <= max(max_map_count() // 3, 8 * MAPS_PER_SHAPE)
    for name, (runner_cap, grid) in grids.items():
        assert runner_cap == cap, name
        assert grid > 0, name


def test_the_largest_shipped_config_compiles_at_most_the_cap(grids, llama):
    name = max(grids, key=lambda n: grids[n][1])
    grid = grids[name][1]
    assert grid > 100  # hundreds of shapes without a cap: what crashed the first-hour run
    cap = 5  # small, so the test compiles few shapes; the default cap is checked above
    run = build_engine(shipped_config(name, llama[0], **{"engine.warmup": True, "engine.max_compiled_shapes": cap,
                                                         "workload.num_requests": 12}))  # fmt: skip
    assert warmup_grid(run) > cap
    warmed = []
    results = serve_engine(run, on_warmup=lambda done, total, shape: warmed.append((done, total)))
    m = results.metrics
    assert warmed[-1] == (cap, cap)  # the warm-up stopped at the cap, with progress per shape
    assert m["num_finished"] == 12
    assert run.runner.num_compiled_shapes <= cap and m["num_compiled_shapes"] <= cap
    assert m["num_compilations"] >= cap
