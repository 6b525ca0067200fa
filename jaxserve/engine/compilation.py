"""How many compiled step shapes a process may keep, and the on-disk cache that makes a shape's
second compilation (in a later run, or after an eviction) a file read.

Every compiled XLA:CPU executable keeps its code in memory-mapped sections: about 260 maps per
step shape of a tiny Llama on this project's CI machine (``benchmarks/engine_startup.py`` prints
the figure). Linux caps a process at ``vm.max_map_count`` maps (65,530 by default), and LLVM aborts
the process (``Unable to allocate section memory``) when it runs out, so the runner bounds the
shapes it keeps alive (``ModelRunner(max_compiled_shapes=...)``) rather than let a long run or a
wide warm-up grid crash.
"""

from __future__ import annotations

import os

import jax

MAPS_PER_SHAPE = 300  # memory maps one compiled step shape holds (measured ~260, rounded up)
MAX_MAP_COUNT_FILE = "/proc/sys/vm/max_map_count"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxserve", "xla")


def max_map_count(path: str = MAX_MAP_COUNT_FILE) -> int:
    """The kernel's per-process memory-map limit (Linux's default 65,530 where it cannot be read)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 65530


def default_max_compiled_shapes(map_limit: int | None = None) -> int:
    """Step shapes a runner keeps compiled at once: a third of the process's map budget (the rest
    is for the interpreter, jax, numpy and other runners), at least 8 and at most 256."""
    limit = max_map_count() if map_limit is None else map_limit
    return max(8, min(256, limit // 3 // MAPS_PER_SHAPE))


def enable_persistent_cache(path: str = DEFAULT_CACHE_DIR) -> str | None:
    """Turns on jax's persistent compilation cache at ``path`` ("" leaves it off) unless the process
    already chose a directory (a test session, or the user's own jax config); returns the directory
    in use, or None. Process-wide, so only front doors (the CLI, ``jaxserve.LLM``) call it."""
    current = jax.config.jax_compilation_cache_dir
    if current or not path:
        return current or None
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small shapes compile fast but add up
    return path
