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
(``engine/buckets.py``): with it a step's padded shape and attention work can be recomputed from
its rows alone, which is what the profiled cost model is fitted on.

File format (JSON, ``"format": 2``)::

    {"format": 2,
     "model": {ModelConfig fields},        # jaxserve.model.config.ModelConfig, as JSON
     "model_name": "<checkpoint dir name>", # informational
     "dtype": "float32" | "bfloat16" | "float16",
     "device": {"backend": "cpu" | "gpu" | "tpu", "kind": "<jax device_kind>"},
     "block_size": 16,                      # tokens per KV page (= engine.page_size)
     "engine": {StepGeometry fields},       # attention, page_size, block_rows, chunk_pages, buckets
     "temperature": 1.0,                    # every row sampled at it (0: greedy)
     "grid": "small" | "default",          # informational
     "points": [{
        "prefill_chunk_lens": [n_1, ...],   # new tokens of each prefill row (each >= 2)
        "prefill_context": [c_1, ...],      # tokens already in KV before each prefill row's chunk
        "decode_context": [d_1, ...],       # tokens already in KV before each decode row's token
        "num_prefill_tokens": sum(n_i),     # derived, for readers
        "num_decodes": len(decode_context), # derived
        "decode_context_tokens": sum(d_j),  # derived
        "num_seqs": decodes + prefill rows, # derived
        "times_s": [seconds, ...],          # every timed repeat
        "median_s": median(times_s)}, ...]}

The cost model's features (``profiled_cost_model.FEATURES``) are a constant per step and the
``StepGeometry.work`` terms: padded token rows, padded sequence slots, the decode and the prefill
attention work as the engine's attention path does it, and the number of real rows.

``load_profile(path)`` validates a file and names the first problem in a ``ValueError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxserve.engine.buckets import StepGeometry

FORMAT = 2
GRIDS = ("small", "default")
_TOP_KEYS = ("format", "model", "dtype", "device", "block_size", "engine", "temperature", "points")
# What makes two profiles comparable: measuring any of these differently changes step times.
# "model" last: its fields include the dtype, and a dtype mismatch should be reported as one.
FINGERPRINT_KEYS = ("dtype", "device", "block_size", "engine", "temperature", "model")


# -- the file format ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProfilePoint:
    """One measured step shape; see the module docstring for the fields (tokens and seconds)."""

    prefill_chunk_lens: tuple[int, ...]
    prefill_context: tuple[int, ...]
    decode_context: tuple[int, ...]
    times_s: tuple[float, ...]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_chunk_lens)

    @property
    def num_decodes(self) -> int:
        return len(self.decode_context)

    @property
    def decode_context_tokens(self) -> int:
        return sum(self.decode_context)

    @property
    def num_seqs(self) -> int:
        return self.num_decodes + len(self.prefill_chunk_lens)

    @property
    def median_s(self) -> float:
        return float(np.median(self.times_s))

    @property
    def key(self) -> tuple:
        """The shape measured (what a resumed run compares to skip a point)."""
        return (self.prefill_chunk_lens, self.prefill_context, self.decode_context)

    def spec(self) -> PointSpec:
        """The grid shape this point measured."""
        return PointSpec(tuple(zip(self.prefill_context, self.prefill_chunk_lens)), self.decode_context)

    def to_json(self) -> dict:
        return {
            "prefill_chunk_lens": list(self.prefill_chunk_lens),
            "prefill_context": list(self.prefill_context),
            "decode_context": list(self.decode_context),
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_decodes": self.num_decodes,
            "decode_context_tokens": self.decode_context_tokens,
            "num_seqs": self.num_seqs,
            "times_s": list(self.times_s),
            "median_s": self.median_s,
        }


