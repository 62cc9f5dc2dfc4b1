"""Name lookup shared by the package's registries (regularizers, conventions)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """``registry[name]``; otherwise a ``ValueError`` naming the bad value, the closest valid name
    and all valid names, e.g. ``unknown regularizer 'jacobian' (did you mean ...?); valid: ...``."""
    if isinstance(name, str) and name in registry:
        return registry[name]
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(registry)}")
