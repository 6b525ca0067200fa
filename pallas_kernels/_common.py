"""Pieces shared by the paged attention kernels: launch variants, GQA row layout, online softmax.

Two launch variants exist because the Pallas backends disagree on how a kernel may follow a page
table:

* ``"loop"`` (GPU / Triton, and the default off TPU): a plain ``pl.pallas_call`` whose program sees
  the whole ``[total_num_pages, page_size, head_dim]`` page array of its KV head (on a GPU that is
  just a pointer into HBM) and walks the sequence's pages in an in-kernel ``fori_loop``, gathering
  ``pages_per_compute_block`` pages per iteration through the page table. Triton has neither scalar
  prefetch nor scratch memory, so this is the shape of kernel it can compile.
* ``"grid"`` (TPU / Mosaic): ``pltpu.PrefetchScalarGridSpec`` puts the page table (and per-block
  metadata) in SMEM; KV pages are a grid axis whose ``BlockSpec`` index maps read the page table, so
  the Mosaic pipeline DMAs exactly the pages a program needs (one operand per page of a compute
  block) and the online-softmax state lives in VMEM scratch across that axis.

Both run in interpret mode on CPU and share :func:`online_softmax_step`, so the maths is one piece of
code. Rows of a program are ``(token, q head of the GQA group)`` pairs: row ``r`` is query token
``r // group_rows`` and head ``r % group_rows`` of the group (the group is padded to a power of two;
padded heads see zero queries and are sliced off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# A large finite negative logit for masked positions: exp(MASK_VALUE - m) underflows to 0 for any real
# running max m, and MASK_VALUE - MASK_VALUE stays finite (no inf - inf = nan in the rescale factor).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

VARIANTS = ("loop", "grid")

# Triton's dot wants every operand dimension >= 16.
_TRITON_MIN_DIM = 16


def cdiv(a, b):
    """Ceiling division for Python ints and integer arrays alike."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_power_of_2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def resolve_variant(variant: str | None) -> str:
    """``None`` -> ``"grid"`` on TPU, ``"loop"`` anywhere else."""
    if variant is None:
        return "grid" if jax.default_backend() == "tpu" else "loop"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} or None, got {variant!r}")
    return variant


def pages_per_block(requested: int, pages_per_seq: int, variant: str) -> int:
    """The pages per compute block a kernel actually uses: ``requested`` clamped to
    ``[1, pages_per_seq]``, rounded down to a power of two for ``loop`` (Triton block shapes)."""
    ppb = max(1, min(int(requested), int(pages_per_seq)))
    return 1 << (ppb.bit_length() - 1) if variant == "loop" else ppb


def group_rows(group: int) -> int:
    """Rows one GQA group occupies per query token: the group size rounded up to a power of two."""
    return next_power_of_2(group)


def check_paged_shapes(q_heads: int, head_dim: int, k_pages, v_pages, page_indices) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be [num_kv_heads, total_num_pages, page_size, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}"
        )
    num_kv_heads, _, _, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != k/v head_dim {kv_head_dim}")
    if q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if page_indices.ndim != 2:
        raise ValueError(f"page_indices must be [max_num_seqs, pages_per_seq], got {page_indices.shape}")


def triton_shape_problems(*, rows: int, head_dim: int, page_size: int, pages_per_block: int) -> list[str]:
    """Why the ``loop`` kernel would not compile with Triton for these sizes ([] when it would)."""
    problems = []
    if not is_power_of_2(head_dim) or head_dim < _TRITON_MIN_DIM:
        problems.append(f"head_dim={head_dim} must be a power of two >= {_TRITON_MIN_DIM}")
    if not is_power_of_2(page_size):
        problems.append(f"page_size={page_size} must be a power of two")
    if not is_power_of_2(pages_per_block):
        problems.append(f"pages_per_compute_block={pages_per_block} must be a power of two")
    if page_size * pages_per_block < _TRITON_MIN_DIM:
        problems.append(f"page_size * pages_per_compute_block must be >= {_TRITON_MIN_DIM}")
    if not is_power_of_2(rows) or rows < _TRITON_MIN_DIM:
        problems.append(f"rows per program={rows} must be a power of two >= {_TRITON_MIN_DIM}")
    return problems


