"""``Registry``: a name -> constructor table, one per kind of policy (schedulers, routers), so that
research scripts add their own with ``register`` and configs name them."""

from __future__ import annotations

from typing import Any, Callable


class Registry:
    """Constructors of one ``kind`` ("scheduler", "router") by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._constructors: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, constructor: Callable[..., Any], *, overwrite: bool = False) -> None:
        """Makes ``name`` build with ``constructor``; a second, different one needs ``overwrite``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")
        if name in self._constructors and not overwrite and self._constructors[name] is not constructor:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
        self._constructors[name] = constructor

    def available(self) -> tuple[str, ...]:
        return tuple(sorted(self._constructors))

    def constructor(self, name: str) -> Callable[..., Any]:
        """The constructor registered as ``name``; ValueError listing the known names otherwise."""
        if name not in self._constructors:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.available())}")
        return self._constructors[name]
