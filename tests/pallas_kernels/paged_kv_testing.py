"""Test helpers for the paged attention kernels: random paged KV caches, ragged batches, a float64
numpy attention that is obviously right, and the per-dtype tolerance table."""

from __future__ import annotations

import dataclasses
import zlib

import jax.numpy as jnp
import numpy as np

# Kernel (interpret mode) vs reference, and reference vs float64 numpy, per input dtype. The
# float32 bound covers different summation orders; the bfloat16 one covers the output rounding to
# bfloat16 (2^-8 relative) plus the kernel's bfloat16 probabilities in the P @ V matmul.
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=1e-5, rtol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
}

# KV slots no query may see are filled with values of this scale, so a masking bug shows up loudly.
GARBAGE_SCALE = 30.0


def rng_for(*parts) -> np.random.Generator:
    """A generator seeded stably (unlike ``hash``) from the test's parameters."""
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def assert_close(actual, expected, dtype, *, what: str = ""):
    tol = TOLERANCES[jnp.dtype(dtype)]
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite output"
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol)


def max_abs_error(actual, expected) -> float:
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    return float(np.max(np.abs(a - e))) if a.size else 0.0


@dataclasses.dataclass
class PagedKV:
    k_pages: jnp.ndarray  # [Hkv, total_pages, page_size, D]
    v_pages: jnp.ndarray
    page_indices: jnp.ndarray  # int32 [num_rows, pages_per_seq]
    dense_k: list  # per real sequence: float64 [Hkv, kv_len, D] (the values as stored, i.e. rounded)
    dense_v: list