@dataclasses.dataclass(frozen=True)
class Profile:
    """A validated profile file (``load_profile``); ``model`` holds ModelConfig fields as JSON."""

    model: Mapping[str, Any]
    dtype: str
    device: Mapping[str, str]
    block_size: int
    points: tuple[ProfilePoint, ...]
    engine: StepGeometry
    temperature: float = 1.0  # every profiled row samples at this temperature (0: greedy)
    model_name: str = ""
    grid: str = ""

    def model_config(self):
        """The profiled model's ``ModelConfig``."""
        return _model_config(self.model, "model")

    def fingerprint(self) -> dict:
        return {k: _normalized(self.to_json()[k]) for k in FINGERPRINT_KEYS}

    def with_points(self, points: Sequence[ProfilePoint]) -> Profile:
        return dataclasses.replace(self, points=tuple(points))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "model": _normalized(self.model),
            "model_name": self.model_name,
            "dtype": self.dtype,
            "device": dict(self.device),
            "block_size": self.block_size,
            "engine": self.engine.to_json(),
            "temperature": self.temperature,
            "grid": self.grid,
            "points": [p.to_json() for p in self.points],
        }


def _normalized(value):
    """JSON round trip: tuples become lists, so values compare equal however they were built."""
    return json.loads(json.dumps(value))


def _model_config(d, where: str):
    from jaxserve.model.config import ModelConfig, RopeScaling

    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be an object of ModelConfig fields, got {type(d).__name__}")
    fields = dict(d)
    try:
        rope = fields.pop("rope_scaling", None)
        if rope is not None:
            if not isinstance(rope, Mapping):
                raise ValueError(f"rope_scaling must be an object, got {type(rope).__name__}")
            fields["rope_scaling"] = RopeScaling(**rope)
        if "eos_token_ids" in fields:
            if not isinstance(fields["eos_token_ids"], list):
                raise ValueError("eos_token_ids must be a list")
            fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:  # CheckpointError is a ValueError
        raise ValueError(f"{where}: {e}") from None


def _int(value, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where} must be an int >= {minimum}, got {value!r}")
    return value


def _int_list(value, where: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of ints, got {type(value).__name__}")
    return tuple(_int(v, f"{where}[{i}]", minimum) for i, v in enumerate(value))


def _point_from_json(d, where: str) -> ProfilePoint:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be an object, got {type(d).__name__}")
    for key in ("prefill_chunk_lens", "prefill_context", "decode_context", "num_prefill_tokens", "num_decodes",
                "decode_context_tokens", "num_seqs", "times_s", "median_s"):
        if key not in d:
            raise ValueError(f"{where} is missing key {key!r}")
    # A one-token row is packed as a decode row, so a prefill chunk has at least 2 tokens.
    lens = _int_list(d["prefill_chunk_lens"], f"{where}.prefill_chunk_lens", 2)
    context = _int_list(d["prefill_context"], f"{where}.prefill_context", 0)
    if len(context) != len(lens):
        raise ValueError(f"{where}: prefill_context has {len(context)} entries, prefill_chunk_lens {len(lens)}")
    decode_context = _int_list(d["decode_context"], f"{where}.decode_context", 0)
    times = d["times_s"]
    if not isinstance(times, list) or not times:
        raise ValueError(f"{where}.times_s must be a non-empty list of seconds, got {times!r}")
    for i, t in enumerate(times):
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"{where}.times_s[{i}] must be a finite number of seconds > 0, got {t!r}")
    point = ProfilePoint(lens, context, decode_context, tuple(float(t) for t in times))
    if point.num_seqs == 0:
        raise ValueError(f"{where} has no rows (no prefill chunks and no decodes)")
    # The derived fields are stored for readers of the JSON; they must agree with the primary ones.
    for key in ("num_prefill_tokens", "num_decodes", "decode_context_tokens", "num_seqs"):
        if d[key] != getattr(point, key):
            raise ValueError(f"{where}.{key} = {d[key]!r} disagrees with the rows ({getattr(point, key)})")
    median = d["median_s"]
    is_number = isinstance(median, (int, float)) and not isinstance(median, bool)
    if not is_number or not math.isclose(median, point.median_s, rel_tol=1e-9):
        raise ValueError(f"{where}.median_s = {median!r} is not the median of times_s ({point.median_s!r})")
    return point


