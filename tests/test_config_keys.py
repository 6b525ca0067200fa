"""jaxserve.config: checked reads (no defaults, did-you-mean), typed overrides, scheduler options
derived from the registry, and proof that every key configs/default.py declares is read by some
code path and has no stand-in default in the code that reads it."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import pytest
from rich.console import Console

import jaxserve.scheduler as schedulers
from jaxserve import experiment
from jaxserve.config import (
    ConfigError,
    Key,
    Recording,
    build_config,
    build_scheduler,
    build_workload,
    check_keys,
    get,
    leaf_keys,
    override,
    parse_value,
    scheduler_kwargs,
    scheduler_options,
    section,
)
from jaxserve.engine.serve_config import engine_settings
from jaxserve.sim.simulate import build_sim

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_defaults():
    spec = importlib.util.spec_from_file_location("jaxserve_test_default_config", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEFAULTS = load_defaults()


def small(config=None, **values):
    """The default config with a small synthetic workload (no shared trace needed)."""
    base = {"workload.kind": "poisson", "workload.qps": 20.0, "workload.num_requests": 8,
            "workload.lengths.kind": "fixed", "workload.lengths.prompt_len": 64, "workload.lengths.output_len": 4}
    return override(DEFAULTS.get_config() if config is None else config, {**base, **values})


# -- reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, message", [
    ("workload.qsp", "unknown config key 'workload.qsp' (did you mean 'workload.qps'?)"),
    ("workloads.qps", "did you mean 'workload.qps'?"),
    ("qps", "did you mean 'workload.qps'?"),
    ("scheduler.chunksize", "did you mean 'scheduler.chunk_size'?"),
    ("workload.lengths.kindd", "did you mean 'workload.lengths.kind'?"),
    ("nosuch.key", "unknown config key 'nosuch.key' (top-level keys: backend, cluster, engine, hardware, kv, model,"),
    ("foo", "unknown config key 'foo' (top-level keys: backend,"),
    ("workload.zzz", "unknown config key 'workload.zzz' (keys of 'workload': client_id, clients, cv, duration_s,"),
    ("workload.kind.x", "'workload.kind' is a value, not a section"),
])  # fmt: skip
def test_unknown_keys_raise_naming_the_key_with_a_suggestion(key, message):
    with pytest.raises(ConfigError) as e:
        get(DEFAULTS.get_config(), key)
    assert message in str(e.value)


def test_get_checks_types_strictly_and_has_no_default_parameter():
    config = DEFAULTS.get_config()
    assert get(config, "kv.block_size", int) == 16
    assert get(config, "workload.qps", float, optional=True) is None
    with pytest.raises(ConfigError, match="workload.qps must be a float, got None"):
        get(config, "workload.qps", float)
    with pytest.raises(ConfigError, match="workload is a section"):
        get(config, "workload")
    loose = config.to_dict()  # plain dicts are read the same way, without ml_collections' typing
    loose["kv"]["block_size"] = True
    with pytest.raises(ConfigError, match=r"kv.block_size must be an int, got True"):
        get(loose, "kv.block_size", int)
    assert get(loose, "workload.cv", float) == 1.0


def test_a_section_is_strict_even_through_mapping_get():
    view = section(DEFAULTS.get_config(), "workload")
    assert view["kind"] == "trace" and "qps" in view and "qsp" not in view
    assert view["lengths"]["kind"] == "trace"
    with pytest.raises(ConfigError, match="did you mean 'workload.qps'"):
        view.get("qsp", 1.0)  # a library default never stands in for a missing key


def test_key_declarations():
    assert Key("a", None, "", float).optional and not Key("a", 1, "").optional
    with pytest.raises(ValueError, match="needs type"):
        Key("a", None, "")
    with pytest.raises(ValueError, match="is not an int"):
        Key("a", "x", "", int)
    with pytest.raises(ValueError, match="declared twice"):
        build_config([Key("a.b", 1, ""), Key("a.b", 2, "")])
    c = build_config([Key("s.x", 1, ""), Key("s.y", None, "", float), Key("z", 2.0, "", optional=True)])
    assert leaf_keys(c) == ["s.x", "s.y", "z"] and c.s.y is None
    assert override(c, {"z": None, "s.y": 3}).s.y == 3.0


# -- overriding ---------------------------------------------------------------------------------------


def test_override_is_checked_and_pure():
    config = DEFAULTS.get_config()
    changed = override(config, {"workload.qps": 4, "kv.block_size": 32, "workload.duration_s": None})
    assert (changed.workload.qps, changed.kv.block_size, changed.workload.duration_s) == (4.0, 32, None)
    assert (config.workload.qps, config.kv.block_size, config.workload.duration_s) == (None, 16, 600.0)
    for values, message in [
        ({"workload.qsp": 4.0}, "did you mean 'workload.qps'"),
        ({"workload.qps": "fast"}, "workload.qps must be a float or None, got 'fast'"),  # ml_collections allows it
        ({"kv.block_size": True}, "kv.block_size must be an int, got True"),  # ml_collections allows it
        ({"kv.block_size": None}, "kv.block_size must be an int, got None"),  # not an optional key
        ({"workload": {}}, "workload is a section"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            override(config, values)


@pytest.mark.parametrize("key, text, value", [
    ("workload.qps", "2.5", 2.5), ("workload.qps", "none", None), ("kv.block_size", "32", 32),
    ("engine.warmup", "False", False), ("engine.warmup", "1", True), ("model.name", "opt-13b", "opt-13b"),
])  # fmt: skip
def test_parse_value(key, text, value):
    assert parse_value(DEFAULTS.get_config(), key, text) == value


@pytest.mark.parametrize("key, text, message", [
    ("workload.qps", "abc", "workload.qps must be a float or None, got 'abc'"),
    ("kv.block_size", "1.5", "kv.block_size must be an int, got '1.5'"),
    ("kv.block_size", "none", "kv.block_size must be an int, got 'none'"),
    ("engine.warmup", "maybe", "engine.warmup must be a bool (True or False), got 'maybe'"),
])  # fmt: skip
def test_parse_value_errors_name_key_type_and_value(key, text, message):
    with pytest.raises(ConfigError) as e:
        parse_value(DEFAULTS.get_config(), key, text)
    assert str(e.value) == message


def test_check_keys_catches_a_key_a_config_file_added():
    config = DEFAULTS.get_config()
    check_keys(config, DEFAULTS.get_config())
    config.workload.qsp = 3.0  # a typo in a config file
    with pytest.raises(ConfigError, match="unknown config key 'workload.qsp' \\(did you mean 'workload.qps'\\?\\)"):
        check_keys(config, DEFAULTS.get_config())


# -- scheduler options ----------------------------------------------------------------------------------


def test_the_scheduler_section_is_every_policys_options_with_their_defaults():
    section_keys = {k for k in leaf_keys(DEFAULTS.get_config()) if k.startswith("scheduler.")}
    options = scheduler_options()
    assert section_keys == {"scheduler.name"} | {f"scheduler.{o}" for o in options}
    assert {"enable_prefix_caching", "chunk_size", "chunk_align", "max_num_batched_tokens", "w_p", "base"} <= set(options)
    for name in ("static", "orca", "vllm", "sarathi"):  # each default is the dataclass's own
        built = schedulers.make(name)
        for f in dataclasses.fields(built):
            if f.name in options:
                assert options[f.name].default == getattr(built, f.name), (name, f.name)
    assert set(DEFAULTS.SCHEDULER_HELP) == set(options)  # every built-in option has help text


def test_scheduler_options_reach_the_chosen_policy():
    caching = build_scheduler(small(**{"scheduler.enable_prefix_caching": True}))
    assert caching.enable_prefix_caching is True
    sarathi = build_scheduler(small(**{"scheduler.name": "sarathi", "scheduler.chunk_size": 256}))
    assert type(sarathi).__name__ == "SarathiScheduler" and sarathi.chunk_size == 256
    vtc = build_scheduler(small(**{"scheduler.name": "vtc", "scheduler.base": "sarathi", "scheduler.chunk_size": 128,
                                   "scheduler.w_q": 3.0}))  # fmt: skip
    assert vtc.chunk_size == 128 and vtc.order.w_q == 3.0  # VTC passes its base's options on
    name, kwargs = scheduler_kwargs(small(**{"scheduler.name": "sarathi"}))
    assert name == "sarathi" and "max_num_batched_tokens" not in kwargs and "w_p" not in kwargs


@pytest.mark.parametrize("values, message", [
    ({"scheduler.chunk_size": 256}, "scheduler.chunk_size=256 does not apply to scheduler 'vllm' (it is an option "
                                    "of sarathi"),  # (and of any policy another test registered)
    ({"scheduler.name": "sarathi", "scheduler.max_num_batched_tokens": 4096}, "does not apply to scheduler 'sarathi'"),
    ({"scheduler.name": "vlm"}, "scheduler.name: unknown scheduler 'vlm' (did you mean 'vllm'?); available: orca,"),
    ({"scheduler.name": "sarathi", "scheduler.chunk_size": 0}, "scheduler.chunk_size: scheduler option chunk_size must"),
    ({"scheduler.name": "vtc", "scheduler.base": "orca"}, "scheduler.base: vtc option base must be one of"),
])  # fmt: skip
def test_scheduler_option_errors_name_the_key(values, message):
    with pytest.raises(ConfigError) as e:
        build_scheduler(small(**values))
    assert message in str(e.value)


def test_scheduler_section_errors():
    config = small()
    config.scheduler.chunksize = 3  # a config file's typo
    with pytest.raises(ConfigError, match=r"unknown config key 'scheduler.chunksize' \(did you mean 'scheduler.chunk_size'"):
        build_scheduler(config)
    loose = small().to_dict()
    del loose["scheduler"]["max_num_seqs"]  # no default stands in for an option the policy takes
    with pytest.raises(ConfigError, match="'scheduler.max_num_seqs' is missing"):
        build_scheduler(loose)
    loose = small().to_dict()
    loose["scheduler"]["chunk_size"] = "big"
    with pytest.raises(ConfigError, match="scheduler.chunk_size must be an int, got 'big'"):
        build_scheduler(loose)


# -- every declared key is read, and read without a stand-in default ---------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "trace.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,50,3\n0.5,60,2\n1.5,40,4\n")
    (d / "lengths.csv").write_text("num_prefill_tokens,num_decode_tokens\n30,2\n50,3\n")
    (d / "model").mkdir()
    return d


def sim_variants(files) -> dict:
    """Configs that between them take every branch that reads keys: each workload and length kind,
    both cost models, the swap preemption path, every scheduler policy."""
    trace = {"workload.kind": "trace", "workload.trace_path": str(files / "trace.csv"), "workload.qps": None}
    out = {
        "trace": override(DEFAULTS.get_config(), trace),
        "gamma-fixed": small(**{"workload.kind": "gamma", "workload.cv": 2.0}),
        "uniform": small(**{"workload.lengths.kind": "uniform", "workload.lengths.low": 8, "workload.lengths.high": 64}),
        "zipf": small(**{"workload.lengths.kind": "zipf"}),
        "lengths-file": small(**{"workload.lengths.kind": "trace", "workload.lengths.path": str(files / "lengths.csv")}),
        "slo": small(**{"slo.ttft_s": 1.0, "slo.tpot_s": 0.1, "sim.max_time_s": 100.0, "hardware.mfu": 0.5}),
    }
    for name in schedulers.available():
        out[f"policy-{name}"] = small(**{"scheduler.name": name})
    return out


def profiled_variant(files):
    return small(**{"sim.cost_model": "profiled", "sim.profile": str(files / "no-such-profile.json")})


def engine_variant(files):
    return small(**{"backend": "engine", "model.path": str(files / "model")})


def reads_of(config, reader) -> set:
    rec = Recording(config)
    try:
        reader(rec)
    except ConfigError:
        pass  # the profiled variant: every key is read before its (missing) profile is opened
    return rec.reads


def test_every_declared_key_is_read_by_some_code_path(files, tmp_path):
    declared = set(leaf_keys(DEFAULTS.get_config()))
    reads = set()
    for config in sim_variants(files).values():
        reads |= reads_of(config, build_sim)
    with pytest.raises(ConfigError, match="sim.profile: cannot read"):
        build_sim(profiled_variant(files))
    reads |= reads_of(profiled_variant(files), build_sim)
    # The engine backend: every key it reads, with no model loaded; then the scheduler and workload
    # it builds like the simulator.
    reads |= reads_of(engine_variant(files), engine_settings)
    esp = small(**{"backend": "engine", "model.path": str(files / "model"), "parallel.esp": True, "parallel.sp": 2})
    reads |= reads_of(esp, engine_settings)  # the ESP policy's keys, read only when parallel.esp is on
    # The CLI's own keys (backend, output_dir, the title's) through the real run() on a tiny config.
    cli = small(**{"output_dir": str(tmp_path / "out")})
    reads |= reads_of(cli, lambda rec: experiment.run(rec, Console(file=open("/dev/null", "w"))))
    assert (tmp_path / "out" / "metrics.json").exists()
    # A cluster: its keys, read when it is built.
    from jaxserve.cluster.config import build_cluster_sim

    reads |= reads_of(small(**{"cluster.num_replicas": 2, "cluster.router": "fair"}), build_cluster_sim)
    # A LoongServe node (cluster.esp.*): its keys, read when it is built.
    from jaxserve.cluster.esp_config import build_loongserve_sim

    reads |= reads_of(small(**{"cluster.esp.enabled": True}), build_loongserve_sim)
    assert declared - reads == set(), "declared but read by nothing"
    assert reads - declared == set(), "read but not declared"


def _without(config, key):
    loose = config.to_dict()
    *sections, leaf = key.split(".")
    node = loose
    for part in sections:
        node = node[part]
    del node[leaf]
    return loose


def test_no_reader_has_a_default_of_its_own(files):
    """Remove any key a code path reads and that path raises ConfigError naming the key: nothing in
    the code stands in for configs/default.py. (Options of policies other than the chosen one are
    read only to check that they were left at their defaults.)"""
    cases = [(c, build_sim) for c in sim_variants(files).values()]
    cases += [(profiled_variant(files), build_sim), (engine_variant(files), engine_settings)]
    checked = 0
    for config, reader in cases:
        name, kwargs = scheduler_kwargs(config)
        other_policies = {f"scheduler.{o}" for o in scheduler_options() if o not in kwargs}
        for key in sorted(reads_of(config, reader) - other_policies):
            with pytest.raises(ConfigError) as e:
                reader(_without(config, key))
            assert f"'{key}'" in str(e.value), (key, str(e.value))
            checked += 1
    assert checked > 100


def test_changing_a_default_changes_what_is_built():
    run = build_sim(small(**{"kv.block_size": 32, "scheduler.max_num_seqs": 7, "workload.lengths.prompt_len": 48,
                             "model.max_context": 1000, "workload.client_id": "c"}))  # fmt: skip
    assert run.kv.block_size == 32 and run.scheduler.max_num_seqs == 7 and run.limits.max_context == 1000
    assert {r.prompt_len for r in run.requests} == {48} and run.requests[0].request_id == "c-0"
    assert len(build_workload(small(**{"workload.num_requests": 3}))) == 3
