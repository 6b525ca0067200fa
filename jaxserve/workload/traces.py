"""Trace readers: Azure 2023 CSV, Vidur/Splitwise CSV, length-only CSV and Mooncake JSONL -> Trace.

Every reader returns the same value, a ``Trace`` of numpy columns with arrival times rebased to the
first request. Malformed input raises ``TraceFormatError`` naming the file, the 1-based line and
what is wrong. Parsing is csv/json per line plus vectorized numpy conversion; the slow per-value
path runs only to locate an error.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

#: Known formats and how each is recognised (also the text of the "cannot detect" error).
FORMATS = {
    "azure": "CSV with header TIMESTAMP,ContextTokens,GeneratedTokens ('YYYY-MM-DD HH:MM:SS.fffffff')",
    "vidur": "CSV with header arrived_at,num_prefill_tokens,num_decode_tokens (seconds)",
    "lengths": "CSV with header num_prefill_tokens,num_decode_tokens,... (token lengths only, no timestamps)",
    "mooncake": "JSON lines with timestamp (ms), input_length, output_length, hash_ids",
}

#: Token block size behind Mooncake's ``hash_ids`` (FAST'25 release README).
MOONCAKE_HASH_BLOCK_SIZE = 512

TRACES_ENV = "JAXSERVE_TRACES"

# Columns each CSV format needs: (arrival column or None, prompt column, output column). Header
# names are matched case-insensitively; extra columns are ignored.
_CSV_COLUMNS = {
    "azure": ("timestamp", "contexttokens", "generatedtokens"),
    "vidur": ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
    "lengths": (None, "num_prefill_tokens", "num_decode_tokens"),
}

_TIMESTAMP_RE = re.compile(r"\s*\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,9})?\s*")


class TraceFormatError(ValueError):
    """A malformed trace: ``path``, 1-based ``line`` (None when no single line is at fault), ``what``."""

    def __init__(self, path: PathLike, line: Optional[int], what: str):
        self.path = str(path)
        self.line = line
        self.what = what
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.what))


def _frozen(values, dtype) -> np.ndarray:
    out = np.array(values, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """Per-request columns of a workload trace, all of length ``n`` and in arrival order.

    ``arrival_s``: float64 seconds since the first request (non-decreasing), or None for length-only
    files. ``prompt_len`` / ``output_len``: int64 tokens, all >= 1. ``hash_ids``: per-request prefix
    block ids (``hash_block_size`` tokens each), or None. Arrays are read-only copies.
    """

    arrival_s: Optional[np.ndarray]
    prompt_len: np.ndarray
    output_len: np.ndarray
    hash_ids: Optional[tuple[tuple[int, ...], ...]] = None
    hash_block_size: int = MOONCAKE_HASH_BLOCK_SIZE
    path: str = ""
    format: str = ""

    def __post_init__(self):
        prompt = _frozen(self.prompt_len, np.int64)
        output = _frozen(self.output_len, np.int64)
        n = len(prompt)
        if prompt.ndim != 1 or output.shape != (n,):
            raise ValueError(
                f"Trace.prompt_len and output_len must be 1-D of equal length, "
                f"got shapes {prompt.shape} and {output.shape}"
            )
        for name, col in (("prompt_len", prompt), ("output_len", output)):
            if n and col.min() < 1:
                raise ValueError(f"Trace.{name} must be >= 1, got {col.min()}")
        object.__setattr__(self, "prompt_len", prompt)
        object.__setattr__(self, "output_len", output)
        if self.arrival_s is not None:
            arrival = _frozen(self.arrival_s, np.float64)
            if arrival.shape != (n,):
                raise ValueError(f"Trace.arrival_s must have shape ({n},), got {arrival.shape}")
            if n and (not np.isfinite(arrival).all() or arrival[0] < 0 or (np.diff(arrival) < 0).any()):
                raise ValueError("Trace.arrival_s must be finite, >= 0 and non-decreasing")
            object.__setattr__(self, "arrival_s", arrival)
        if self.hash_ids is not None:
            hashes = tuple(tuple(h) for h in self.hash_ids)
            if len(hashes) != n:
                raise ValueError(f"Trace.hash_ids must have {n} entries, got {len(hashes)}")
            object.__setattr__(self, "hash_ids", hashes)
        if not isinstance(self.hash_block_size, int) or self.hash_block_size < 1:
            raise ValueError(f"Trace.hash_block_size must be an int >= 1, got {self.hash_block_size!r}")

    def __len__(self) -> int:
        return len(self.prompt_len)

    def take(self, indices) -> "Trace":
        """The sub-trace of rows ``indices`` (an int array or slice), arrival times unchanged."""
        idx = np.arange(len(self))[indices]
        return dataclasses.replace(
            self,
            arrival_s=None if self.arrival_s is None else self.arrival_s[idx],
            prompt_len=self.prompt_len[idx],
            output_len=self.output_len[idx],
            hash_ids=None if self.hash_ids is None else tuple(self.hash_ids[i] for i in idx.tolist()),
        )


# --- paths --------------------------------------------------------------------------------------


def project_root() -> Optional[Path]:
    """The nearest directory above this file holding ``pyproject.toml`` (None when installed)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def traces_dir() -> Path:
    """Where relative trace paths live: ``$JAXSERVE_TRACES``, else ``<project root>/../shared/traces``."""
    env = os.environ.get(TRACES_ENV)
    if env:
        return Path(env).expanduser()
    root = project_root()
    if root is None:
        raise FileNotFoundError(
            f"cannot locate the traces folder: no pyproject.toml above {__file__}; set ${TRACES_ENV}"
        )
    return root.parent / "shared" / "traces"