def _geometry(d, block_size: int) -> StepGeometry:
    if not isinstance(d, Mapping):
        raise ValueError(f"engine must be an object of StepGeometry fields, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(StepGeometry)]
    missing = [k for k in names if k not in d]
    if missing:
        raise ValueError(f"engine is missing {missing[0]!r} (a profile records the runner's StepGeometry: {names})")
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ValueError(f"engine has unknown key {unknown[0]!r}")
    try:
        geometry = StepGeometry(**d)
    except ValueError as e:
        raise ValueError(f"engine.{e}") from None
    if geometry.page_size != block_size:
        raise ValueError(f"engine.page_size = {geometry.page_size} disagrees with block_size = {block_size}")
    return geometry


def profile_from_json(obj, source: str = "profile") -> Profile:
    """Validates a parsed profile; ``ValueError`` naming ``source`` and the first problem."""

    def fail(msg):
        raise ValueError(f"{source}: {msg}")

    if not isinstance(obj, Mapping):
        fail(f"expected a JSON object, got {type(obj).__name__}")
    for key in _TOP_KEYS:
        if key not in obj:
            fail(f"missing key {key!r}")
    if obj["format"] != FORMAT:
        fail(f"format {obj['format']!r} is not supported (this jaxserve reads format {FORMAT}; "
             "re-run python -m jaxserve.profile)")
    try:
        _model_config(obj["model"], "model")
        dtype = obj["dtype"]
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        device = obj["device"]
        if not isinstance(device, Mapping) or not all(isinstance(device.get(k), str) for k in ("backend", "kind")):
            raise ValueError(f"device must be an object with string 'backend' and 'kind', got {device!r}")
        block_size = _int(obj["block_size"], "block_size", 1)
        engine = _geometry(obj["engine"], block_size)
        temperature = obj["temperature"]
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
                math.isfinite(temperature) and temperature >= 0):  # fmt: skip
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        raw = obj["points"]
        if not isinstance(raw, list):
            raise ValueError(f"points must be a list, got {type(raw).__name__}")
        if not raw:
            raise ValueError("points is empty (nothing was measured)")
        points, seen = [], {}
        for i, p in enumerate(raw):
            point = _point_from_json(p, f"points[{i}]")
            if point.key in seen:
                raise ValueError(f"points[{i}] measures the same shape as points[{seen[point.key]}]")
            seen[point.key] = i
            points.append(point)
    except ValueError as e:
        fail(str(e))
    return Profile(
        model=_normalized(obj["model"]), dtype=dtype, device=dict(device), block_size=block_size,
        points=tuple(points), engine=engine, temperature=float(temperature), model_name=str(obj.get("model_name", "")),
        grid=str(obj.get("grid", "")),
    )


def load_profile(path: str) -> Profile:
    """Reads and validates a profile file. ``FileNotFoundError`` if absent; ``ValueError`` naming the
    file and the problem (not JSON, a missing key, a wrong type, another format version, no points)."""
    with open(path) as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return profile_from_json(obj, source=path)


