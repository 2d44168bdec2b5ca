"""Counters of what the compressed cache did: seals, fallbacks to dense ops, bytes decoded."""

from __future__ import annotations

import warnings
from collections import Counter

_COUNTS: Counter = Counter()
_WARNED: set[str] = set()


def count(name: str, amount: int = 1) -> None:
    _COUNTS[name] += amount


def fallback(op: str) -> None:
    """Record a dense fallback of ``op`` and warn the first time it happens."""
    _COUNTS[f"fallback:{op}"] += 1
    if op not in _WARNED:
        _WARNED.add(op)
        warnings.warn(f"QVGCache: {op} has no compressed implementation; it dequantizes the cache "
                      "and runs the dense op (correct, but it builds a dense copy)", stacklevel=3)


def stats() -> dict[str, int]:
    """Counts so far: ``seals``, ``tokens_sealed``, ``reads``, ``decoded_tokens``, ``fallback:<op>``..."""
    return dict(_COUNTS)


def reset_stats() -> None:
    _COUNTS.clear()
    _WARNED.clear()
