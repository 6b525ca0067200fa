"""The compiled-shape budget and the persistent compilation cache (engine/compilation.py)."""

import jax
import pytest

from jaxserve.engine import compilation


def test_map_limit_is_read_and_falls_back_to_linux_default(tmp_path):
    f = tmp_path / "max_map_count"
    f.write_text("262144\n")
    assert compilation.max_map_count(str(f)) == 262144
    assert compilation.max_map_count(str(tmp_path / "missing")) == 65530
    f.write_text("garbage")
    assert compilation.max_map_count(str(f)) == 65530


@pytest.mark.parametrize("limit, shapes", [(65530, 72), (262144, 256), (1000, 8), (10**7, 256)])
def test_shape_budget_is_a_third_of_the_map_budget_within_bounds(limit, shapes):
    assert compilation.default_max_compiled_shapes(limit) == shapes
    assert shapes * compilation.MAPS_PER_SHAPE <= max(limit // 3, 8 * compilation.MAPS_PER_SHAPE)


def test_persistent_cache_keeps_a_directory_already_chosen(tmp_path):
    chosen = jax.config.jax_compilation_cache_dir  # tests/conftest.py sets one for the session
    assert chosen
    assert compilation.enable_persistent_cache(str(tmp_path / "other")) == chosen
    assert not (tmp_path / "other").exists() and jax.config.jax_compilation_cache_dir == chosen


def test_persistent_cache_is_turned_on_where_none_is_set(tmp_path, monkeypatch):
    chosen = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compilation.enable_persistent_cache("") is None  # "" leaves it off
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("HOME", str(tmp_path))
        path = compilation.enable_persistent_cache("~/xla")
        assert path == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
        assert jax.config.jax_compilation_cache_dir == path
    finally:
        jax.config.update("jax_compilation_cache_dir", chosen)