def save_profile(profile: Profile, path: str) -> None:
    """Writes ``profile`` atomically: a temporary file in the same directory, then a rename, so an
    interrupted run leaves either the previous file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=directory)
    try:
        obj = profile.to_json()
        points = obj.pop("points")
        head = json.dumps(obj, indent=1)
        assert head.endswith("\n}")
        # One line per point: a long profile stays readable and diffable.
        lines = ",\n".join("  " + json.dumps(p) for p in points)
        with os.fdopen(fd, "w") as f:
            f.write(f'{head[:-2]},\n "points": [\n{lines}\n ]\n}}\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -- the grid ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PointSpec:
    """A step shape to measure: prefill rows ``(context, chunk_len)`` and decode rows, each with
    ``decode[j]`` tokens already in KV."""

    prefill: tuple[tuple[int, int], ...] = ()
    decode: tuple[int, ...] = ()

    @property
    def key(self) -> tuple:
        return (tuple(n for _, n in self.prefill), tuple(c for c, _ in self.prefill), tuple(self.decode))

    @property
    def row_lens(self) -> list[int]:
        """Tokens in KV after the step, per row (decodes first)."""
        return [c + 1 for c in self.decode] + [c + n for c, n in self.prefill]

    def blocks_needed(self, block_size: int) -> int:
        return sum(-(-n // block_size) for n in self.row_lens)

    def describe(self) -> str:
        parts = []
        if self.decode:
            lo, hi = min(self.decode), max(self.decode)
            parts.append(f"{len(self.decode)} decodes x {lo if lo == hi else f'{lo}-{hi}'} ctx")
        if self.prefill:
            parts.append(" + ".join(f"{n}@{c}" for c, n in self.prefill) + " prefill")
        return ", ".join(parts)

    def point(self, times_s: Sequence[float]) -> ProfilePoint:
        lens, context, decode = self.key
        return ProfilePoint(lens, context, decode, tuple(float(t) for t in times_s))


def _decodes(count: int, context: int) -> tuple[int, ...]:
    return (context,) * count


def _spread(count: int, lo: int, hi: int) -> tuple[int, ...]:
    """``count`` decode contexts evenly spread over [lo, hi] (a batch of requests at different ages)."""
    return tuple(int(v) for v in np.linspace(lo, hi, count).round())


def grid_points(name: str) -> tuple[PointSpec, ...]:
    """The shapes of grid ``name``. ``small``: 15 points in 4 bucket shapes of a tiny model (tests,
    a quick look); ``default``: 116 points up to 2048-token chunks and 256 decodes, on and off the
    engine's bucket sizes, uniform and spread decode contexts (the engine's attention work follows
    a batch's longest context, its matmuls the padded row count)."""
    if name == "small":
        # Decode counts 5 and 6 share one decode bucket and every chunk fits 1-2 blocks of 32 rows,
        # so the whole grid compiles 4 step shapes; contexts stay under 256 positions.
        prefill = [((0, 32),), ((0, 16),), ((64, 32),), ((160, 32),), ((0, 64),),
                   ((0, 32), (0, 32)), ((32, 32), (0, 20))]  # fmt: skip
        specs = [PointSpec(p) for p in prefill]
        specs += [PointSpec((), _decodes(d, ctx)) for d in (5, 6) for ctx in (16, 64, 200)]
        specs += [PointSpec(((0, 32),), _decodes(6, 64)), PointSpec(((96, 24),), _spread(5, 20, 160))]
        return tuple(specs)
    if name == "default":
        # Contexts stop at 2000 so a 2048-position model keeps every decode point.
        specs = [PointSpec(((0, n),)) for n in (16, 40, 100, 256, 500, 1024, 2048)]
        specs += [PointSpec(((c, n),)) for c in (256, 1024, 1700) for n in (100, 300, 512)]
        specs += [PointSpec(((3072, n),)) for n in (128, 1024)]
        specs += [PointSpec(((0, n),) * k) for k in (2, 4, 8) for n in (50, 250)]
        specs += [PointSpec(((512, 256),) * 4), PointSpec(((0, 300), (700, 180), (90, 20)))]
        specs += [PointSpec((), _decodes(d, ctx)) for d in (1, 2, 3, 6, 12, 24, 48, 96, 192, 256)
                  for ctx in (64, 400, 1000, 2000)]  # fmt: skip
        # Spread contexts are what serving runs; the batch sizes a scheduler capped at 64 sequences
        # visits most get the densest coverage.
        specs += [PointSpec((), _spread(d, 16, hi)) for d in (2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 64, 100, 200)
                  for hi in (600, 1500)]  # fmt: skip
        specs += [PointSpec(((0, n),), _decodes(d, ctx)) for d in (4, 16, 64) for n in (64, 256, 500)
                  for ctx in (300, 1200)]  # fmt: skip
        specs += [PointSpec(((c, 200),), _spread(d, 16, 1500)) for d in (10, 30, 60) for c in (0, 800)]
        return tuple(specs)
    raise ValueError(f"grid must be one of {GRIDS}, got {name!r}")


