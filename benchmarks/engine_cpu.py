"""The real engine on CPU against Hugging Face ``transformers``, same weights, same requests, one run.

    python benchmarks/engine_cpu.py [--num_requests 64] [--scheduler vllm] [--max_num_batched_tokens 2048]
        [--hf_batch_size 16]
        [--layers 12] [--hidden 768] [--vocab 16000] [--quick]

1. Builds a random Llama checkpoint (default ~100M parameters: 12 layers, hidden 768, 12 query / 4
   KV heads, SwiGLU 2048, vocab 16000, float32) with ``transformers`` and saves it as safetensors.
2. **Mixed workload**: ``num_requests`` requests with prompt lengths uniform in [16, 512] and output
   lengths uniform in [8, 128] (fixed seed), greedy on both sides. ``jaxserve.LLM.generate`` serves
   them all with continuous batching (after ``LLM.warmup`` has compiled the step shapes; a step budget of 2048
   tokens, since on a CPU a step's activations past the caches cost more per token than the
   vllm default of 8192 saves); ``transformers``
   ``generate`` runs them in padded batches of ``hf_batch_size`` (left padding, each batch until its
   longest output, greedy). Both count only the requested output tokens; tokens/s and the ratio.
3. **Batch-1 decode vs the memory-bandwidth roofline**: one request, a 128-token prompt, decoding
   ``decode_tokens`` tokens; per-step time = (wall(N tokens) - wall(1 token)) / (N - 1), for both
   jaxserve and transformers, each wall the best of 5 interleaved rounds. The roofline step time is
   the bytes a decode step must read -- every weight but the embedding table (one row of it), plus the KV cache at the mean context -- divided
   by the machine's measured copy bandwidth (numpy copy of a 1 GiB array, read + write bytes; the
   best of the measurements taken in every round of the decode timings).
4. **Prefill**: ``prefill_batch`` prompts of 512 tokens, one output token each: prompt tokens/s of
   jaxserve against one padded ``transformers`` forward pass over the same batch.
5. **Batched decode vs the roofline**: one jitted decode step (the model's forward, the cache
   writes, the logits of every row; caches donated, as the engine runs it) of ``decode_rows`` rows
   at context ``decode_context`` (pages scattered at random over the cache) with the CPU attention
   path as it is (decode rows in ``attention.DECODE_CHUNK_PAGES``-page chunks) and with one chunk
   size for every row (``decode_chunk_pages=8``, the path before), in alternating rounds; the
   median CPU time and the best wall of each. Roofline = (every weight but the embedding table +
   the KV bytes the step reads) / copy bandwidth; beside it the compute floor = the step's matmul
   FLOPs / the CPU time rate of one [rows, hidden] x [hidden, 2 * intermediate] matmul, since at 64
   rows a float32 step is compute-bound on this CPU, not memory-bound.

Run it with the machine otherwise idle. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np


def greedy(max_new_tokens: int):
    """jaxserve's sampling for every request here: greedy, as ``transformers`` runs."""
    import jaxserve

    return jaxserve.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)


def log(msg: str) -> None:
    print(f"[engine_cpu] {msg}", file=sys.stderr, flush=True)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy, counting the bytes read and the bytes written."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def make_checkpoint(directory: str, args) -> object:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def workload(n: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(16, 513, n)
    output_lens = rng.integers(8, 129, n)
    prompts = [rng.integers(3, vocab, p).tolist() for p in prompt_lens]  # no special ids: no early stop
    return prompts, output_lens.tolist()


def hf_generate(model, prompts, output_lens, batch_size: int) -> float:
    """Wall seconds for transformers to serve all prompts in padded batches (arrival order)."""
    import torch

    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        batch, outs = prompts[b : b + batch_size], output_lens[b : b + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as decoder-only generation requires
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs), do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
    return time.perf_counter() - start