SAMPLE_PREFIX = "sample:"  # trace_path "sample:<file>": a trace shipped in jaxserve/workload/samples
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def sample_traces() -> list[str]:
    """Names of the traces shipped with the package (``sample:<name>``)."""
    return sorted(p.name for p in SAMPLES_DIR.glob("*.csv"))


def resolve_trace_path(path: PathLike) -> Path:
    """``sample:<name>``: a trace shipped with jaxserve (see ``samples/README.md``); an absolute
    path: itself; else ``traces_dir() / path``. Traces are never copied."""
    if isinstance(path, str) and path.startswith(SAMPLE_PREFIX):
        name = path[len(SAMPLE_PREFIX) :]
        if name not in sample_traces():
            raise FileNotFoundError(f"no sample trace {name!r}; the samples are {sample_traces()}")
        return SAMPLES_DIR / name
    p = Path(path).expanduser()
    return p if p.is_absolute() else traces_dir() / p


# --- reading ------------------------------------------------------------------------------------


def read_trace(path: PathLike, format: str = "auto") -> Trace:
    """Reads a trace file; ``format`` is ``"auto"`` (detect from the first line) or a ``FORMATS`` key."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {tuple(FORMATS)}, got {format!r}")
    text = _read_text(path)
    if format == "auto":
        format = _detect(path, text)
    if format == "mooncake":
        return _read_mooncake(path, text)
    return _read_csv(path, text, format)


def detect_format(path: PathLike) -> str:
    """The ``FORMATS`` key of the file at ``path``, or TraceFormatError saying why none fits."""
    return _detect(path, _read_text(path))


def _read_text(path: PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trace file not found: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"trace path is a directory, not a file: {p}")
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate a BOM before the header
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TraceFormatError(p, line, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _known_formats() -> str:
    return "; ".join(f"{name}: {how}" for name, how in FORMATS.items())


def _detect(path: PathLike, text: str) -> str:
    for lineno, line in enumerate(io.StringIO(text), 1):  # lazily: only the first lines are read
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            return "mooncake"
        names = {c.strip().lower() for c in next(csv.reader([line]))}
        for fmt, columns in _CSV_COLUMNS.items():  # azure, vidur before lengths: most specific first
            if {c for c in columns if c} <= names:
                return fmt
        what = f"cannot detect the trace format from {line.strip()[:120]!r}"
        # Name the nearest CSV format's missing columns: usually a typo or a dropped column.
        overlap = {fmt: {c for c in cols if c} & names for fmt, cols in _CSV_COLUMNS.items()}
        near = max(overlap, key=lambda fmt: len(overlap[fmt]))
        if overlap[near]:
            missing = [c for c in _CSV_COLUMNS[near] if c and c not in names]
            what += f" (nearest is {near!r}, missing column {', '.join(map(repr, missing))})"
        raise TraceFormatError(path, lineno, f"{what}; known formats: {_known_formats()}")
    raise TraceFormatError(path, None, f"empty file; known formats: {_known_formats()}")


def _read_csv(path: PathLike, text: str, fmt: str, *, plain: bool = True) -> Trace:
    """The trace in CSV ``text``: split on commas when it is plain (``_plain_columns``), else read by
    ``csv.reader``, which also finds and names any malformed line (``plain=False``: always)."""
    table = _plain_columns(path, text, fmt) if plain else None
    if table is not None:
        return _trace_from_columns(path, fmt, *table)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _trace_from_columns(path, fmt, *_reader_columns(path, reader, fmt))
    except csv.Error as e:  # e.g. a NUL byte or an unterminated quote
        raise TraceFormatError(path, reader.line_num, f"bad CSV: {e}") from None


def _column_index(path: PathLike, header: list[str], header_line: int, fmt: str) -> list[int]:
    """Where ``fmt``'s columns sit in ``header``; TraceFormatError naming the first one missing."""
    names = [c.strip().lower() for c in header]
    index = []
    for col in _CSV_COLUMNS[fmt]:
        if col is None:
            continue
        if col not in names:
            what = f"missing column {col!r} for format {fmt!r}; header is {header}"
            raise TraceFormatError(path, header_line, what)
        index.append(names.index(col))
    return index