def build_plan(
    spec: PointSpec, block_size: int, vocab_size: int, num_pages: int, rng, temperature: float = 1.0,
    *, first_page: int = 0, id_prefix: str = "",
):  # fmt: skip
    """``(BatchPlan, requests)``: the step ``spec`` describes, every row sampling (a prefill row is
    its prompt's last chunk) at ``temperature``, with the requests to ``register`` on the runner.
    Rows get distinct pages drawn at random from ``[first_page, num_pages)``, as a pool in steady
    state hands them out (contents do not matter for timing; where the pages lie does, a little);
    request ids start with ``id_prefix``."""
    from jaxserve.plan import BatchPlan
    from jaxserve.request import Request, SamplingParams

    rows = [(f"{id_prefix}dec{i}", c, 1) for i, c in enumerate(spec.decode)]
    rows += [(f"{id_prefix}pre{j}", c, n) for j, (c, n) in enumerate(spec.prefill)]
    needed = spec.blocks_needed(block_size)
    if needed > num_pages - first_page:
        raise ValueError(f"{spec.describe()} needs {needed} KV pages, the pool has {num_pages - first_page}")
    pages = (first_page + rng.choice(num_pages - first_page, size=needed, replace=False)).tolist()
    requests, tables, tokens = [], [], []
    for rid, c, n in rows:
        decode = n == 1
        prompt_len = c if decode else c + n  # a decode samples generated token 1; a chunk token 0
        ids = rng.integers(0, vocab_size, size=prompt_len).tolist()
        sampling = SamplingParams(2 if decode else 1, temperature=temperature)
        requests.append(Request(rid, prompt_token_ids=ids, sampling=sampling))
        k = -(-(c + n) // block_size)
        tables.append(tuple(pages[:k]))
        pages = pages[k:]
        tokens.append(rng.integers(0, vocab_size, size=n))
    plan = BatchPlan(
        request_ids=tuple(r for r, _, _ in rows),
        num_computed_tokens=np.array([c for _, c, _ in rows], np.int64),
        num_new_tokens=np.array([n for _, _, n in rows], np.int64),
        samples_token=np.ones(len(rows), bool),
        block_tables=tuple(tables),
        token_ids=np.concatenate(tokens).astype(np.int32),
        block_size=block_size,
    )
    plan.validate()
    return plan, requests


# -- measuring ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProfileRun:
    """What one ``profile_model`` call did: samples measured now, points already complete in the
    file, and grid points skipped (with the reason)."""

    profile: Profile
    measured: int
    already: int
    skipped: tuple[tuple[PointSpec, str], ...]


def time_step(runner, spec: PointSpec, plan, requests, *, warmup: int, first_visit: bool) -> float:
    """One timed sample of ``plan`` (built from ``spec`` by ``build_plan``) on ``runner``, in the
    profile's serving-like context: a first visit compiles the shape (``warmup`` untimed runs); a
    decode-only step runs right after its own batch's previous step in serving, so its samples
    follow ``warmup`` runs of itself; a step with prefill rows follows steps of other shapes, so its
    samples follow whatever ran last. The requests are registered for the sample only."""
    for r in requests:
        runner.register(r)
    try:
        if first_visit or not spec.prefill:
            for _ in range(warmup):
                runner.execute(plan)
        return runner.execute(plan).duration_s
    finally:
        for r in requests:
            runner.release(r.request_id)


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

    from jaxserve.engine.model_runner import ModelRunner
    from jaxserve.kv.config import KVConfig
    from jaxserve.model.attention import default_attention_impl
    from jaxserve.model.loader import load_model

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

    per_block = 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * jax.numpy.dtype(cfg.dtype).itemsize
    budget_blocks = max(1, int(kv_cache_gb * 2**30 // per_block))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxserve.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--out", required=True, help="the profile JSON (resumed if it exists)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per point (one per pass over the grid)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before a decode point's samples and a point's first (>= 1)")
    parser.add_argument("--grid", choices=GRIDS, default="default")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--block-rows", type=int, default=32, help="prefill rows per block (engine.block_rows)")
    parser.add_argument("--attention", default="auto", help="auto | grouped | ragged")
    parser.add_argument("--kv-cache-gb", type=float, default=4.0, help="largest KV pool a point may use")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every row (0: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(stderr=True)
    try:
        run = profile_model(
            args.model, args.out, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, grid=args.grid,
            block_size=args.block_size, block_rows=args.block_rows, attention=args.attention,
            kv_cache_gb=args.kv_cache_gb, temperature=args.temperature, seed=args.seed, progress=not args.quiet,
        )
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    console.print(f"{args.out}: measured {run.measured} samples, {run.already} points already complete, "
                  f"{len(run.skipped)} skipped")
    for spec, reason in run.skipped:
        console.print(f"  skipped {spec.describe()}: {reason}")
    if run.profile.points:
        from jaxserve.sim.profiled_cost_model import fit

        _, report = fit(run.profile.points, run.profile.engine)
        console.print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
