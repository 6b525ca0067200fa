"""Name lookups in the spec tables (hardware, models)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], name, kind: str) -> T:
    """``table[name]`` (case-insensitive); ``ValueError`` listing the known names otherwise."""
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        return table[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}") from None
