"""``configs/default.py`` loaded by its path, so tests that build configs run from any working
directory without ``configs`` on ``sys.path``."""

from __future__ import annotations

import importlib.util
import pathlib

DEFAULTS_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"


def default_config():
    """A fresh copy of every declared key at its default (``configs/default.py``'s ``get_config``)."""
    spec = importlib.util.spec_from_file_location("jaxserve_test_default_config", DEFAULTS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
