"""RunningBatch: the running requests as columns (structure of arrays), sorted by (rank, arrival).

The last row is always the first preemption victim: the latest arrival of the highest rank.

Column-wise storage lets a 256-request decode step update every request with a handful of numpy
operations instead of 256 object copies. Arrays are never written in place after construction:
an update builds new arrays (O(batch), not O(all state)) and shares the untouched columns.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxserve.persistent import Cons, evolve, pick
from jaxserve.scheduler.seq import SeqState

ARRAY_COLUMNS = (
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
    "has_stop",  # bool: the request has stop tokens
    "real_tokens",  # bool: prompt ids are real (placeholders are never cached past the prompt)
)
TUPLE_COLUMNS = ("ids", "requests", "outputs", "block_tables", "block_hashes")


@dataclasses.dataclass(frozen=True, eq=False)
class RunningBatch:
    ids: tuple[str, ...]
    requests: tuple
    outputs: tuple[Cons, ...]
    block_tables: tuple[tuple[int, ...], ...]
    block_hashes: tuple[tuple[int, ...], ...]
    rank: np.ndarray
    seq_no: np.ndarray
    num_computed: np.ndarray
    num_tokens: np.ndarray
    num_output: np.ndarray
    max_new: np.ndarray
    last_token: np.ndarray
    num_hashed: np.ndarray
    num_registered: np.ndarray
    num_preemptions: np.ndarray
    num_blocks: np.ndarray
    has_stop: np.ndarray
    real_tokens: np.ndarray

    @classmethod
    def empty(cls) -> "RunningBatch":
        arrays = {c: np.zeros(0, bool if c in ("has_stop", "real_tokens") else np.int64) for c in ARRAY_COLUMNS}
        return cls(**{c: () for c in TUPLE_COLUMNS}, **arrays)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "RunningBatch":
        """Builds a batch from row dicts holding every column (rows must be sorted by (rank, seq_no))."""
        if not rows:
            return cls.empty()
        cols = {c: tuple(r[c] for r in rows) for c in TUPLE_COLUMNS}
        for c in ARRAY_COLUMNS:
            cols[c] = np.array([r[c] for r in rows], bool if c in ("has_stop", "real_tokens") else np.int64)
        return cls(**cols)

    def __len__(self) -> int:
        return len(self.ids)

    def replace(self, **columns) -> "RunningBatch":
        return evolve(self, **columns)

    def take(self, rows: np.ndarray) -> "RunningBatch":
        """The rows at integer indices ``rows`` (in that order)."""
        idx = rows.tolist()
        cols = {c: pick(getattr(self, c), idx) for c in TUPLE_COLUMNS}
        cols.update({c: getattr(self, c)[rows] for c in ARRAY_COLUMNS})
        return RunningBatch(**cols)

    def concat_sorted(self, other: "RunningBatch") -> tuple["RunningBatch", Optional[np.ndarray]]:
        """Both batches merged by (rank, seq_no), and the permutation applied (None when ``other``
        is empty)."""
        if len(other) == 0:
            return self, None
        seq_no = np.concatenate([self.seq_no, other.seq_no])
        order = np.lexsort((seq_no, np.concatenate([self.rank, other.rank])))
        cols = {}
        idx = order.tolist()
        for c in TUPLE_COLUMNS:
            cols[c] = pick(getattr(self, c) + getattr(other, c), idx)
        for c in ARRAY_COLUMNS:
            cols[c] = np.concatenate([getattr(self, c), getattr(other, c)])[order]
        return RunningBatch(**cols), order

    def row_index(self, request_id: str) -> Optional[int]:
        try:
            return self.ids.index(request_id)
        except ValueError:
            return None

    def seq_state(self, i: int, **overrides) -> SeqState:
        """Row ``i`` as a SeqState (when it leaves the batch)."""
        fields = dict(
            request=self.requests[i],
            seq_no=int(self.seq_no[i]),
            outputs=self.outputs[i],
            num_output=int(self.num_output[i]),
            block_hashes=self.block_hashes[i],
            num_preemptions=int(self.num_preemptions[i]),
        )
        fields.update(overrides)
        return SeqState(**fields)


def row_from_seq(
    seq: SeqState, num_computed: int, block_table: tuple[int, ...], num_registered: int, rank: int = 0
) -> dict:
    """A row dict for ``RunningBatch.from_rows`` for a request entering the batch."""
    req = seq.request
    outputs = seq.outputs
    last = outputs[0] if outputs is not None else req.prompt_token_ids[-1]
    return dict(
        ids=req.request_id,
        requests=req,
        outputs=outputs,
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
        has_stop=bool(req.sampling.stop_token_ids),
        real_tokens=req.has_real_tokens,
    )
