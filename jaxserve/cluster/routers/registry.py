"""Router name -> constructor, like the scheduler registry. Scripts add their own with ``register``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, constructor: Callable[..., Any], *, overwrite: bool = False) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"router name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not constructor:
        raise ValueError(f"router {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = constructor


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def constructor(name: str) -> Callable[..., Any]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown router {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def option_names(name: str) -> tuple[str, ...]:
    constructor = _REGISTRY[name]
    return tuple(f.name for f in dataclasses.fields(constructor)) if dataclasses.is_dataclass(constructor) else ()


def make(name: str, **options):
    """The router registered as ``name``; an unknown name or option is a ValueError naming it."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown router {name!r}; available: {', '.join(available())}")
    known = option_names(name)
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"router {name!r} has no option {unknown[0]!r}; options: {', '.join(known) or 'none'}")
    try:
        return _REGISTRY[name](**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"router {name!r}: {e}") from None
