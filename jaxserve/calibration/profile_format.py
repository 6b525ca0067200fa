"""The profile file: the engine's measured step times over a grid of batch shapes, with what
they were measured under (model, dtype, device, step geometry, sampling temperature).

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

``load_profile(path)`` validates a file and names the first problem in a ``ValueError``;
``save_profile`` writes one atomically. ``PointSpec`` is a step shape to measure, ``ProfilePoint``
one measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxserve.model.config import ModelConfig, RopeScaling
from jaxserve.runtime.step_geometry import StepGeometry

FORMAT = 2
GRIDS = ("small", "default")
_TOP_KEYS = ("format", "model", "dtype", "device", "block_size", "engine", "temperature", "points")
# What makes two profiles comparable: measuring any of these differently changes step times.
# "model" last: its fields include the dtype, and a dtype mismatch should be reported as one.
FINGERPRINT_KEYS = ("dtype", "device", "block_size", "engine", "temperature", "model")


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