def jaxserve_generate(llm, prompts, output_lens) -> tuple[float, int]:
    """Wall seconds for jaxserve to serve all prompts (each with its own output length)."""
    import jaxserve

    requests = [
        jaxserve.Request(f"bench-{i}", prompt_token_ids=p, sampling=greedy(n))
        for i, (p, n) in enumerate(zip(prompts, output_lens))
    ]
    start = time.perf_counter()
    run = llm.engine.serve(requests)
    wall = time.perf_counter() - start
    produced = sum(len(f.output_token_ids) for f in run.finished.values())
    return wall, produced


def decode_rounds(fns: dict, n: int, rounds: int = 5) -> tuple[dict, float]:
    """Per-step seconds of each ``fns[name](num_tokens)`` -- (wall(n tokens) - wall(1 token)) /
    (n - 1), each wall the best of ``rounds`` -- and the best copy bandwidth. Every round times
    every function and the bandwidth once, so all see the same phases of a drifting machine."""
    one = {k: [] for k in fns}
    many = {k: [] for k in fns}
    bandwidth = []
    for _ in range(rounds):
        bandwidth.append(copy_bandwidth(repeats=2))
        for k, fn in fns.items():
            one[k].append(_timed(fn, 1))
            many[k].append(_timed(fn, n))
    return {k: (min(many[k]) - min(one[k])) / (n - 1) for k in fns}, max(bandwidth)


def _timed(fn, n: int) -> float:
    t = time.perf_counter()
    fn(n)
    return time.perf_counter() - t


