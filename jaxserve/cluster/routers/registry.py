"""Router name -> constructor, like the scheduler registry. Scripts add their own with ``register``."""

from __future__ import annotations

import dataclasses

from jaxserve.registry import Registry

_ROUTERS = Registry("router")
register = _ROUTERS.register
available = _ROUTERS.available
constructor = _ROUTERS.constructor


def option_names(name: str) -> tuple[str, ...]:
    build = constructor(name)
    return tuple(f.name for f in dataclasses.fields(build)) if dataclasses.is_dataclass(build) else ()


def make(name: str, **options):
    """The router registered as ``name``; an unknown name or option is a ValueError naming it."""
    known = option_names(name)
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"router {name!r} has no option {unknown[0]!r}; options: {', '.join(known) or 'none'}")
    try:
        return constructor(name)(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"router {name!r}: {e}") from None