def pad_page_table(page_indices: jax.Array, num_pages: int, total_num_pages: int) -> jax.Array:
    """Page table padded with page 0 to ``num_pages`` columns, entries clamped into the page array.

    Entries past a sequence's length (and padding rows) may hold anything; clamping keeps every
    gather and DMA in bounds, and the kernels mask whatever such pages contain.
    """
    page_indices = jnp.clip(page_indices.astype(jnp.int32), 0, total_num_pages - 1)
    extra = num_pages - page_indices.shape[1]
    if extra > 0:
        page_indices = jnp.pad(page_indices, ((0, 0), (0, extra)))
    return page_indices


def init_state(rows: int, head_dim: int, lanes: int = 1):
    """Online-softmax state: running max m and sum l ``[rows, lanes]``, accumulator ``[rows, head_dim]``."""
    m = jnp.full((rows, lanes), MASK_VALUE, jnp.float32)
    l = jnp.zeros((rows, lanes), jnp.float32)
    acc = jnp.zeros((rows, head_dim), jnp.float32)
    return m, l, acc


def online_softmax_step(q, k, v, mask, m_prev, l_prev, acc_prev, *, sm_scale: float):
    """Fold one block of keys/values into the online-softmax state.

    Args:
      q: ``[rows, head_dim]`` queries (any float dtype).
      k, v: ``[block_k, head_dim]`` keys and values (same dtype as q).
      mask: bool ``[rows, block_k]``, True where the row may attend to the key.
      m_prev, l_prev: float32 ``[rows, 1]`` running max and softmax denominator.
      acc_prev: float32 ``[rows, head_dim]`` running, unnormalised output.

    Returns the new ``(m, l, acc)``. Masked entries contribute exactly zero, so a block in which a
    row sees nothing leaves that row's state unchanged.
    """
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(mask, s * sm_scale, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_prev + pv


def normalize(acc, l):
    """``acc / l`` with rows that saw no key (l == 0) giving 0 instead of nan."""
    return acc / jnp.where(l == 0.0, 1.0, l)


def merge_splits(o, m, l):
    """Combine per-split partial results of a split-KV (flash-decoding) launch.

    ``o``: float32 ``[splits, ..., rows, head_dim]`` outputs normalised within each split;
    ``m``, ``l``: ``[splits, ..., rows]`` the split's running max and denominator. Returns
    ``[..., rows, head_dim]`` float32, exactly the softmax over the union of the splits' keys.
    """
    m_all = jnp.max(m, axis=0)
    w = jnp.exp(m - m_all[None]) * l  # each split's share of the global denominator
    denom = jnp.sum(w, axis=0)
    out = jnp.sum(w[..., None] * o, axis=0)
    return out / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def grid_page_steps(j, q_ref, k_refs, v_refs, o_ref, scratch, *, active, mask_for, sm_scale: float) -> None:
    """The grid variant's body, shared by both kernels: grid step ``j`` folds its pages into the
    online-softmax state held in ``scratch`` (m, l, acc) when ``active``, starting fresh at j == 0
    and writing the normalized output at the last step. ``mask_for(start)`` gives the
    [rows, page_size] visibility mask of the page whose first kv position is ``start``."""
    m_sc, l_sc, acc_sc = scratch
    pages = len(k_refs)
    page_size = k_refs[0].shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(active)
    def _compute():
        q = q_ref[...]
        m, l, acc = m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...]
        for p in range(pages):
            mask = mask_for((j * pages + p) * page_size)
            m, l, acc = online_softmax_step(q, k_refs[p][...], v_refs[p][...], mask, m, l, acc, sm_scale=sm_scale)
        m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l, l_sc.shape)
        acc_sc[...] = acc

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = normalize(acc_sc[...], l_sc[...][:, :1]).astype(o_ref.dtype)


def split_shapes(q_shape, k_pages_shape) -> tuple[list[str], int, int, int, int]:
    """(problems, num_q_heads, num_kv_heads, head_dim, page_size) for the compiled kernels'
    ``supports``: the GQA grouping must divide evenly."""
    _, num_q_heads, head_dim = q_shape
    num_kv_heads, _, page_size, _ = k_pages_shape
    problems = [f"num_q_heads {num_q_heads} % num_kv_heads {num_kv_heads} != 0"] if num_q_heads % num_kv_heads else []
    return problems, num_q_heads, num_kv_heads, head_dim, page_size