def _plain_columns(path: PathLike, text: str, fmt: str):
    """``_reader_columns``'s result for a CSV text that ``csv.reader`` would split on every comma
    alone: no quote, NUL or lone carriage return, a header on the first line and every other line (a
    last empty one aside) with the header's number of fields. None for any other text. One split of
    the whole text instead of a Python loop over rows (a third of reading the Azure hour)."""
    if '"' in text or "\0" in text:
        return None
    if "\r" in text:  # Windows line ends (the Azure files'): the reader splits lines on them alike
        if text.count("\r") != text.count("\r\n"):
            return None
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    header = lines[0].split(",")
    commas = len(header) - 1
    body = lines[1:]
    if not commas or not body or not any(c.strip() for c in header):
        return None  # no header on the first line, or no rows: the reader's path finds it or says so
    if any(line.count(",") != commas for line in body):
        return None  # a blank or ragged line: the reader's path skips it or names it
    index = _column_index(path, header, 1, fmt)
    fields = ",".join(body).split(",")
    return header, index, [fields[i :: commas + 1] for i in index], list(range(2, len(body) + 2))


def _reader_columns(path: PathLike, reader, fmt: str):
    """(header, the wanted columns' indices in it, those columns as lists of strings, each row's
    line number) of the CSV ``reader`` reads; TraceFormatError naming the line of a problem."""
    header = next((row for row in reader if any(c.strip() for c in row)), None)
    if header is None:
        raise TraceFormatError(path, None, "empty file, expected a CSV header")
    header_line = reader.line_num
    index = _column_index(path, header, header_line, fmt)
    need = max(index) + 1
    columns: list[list[str]] = [[] for _ in index]
    lines: list[int] = []
    appenders = [c.append for c in columns]
    for row in reader:
        if len(row) < need:
            if not any(c.strip() for c in row):
                continue  # blank line (a trailing newline, or spacing)
            missing = next(header[i].strip() for i in index if i >= len(row))
            what = f"missing column {missing!r} ({len(row)} fields, need {need})"
            raise TraceFormatError(path, reader.line_num, what)
        lines.append(reader.line_num)
        for append, i in zip(appenders, index):
            append(row[i])
    if not lines:
        raise TraceFormatError(path, header_line, "no data rows after the header")
    return header, index, columns, lines


def _trace_from_columns(path: PathLike, fmt: str, header: list[str], index: list[int], columns: list[list[str]],
                        lines: list[int]) -> Trace:  # fmt: skip
    labels = [header[i].strip() for i in index]
    prompt = _ints(path, labels[-2], columns[-2], lines)
    output = _ints(path, labels[-1], columns[-1], lines)
    arrival = None
    if fmt == "azure":
        ns = _timestamps_ns(path, labels[0], columns[0], lines)
        _check_sorted(path, labels[0], ns, lines)
        arrival = (ns - ns[0]) / 1e9  # exact integer ns difference, then one rounding
    elif fmt == "vidur":
        t = _floats(path, labels[0], columns[0], lines)
        _check_sorted(path, labels[0], t, lines)
        arrival = t - t[0]
    return Trace(arrival, prompt, output, path=str(path), format=fmt)


def _bad(path, lines, i, what) -> TraceFormatError:
    return TraceFormatError(path, lines[i], what)


def _floats(path, name: str, strs: list[str], lines: list[int]) -> np.ndarray:
    try:
        out = np.asarray(strs).astype(np.float64)
    except (ValueError, OverflowError):
        out = np.empty(len(strs), dtype=np.float64)
        for i, s in enumerate(strs):  # slow path: find the culprit (or accept what float() does)
            try:
                out[i] = float(s)
            except ValueError:
                raise _bad(path, lines, i, f"bad number {s!r} in column {name!r}") from None
    nonfinite = np.flatnonzero(~np.isfinite(out))
    if nonfinite.size:
        i = nonfinite[0]
        raise _bad(path, lines, i, f"bad number {strs[i]!r} in column {name!r} (not finite)")
    return out


