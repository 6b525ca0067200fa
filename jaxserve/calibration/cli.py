"""``python -m jaxserve.profile``: measure the engine's step times into a profile file, then
print how well the profiled cost model fits them (``jaxserve.calibration.profiler``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jaxserve.calibration import profiler
from jaxserve.calibration.fit import fit
from jaxserve.calibration.grid import GRIDS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxserve.profile", description=profiler.__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--out", required=True, help="the profile JSON (resumed if it exists)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per point (one per pass over the grid)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before a decode point's samples and a point's first (>= 1)")
    parser.add_argument("--grid", choices=GRIDS, default="default")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--block-rows", type=int, default=32, help="prefill rows per block (engine.block_rows)")
    parser.add_argument("--attention", default="auto", help="auto | grouped | ragged")
    parser.add_argument("--kv-cache-gb", type=float, default=4.0, help="largest KV pool a point may use")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every row (0: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(stderr=True)
    try:
        run = profiler.profile_model(
            args.model, args.out, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, grid=args.grid,
            block_size=args.block_size, block_rows=args.block_rows, attention=args.attention,
            kv_cache_gb=args.kv_cache_gb, temperature=args.temperature, seed=args.seed, progress=not args.quiet,
        )
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    console.print(f"{args.out}: measured {run.measured} samples, {run.already} points already complete, "
                  f"{len(run.skipped)} skipped")
    for spec, reason in run.skipped:
        console.print(f"  skipped {spec.describe()}: {reason}")
    if run.profile.points:
        _, report = fit(run.profile.points, run.profile.engine)
        console.print(report.summary())
    return 0