def random_paged_kv(
    rng: np.random.Generator,
    kv_lens: list[int],
    *,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    dtype,
    num_padding_rows: int = 0,
    extra_pages: int = 3,
) -> PagedKV:
    """A shuffled page pool holding each sequence's K/V at its pages; every other slot is garbage.

    Padding rows of the page table hold out-of-range entries (-1 and a huge index) that callers
    must ignore.
    """
    num_seqs = len(kv_lens)
    assert all(n <= pages_per_seq * page_size for n in kv_lens)
    total_pages = num_seqs * pages_per_seq + extra_pages
    shape = (num_kv_heads, total_pages, page_size, head_dim)
    k_pages = rng.standard_normal(shape) * GARBAGE_SCALE
    v_pages = rng.standard_normal(shape) * GARBAGE_SCALE
    perm = rng.permutation(total_pages)
    page_indices = perm[: num_seqs * pages_per_seq].reshape(num_seqs, pages_per_seq)
    dense_k, dense_v = [], []
    for s, n in enumerate(kv_lens):
        k = rng.standard_normal((num_kv_heads, n, head_dim))
        v = rng.standard_normal((num_kv_heads, n, head_dim))
        for pos in range(n):
            page, slot = page_indices[s, pos // page_size], pos % page_size
            k_pages[:, page, slot] = k[:, pos]
            v_pages[:, page, slot] = v[:, pos]
    k_pages = jnp.asarray(k_pages, dtype)
    v_pages = jnp.asarray(v_pages, dtype)
    # The dense copies hold exactly what the pages hold (after rounding to dtype).
    k_f = np.asarray(k_pages.astype(jnp.float32), np.float64)
    v_f = np.asarray(v_pages.astype(jnp.float32), np.float64)
    for s, n in enumerate(kv_lens):
        pos = np.arange(n)
        pages = page_indices[s, pos // page_size]
        dense_k.append(k_f[:, pages, pos % page_size])
        dense_v.append(v_f[:, pages, pos % page_size])
    if num_padding_rows:
        pad = np.full((num_padding_rows, pages_per_seq), -1, np.int64)
        pad[:, ::2] = 10**6
        page_indices = np.concatenate([page_indices, pad])
    return PagedKV(k_pages, v_pages, jnp.asarray(page_indices, jnp.int32), dense_k, dense_v)


def naive_attention(q, k, v, visible, sm_scale):
    """float64 attention for one query token. q ``[Hq, D]``, k/v ``[Hkv, L, D]``, visible bool ``[L]``."""
    num_q_heads = q.shape[0]
    group = num_q_heads // k.shape[0]
    out = np.zeros(q.shape, np.float64)
    if not visible.any():
        return out
    for h in range(num_q_heads):
        kh, vh = k[h // group][visible], v[h // group][visible]
        s = kh @ q[h] * sm_scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vh
    return out


@dataclasses.dataclass
class RaggedBatch:
    args: tuple  # (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    kv: PagedKV
    q_lens: list
    kv_lens: list

    def naive(self, *, sm_scale=None, sliding_window=None) -> np.ndarray:
        """float64 numpy ground truth, token by token."""
        q = np.asarray(self.args[0].astype(jnp.float32), np.float64)
        num_tokens, _, head_dim = q.shape
        scale = head_dim**-0.5 if sm_scale is None else sm_scale
        out = np.zeros(q.shape, np.float64)
        t = 0
        for s, (q_len, kv_len) in enumerate(zip(self.q_lens, self.kv_lens)):
            for i in range(q_len):
                pos = kv_len - q_len + i
                kv_pos = np.arange(kv_len)
                visible = kv_pos <= pos
                if sliding_window is not None:
                    visible &= kv_pos > pos - sliding_window
                out[t] = naive_attention(q[t], self.kv.dense_k[s], self.kv.dense_v[s], visible, scale)
                t += 1
        return out


def ragged_batch(
    rng: np.random.Generator,
    seqs: list[tuple[int, int]],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype,
    pages_per_seq: int | None = None,
    num_padding_rows: int = 1,
    num_padding_tokens: int = 3,
) -> RaggedBatch:
    """A ragged batch of ``(q_len, kv_len)`` sequences, padded the way an engine pads buckets.

    Padding rows get garbage ``kv_lens``/``cu_q_lens``/page-table entries, padding tokens garbage
    queries; ``num_seqs`` counts only the real sequences.
    """
    q_lens = [a for a, _ in seqs]
    kv_lens = [b for _, b in seqs]
    assert all(0 <= a <= b for a, b in seqs)
    if pages_per_seq is None:
        pages_per_seq = max(1, -(-max(kv_lens) // page_size))
    kv = random_paged_kv(
        rng,
        kv_lens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        dtype=dtype,
        num_padding_rows=num_padding_rows,
    )
    num_tokens = sum(q_lens) + num_padding_tokens
    q = jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, head_dim)), dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    cu = np.concatenate([cu, np.full(num_padding_rows, 7)])  # garbage past num_seqs
    kv_l = np.concatenate([kv_lens, np.full(num_padding_rows, 5)])
    args = (
        q,
        kv.k_pages,
        kv.v_pages,
        jnp.asarray(kv_l, jnp.int32),
        kv.page_indices,
        jnp.asarray(cu, jnp.int32),
        jnp.asarray([len(seqs)], jnp.int32),
    )
    return RaggedBatch(args, kv, q_lens, kv_lens)


def decode_batch(
    rng: np.random.Generator,
    kv_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype,
    pages_per_seq: int | None = None,
):
    """``(args, naive)`` for paged decode: args = (q, k_pages, v_pages, kv_lens, page_indices),
    naive the float64 ground truth ``[num_seqs, Hq, D]`` (0 for a sequence with kv_len 0)."""
    if pages_per_seq is None:
        pages_per_seq = max(1, -(-max(kv_lens) // page_size))
    kv = random_paged_kv(
        rng,
        kv_lens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        dtype=dtype,
    )
    q = jnp.asarray(rng.standard_normal((len(kv_lens), num_q_heads, head_dim)), dtype)
    args = (q, kv.k_pages, kv.v_pages, jnp.asarray(kv_lens, jnp.int32), kv.page_indices)
    qf = np.asarray(q.astype(jnp.float32), np.float64)
    naive = np.stack(
        [
            naive_attention(qf[s], kv.dense_k[s], kv.dense_v[s], np.ones(n, bool), head_dim**-0.5)
            for s, n in enumerate(kv_lens)
        ]
    )
    return args, naive
