"""Session-wide test settings.

Engine tests compile the same tiny model steps many times (one runner per scenario); a persistent
XLA compilation cache shared by the whole session makes every repeat a cache hit (~0.05 s instead
of ~1 s on the 2-core CI machine). Set ``JAXSERVE_TEST_COMPILE_CACHE`` to keep it across runs.
Tracing still happens per runner, so compilation-count tests are unaffected.
"""

import os
import tempfile

# Sequence-parallel tests (tests/parallel) shard over 8 host CPU devices. XLA reads this flag only when
# jax's CPU backend starts, so it is set before anything imports jax; single-device code still runs on
# jax.devices()[0]. A count the caller already set wins.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("JAXSERVE_TEST_COMPILE_CACHE") or tempfile.mkdtemp(prefix="jaxserve-xla-")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
