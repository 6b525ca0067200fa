"""The scheduler/executor contract: BatchPlan (one engine iteration) and StepOutput.

A BatchPlan is stored column-wise (one array per field, one row per scheduled request) in the ragged
layout of ragged paged attention, because executors consume arrays and a 256-request plan must be
cheap to build. ``entries`` gives the same data row-wise as ``ScheduledRequest`` values.

Executors apply, in this order, before running the step: ``swap_out_blocks`` (device -> host),
``swap_in_blocks`` (host -> device), ``copy_blocks`` (device -> device copy-on-write).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from jaxserve.request import MAX_TOKEN_ID, any_bad_token_id


class ScheduledRequest(NamedTuple):
    """One request's share of a step."""

    request_id: str
    num_computed_tokens: int  # tokens already in KV before this step
    num_new_tokens: int  # tokens computed this step (a prefill chunk, or 1 for a decode)
    block_ids: tuple[int, ...]  # the whole block table after this step's allocation
    token_ids: tuple[int, ...]  # ids of the num_new_tokens tokens
    samples_token: bool  # whether this step samples a token for the request


class _cached:
    """``functools.cached_property`` without its lock (Python 3.11 takes one on every first read;
    a plan is read where it was built): computed once, then an instance attribute."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class BatchPlan:
    """One engine iteration. Rows are scheduled requests; arrays have one entry per row.

    ``token_ids`` is flat: row ``i``'s new tokens are ``token_ids[cu_q_lens[i]:cu_q_lens[i+1]]``.
    A request in ``preempted`` or ``swapped_out`` is not among the rows.
    """

    request_ids: tuple[str, ...]
    num_computed_tokens: np.ndarray  # int64 [num_seqs]
    num_new_tokens: np.ndarray  # int64 [num_seqs], each >= 1
    samples_token: np.ndarray  # bool [num_seqs]
    block_tables: tuple[tuple[int, ...], ...]  # per row, after this step's allocation
    token_ids: np.ndarray  # int32 [num_tokens]
    block_size: int
    step: int = 0
    preempted: tuple[str, ...] = ()
    swapped_out: tuple[str, ...] = ()
    swapped_in: tuple[str, ...] = ()
    copy_blocks: tuple[tuple[int, int], ...] = ()  # (src, dst) device blocks
    swap_out_blocks: tuple[tuple[int, int], ...] = ()  # (device src, host dst)
    swap_in_blocks: tuple[tuple[int, int], ...] = ()  # (host src, device dst)

    def __post_init__(self):
        n = len(self.request_ids)
        for name in ("num_computed_tokens", "num_new_tokens", "samples_token"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"BatchPlan.{name} has {len(getattr(self, name))} rows, expected {n}")
        if len(self.block_tables) != n:
            raise ValueError(f"BatchPlan.block_tables has {len(self.block_tables)} rows, expected {n}")
        for name in _ARRAYS:
            _frozen(getattr(self, name))

    @classmethod
    def built(cls, **fields) -> "BatchPlan":
        """A plan from a builder that made its fields consistent (``StepBuilder``): the same value
        as ``BatchPlan(**fields)`` without re-checking row counts. Besides the fields, a builder may
        give derived values it knows already (``is_decode``, ``num_decode_tokens``); arrays are
        frozen here as the constructor freezes them."""
        new = object.__new__(cls)
        d = new.__dict__
        d.update(_OP_DEFAULTS)
        d.update(fields)
        for name in _ARRAYS:
            d[name].flags.writeable = False
        return new

    @classmethod
    def empty(cls, block_size: int, step: int = 0, **ops) -> "BatchPlan":
        z = np.zeros(0, np.int64)
        return cls((), z, z.copy(), np.zeros(0, bool), (), np.zeros(0, np.int32), block_size, step, **ops)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return len(self.request_ids)

    @_cached
    def num_tokens(self) -> int:
        """Total new tokens in the step (the GEMM batch size)."""
        return int(np.add.reduce(self.num_new_tokens))  # (ufunc reduce: cheaper than .sum() on small arrays)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids

    @_cached
    def is_decode(self) -> np.ndarray:
        """Rows that compute exactly one token and sample (decodes), bool [num_seqs]."""
        return _frozen((self.num_new_tokens == 1) & self.samples_token)

    @_cached
    def num_decode_tokens(self) -> int:
        if self.num_tokens == len(self.num_new_tokens):  # every row computes one token: decodes are the sampling rows
            return int(np.count_nonzero(self.samples_token))
        return int(np.count_nonzero(self.is_decode))

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    # -- ragged layout -------------------------------------------------------------------------
    @_cached
    def cu_q_lens(self) -> np.ndarray:
        """int32 [num_seqs + 1]: prefix sums of ``num_new_tokens``."""
        cu = np.zeros(self.num_seqs + 1, np.int32)
        np.add.accumulate(self.num_new_tokens, out=cu[1:])
        return _frozen(cu)

    @_cached
    def kv_lens(self) -> np.ndarray:
        """int32 [num_seqs]: tokens in KV after the step (computed + new)."""
        return _frozen((self.num_computed_tokens + self.num_new_tokens).astype(np.int32))

    @_cached
    def page_indices(self) -> np.ndarray:
        """int32 [num_seqs, max_pages]: block tables padded with 0 (pages past a row's kv_len unused)."""
        width = max((len(t) for t in self.block_tables), default=0)
        out = np.zeros((self.num_seqs, width), np.int32)
        for i, table in enumerate(self.block_tables):
            out[i, : len(table)] = table
        return _frozen(out)

    @_cached
    def entries(self) -> tuple[ScheduledRequest, ...]:
        cu = self.cu_q_lens.tolist()
        toks = self.token_ids.tolist()
        return tuple(
            ScheduledRequest(rid, nc, nn, table, tuple(toks[cu[i] : cu[i + 1]]), s)
            for i, (rid, nc, nn, table, s) in enumerate(
                zip(
                    self.request_ids,
                    self.num_computed_tokens.tolist(),
                    self.num_new_tokens.tolist(),
                    self.block_tables,
                    self.samples_token.tolist(),
                )
            )
        )

    def validate(self) -> None:
        """Full O(tokens) consistency check (tests, debugging): raises ValueError on a bad plan."""
        if np.any(self.num_new_tokens < 1):
            raise ValueError("BatchPlan: every row must compute at least one token")
        if np.any(self.num_computed_tokens < 0):
            raise ValueError("BatchPlan: negative num_computed_tokens")
        if len(self.token_ids) != self.num_tokens:
            raise ValueError(f"BatchPlan: {len(self.token_ids)} token ids for {self.num_tokens} tokens")
        if len(set(self.request_ids)) != self.num_seqs:
            raise ValueError("BatchPlan: a request appears twice")
        for rid, table, kv_len in zip(self.request_ids, self.block_tables, self.kv_lens.tolist()):
            if len(table) * self.block_size < kv_len:
                raise ValueError(f"BatchPlan: request {rid!r} has {len(table)} blocks for {kv_len} tokens")
        absent = set(self.preempted) | set(self.swapped_out)
        if absent & set(self.request_ids):
            raise ValueError("BatchPlan: a preempted or swapped-out request is scheduled")


_REPEATED: dict[tuple[int, int], np.ndarray] = {}  # (token id, rows) -> frozen array, for SampledTokens.repeated


_ARRAYS = ("num_computed_tokens", "num_new_tokens", "samples_token", "token_ids")
_OP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BatchPlan) if f.default is not dataclasses.MISSING}


