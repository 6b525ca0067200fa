"""Attention kernels: Pallas paged decode attention vs the jnp reference, long contexts.

    python benchmarks/attention_kernels.py [--batch 8] [--context 8192] [--num_q_heads 32] [--num_kv_heads 8]
        [--head_dim 128] [--page_size 16] [--dtype bfloat16] [--iters 20]

Workload: ``batch`` sequences each decoding one token with ``context`` tokens in a paged KV cache
(pages shuffled over the pool). Both ``paged_attention`` (the decode kernel) and
``ragged_paged_attention`` (the mixed-batch kernel, here fed the same all-decode batch) are timed
against their references (median wall time over ``iters`` calls after a warm-up, inside ``jax.jit``).

* On GPU/TPU the compiled Pallas kernels run natively (``loop`` variant on GPU, ``grid`` on TPU; for
  the decode kernel on GPU the best of a few ``num_kv_splits`` is reported) and the JSON line carries
  the achieved HBM bandwidth -- bytes of K/V pages, queries and outputs the kernel must move, divided
  by its time -- and that as a fraction of the device's peak (``jaxserve.sim.hardware``).
* On CPU there is no compiled Pallas: only the references are timed, and the kernels are checked for
  correctness in interpret mode on a reduced shape (the interpreter's speed means nothing). The JSON
  line says so in ``note``.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sim.hardware import hardware_for_device
from pallas_kernels.paged_attention import kernel as paged_kernel
from pallas_kernels.paged_attention import reference as paged_reference
from pallas_kernels.ragged_paged_attention import kernel as ragged_kernel
from pallas_kernels.ragged_paged_attention import reference as ragged_reference


def peak_bandwidth(device) -> tuple[str | None, float | None]:
    """(hardware name, peak HBM bytes/s) for a jax accelerator, or (None, None) when not in the table
    (or a CPU: the table's nominal CPU is one measured machine, not this one's peak)."""
    spec = None if device.platform == "cpu" else hardware_for_device(device.platform, getattr(device, "device_kind", ""))
    return (None, None) if spec is None else (spec.name, spec.memory_bandwidth)


def make_decode_batch(rng, *, batch, context, num_q_heads, num_kv_heads, head_dim, page_size, dtype):
    pages_per_seq = -(-context // page_size)
    total_pages = batch * pages_per_seq + 8
    shape = (num_kv_heads, total_pages, page_size, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    page_indices = rng.permutation(total_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq)
    q = jnp.asarray(rng.standard_normal((batch, num_q_heads, head_dim), np.float32), dtype)
    kv_lens = jnp.full((batch,), context, jnp.int32)
    return q, k_pages, v_pages, kv_lens, jnp.asarray(page_indices, jnp.int32)


def as_ragged(q, kv_lens):
    """The same decode batch in the ragged layout: one query token per sequence."""
    batch = q.shape[0]
    cu_q_lens = jnp.arange(batch + 1, dtype=jnp.int32)
    return cu_q_lens, jnp.array([batch], jnp.int32)


def time_fn(fn, args, iters: int) -> float:
    """Median seconds per call after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def decode_bytes(q, k_pages, kv_lens) -> int:
    """HBM bytes a decode attention kernel must move: the K and V pages holding each sequence's
    context (whole pages), the queries and the outputs."""
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    item = jnp.dtype(k_pages.dtype).itemsize
    pages = int(np.sum(-(-np.asarray(kv_lens) // page_size)))
    kv = 2 * num_kv_heads * pages * page_size * head_dim * item
    return kv + 2 * q.size * jnp.dtype(q.dtype).itemsize


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="default 8 on GPU/TPU, 4 on CPU")
    parser.add_argument("--context", type=int, default=None, help="default 8192 on GPU/TPU, 2048 on CPU")
    parser.add_argument("--num_q_heads", type=int, default=32)
    parser.add_argument("--num_kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--page_size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    native = backend in ("gpu", "tpu")
    device = jax.devices()[0]
    batch = args.batch or (8 if native else 4)
    context = args.context or (8192 if native else 2048)
    dtype = jnp.dtype(args.dtype)
    heads = dict(num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim)
    rng = np.random.default_rng(args.seed)
    q, k_pages, v_pages, kv_lens, page_indices = make_decode_batch(
        rng, batch=batch, context=context, page_size=args.page_size, dtype=dtype, **heads
    )
    decode_args = (q, k_pages, v_pages, kv_lens, page_indices)
    ragged_args = (q, k_pages, v_pages, kv_lens, page_indices, *as_ragged(q, kv_lens))
    nbytes = decode_bytes(q, k_pages, kv_lens)

    result = {
        "benchmark": "kernels",
        "backend": backend,
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "workload": "decode",
        "batch": batch,
        "context": context,
        **heads,
        "page_size": args.page_size,
        "dtype": dtype.name,
        "bytes_per_call": nbytes,
    }

    ref_paged = jax.jit(paged_reference.paged_attention)
    ref_ragged = jax.jit(ragged_reference.ragged_paged_attention)
    expected = ref_paged(*decode_args)
    result["paged_reference_ms"] = 1e3 * time_fn(ref_paged, decode_args, args.iters)
    result["ragged_reference_ms"] = 1e3 * time_fn(ref_ragged, ragged_args, args.iters)

    if native:
        variant = "grid" if backend == "tpu" else "loop"
        result["variant"] = variant
        best = None
        for splits in [1, 2, 4, 8] if variant == "loop" else [1]:
            fn = jax.jit(lambda *a, s=splits: paged_kernel.paged_attention(*a, variant=variant, num_kv_splits=s))
            t = time_fn(fn, decode_args, args.iters)
            if best is None or t < best[0]:
                best = (t, splits, max_err(fn(*decode_args), expected))
        t_paged, splits, err = best
        fn = jax.jit(lambda *a: ragged_kernel.ragged_paged_attention(*a, variant=variant))
        t_ragged = time_fn(fn, ragged_args, args.iters)
        err_ragged = max_err(fn(*ragged_args), expected)
        name, peak = peak_bandwidth(device)
        result.update(
            paged_kernel_ms=1e3 * t_paged,
            paged_num_kv_splits=splits,
            paged_speedup_vs_reference=result["paged_reference_ms"] / (1e3 * t_paged),
            paged_max_abs_err=err,
            ragged_kernel_ms=1e3 * t_ragged,
            ragged_speedup_vs_reference=result["ragged_reference_ms"] / (1e3 * t_ragged),
            ragged_max_abs_err=err_ragged,
            paged_hbm_gb_s=nbytes / t_paged / 1e9,
            ragged_hbm_gb_s=nbytes / t_ragged / 1e9,
            hardware=name,
            peak_hbm_gb_s=None if peak is None else peak / 1e9,
            paged_hbm_fraction_of_peak=None if peak is None else nbytes / t_paged / peak,
            ragged_hbm_fraction_of_peak=None if peak is None else nbytes / t_ragged / peak,
        )
    else:
        # Interpret-mode correctness on a reduced shape; the interpreter's speed means nothing.
        small_ctx = min(context, 256)
        small = make_decode_batch(
            np.random.default_rng(args.seed + 1),
            batch=2,
            context=small_ctx,
            page_size=args.page_size,
            dtype=dtype,
            **heads,
        )
        small = (*small[:3], jnp.array([small_ctx, max(1, small_ctx // 3)], jnp.int32), small[4])
        small_expected = paged_reference.paged_attention(*small)
        checks = {}
        for variant in ("loop", "grid"):
            out = paged_kernel.paged_attention(*small, variant=variant, interpret=True)
            checks[f"paged_{variant}"] = max_err(out, small_expected)
            out = ragged_kernel.ragged_paged_attention(
                *small, *as_ragged(small[0], small[3]), variant=variant, interpret=True
            )
            checks[f"ragged_{variant}"] = max_err(out, small_expected)
        result.update(
            note=(
                f"backend {backend!r} has no compiled Pallas: only the jnp references are timed; the "
                f"Pallas kernels were run in interpret mode (batch 2, context {small_ctx}) for correctness "
                "only. Run on a GPU or TPU for kernel timings and HBM bandwidth."
            ),
            interpret_max_abs_err=checks,
            paged_reference_hbm_gb_s=nbytes / (result["paged_reference_ms"] / 1e3) / 1e9,
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
