"""Profile the real engine's step time over a grid of batch shapes: the data a fitted
("profiled") simulator cost model is calibrated on (``jaxserve.sim.profiled_cost_model``).

    python -m jaxserve.profile --model <hf dir> --out profile.json [--dtype float32]
        [--repeats 5] [--warmup 1] [--grid small|default] [--block-size 16] [--kv-cache-gb 4]
        [--temperature 1.0]

A ``ModelRunner`` is built on the model and ``runner.execute(plan)`` is timed on hand-built
BatchPlans (no scheduler; each row's pages drawn at random from the runner's pool): the step time
is ``StepOutput.duration_s``, the same wall time the engine's clock advances by (packing, the
jitted device step, sampling, transfer back). Every row samples at ``temperature`` (the default
1.0 is ``SamplingParams``'; an all-greedy step skips drawing noise and is cheaper, so profile
with the sampling your workload uses). The grid is measured in ``repeats`` passes, each timing
every point once in a fresh random order, so machine drift during a profile spreads over all
points instead of biasing some. What runs just before a sample matters on a CPU (a step timed
right after a run of itself finds its KV and activations in the caches): each sample follows what
precedes that kind of step in serving. A decode-only step follows its own batch's previous step,
so it is timed after ``warmup`` untimed runs of itself; a step with prefill rows follows steps of
other shapes, so it is timed right after the previous point (``warmup`` runs only on its first
visit, which compiles the shape). All samples are stored; their median is what the cost model is
fitted on. The grid has prefill-only points (chunk sizes, one or several chunks per step, chunks that
start mid-prompt after prior context), decode-only points (number of decodes x context length,
uniform and spread) and mixed points (decodes + a prefill chunk). Points the model cannot hold (a
row longer than ``max_position_embeddings``) or the KV pool cannot hold are skipped and listed.

**Resumable.** The profile file is rewritten atomically after every sample; on restart, points
get only the samples they still lack. A file measured on another model, dtype, block size,
device, step geometry or temperature is an error (use another ``--out``), never silently mixed.

Row classes follow the engine's packing (``engine/packing.py``): a row with one new token is a
*decode* row (one query row, one sequence slot); every other row is a *prefill* chunk, padded to
whole blocks of ``block_rows`` rows. The ``engine`` record is the runner's ``StepGeometry``
(``runtime/step_geometry.py``): with it a step's padded shape and attention work can be recomputed from
its rows alone, which is what the profiled cost model is fitted on.

The file format is ``jaxserve.calibration.profile_format``; the CLI is ``python -m jaxserve.profile``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from jaxserve.calibration.grid import grid_points
from jaxserve.calibration.plans import build_plan, time_step
from jaxserve.calibration.profile_format import (
    FINGERPRINT_KEYS, Profile, ProfilePoint, PointSpec, _int, _normalized, load_profile, save_profile,
)  # fmt: skip
from jaxserve.engine.kv_sizing import kv_bytes_per_block
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.kv.config import KVConfig
from jaxserve.model.attention import default_attention_impl
from jaxserve.model.loader import load_model
from jaxserve.runtime.step_geometry import StepGeometry


@dataclasses.dataclass(frozen=True)
class ProfileRun:
    """What one ``profile_model`` call did: samples measured now, points already complete in the
    file, and grid points skipped (with the reason)."""

    profile: Profile
    measured: int
    already: int
    skipped: tuple[tuple[PointSpec, str], ...]



def _fits(spec: PointSpec, max_positions: int) -> str | None:
    if max(spec.row_lens) > max_positions:
        return f"a row of {max(spec.row_lens)} tokens exceeds max_position_embeddings={max_positions}"
    return None


def profile_model(
    model_dir: str,
    out: str,
    *,
    dtype: str | None = None,
    repeats: int = 5,
    warmup: int = 1,
    grid: str = "default",
    block_size: int = 16,
    block_rows: int = 32,
    attention: str = "auto",
    kv_cache_gb: float = 4.0,
    chunk_pages: int = 8,
    buckets_per_octave: tuple[int, int] = (2, 4),
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> ProfileRun:
    """Measures ``grid`` into ``out`` until every point has ``repeats`` samples (see the module
    docstring) and returns what it did. ``ValueError`` for bad options or an ``out`` measured
    under another fingerprint."""
    _int(repeats, "repeats", 1)
    _int(warmup, "warmup", 1)  # the first run of a shape compiles it: never a sample
    _int(block_size, "block_size", 1)
    specs = grid_points(grid)
    if not kv_cache_gb > 0:
        raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ValueError(f"--out {out!r}: its directory does not exist")

    import jax

    cfg, params = load_model(model_dir, dtype)
    impl = default_attention_impl() if attention == "auto" else attention
    header = Profile(
        model=_normalized(dataclasses.asdict(cfg)), dtype=cfg.dtype,
        device={"backend": jax.default_backend(), "kind": jax.devices()[0].device_kind},
        block_size=block_size, points=(), engine=StepGeometry(
            attention=impl, page_size=block_size, block_rows=block_rows, chunk_pages=chunk_pages,
            decode_per_octave=buckets_per_octave[0], blocks_per_octave=buckets_per_octave[1]),
        temperature=float(temperature), model_name=os.path.basename(os.path.normpath(model_dir)), grid=grid,
    )  # fmt: skip
    times: dict[tuple, list[float]] = {}
    measured_before: tuple[ProfilePoint, ...] = ()
    if os.path.exists(out):
        old = load_profile(out)
        mine, theirs = header.fingerprint(), old.fingerprint()
        for key in FINGERPRINT_KEYS:
            if mine[key] != theirs[key]:
                raise ValueError(
                    f"{out} was measured with another {key} ({theirs[key]!r}, now {mine[key]!r}); "
                    "write this profile to another --out"
                )
        measured_before = old.points
        times = {p.key: list(p.times_s) for p in old.points}

    budget_blocks = max(1, int(kv_cache_gb * 2**30 // kv_bytes_per_block(cfg, block_size)))
    skipped, measurable = [], []
    for spec in specs:
        reason = _fits(spec, cfg.max_position_embeddings)
        if reason is None and spec.blocks_needed(block_size) > budget_blocks:
            reason = f"needs {spec.blocks_needed(block_size)} KV pages, --kv-cache-gb holds {budget_blocks}"
        if reason:
            skipped.append((spec, reason))
        else:
            measurable.append(spec)
    todo = [s for s in measurable if len(times.get(s.key, ())) < repeats]
    already = len(measurable) - len(todo)
    # Points of the file outside this grid are kept, after the grid's own (in grid order).
    grid_keys = {s.key for s in specs}
    extra = [p.spec() for p in measured_before if p.key not in grid_keys]

    def current() -> Profile:
        return header.with_points([s.point(times[s.key]) for s in [*specs, *extra] if times.get(s.key)])

    if not todo:
        return ProfileRun(current(), 0, already, tuple(skipped))

    # The pool and the context limit sized to what the grid needs, not to the model's maximum.
    num_blocks = max(s.blocks_needed(block_size) for s in todo)
    max_len = max(max(s.row_lens) for s in todo) + 1
    runner = ModelRunner(cfg, params, KVConfig(num_blocks, block_size), max_model_len=max_len,
                         block_rows=block_rows, attention=impl, chunk_pages=chunk_pages, seed=seed,
                         buckets_per_octave=buckets_per_octave)
    assert runner.geometry == header.engine, (runner.geometry, header.engine)
    rng = np.random.default_rng(seed)
    plans = {s.key: build_plan(s, block_size, cfg.vocab_size, num_blocks, rng, temperature) for s in todo}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]profile[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    measured, visited = 0, set()
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("", total=sum(repeats - len(times.get(s.key, ())) for s in todo))
        # One sample per point per pass, the points in a new random order each pass: a machine
        # whose speed drifts during the profile shifts every point a little, not some a lot.
        for sample in range(repeats):
            for i in rng.permutation(len(todo)):
                spec = todo[i]
                if len(times.get(spec.key, ())) > sample:
                    continue
                bar.update(task, description=f"pass {sample + 1}/{repeats}: {spec.describe()}")
                sample_s = time_step(runner, spec, *plans[spec.key], warmup=warmup, first_visit=spec.key not in visited)
                visited.add(spec.key)
                times.setdefault(spec.key, []).append(sample_s)
                save_profile(current(), out)  # after every sample: a crash loses one
                measured += 1
                bar.advance(task)
    return ProfileRun(current(), measured, already, tuple(skipped))