class SampledTokens(Mapping):
    """The tokens sampled in one plan's step as an array: entry ``j`` belongs to the plan's ``j``-th
    row that samples (plan row order). A read-only ``request id -> token`` mapping for anyone, and
    for the scheduler a batch it applies without a per-request lookup.

    Built by ``StepOutput.for_plan``; validated once here (integer ids in [0, MAX_TOKEN_ID], one
    per sampling row).
    """

    __slots__ = ("array", "step", "_plan", "_map")

    def __init__(self, plan: "BatchPlan", tokens):
        arr = np.asarray(tokens)
        expected = int(np.count_nonzero(plan.samples_token))
        if arr.ndim != 1 or len(arr) != expected:
            raise ValueError(
                f"StepOutput.for_plan: need one token per sampling row of plan {plan.step} "
                f"({expected}), got an array of shape {arr.shape}"
            )
        if arr.dtype.kind not in "iu":
            raise ValueError(f"StepOutput.for_plan: token ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)  # our own copy; uint64 beyond int64 wraps negative and fails below
        if any_bad_token_id(arr):
            raise ValueError(f"StepOutput.for_plan: token ids must be in [0, {MAX_TOKEN_ID}], got {arr[:8].tolist()}...")
        arr.flags.writeable = False
        self.array, self.step, self._plan, self._map = arr, plan.step, plan, None

    @classmethod
    def repeated(cls, plan: "BatchPlan", token_id: int) -> "SampledTokens":
        """Every sampling row of ``plan`` sampled ``token_id`` (a simulator's placeholder): one
        check of that id, and the array shared by every plan with as many sampling rows."""
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id <= MAX_TOKEN_ID:
            raise ValueError(f"SampledTokens.repeated: token id must be an int in [0, {MAX_TOKEN_ID}], got {token_id!r}")
        n = int(np.count_nonzero(plan.samples_token))
        arr = _REPEATED.get((token_id, n))
        if arr is None:
            arr = _REPEATED[token_id, n] = _frozen(np.full(n, token_id, np.int64))
        new = object.__new__(cls)
        new.array, new.step, new._plan, new._map = arr, plan.step, plan, None
        return new

    def _mapping(self) -> dict:
        if self._map is None:
            plan = self._plan
            ids = [rid for rid, s in zip(plan.request_ids, plan.samples_token.tolist()) if s]
            self._map = dict(zip(ids, self.array.tolist()))
        return self._map

    def __getitem__(self, request_id: str) -> int:
        return self._mapping()[request_id]

    def __iter__(self):
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self.array)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What an executor returns: the sampled token of every row with ``samples_token``, and the
    step's measured (engine) or modelled (simulator) duration in seconds and energy in joules."""

    token_ids: Mapping[str, int]
    duration_s: float = 0.0
    energy_j: float = 0.0

    @classmethod
    def for_plan(cls, plan: BatchPlan, tokens, duration_s: float = 0.0, energy_j: float = 0.0) -> "StepOutput":
        """The output of ``plan`` from an array ``tokens`` with one id per sampling row, in plan row
        order (what executors have at hand): cheaper to build and to apply than a dict."""
        return cls(SampledTokens(plan, tokens), duration_s, energy_j)

    @classmethod
    def repeated(cls, plan: BatchPlan, token_id: int, duration_s: float = 0.0, energy_j: float = 0.0) -> "StepOutput":
        """The output of ``plan`` when every sampling row sampled ``token_id`` (``SampledTokens.repeated``)."""
        return cls(SampledTokens.repeated(plan, token_id), duration_s, energy_j)

    def __post_init__(self):
        if not isinstance(self.token_ids, Mapping):
            raise ValueError(f"StepOutput.token_ids must be a mapping, got {type(self.token_ids).__name__}")
        for name in ("duration_s", "energy_j"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"StepOutput.{name} must be a finite number >= 0, got {value!r}")
