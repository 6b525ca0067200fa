"""``python -m jaxserve.serve --model <local HF dir> --scheduler sarathi --port 8000``: the
OpenAI-compatible server (``serve.server``) on uvicorn.

Scheduler options are ``--scheduler-option KEY=VALUE`` (repeatable; VALUE read as JSON when it
parses, else as a string), engine and mesh options are flags (``--tp``, ``--sp``, ``--num-blocks``,
...). ``--replicas N`` serves N engines of the model behind ``--router`` (``serve.routed``: a loop per
engine, each on devices of its own where there are enough). ``--cluster-config configs/<x>.py``
serves that config's cluster of engines instead (``serve.cluster_loop``: phase pools, Llumnix
migration, failures, events; its scheduler, kv, engine and parallel keys describe the replicas,
``--cluster-set KEY=VALUE`` overrides any key, and the engine flags here do not apply). SIGTERM
(or Ctrl-C) stops admitting (503), lets in-flight requests finish for up to ``--grace-s`` seconds,
aborts the rest, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from typing import Optional

import uvicorn


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxserve.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed at start)")
    p.add_argument("--scheduler", default="vllm", help="a registered scheduler (jaxserve.scheduler.available())")
    p.add_argument("--scheduler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a scheduler option, e.g. chunk_size=256 (repeatable)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=1,
                   help="engines of the model served together (a colocated cluster, one engine loop each)")
    p.add_argument("--router", default="least_kv", help="with --replicas > 1: a registered router (jaxserve.cluster.routers)")
    p.add_argument("--router-option", action="append", default=[], metavar="KEY=VALUE", help="a router option (repeatable)")
    p.add_argument("--cluster-config", default=None, metavar="FILE",
                   help="serve this config's cluster of engines (cluster.* keys: pools, migration, router, events)")
    p.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --cluster-config: override a config key, e.g. cluster.migration.mode=live (repeatable)")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting to be scheduled past which new ones get 429")
    p.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, seconds in-flight requests may take to finish")
    engine = p.add_argument_group("engine (jaxserve.LLM options)")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    engine.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: as many as --kv-cache-gb holds)")
    engine.add_argument("--num-host-blocks", type=int, default=0, help="host swap blocks (for preemption_mode=swap)")
    engine.add_argument("--kv-cache-gb", type=float, default=0.5, help="KV pool size per device when --num-blocks is not given")
    engine.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's, at most 4096)")
    engine.add_argument("--dtype", default=None, help="override the checkpoint's dtype (float32, bfloat16, float16)")
    engine.add_argument("--attention", default="auto", choices=("auto", "grouped", "ragged"), help="attention implementation")
    engine.add_argument("--params-cache", default=None, help="orbax directory for converted parameters")
    engine.add_argument("--compile-cache", default=None, help="jax's persistent compilation cache directory ('' off)")
    engine.add_argument("--seed", type=int, default=0, help="sampling seed of requests without one")
    engine.add_argument("--ignore-eos", action="store_true", help="never stop at the model's EOS ids (fixed output lengths)")
    engine.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    engine.add_argument("--sp", type=int, default=1, help="devices a step's rows are split over")
    engine.add_argument("--warmup", action="store_true", help="compile every reachable step shape before serving")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def key_values(items: list[str]) -> dict:
    """``["chunk_size=256", "order=fcfs"]`` -> ``{"chunk_size": 256, "order": "fcfs"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"an option needs KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class _Server(uvicorn.Server):
    """uvicorn, telling the engine loop(s) to stop admitting as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, loop):
        super().__init__(config)
        self._loop = loop

    def handle_exit(self, sig, frame) -> None:
        self._loop.stop_admitting()
        super().handle_exit(sig, frame)


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import jaxserve
    from jaxserve.serve.server import build_app

    options = dict(
        scheduler=args.scheduler, scheduler_options=key_values(args.scheduler_option), block_size=args.block_size,
        num_blocks=args.num_blocks, num_host_blocks=args.num_host_blocks, kv_cache_gb=args.kv_cache_gb,
        max_model_len=args.max_model_len, dtype=args.dtype, attention=args.attention, params_cache=args.params_cache,
        seed=args.seed, stop_at_eos=not args.ignore_eos, tp=args.tp, sp=args.sp,
    )  # fmt: skip
    if args.compile_cache is not None:
        options["compile_cache"] = args.compile_cache
    if args.replicas < 1:
        raise SystemExit(f"--replicas must be >= 1, got {args.replicas}")
    if args.cluster_config is not None and args.replicas != 1:
        raise SystemExit("--cluster-config and --replicas: the config's cluster.num_replicas says how many engines")
    try:
        loop = None
        if args.cluster_config is None and args.replicas == 1:
            model = jaxserve.LLM(args.model, **options)
            if args.warmup:
                model.warmup()
        else:  # (a ConfigError is a ValueError: it names the bad key)
            from jaxserve.serve import cluster_serving as cs

            if args.cluster_config is not None:
                config = cs.load_config(args.cluster_config, args.cluster_set)
                loop, model = cs.cluster_serving(config, args.model, max_queue=args.max_queue,
                                                 stop_at_eos=not args.ignore_eos)  # fmt: skip
                specs = [m.spec for m in loop.cluster.members]
            else:  # colocated engines, a loop each (each steps on its own thread and devices)
                from jaxserve.serve.routed import RoutedLoops

                config = cs.flag_config(options, args.replicas, args.router, args.router_option)
                parts = cs.engine_parts(config, args.model)
                specs = parts.specs
                loop = RoutedLoops(specs, parts.router, max_queue=args.max_queue)
                model = cs.served_model(specs, args.model, stop_at_eos=not args.ignore_eos)
            if args.warmup:
                cs.warm_up(specs)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxserve.serve: {e}", file=sys.stderr)
        return 2
    app = build_app(model, model_name=args.served_model_name, max_queue=args.max_queue, grace_s=args.grace_s, loop=loop)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.grace_s)
    server = _Server(config, app.state.serving.loop)
    # uvicorn re-raises the shutdown signal once it has shut down gracefully; with the default
    # SIGTERM action that would kill the process (exit -15). A no-op handler makes it exit 0.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    print(f"jaxserve: serving {app.state.serving.model_name} at http://{host}:{port}", flush=True)
    server.run(sockets=[sock])
    sock.close()
    return 0
