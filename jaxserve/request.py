"""Immutable request values: Request, SamplingParams, SLO, RequestStatus.

Every field is validated at construction; a bad value raises ``ValueError`` naming the field, so a
malformed request never reaches a scheduler or an executor.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

PLACEHOLDER_TOKEN_ID = 0
MAX_TOKEN_ID = 2**31 - 1  # token ids travel to executors as int32


def any_bad_token_id(ids: np.ndarray) -> bool:
    """Whether an int64 array holds an id outside [0, MAX_TOKEN_ID] (one reduction: negative ids
    wrap to huge unsigned ones)."""
    return bool(len(ids)) and int(ids.view(np.uint64).max()) > MAX_TOKEN_ID


class RequestStatus(enum.Enum):
    """Where a request is in its life, as a scheduler sees it."""

    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"
    ABORTED = "aborted"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def _check_float(owner: str, name: str, value: Any, minimum: float, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        op = ">" if strict else ">="
        raise ValueError(f"{owner}.{name} must be a finite number {op} {minimum}, got {value!r}")


def _int_tuple(owner: str, name: str, values: Any, *, non_negative: bool = True) -> tuple[int, ...]:
    """Coerces a sequence (list, tuple, numpy array) of ints to a tuple of Python ints."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "tolist"):
        raise ValueError(f"{owner}.{name} must be a sequence of ints, got {type(values).__name__}")
    out = tuple(values.tolist()) if hasattr(values, "tolist") else tuple(values)
    if not all(type(t) is int for t in out):  # slow path: numpy scalars, bools, junk
        fixed = []
        for i, t in enumerate(out):
            if not isinstance(t, numbers.Integral) or isinstance(t, (bool, np.bool_)):
                raise ValueError(f"{owner}.{name}[{i}] must be an int, got {t!r}")
            fixed.append(int(t))
        out = tuple(fixed)
    if non_negative and out and (min(out) < 0 or max(out) > MAX_TOKEN_ID):
        i = next(i for i, t in enumerate(out) if not 0 <= t <= MAX_TOKEN_ID)
        raise ValueError(f"{owner}.{name}[{i}] must be a token id in [0, {MAX_TOKEN_ID}], got {out[i]!r}")
    return out


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample a request's output. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_int("SamplingParams", "max_new_tokens", self.max_new_tokens, 1)
        _check_float("SamplingParams", "temperature", self.temperature, 0.0)
        _check_int("SamplingParams", "top_k", self.top_k, 0)
        _check_float("SamplingParams", "top_p", self.top_p, 0.0, strict=True)
        if self.top_p > 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_int("SamplingParams", "seed", self.seed, 0)
        object.__setattr__(
            self, "stop_token_ids", _int_tuple("SamplingParams", "stop_token_ids", self.stop_token_ids)
        )


@dataclasses.dataclass(frozen=True)
class SLO:
    """Per-request latency targets in seconds (None = no target)."""

    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None:
                _check_float("SLO", name, value, 0.0, strict=True)


class PlaceholderTokens(Sequence):
    """An immutable run of ``n`` placeholder ids for requests known only by length (O(1) memory)."""

    __slots__ = ("_n",)

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PlaceholderTokens(len(range(*index.indices(self._n))))
        index = operator.index(index)
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return PLACEHOLDER_TOKEN_ID

    def __contains__(self, value) -> bool:
        return self._n > 0 and value == PLACEHOLDER_TOKEN_ID

    def __eq__(self, other) -> bool:
        # Equal only to another placeholder run: a length-only prompt is not the same request as
        # real ids that happen to be zeros (and hash/eq stay consistent).
        if isinstance(other, PlaceholderTokens):
            return self._n == other._n
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("PlaceholderTokens", self._n))

    def __repr__(self) -> str:
        return f"PlaceholderTokens({self._n})"


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    Pass ``prompt_token_ids`` (real ids), or ``prompt_len`` alone for simulations that know only
    lengths (the ids are then placeholders and the request is never prefix-cached unless it carries
    ``prefix_block_hashes``). ``prefix_block_hashes`` is a trace-provided prefix identity: hash ``i``
    names prompt tokens ``[i * prefix_hash_block_size, (i + 1) * prefix_hash_block_size)`` together
    with everything before them, as in the Mooncake traces (512-token blocks). ``cache_salt``
    (a non-empty str, e.g. a tenant id) enters the first prefix-cache block's key, so requests
    share prefix blocks only with requests of the same salt (None: shared with unsalted ones).
    """

    request_id: str
    prompt_token_ids: Optional[Sequence[int]] = None
    sampling: Optional[SamplingParams] = None
    arrival_time: float = 0.0
    client_id: str = "default"
    prompt_len: Optional[int] = None
    prefix_block_hashes: Optional[tuple[int, ...]] = None
    prefix_hash_block_size: int = 512
    priority: int = 0
    slo: Optional[SLO] = None
    cache_salt: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"Request.request_id must be a non-empty str, got {self.request_id!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(
                f"Request.sampling must be a SamplingParams (request {self.request_id!r}), "
                f"got {type(self.sampling).__name__}"
            )
        if self.prompt_len is not None:
            _check_int("Request", "prompt_len", self.prompt_len, 1)
        if self.prompt_token_ids is None:
            if self.prompt_len is None:
                raise ValueError(
                    f"Request {self.request_id!r}: give prompt_token_ids or prompt_len"
                )
            object.__setattr__(self, "prompt_token_ids", PlaceholderTokens(self.prompt_len))
        else:
            ids = self.prompt_token_ids
            if not isinstance(ids, PlaceholderTokens):
                ids = _int_tuple("Request", "prompt_token_ids", ids)
            if not len(ids):
                raise ValueError(f"Request {self.request_id!r}: prompt_token_ids is empty")
            if self.prompt_len is not None and self.prompt_len != len(ids):
                raise ValueError(
                    f"Request {self.request_id!r}: prompt_len={self.prompt_len} disagrees with "
                    f"len(prompt_token_ids)={len(ids)}"
                )
            object.__setattr__(self, "prompt_token_ids", ids)
        object.__setattr__(self, "prompt_len", len(self.prompt_token_ids))
        _check_float("Request", "arrival_time", self.arrival_time, 0.0)
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError(f"Request.client_id must be a non-empty str, got {self.client_id!r}")
        if not _is_int(self.priority):
            raise ValueError(f"Request.priority must be an int, got {self.priority!r}")
        _check_int("Request", "prefix_hash_block_size", self.prefix_hash_block_size, 1)
        if self.prefix_block_hashes is not None:
            object.__setattr__(
                self,
                "prefix_block_hashes",
                _int_tuple("Request", "prefix_block_hashes", self.prefix_block_hashes, non_negative=False),
            )
        if self.slo is not None and not isinstance(self.slo, SLO):
            raise ValueError(f"Request.slo must be an SLO or None, got {type(self.slo).__name__}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError(f"Request.cache_salt must be a non-empty str or None, got {self.cache_salt!r}")

    @property
    def has_real_tokens(self) -> bool:
        return not isinstance(self.prompt_token_ids, PlaceholderTokens)

    @functools.cached_property
    def prompt_array(self) -> np.ndarray:
        """The prompt ids as a read-only int32 array, built once (schedulers copy prefill chunks
        from it into a plan's ``token_ids``)."""
        arr = np.asarray(self.prompt_token_ids, np.int32)
        arr.flags.writeable = False
        return arr

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus the most tokens it may generate."""
        return self.prompt_len + self.sampling.max_new_tokens
