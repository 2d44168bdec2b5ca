"""Setup the reference-model tests (``tests/test_examples_*``) share: the repository root on
``sys.path`` (for ``examples``), the QVG config and tolerance they compare with, a seeded tiny
model, the Dynamo reset around a test, and the steady-state bytes ratio of a compressed cache
measured over a short and a long run."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import read_plan, reset_stats, seal_ahead

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CFG = QVGConfig.preset("qvg", centroids=32, kmeans_iters=2)
TOL = 1e-5

STEADY_POLICY = {"codebook_bits": 0.125, "spare_segments": 0}
"""A read-only history needs no spare codebook slot, and a 0.125-bit budget stands in for the
real-length amortisation of the codebooks (at toy lengths the default 0.25 bit plus its spare
slot cost 0.5 bit per element)."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo reset before and after each test. Autouse where a test module imports it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def switch_seal_ahead(monkeypatch: pytest.MonkeyPatch, switch: str) -> None:
    """`cache.seal_ahead` on or off (``QVG_SEAL_AHEAD``), with no order learned, no read plan
    cached and the `stats` counters at zero: a run that compares the two starts here."""
    monkeypatch.setenv("QVG_SEAL_AHEAD", switch)
    seal_ahead.forget()
    read_plan.clear_plans()
    reset_stats()


def seeded(model_cls: Callable[[Any], torch.nn.Module], config: Any) -> torch.nn.Module:
    """``model_cls(config)`` from ``torch.manual_seed(0)``, in eval mode."""
    torch.manual_seed(0)
    return model_cls(config).eval()


def compress_seq2(kv: Any, **policy: Any) -> Any:
    """``qvg_compile.compress`` of caches whose sequence is dim 2 (``[B, H, N, D]``)."""
    return qvg_compile.compress(kv, CFG, seq_dim=2, **policy)


def bytes_ratio(short: Sequence[QVGCache], long: Sequence[QVGCache]) -> tuple[float, float]:
    """Given the caches after a short and a long run: (BF16 bytes over held bytes of what the
    extra chunks added, the same for the whole long cache). All must be QVG caches."""
    assert all(isinstance(c, QVGCache) for c in (*short, *long))
    held = [sum(c.nbytes() for c in caches) for caches in (short, long)]
    bf16 = [sum(c.numel() * 2 for c in caches) for caches in (short, long)]
    return (bf16[1] - bf16[0]) / (held[1] - held[0]), bf16[1] / held[1]


def steady_state_ratio(model_cls: Callable[[Any], torch.nn.Module], config: Any,
                       run: Callable[[torch.nn.Module, int], Sequence[QVGCache]]) -> tuple[float, float]:
    """:func:`bytes_ratio` of a 4-chunk and an 8-chunk run. Each run builds ``model_cls(config)``
    from ``torch.manual_seed(0)`` in BF16; ``run(model, chunks)`` generates and returns the
    compressed caches it ends with."""
    runs = []
    for chunks in (4, 8):
        torch.manual_seed(0)
        runs.append(run(model_cls(config).to(torch.bfloat16).eval(), chunks))
    return bytes_ratio(*runs)


def last_steady_cache(generate: Callable[..., Any], model: torch.nn.Module, chunks: int) -> Any:
    """The cache ``generate`` hands its last ``on_chunk`` after ``chunks`` chunks (seed 1), each
    cache compressed by :func:`compress_seq2` with :data:`STEADY_POLICY` before it is read."""
    last = {}
    generate(model, chunks, seed=1, progress=False, cache_hook=lambda kv: compress_seq2(kv, **STEADY_POLICY),
             on_chunk=lambda i, kv: last.__setitem__(0, kv))
    return last[0]
