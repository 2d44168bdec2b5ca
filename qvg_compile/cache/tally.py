"""Process-wide tallies of what the compressed caches did: seals, decodes, fallbacks.

Counts are taken where the work happens: seals and decodes inside the ``qvg::cache_*`` op bodies
(so they count at run time, compiled or not), fallbacks when an op without a compressed
implementation is dispatched (once per eager call; under torch.compile once per trace, while the
decode it causes still counts on every run).
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from typing import Any

_lock = threading.Lock()
_counts: Counter = Counter()
_fallbacks: Counter = Counter()
_warned: set[str] = set()
_general: Counter = Counter()


class QVGFallbackWarning(UserWarning):
    """An op ran on a dequantized copy of a `QVGCache` (correct, but not compressed)."""


def add(**amounts: int) -> None:
    with _lock:
        _counts.update(amounts)


def fast_read(sealed: int, rows: int, replayed: bool = False) -> None:
    """Count one fast read of ``sealed`` packed tokens and ``rows`` dense rows, ``replayed`` from
    the op's arguments (called on every read: a few increments, not a keyword `add`)."""
    with _lock:
        _counts["attention_calls"] += 1
        _counts["fast_reads"] += 1
        _counts["fast_tokens"] += sealed
        _counts["fast_rows"] += rows
        _counts["read_replays"] += replayed


def fast_write() -> None:
    """Count one write that only copied into open rows."""
    with _lock:
        _counts["fast_writes"] += 1


def fallback(op: str, why: str) -> None:
    """Count a fallback of ``op``; warn the first time each op falls back."""
    with _lock:
        _fallbacks[op] += 1
        first = op not in _warned
        _warned.add(op)
    if first:
        warnings.warn(f"QVGCache: {op} runs on a dequantized copy ({why}); it is correct but holds "
                      f"the decoded values in memory. qvg_compile.cache.stats() counts these.",
                      QVGFallbackWarning, stacklevel=3)


def general_read(why: str) -> None:
    """Count a read that the fast read could not take, by reason."""
    with _lock:
        _general[why] += 1


def stats() -> dict[str, Any]:
    """Counters since the last `reset_stats`:

    ``seals`` (segments quantized), ``sealed_tokens``, ``share_misfits`` (segments that would have
    shared a codebook they do not fit and got their own: `CachePolicy.share_fit`), ``decoded_tokens`` (sealed tokens decoded
    to dense outside the attention kernel), ``decoded_bytes`` (dense bytes those decodes and
    dense gathers produced), ``attention_calls``, ``fused_tokens`` (tokens the attention op read
    straight from packed storage), ``tail_tokens`` (dense tokens it read), ``fast_reads``,
    ``fast_tokens`` and ``fast_rows`` (reads planned once per cache state: one gather launch and
    one SDPA; the sealed tokens they decoded and the dense rows they copied, per stored row),
    ``read_replays`` (fast reads run from their arguments alone, without building a store or
    reading its token state: every read of a plan but its first), ``general_reads`` and ``general_why`` (the general path, and why per
    reason), ``fast_writes`` (writes into an open chunk that only copied), ``fallbacks`` (per op
    name) and ``fallback_total``.
    """
    with _lock:
        out: dict[str, Any] = {k: 0 for k in ("seals", "sealed_tokens", "share_misfits", "decoded_tokens",
                                               "decoded_bytes", "attention_calls", "fused_tokens", "tail_tokens",
                                               "fast_reads", "fast_tokens", "fast_rows", "read_replays", "general_reads",
                                               "fast_writes")}
        out.update(_counts)
        out["general_why"] = dict(_general)
        out["fallbacks"] = dict(_fallbacks)
        out["fallback_total"] = sum(_fallbacks.values())
    return out


def reset_stats(forget_warnings: bool = False) -> None:
    """Zero every counter; warnings already given are not repeated unless ``forget_warnings``."""
    with _lock:
        if forget_warnings:
            _warned.clear()
        _counts.clear()
        _general.clear()
        _fallbacks.clear()
