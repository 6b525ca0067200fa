"""Name -> constructor registry. Research scripts add their own policies with ``register``."""

from __future__ import annotations

import dataclasses
import inspect

from jaxserve.registry import Registry

_SCHEDULERS = Registry("scheduler")
register = _SCHEDULERS.register  # register(name, constructor, overwrite=False): make(name, **options) calls it
available = _SCHEDULERS.available
constructor = _SCHEDULERS.constructor


def _option_names(constructor) -> list[str]:
    if dataclasses.is_dataclass(constructor):
        return [f.name for f in dataclasses.fields(constructor)]
    params = inspect.signature(constructor).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def make(name: str, **options):
    """Builds the scheduler registered as ``name``; an unknown name or option is a ValueError."""
    build = constructor(name)
    try:
        return build(**options)
    except TypeError as e:
        known = _option_names(build)
        unknown = [k for k in options if k not in known]
        if unknown and not any(
            p.kind == p.VAR_KEYWORD for p in inspect.signature(build).parameters.values()
        ):
            raise ValueError(
                f"scheduler {name!r} has no option {unknown[0]!r}; options: {', '.join(known)}"
            ) from None
        raise ValueError(f"scheduler {name!r}: {e}") from None