def decode_batch_case(cfg, rows: int, context: int, page_size: int = 16, rounds: int = 5) -> dict:
    """Step times of ``rows`` decodes at ``context`` tokens (see the module docstring, item 5)."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxserve.model import attention
    from jaxserve.model.llama import bind, params_of, random_model

    params = params_of(random_model(cfg))
    per_seq = -(-cfg.max_position_embeddings // page_size)
    num_pages = rows * per_seq
    rng = np.random.default_rng(0)
    table = rng.permutation(num_pages).reshape(rows, per_seq).astype(np.int32)
    lens = np.full(rows, context, np.int32)
    pos = lens - 1
    batch = attention.AttentionBatch(
        slot_page=table[np.arange(rows), pos // page_size], slot_offset=pos % page_size, positions=pos,
        decode_kv_lens=lens, decode_pages=table, block_kv_lens=np.zeros(0, np.int32),
        block_pages=np.zeros((0, per_seq), np.int32), kv_lens=lens, page_indices=table,
        cu_q_lens=np.arange(rows + 1, dtype=np.int32), num_seqs=np.array([rows], np.int32),
    )  # fmt: skip
    batch = jax.tree.map(jnp.asarray, batch)
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    caches = [tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in "kv") for _ in range(cfg.num_layers)]
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, rows), jnp.int32)

    def step(params, caches, decode_chunk_pages):
        attend = functools.partial(
            attention.paged_attention, impl="grouped", sm_scale=cfg.head_dim**-0.5, sliding_window=None,
            chunk_pages=8, decode_chunk_pages=decode_chunk_pages,
        )  # fmt: skip
        model = bind(cfg, params)
        hidden, caches = model(tokens, caches, batch, attend)
        return model.logits(hidden), caches

    paths = {"current": None, "single_chunk": 8}  # None: attention.DECODE_CHUNK_PAGES
    fns = {k: jax.jit(functools.partial(step, decode_chunk_pages=c), donate_argnums=1) for k, c in paths.items()}
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for r in range(rounds + 1):  # round 0 compiles
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            logits, caches = fn(params, tuple(caches))
            logits.block_until_ready()
            if r:
                cpu[k].append(time.process_time() - c)
                wall[k].append(time.perf_counter() - w)
    x = jnp.ones((rows, cfg.hidden_size))
    w_up = jnp.ones((2 * cfg.intermediate_size, cfg.hidden_size))
    mm = jax.jit(lambda x, w: x @ w.T)
    mm(x, w_up).block_until_ready()
    c = time.process_time()
    for _ in range(10):
        mm(x, w_up).block_until_ready()
    gemm_flop_s = 10 * 2 * rows * cfg.hidden_size * w_up.shape[0] / (time.process_time() - c)
    bandwidth = max(copy_bandwidth(repeats=2) for _ in range(3))
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    # Every weight is multiplied by every row except the embedding table (read one row per token);
    # tied embeddings are the lm_head too. Attention adds 4 FLOPs per (row, context token, head, dim).
    matmul_params = num_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention_flops = 4 * rows * context * cfg.num_heads * cfg.head_dim * cfg.num_layers
    weight_bytes = (num_params - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * 4
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * rows * context
    roofline_s = (weight_bytes + kv_bytes) / bandwidth
    compute_floor_s = (2 * rows * matmul_params + attention_flops) / gemm_flop_s
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    best = {k: min(v) for k, v in wall.items()}
    return {
        "rows": rows, "context": context, "rounds": rounds,
        "step_cpu_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "step_wall_ms": {k: round(v * 1e3, 3) for k, v in best.items()},
        "speedup_cpu": round(med["single_chunk"] / med["current"], 2),
        "decode_chunk_pages": attention.DECODE_CHUNK_PAGES,
        "roofline_step_ms": round(roofline_s * 1e3, 4),
        "fraction_of_roofline": round(roofline_s / best["current"], 3),
        "compute_floor_step_ms": round(compute_floor_s * 1e3, 3),
        # The roofline is the larger of the two bounds: where the GEMMs' floor (CPU time at the
        # measured GEMM rate) exceeds the memory time, the step is compute-bound and is measured
        # against that floor, in CPU time as the floor is.
        "compute_bound": compute_floor_s > roofline_s,
        "fraction_of_compute_floor_cpu": round(compute_floor_s / med["current"], 3),
        "gemm_gflop_s_cpu_time": round(gemm_flop_s / 1e9, 1),
        "weight_mb": round(weight_bytes / 1e6, 1), "kv_read_mb": round(kv_bytes / 1e6, 1),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2), "target_fraction": 0.5,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_requests", type=int, default=64)
    p.add_argument("--scheduler", default="vllm")
    p.add_argument("--max_num_batched_tokens", type=int, default=2048, help="vllm's token budget per step")
    p.add_argument("--hf_batch_size", type=int, default=16)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--prefill_batch", type=int, default=4)
    p.add_argument("--decode_rows", type=int, default=64, help="rows of the batched decode case")
    p.add_argument("--decode_context", type=int, default=300, help="context of the batched decode case")
    p.add_argument("--quick", action="store_true", help="a tiny model and 8 requests (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 128, 256, 4, 2
        args.vocab, args.num_requests, args.decode_tokens, args.hf_batch_size = 1000, 8, 16, 4
        args.decode_rows = 8

    import jax
    import torch

    import jaxserve

    with tempfile.TemporaryDirectory(prefix="jaxserve-bench-") as model_dir:
        hf_model = make_checkpoint(model_dir, args)
        num_params = sum(t.numel() for t in hf_model.parameters())
        log(f"checkpoint: {num_params / 1e6:.1f}M parameters")
        prompts, output_lens = workload(args.num_requests, args.vocab)
        useful_tokens = int(sum(output_lens))

        options = {"max_num_seqs": args.num_requests}
        if args.scheduler == "vllm":
            options["max_num_batched_tokens"] = args.max_num_batched_tokens
        t = time.perf_counter()
        llm = jaxserve.LLM(
            model_dir, scheduler=args.scheduler, scheduler_options=options,
            max_model_len=1024, num_blocks=args.num_requests * 1024 // 16 + 64, stop_at_eos=False,
        )  # fmt: skip
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        shapes = llm.warmup(max_decode_rows=args.num_requests, mixed=args.scheduler != "vllm")
        warmup_s = time.perf_counter() - t
        log(f"jaxserve: loaded in {load_s:.1f} s, compiled {shapes} step shapes in {warmup_s:.1f} s")

        compiles_before = llm.runner.num_compilations
        js_wall, js_tokens = jaxserve_generate(llm, prompts, output_lens)
        new_compiles = llm.runner.num_compilations - compiles_before
        log(f"jaxserve: {js_tokens} tokens in {js_wall:.1f} s ({new_compiles} compilations during the run)")
        hf_wall = hf_generate(hf_model, prompts, output_lens, args.hf_batch_size)
        log(f"transformers: {useful_tokens} tokens in {hf_wall:.1f} s")

        # Batch-1 decode.
        prompt = prompts[0][:128] + [5] * max(0, 128 - len(prompts[0]))

        def js_one(n):
            llm.generate([prompt], greedy(n))

        def hf_one(n):
            with torch.no_grad():
                hf_model.generate(
                    torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                )  # fmt: skip

        n = args.decode_tokens
        # Interleaved rounds, the best of each kept (the highest bandwidth: the stricter roofline):
        # this VM's speed drifts by tens of percent within minutes.
        steps, bandwidth = decode_rounds({"jaxserve": js_one, "transformers": hf_one}, n)
        js_step, hf_step = steps["jaxserve"], steps["transformers"]
        # Prefill.
        pre_prompts = [p + [5] * (512 - len(p)) for p in prompts[: args.prefill_batch]]
        pre_tokens = 512 * len(pre_prompts)
        llm.generate(pre_prompts, greedy(1))  # compiles this shape
        t = time.perf_counter()
        llm.generate(pre_prompts, greedy(1))
        js_prefill = pre_tokens / (time.perf_counter() - t)
        with torch.no_grad():
            t = time.perf_counter()
            hf_model(torch.tensor(pre_prompts))
            hf_prefill = pre_tokens / (time.perf_counter() - t)
        log(f"prefill: jaxserve {js_prefill:.0f} tok/s, transformers {hf_prefill:.0f} tok/s")

        cfg = llm.cfg
        weight_bytes = (num_params - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * 4
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
        mean_context = len(prompt) + n / 2
        roofline_s = (weight_bytes + kv_per_token * mean_context) / bandwidth
        log(f"batch-1 decode step: jaxserve {js_step * 1e3:.2f} ms, transformers {hf_step * 1e3:.2f} ms, "
            f"roofline {roofline_s * 1e3:.2f} ms")  # fmt: skip
        batched = decode_batch_case(cfg, args.decode_rows, args.decode_context)
        log(f"batched decode: {batched}")

    result = {
        "benchmark": "engine_cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "model": {"params_m": round(num_params / 1e6, 1), "layers": args.layers, "hidden": args.hidden,
                  "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "dtype": "float32"},
        "workload": {"num_requests": args.num_requests, "prompt_len": [16, 512], "output_len": [8, 128],
                     "output_tokens": useful_tokens, "scheduler": args.scheduler, "scheduler_options": options,
                     "hf_batch_size": args.hf_batch_size},
        "jaxserve_tok_s": round(js_tokens / js_wall, 1),
        "transformers_tok_s": round(useful_tokens / hf_wall, 1),
        "throughput_ratio": round((js_tokens / js_wall) / (useful_tokens / hf_wall), 2),
        "target_throughput_ratio": 2.5,  # issue 19, item 4
        "prefill_tok_s": {"jaxserve": round(js_prefill, 1), "transformers": round(hf_prefill, 1),
                          "ratio": round(js_prefill / hf_prefill, 2), "batch": len(pre_prompts), "prompt_len": 512},
        "jaxserve_compile": {"shapes": shapes, "seconds": round(warmup_s, 1), "during_run": new_compiles},
        "decode_batch1": {
            "jaxserve_step_ms": round(js_step * 1e3, 3),
            "transformers_step_ms": round(hf_step * 1e3, 3),
            "roofline_step_ms": round(roofline_s * 1e3, 3),
            "jaxserve_fraction_of_roofline": round(roofline_s / js_step, 3),
            "transformers_fraction_of_roofline": round(roofline_s / hf_step, 3),
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "bytes_per_step_mb": round((weight_bytes + kv_per_token * mean_context) / 1e6, 1),
            "target_fraction": 0.7,
        },
        "decode_batched": batched,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
