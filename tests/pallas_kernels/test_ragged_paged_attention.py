"""Ragged paged attention: the Pallas kernel (interpret mode, both launch variants) vs the reference.

The default run covers each feature once on tiny shapes; ``-m slow`` sweeps GQA ratios, head dims,
page sizes, block sizes, sliding windows and dtypes exhaustively.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_kv_testing import assert_close, ragged_batch, rng_for

from pallas_kernels.ragged_paged_attention import kernel, reference

VARIANTS = ["loop", "grid"]

# (q_len, kv_len) per sequence: a prefill from position 0, a decode, a chunk in the middle of a
# sequence, a length-1 sequence, and kv_lens on exact page boundaries (page_size 4).
MIXED = [(6, 6), (1, 9), (5, 12), (1, 1), (3, 8)]


def _check(
    variant,
    seqs,
    *,
    heads,
    head_dim,
    page_size,
    dtype,
    sliding_window=None,
    sm_scale=None,
    pages_per_seq=None,
    num_padding_tokens=3,
    **kernel_args,
):
    rng = rng_for(
        "ragged",
        variant,
        tuple(seqs),
        heads,
        head_dim,
        page_size,
        str(dtype),
        sliding_window,
        sorted(kernel_args.items()),
    )
    batch = ragged_batch(
        rng,
        seqs,
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        pages_per_seq=pages_per_seq,
        num_padding_tokens=num_padding_tokens,
    )
    expected = reference.ragged_paged_attention(*batch.args, sm_scale=sm_scale, sliding_window=sliding_window)
    out = kernel.ragged_paged_attention(
        *batch.args,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        variant=variant,
        interpret=True,
        **kernel_args,
    )
    assert out.shape == expected.shape and out.dtype == dtype
    what = f"{variant} {seqs} {heads} D={head_dim} ps={page_size} window={sliding_window} {kernel_args}"
    assert_close(out, expected, dtype, what=what)
    num_real = sum(q for q, _ in seqs)
    assert np.all(np.asarray(out[num_real:], np.float32) == 0.0), "padding tokens must be 0"
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_prefill_and_decode(variant):
    _check(
        variant, MIXED, heads=(4, 2), head_dim=32, page_size=4, dtype=jnp.float32, block_q=4, pages_per_compute_block=2
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_gqa3_sliding_window(variant):
    _check(
        variant,
        MIXED,
        heads=(6, 2),
        head_dim=64,
        page_size=4,
        dtype=jnp.bfloat16,
        sliding_window=5,
        sm_scale=0.3,
        block_q=2,
        pages_per_compute_block=2,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocks_spanning_many_pages_and_empty_sequence(variant):
    # block_q=1 (one program per token), an idle sequence with no tokens, MHA, page size 1
    _check(
        variant,
        [(4, 7), (0, 3), (1, 5), (2, 2)],
        heads=(2, 2),
        head_dim=16,
        page_size=1,
        dtype=jnp.float32,
        block_q=1,
        pages_per_compute_block=4,
        pages_per_seq=9,
    )


def test_default_block_sizes_under_jit():
    # the defaults (64 rows per program, 8 pages per step) inside an outer jit, as the engine calls it
    rng = rng_for("jit")
    batch = ragged_batch(
        rng, [(9, 20), (1, 17)], num_q_heads=8, num_kv_heads=1, head_dim=32, page_size=2, dtype=jnp.float32
    )
    fn = jax.jit(lambda *a: kernel.ragged_paged_attention(*a, interpret=True))
    assert_close(fn(*batch.args), reference.ragged_paged_attention(*batch.args), jnp.float32)


def test_block_metadata_covers_every_token_once():
    cu = jnp.array([0, 5, 5, 6, 15, 3], jnp.int32)  # 4 real sequences, then garbage
    kv_lens = jnp.array([5, 2, 9, 20, 1], jnp.int32)
    meta, q_index, q_valid, out_index, out_valid = kernel.block_metadata(
        cu,
        kv_lens,
        jnp.array([4], jnp.int32),
        num_tokens=18,
        block_q=4,
        kv_block=8,
        num_kv_blocks=3,
        sliding_window=None,
    )
    meta, q_index, q_valid = map(np.asarray, (meta, q_index, q_valid))
    assert meta.shape[0] == kernel.num_query_blocks(18, 5, 4) == 10
    # blocks: seq0 [0..3],[4]; seq2 [5]; seq3 [6..9],[10..13],[14]
    assert meta[:6, 0].tolist() == [0, 0, 2, 3, 3, 3]
    assert meta[:, 2].tolist() == [4, 1, 1, 4, 4, 1, 0, 0, 0, 0]
    assert meta[:6, 1].tolist() == [0, 4, 8, 11, 15, 19]  # first query position of each block
    assert meta[:6, 4].tolist() == [1, 1, 2, 2, 3, 3]  # one past the last 8-token KV block needed
    assert sorted(q_index[q_valid].tolist()) == list(range(15))
    rows = np.asarray(out_index)[np.asarray(out_valid)]
    assert np.asarray(out_valid).tolist() == [True] * 15 + [False] * 3
    assert (q_index.reshape(-1)[rows] == np.arange(15)).all()


def test_supports():
    assert kernel.supports((64, 32, 128), (8, 100, 16, 128), variant="loop") == []
    assert kernel.supports((64, 32, 96), (8, 100, 16, 96), variant="loop")  # head_dim not a power of 2
    assert kernel.supports((64, 32, 128), (8, 100, 16, 128), block_q=1, variant="loop")  # 4 rows < 16
    assert kernel.supports((64, 32, 96), (8, 100, 16, 96), variant="grid") == []


SWEEP = list(
    itertools.product(
        VARIANTS,
        [(1, 1), (2, 1), (6, 2), (8, 1), (16, 2)],  # GQA 1, 2, 3, 8, 8
        [1, 4, 16],  # page_size
        [jnp.float32, jnp.bfloat16],
    )
)


def _random_seqs(rng, page_size, num_seqs=5, max_pages=4):
    seqs = [(1, 1), (page_size, page_size), (1, max_pages * page_size)]  # length 1, full pages
    for _ in range(num_seqs - len(seqs)):
        kv = int(rng.integers(1, max_pages * page_size + 1))
        seqs.append((int(rng.integers(1, kv + 1)), kv))
    return seqs


@pytest.mark.slow
@pytest.mark.parametrize("variant,heads,page_size,dtype", SWEEP)
def test_sweep(variant, heads, page_size, dtype):
    rng = np.random.default_rng(page_size * 7 + heads[0])
    seqs = _random_seqs(rng, page_size)
    for head_dim, block_q, ppb, window in [(32, 1, 1, None), (128, 4, 2, None), (64, 3, 4, 2 * page_size + 1)]:
        _check(
            variant,
            seqs,
            heads=heads,
            head_dim=head_dim,
            page_size=page_size,
            dtype=dtype,
            pages_per_seq=4,
            block_q=block_q,
            pages_per_compute_block=ppb,
            sliding_window=window,
        )


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", range(6))
def test_random_batches(variant, seed):
    rng = np.random.default_rng(100 + seed)
    page_size = int(rng.choice([2, 4, 8]))
    seqs = _random_seqs(rng, page_size, num_seqs=int(rng.integers(3, 9)), max_pages=6)
    window = None if seed % 2 else int(rng.integers(1, 12))
    dtype = [jnp.float32, jnp.bfloat16][seed % 2]
    _check(
        variant,
        seqs,
        heads=(4, 2),
        head_dim=64,
        page_size=page_size,
        dtype=dtype,
        pages_per_seq=6,
        block_q=int(rng.choice([1, 2, 8, 16])),
        pages_per_compute_block=int(rng.choice([1, 2, 4])),
        sliding_window=window,
        num_padding_tokens=int(rng.integers(0, 6)),
    )
