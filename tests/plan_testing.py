"""A BatchPlan from explicit rows, for tests that pack or attend hand-built steps."""

from __future__ import annotations

import numpy as np

from jaxserve.plan import BatchPlan


def make_plan(rows, block_size: int) -> BatchPlan:
    """rows: ``(request_id, num_computed, new token ids, block_table, samples_token)``; validated."""
    plan = BatchPlan(
        request_ids=tuple(r[0] for r in rows),
        num_computed_tokens=np.array([r[1] for r in rows], np.int64),
        num_new_tokens=np.array([len(r[2]) for r in rows], np.int64),
        samples_token=np.array([r[4] for r in rows], bool),
        block_tables=tuple(tuple(r[3]) for r in rows),
        token_ids=np.array([t for r in rows for t in r[2]], np.int32),
        block_size=block_size,
    )
    plan.validate()
    return plan