def _ints(path, name: str, strs: list[str], lines: list[int]) -> np.ndarray:
    """Token counts: integers >= 1 ("12", or an integral "12.0" as pandas writes nullable columns)."""
    try:
        out = np.asarray(strs).astype(np.int64)
    except (ValueError, OverflowError):
        out = None
    if out is None:
        floats = _floats(path, name, strs, lines)
        frac = np.flatnonzero((floats != np.round(floats)) | (np.abs(floats) > 2**53))
        if frac.size:
            i = frac[0]
            raise _bad(path, lines, i, f"bad number {strs[i]!r} in column {name!r} (not an integer)")
        out = floats.astype(np.int64)
    small = np.flatnonzero(out < 1)
    if small.size:
        i = small[0]
        kind = "zero" if out[i] == 0 else "negative"
        raise _bad(path, lines, i, f"{kind} length {strs[i].strip()} in column {name!r} (must be >= 1)")
    return out


def _timestamps_ns(path, name: str, strs: list[str], lines: list[int]) -> np.ndarray:
    """Wall-clock timestamps as exact int64 nanoseconds (the Azure files carry 100 ns ticks)."""
    match = _TIMESTAMP_RE.fullmatch
    if not all(map(match, strs)):  # numpy alone would also accept words such as "now" or "today"
        i, s = next((i, s) for i, s in enumerate(strs) if match(s) is None)
        what = f"bad timestamp {s!r} in column {name!r}, expected 'YYYY-MM-DD HH:MM:SS.fffffff'"
        raise _bad(path, lines, i, what)
    stripped = np.char.strip(np.asarray(strs))
    try:
        return stripped.astype("datetime64[ns]").astype(np.int64)
    except ValueError:  # well-formed but impossible, e.g. 2023-02-30 or 25:00:00
        for i, s in enumerate(stripped.tolist()):
            try:
                np.datetime64(s, "ns")
            except ValueError:
                what = f"bad timestamp {strs[i]!r} in column {name!r} (no such time)"
                raise _bad(path, lines, i, what) from None
        raise


def _check_sorted(path, name: str, t: np.ndarray, lines: list[int]) -> None:
    back = np.flatnonzero(np.diff(t) < 0)
    if back.size:
        i = back[0] + 1
        raise _bad(path, lines, i, f"timestamps go backwards in column {name!r}: {t[i]} after {t[i - 1]}")


def _is_int(x) -> bool:
    return type(x) is int  # JSON ints only: bools and floats are malformed lengths


def _read_mooncake(path: PathLike, text: str) -> Trace:
    stamps: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hashes: list[tuple[int, ...]] = []
    lines: list[int] = []
    with_hashes: Optional[bool] = None
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TraceFormatError(path, lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise TraceFormatError(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
        for key in ("timestamp", "input_length", "output_length"):
            if key not in rec:
                raise TraceFormatError(path, lineno, f"missing key {key!r}")
        ts, n_in, n_out = rec["timestamp"], rec["input_length"], rec["output_length"]
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
            raise TraceFormatError(path, lineno, f"bad number {ts!r} for 'timestamp'")
        for key, value in (("input_length", n_in), ("output_length", n_out)):
            if not _is_int(value):
                raise TraceFormatError(path, lineno, f"bad number {value!r} for {key!r} (expected an int)")
            if value < 1:
                kind = "zero" if value == 0 else "negative"
                raise TraceFormatError(path, lineno, f"{kind} length {value} for {key!r} (must be >= 1)")
        ids = rec.get("hash_ids")
        if with_hashes is None:
            with_hashes = ids is not None  # the first record decides; later ones must agree
        elif with_hashes and ids is None:
            raise TraceFormatError(path, lineno, "missing key 'hash_ids' (earlier lines have it)")
        if with_hashes:
            if not isinstance(ids, list) or not all(_is_int(h) for h in ids):
                raise TraceFormatError(path, lineno, "bad 'hash_ids': expected a list of ints")
            hashes.append(tuple(ids))
        stamps.append(ts)
        prompt.append(n_in)
        output.append(n_out)
        lines.append(lineno)
    if not lines:
        raise TraceFormatError(path, None, "empty file, expected JSON lines")
    t = np.asarray(stamps, dtype=np.float64)
    _check_sorted(path, "timestamp", t, lines)
    return Trace(
        (t - t[0]) / 1000.0,
        np.asarray(prompt, dtype=np.int64),
        np.asarray(output, dtype=np.int64),
        hash_ids=tuple(hashes) if with_hashes else None,
        hash_block_size=MOONCAKE_HASH_BLOCK_SIZE,
        path=str(path),
        format="mooncake",
    )
