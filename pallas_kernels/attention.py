"""Attention dispatcher: the Pallas kernels on GPU/TPU, the jnp references elsewhere.

The engine calls these two functions and nothing else. The choice is made when the call is traced
(inside ``jax.jit`` it is baked into the compiled step):

* ``JAXSERVE_ATTENTION`` unset or ``auto``: the Pallas kernel when ``jax.default_backend()`` is
  ``"gpu"`` or ``"tpu"`` and the kernel supports the shapes (see ``kernel.supports``), else the
  reference.
* ``reference``: always the jnp reference.
* ``pallas``: always the compiled Pallas kernel (an error on CPU, or for unsupported shapes).
* ``interpret``: the Pallas kernel in interpret mode, on any backend (tests on CPU; slow).
"""

from __future__ import annotations

import os

import jax

from pallas_kernels.paged_attention import kernel as _paged_kernel
from pallas_kernels.paged_attention import reference as _paged_reference
from pallas_kernels.ragged_paged_attention import kernel as _ragged_kernel
from pallas_kernels.ragged_paged_attention import reference as _ragged_reference

ENV_VAR = "JAXSERVE_ATTENTION"
MODES = ("auto", "reference", "pallas", "interpret")
KERNEL_BACKENDS = ("gpu", "tpu")


def attention_mode() -> str:
    """The mode requested through ``JAXSERVE_ATTENTION`` (``"auto"`` when unset)."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}; expected one of {MODES}")
    return mode


def _backend() -> str:
    return jax.default_backend()


def _variant() -> str:
    """Kernel launch variant for the current backend (see ``pallas_kernels/_common.py``)."""
    return "grid" if _backend() == "tpu" else "loop"


def _choose(problems: list[str], what: str) -> str:
    """``"reference"``, ``"pallas"`` or ``"interpret"`` for a kernel with these shape problems."""
    mode = attention_mode()
    if mode in ("reference", "interpret"):
        return mode
    backend = _backend()
    if mode == "pallas":
        if backend not in KERNEL_BACKENDS:
            raise RuntimeError(
                f"{ENV_VAR}=pallas but the backend is {backend!r}; compiled Pallas kernels need a GPU "
                f"or TPU (use {ENV_VAR}=interpret to run them in the interpreter)"
            )
        if problems:
            raise ValueError(f"{ENV_VAR}=pallas but {what} cannot take these shapes: {'; '.join(problems)}")
        return "pallas"
    return "pallas" if backend in KERNEL_BACKENDS and not problems else "reference"


def ragged_paged_attention_impl(q_shape, k_pages_shape, pages_per_seq: int | None = None) -> str:
    """Which implementation :func:`ragged_paged_attention` would use for these shapes right now."""
    problems = _ragged_kernel.supports(q_shape, k_pages_shape, pages_per_seq=pages_per_seq, variant=_variant())
    return _choose(problems, "ragged_paged_attention")


def paged_attention_impl(q_shape, k_pages_shape, pages_per_seq: int | None = None) -> str:
    """Which implementation :func:`paged_attention` would use for these shapes right now."""
    problems = _paged_kernel.supports(q_shape, k_pages_shape, pages_per_seq=pages_per_seq, variant=_variant())
    return _choose(problems, "paged_attention")


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Mixed prefill + decode attention over a paged KV cache; see
    ``pallas_kernels.ragged_paged_attention.reference.ragged_paged_attention`` for the contract
    (q ``[num_tokens, num_q_heads, head_dim]``, pages ``[num_kv_heads, total_num_pages, page_size,
    head_dim]``, int32 ``kv_lens [S]``, ``page_indices [S, pages_per_seq]``, ``cu_q_lens [S + 1]``,
    ``num_seqs [1]``; returns ``[num_tokens, num_q_heads, head_dim]`` in q's dtype)."""
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    impl = ragged_paged_attention_impl(q.shape, k_pages.shape, page_indices.shape[1])
    if impl == "reference":
        return _ragged_reference.ragged_paged_attention(*args, sm_scale=sm_scale, sliding_window=sliding_window)
    return _ragged_kernel.ragged_paged_attention(
        *args,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        variant=_variant(),
        interpret=impl == "interpret",
    )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
    """Decode attention (one query token per sequence) over a paged KV cache; see
    ``pallas_kernels.paged_attention.reference.paged_attention`` for the contract (q ``[num_seqs,
    num_q_heads, head_dim]``; returns the same shape in q's dtype)."""
    args = (q, k_pages, v_pages, kv_lens, page_indices)
    impl = paged_attention_impl(q.shape, k_pages.shape, page_indices.shape[1])
    if impl == "reference":
        return _paged_reference.paged_attention(*args, sm_scale=sm_scale)
    return _paged_kernel.paged_attention(*args, sm_scale=sm_scale, variant=_variant(), interpret=impl == "interpret")
