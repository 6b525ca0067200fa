"""Pallas attention kernels for jaxserve, each with a plain-jnp reference it is tested against.

* ``pallas_kernels.paged_attention.{kernel,reference}``: paged decode attention (one query token per
  sequence).
* ``pallas_kernels.ragged_paged_attention.{kernel,reference}``: one call for a mixed batch of prefill
  chunks and decodes in the ragged layout (``cu_q_lens``, ``kv_lens``, ``page_indices``, ``num_seqs``).
* :func:`ragged_paged_attention` / :func:`paged_attention` (from ``pallas_kernels.attention``): the
  dispatcher the engine calls -- the Pallas kernel on GPU/TPU, the reference on CPU, overridable with
  ``JAXSERVE_ATTENTION=reference|pallas|interpret``.

The package attributes ``paged_attention`` and ``ragged_paged_attention`` are the dispatcher
functions; they shadow the subpackages of the same name, so each function carries its subpackage's
``kernel`` and ``reference`` modules as attributes. That keeps every import form working:
``pallas_kernels.ragged_paged_attention(...)`` dispatches, while
``pallas_kernels.ragged_paged_attention.reference.ragged_paged_attention``,
``import pallas_kernels.paged_attention.kernel as k`` and
``from pallas_kernels.paged_attention import reference`` reach the modules.
"""

from pallas_kernels.attention import (
    ENV_VAR,
    attention_mode,
    paged_attention,
    paged_attention_impl,
    ragged_paged_attention,
    ragged_paged_attention_impl,
)
from pallas_kernels.paged_attention import kernel as _paged_kernel
from pallas_kernels.paged_attention import reference as _paged_reference
from pallas_kernels.ragged_paged_attention import kernel as _ragged_kernel
from pallas_kernels.ragged_paged_attention import reference as _ragged_reference

paged_attention.kernel = _paged_kernel
paged_attention.reference = _paged_reference
ragged_paged_attention.kernel = _ragged_kernel
ragged_paged_attention.reference = _ragged_reference

__all__ = [
    "ENV_VAR",
    "attention_mode",
    "paged_attention",
    "paged_attention_impl",
    "ragged_paged_attention",
    "ragged_paged_attention_impl",
]
