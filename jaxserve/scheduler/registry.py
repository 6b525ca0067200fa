"""Name -> constructor registry. Research scripts add their own policies with ``register``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, constructor: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Makes ``make(name, **options)`` call ``constructor(**options)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"scheduler name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not constructor:
        raise ValueError(f"scheduler {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = constructor


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _option_names(constructor) -> list[str]:
    if dataclasses.is_dataclass(constructor):
        return [f.name for f in dataclasses.fields(constructor)]
    params = inspect.signature(constructor).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def make(name: str, **options):
    """Builds the scheduler registered as ``name``; an unknown name or option is a ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(available())}")
    constructor = _REGISTRY[name]
    try:
        return constructor(**options)
    except TypeError as e:
        known = _option_names(constructor)
        unknown = [k for k in options if k not in known]
        if unknown and not any(
            p.kind == p.VAR_KEYWORD for p in inspect.signature(constructor).parameters.values()
        ):
            raise ValueError(
                f"scheduler {name!r} has no option {unknown[0]!r}; options: {', '.join(known)}"
            ) from None
        raise ValueError(f"scheduler {name!r}: {e}") from None
