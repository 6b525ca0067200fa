"""Hand-built BatchPlans for the simulator's cost-model tests (imported by their test files)."""

import numpy as np

import jaxserve

BS = 16  # tokens per KV block


def make_plan(computed, new, samples=None, **ops) -> jaxserve.BatchPlan:
    """One row per (computed, new) pair, each with just the blocks it needs; every row samples
    unless ``samples`` says otherwise; ``ops`` are BatchPlan's block operations (copies, swaps)."""
    computed, new = np.asarray(computed, np.int64), np.asarray(new, np.int64)
    samples = np.ones(len(new), bool) if samples is None else np.asarray(samples, bool)
    tables = tuple(tuple(range(-(-int(c + n) // BS))) for c, n in zip(computed.tolist(), new.tolist()))
    return jaxserve.BatchPlan(request_ids=tuple(f"r{i}" for i in range(len(new))), num_computed_tokens=computed,
                              num_new_tokens=new, samples_token=samples, block_tables=tables,
                              token_ids=np.zeros(int(new.sum()), np.int32), block_size=BS, **ops)  # fmt: skip
