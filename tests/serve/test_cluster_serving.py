"""Building the server's engines from a config: a cluster config file with ``--cluster-set``
overrides (bad ones name the key), the engine flags of ``--replicas`` as config keys, routed engines
on devices of their own (the session's 8 host devices), the server's view of the model; and
``python -m jaxserve.serve --cluster-config`` as a subprocess serving a DistServe pool, draining
on SIGTERM (slow)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import pytest

from jaxserve.config import ConfigError, get
from jaxserve.serve.cli import key_values, parser
from jaxserve.serve.cluster_serving import engine_parts, flag_config, load_config, served_model

ROOT = Path(__file__).resolve().parents[2]


def test_a_cluster_config_file_loads_with_overrides_and_bad_ones_name_the_key():
    config = load_config(str(ROOT / "configs/distserve.py"), ["cluster.pools.decode=1", "cluster.num_replicas=2"])
    assert get(config, "cluster.pools.prefill", int) == 1 and get(config, "cluster.pools.decode", int) == 1
    assert get(config, "cluster.num_replicas", int) == 2
    with pytest.raises(ConfigError, match="cluster.pools.decode must be an int"):
        load_config(str(ROOT / "configs/distserve.py"), ["cluster.pools.decode=two"])
    with pytest.raises(ConfigError, match="cluster.nope"):
        load_config(str(ROOT / "configs/distserve.py"), ["cluster.nope=1"])
    with pytest.raises(ConfigError, match="--cluster-set needs KEY=VALUE"):
        load_config(str(ROOT / "configs/distserve.py"), ["cluster.num_replicas"])
    with pytest.raises(ConfigError, match="no config file"):
        load_config(str(ROOT / "configs/missing.py"))


def flags(*argv):
    args = parser().parse_args(["--model", "m", *argv])
    options = dict(scheduler=args.scheduler, scheduler_options=key_values(args.scheduler_option), block_size=args.block_size,
                   num_blocks=args.num_blocks, num_host_blocks=args.num_host_blocks, kv_cache_gb=args.kv_cache_gb,
                   max_model_len=args.max_model_len, dtype=args.dtype, attention=args.attention, seed=args.seed,
                   tp=args.tp, sp=args.sp)  # fmt: skip
    return flag_config(options, args.replicas, args.router, args.router_option)


def test_the_engine_flags_become_config_keys():
    config = flags("--replicas", "3", "--router", "fair", "--router-option", "max_waiting=2", "--scheduler", "sarathi",
                   "--scheduler-option", "chunk_size=16", "--num-blocks", "160", "--block-size", "4")  # fmt: skip
    expected = {"cluster.num_replicas": 3, "cluster.router": "fair", "cluster.router_options": "max_waiting=2",
                "scheduler.name": "sarathi", "scheduler.chunk_size": 16, "kv.num_blocks": 160, "kv.block_size": 4,
                "model.max_context": 0, "engine.dtype": "auto"}  # fmt: skip
    assert {k: get(config, k) for k in expected} == expected
    with pytest.raises(ConfigError, match="scheduler.no_such_option"):
        flags("--scheduler-option", "no_such_option=1")


def test_routed_engines_get_devices_of_their_own(model_dir):
    assert jax.device_count() >= 2, "the test session forces 8 host devices (tests/conftest.py)"
    config = flags("--replicas", "2", "--num-blocks", "32", "--block-size", "4")
    parts = engine_parts(config, str(model_dir))
    devices = [set(spec.executor.caches[0][0].devices()) for spec in parts.specs]
    assert devices == [{jax.devices()[0]}, {jax.devices()[1]}]
    model = served_model(parts.specs, str(model_dir))
    assert model.tokenizer is not None and model.max_model_len == parts.specs[0].limits.max_context
    assert model.kv.num_blocks == 32 and model.cfg.vocab_size == parts.specs[0].executor.cfg.vocab_size


@pytest.mark.slow  # a server process loading and compiling two engines
def test_the_cli_serves_a_distserve_pool_and_drains_on_sigterm(model_dir):
    cache = jax.config.jax_compilation_cache_dir or ""
    sets = ["cluster.num_replicas=2", "cluster.pools.decode=1", "kv.num_blocks=160", "kv.block_size=4",
            "scheduler.max_num_seqs=8", f"engine.compile_cache={cache}"]  # fmt: skip
    cmd = [sys.executable, "-m", "jaxserve.serve", "--model", str(model_dir), "--port", "0", "--grace-s", "60",
           "--cluster-config", "configs/distserve.py", "--log-level", "warning"]  # fmt: skip
    for s in sets:
        cmd += ["--cluster-set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url, seen = None, []
        while url is None:
            line = lines.get(timeout=240)
            seen.append(line)
            if line.startswith("jaxserve: serving"):
                url = line.split(" at ")[-1].strip()
        while httpx.get(url + "/health").status_code != 200:
            time.sleep(0.1)
        got: dict = {"tokens": 0}

        def streaming():
            body = {"prompt": [5, 6, 7], "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True,
                    "return_token_ids": True}  # fmt: skip
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=240) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[len("data: "):])["choices"][0]
                        got["tokens"] += len(choice["token_ids"])
                        got["finish"] = choice["finish_reason"] or got.get("finish")

        client = threading.Thread(target=streaming)
        client.start()
        while got["tokens"] < 2:
            client.join(0.01)
        proc.send_signal(signal.SIGTERM)
        client.join()
        assert proc.wait(timeout=120) == 0, "".join(seen)
        assert got == {"tokens": 40, "finish": "length"}
    finally:
        if proc.poll() is None:
            proc.kill()
