"""RunningBatch: the running requests as columns (structure of arrays), sorted by (rank, arrival).

The last row is always the first preemption victim: the latest arrival of the highest rank.

Column-wise storage lets a 256-request decode step update every request with a handful of numpy
operations instead of 256 object copies. Arrays are never written in place after construction:
an update builds new arrays (O(batch), not O(all state)) and shares the untouched columns.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import numpy as np

from jaxserve.persistent import evolve, pick
from jaxserve.scheduler.seq import SeqState

NUM_COLUMNS = (
    "rank",  # preemption rank (higher = preempted first); rows are sorted by (rank, seq_no)
    "seq_no",  # arrival order
    "num_computed",  # tokens in KV (after the last scheduled step)
    "num_tokens",  # prompt + generated tokens known
    "num_output",  # generated tokens
    "max_new",  # SamplingParams.max_new_tokens
    "last_token",  # id of the newest known token (the next decode's input)
    "num_hashed",  # len(block_hashes[i])
    "num_registered",  # leading blocks already offered to the prefix cache
    "num_preemptions",
    "num_blocks",  # len(block_tables[i])
    "has_stop",  # 1 if the request has stop tokens
    "real_tokens",  # 1 if prompt ids are real (placeholders are never cached past the prompt)
    "slot",  # the row's slot in the scheduler's TokenBuffer (its generated ids)
)
TUPLE_COLUMNS = ("ids", "requests", "block_tables", "block_hashes")
_INDEX = {name: k for k, name in enumerate(NUM_COLUMNS)}
_NUM_COMPUTED, _NUM_BLOCKS = _INDEX["num_computed"], _INDEX["num_blocks"]
_RANK, _SEQ_NO = _INDEX["rank"], _INDEX["seq_no"]
COL = _INDEX  # column name -> index into ``nums``, for code that edits a copy of ``nums`` directly


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class RunningBatch:
    """Numeric columns live in one int64 matrix ``nums`` [rows, len(NUM_COLUMNS)] (read-only), so
    selecting or merging rows is one numpy call; ``batch.num_computed`` etc. are column views."""

    ids: tuple[str, ...]
    requests: tuple
    block_tables: tuple[tuple[int, ...], ...]
    block_hashes: tuple[tuple[int, ...], ...]
    nums: np.ndarray

    @classmethod
    def empty(cls) -> "RunningBatch":
        return _make((), (), (), (), _frozen(np.zeros((0, len(NUM_COLUMNS)), np.int64)))

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "RunningBatch":
        """Builds a batch from row dicts holding every column (rows must be sorted by (rank, seq_no))."""
        if not rows:
            return cls.empty()
        cols = [tuple(r[c] for r in rows) for c in TUPLE_COLUMNS]
        nums = np.array([[r[c] for c in NUM_COLUMNS] for r in rows], np.int64)
        return _make(*cols, _frozen(nums))

    def __len__(self) -> int:
        return len(self.ids)

    def replace(self, **columns) -> "RunningBatch":
        """A copy with some columns replaced (numeric ones given as [rows] arrays)."""
        numeric = {k: columns.pop(k) for k in list(columns) if k in _INDEX}
        if numeric:
            nums = self.nums.copy()
            for k, v in numeric.items():
                nums[:, _INDEX[k]] = v
            columns["nums"] = _frozen(nums)
        return evolve(self, **columns)

    def advance(self, num_new: np.ndarray, block_tables=None, num_blocks=None) -> "RunningBatch":
        """A copy whose ``num_computed`` grew by ``num_new`` [rows], with new ``block_tables``
        (and their lengths ``num_blocks``) when given: the batch after a step is scheduled."""
        nums = self.nums.copy()
        nums[:, _NUM_COMPUTED] += num_new
        if block_tables is None:
            block_tables = self.block_tables
        else:
            nums[:, _NUM_BLOCKS] = num_blocks
        return _make(self.ids, self.requests, block_tables, self.block_hashes, _frozen(nums))

    def with_nums(self, nums: np.ndarray, block_tables=None) -> "RunningBatch":
        """A copy with the numeric matrix ``nums`` (a new array, frozen here: the caller gives it
        up) and, when given, new ``block_tables``."""
        tables = self.block_tables if block_tables is None else block_tables
        return _make(self.ids, self.requests, tables, self.block_hashes, _frozen(nums))

    def take(self, rows: np.ndarray) -> "RunningBatch":
        """The rows at integer indices ``rows`` (in that order)."""
        idx = rows.tolist()
        return _make(*(pick(getattr(self, c), idx) for c in TUPLE_COLUMNS), _frozen(self.nums[rows]))

    def head(self, n: int) -> "RunningBatch":
        """The first ``n`` rows."""
        if n == len(self):
            return self
        return _make(*(getattr(self, c)[:n] for c in TUPLE_COLUMNS), _frozen(self.nums[:n]))

    def drop(self, rows: list[int]) -> "RunningBatch":
        """The batch without the rows at the sorted indices ``rows`` (cheap for a few rows: slices
        of every column, never a gather, which costs far more on a 256-row batch)."""
        if not rows:
            return self
        if len(rows) == 1:  # the usual case (one request finishes): two slices per column
            r = rows[0]
            nums = np.concatenate((self.nums[:r], self.nums[r + 1 :]))
            return _make(*(getattr(self, c)[:r] + getattr(self, c)[r + 1 :] for c in TUPLE_COLUMNS), _frozen(nums))
        spans = [(a + 1, b) for a, b in zip([-1, *rows], [*rows, len(self)]) if b > a + 1]
        cols = []
        for c in TUPLE_COLUMNS:
            col = getattr(self, c)
            cols.append(tuple(itertools.chain.from_iterable(col[a:b] for a, b in spans)) if len(spans) > 2
                        else sum((col[a:b] for a, b in spans), ()))
        nums = self.nums
        kept = [nums[a:b] for a, b in spans]
        nums = np.concatenate(kept) if kept else nums[:0].copy()
        return _make(*cols, _frozen(nums))

    def concat_sorted(self, other: "RunningBatch") -> tuple["RunningBatch", Optional[np.ndarray]]:
        """Both batches merged by (rank, seq_no), and the permutation applied (None when the rows
        of ``other`` simply follow, the usual case: new arrivals rank last)."""
        if len(other) == 0:
            return self, None
        nums = np.concatenate((self.nums, other.nums))
        # Already sorted when the new rows are sorted and follow the last old row (checked on the
        # few rows involved, as Python ints: cheaper than numpy for a handful of rows).
        keys = list(zip(other.rank.tolist(), other.seq_no.tolist()))
        if len(self):
            keys.insert(0, (self.nums.item(-1, _RANK), self.nums.item(-1, _SEQ_NO)))
        if all(a < b for a, b in zip(keys, keys[1:])):
            return _make(*(getattr(self, c) + getattr(other, c) for c in TUPLE_COLUMNS), _frozen(nums)), None
        order = np.lexsort((nums[:, _SEQ_NO], nums[:, _RANK]))
        idx = order.tolist()
        cols = (pick(getattr(self, c) + getattr(other, c), idx) for c in TUPLE_COLUMNS)
        return _make(*cols, _frozen(nums[order])), order

    def row_index(self, request_id: str) -> Optional[int]:
        try:
            return self.ids.index(request_id)
        except ValueError:
            return None

    def seq_state(self, i: int, outputs: tuple[int, ...], **overrides) -> SeqState:
        """Row ``i`` as a SeqState (when it leaves the batch), with its generated ids ``outputs``."""
        fields = dict(
            request=self.requests[i],
            seq_no=int(self.seq_no[i]),
            outputs=outputs,
            num_output=int(self.num_output[i]),
            block_hashes=self.block_hashes[i],
            num_preemptions=int(self.num_preemptions[i]),
        )
        fields.update(overrides)
        return SeqState(**fields)


def _column(k: int):
    return property(lambda self: self.nums[:, k], doc=f"column {NUM_COLUMNS[k]!r} [rows] (a read-only view)")


for _name, _k in _INDEX.items():
    setattr(RunningBatch, _name, _column(_k))


def _make(ids, requests, block_tables, block_hashes, nums) -> RunningBatch:
    """A RunningBatch from its columns without the frozen-dataclass __init__ (hot paths)."""
    new = object.__new__(RunningBatch)
    new.__dict__.update(ids=ids, requests=requests, block_tables=block_tables, block_hashes=block_hashes, nums=nums)
    return new


def row_from_seq(
    seq: SeqState, num_computed: int, block_table: tuple[int, ...], num_registered: int, rank: int, slot: int
) -> dict:
    """A row dict for ``RunningBatch.from_rows`` for a request entering the batch (its generated
    ids already written to TokenBuffer ``slot``)."""
    req = seq.request
    last = seq.outputs[seq.num_output - 1] if seq.num_output else req.prompt_token_ids[-1]
    return dict(
        ids=req.request_id,
        requests=req,
        slot=slot,
        block_tables=block_table,
        block_hashes=seq.block_hashes,
        rank=rank,
        seq_no=seq.seq_no,
        num_computed=num_computed,
        num_tokens=seq.num_tokens,
        num_output=seq.num_output,
        max_new=req.sampling.max_new_tokens,
        last_token=last,
        num_hashed=len(seq.block_hashes),
        num_registered=num_registered,
        num_preemptions=seq.num_preemptions,
        num_blocks=len(block_table),
        has_stop=int(bool(req.sampling.stop_token_ids)),
        real_tokens=int(req.has_real_tokens),
    )
