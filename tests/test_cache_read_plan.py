"""`cache.read_plan`: read plans are built once per cache state, reused while it holds, and never
serve a changed store (a hypothesis state machine over writes, seals, resets, rolling copies,
clones and save/load compares every fast read with the general read)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import read_plan, reset_stats, stats

CFG = QVGConfig.preset("qvg").replace(centroids=8)
B, S, H, D, L = 1, 64, 2, 64, 8
ATOL = 2e-5


def empty(role: str, **kw) -> QVGCache:
    return QVGCache.empty((B, S, H, D), 1, CFG, role=role, dtype=torch.float32, chunk_tokens=L, **kw)


@contextmanager
def read_path(path: str):
    old = os.environ.get("QVG_READ_PATH")
    os.environ["QVG_READ_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QVG_READ_PATH")
        else:
            os.environ["QVG_READ_PATH"] = old


def read(q, k, v, path):
    with read_path(path):
        return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))


def test_a_plan_is_built_once_per_state_and_rebuilt_when_a_chunk_seals(monkeypatch):
    built = []
    original = read_plan.build_plan
    monkeypatch.setattr(read_plan, "build_plan", lambda *a: built.append(1) or original(*a))
    torch.manual_seed(0)
    kb, vb = empty("key"), empty("value")
    q = torch.randn(B, H, L, D)
    for c in range(3):
        for step in range(4):  # four denoising passes over one chunk, two layers' worth of reads
            kb[:, c * L:(c + 1) * L] = torch.randn(B, L, H, D)
            vb[:, c * L:(c + 1) * L] = torch.randn(B, L, H, D)
            for _ in range(2):
                F.scaled_dot_product_attention(q, kb[:, :(c + 1) * L].transpose(1, 2),
                                               vb[:, :(c + 1) * L].transpose(1, 2))
    # One plan per chunk: the first write of chunk c seals chunk c - 1 (a new state), the other
    # writes only rewrite the open rows.
    assert len(built) == 3
    assert stats()["fast_reads"] >= 24


def test_layers_in_the_same_state_share_one_device_table(monkeypatch):
    made = []
    original = read_plan.block_table
    monkeypatch.setattr(read_plan, "block_table", lambda *a, **kw: made.append(1) or original(*a, **kw))
    read_plan.clear_plans()
    torch.manual_seed(0)
    layers = [(empty("key"), empty("value")) for _ in range(3)]
    q = torch.randn(B, H, L, D)
    outs = []
    for c in range(2):
        for kb, vb in layers:
            kb[:, c * L:(c + 1) * L] = torch.randn(B, L, H, D)
            vb[:, c * L:(c + 1) * L] = torch.randn(B, L, H, D)
            outs.append(read(q, kb[:, :(c + 1) * L], vb[:, :(c + 1) * L], "auto"))
            assert torch.allclose(outs[-1], read(q, kb[:, :(c + 1) * L], vb[:, :(c + 1) * L], "general"), atol=ATOL)
    # Three layers, two states (one open chunk; one sealed chunk + one open): two tables.
    assert len(made) == 2
    tables = [plan.blocks[0].table[0] for _, _, plan in read_plan._plans.values() if plan.blocks]
    assert len({t.data_ptr() for t in tables}) == 2


def test_views_the_fast_read_does_not_take_are_counted_with_the_reason(monkeypatch):
    monkeypatch.setenv("QVG_READ_PATH", "auto")
    torch.manual_seed(1)
    kc = QVGCache.from_dense(torch.randn(1, H, 32, D), 2, CFG)
    vc = QVGCache.from_dense(torch.randn(1, H, 32, D), 2, CFG, role="value")
    reset_stats()
    k = torch.cat([kc, torch.randn(1, H, 4, D)], 2)
    v = torch.cat([vc, torch.randn(1, H, 4, D)], 2)
    F.scaled_dot_product_attention(torch.randn(1, H, 4, D), k, v)
    s = stats()
    assert s["general_reads"] == 1 and s["fast_reads"] == 0
    assert s["general_why"] == {"dense pieces appended by cat": 1}


class CacheStates(RuleBasedStateMachine):
    """Random histories of one K/V cache pair; after every step the fast read (plans cached
    across steps) equals the general read (no plans) over every prefix read a model makes."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.v = empty("key"), empty("value")
        self.gen = torch.Generator().manual_seed(0)
        self.end = 0

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    @rule(chunk=st.integers(0, S // L - 1), steps=st.integers(1, 3))
    def write(self, chunk, steps):
        for _ in range(steps):
            self.k[:, chunk * L:(chunk + 1) * L] = self.rand(B, L, H, D)
            self.v[:, chunk * L:(chunk + 1) * L] = self.rand(B, L, H, D)
        self.end = max(self.end, (chunk + 1) * L)

    @rule()
    def reset(self):
        self.k.zero_()
        self.v.zero_()
        self.end = 0

    @rule()
    def seal(self):
        self.k.seal(release=False)
        self.v.seal(release=False)

    @rule(src=st.integers(1, S // L - 2))
    def roll(self, src):
        # Rolling window: move chunks [src, src + 1] down to [0, 1] (sealed tokens move as they are).
        for t in (self.k, self.v):
            t[:, :2 * L] = t[:, src * L:(src + 2) * L].clone()

    @rule()
    def clone(self):
        self.k, self.v = self.k.clone(), self.v.clone()

    @rule()
    def save_and_load(self):
        with tempfile.TemporaryDirectory() as d:
            paths = [os.path.join(d, f"{n}.safetensors") for n in "kv"]
            self.k.save(paths[0])
            self.v.save(paths[1])
            self.k, self.v = QVGCache.load(paths[0]), QVGCache.load(paths[1])

    @invariant()
    def fast_read_equals_general_read(self):
        if self.end == 0:
            return
        q = self.rand(B, H, 4, D)
        for e in sorted({L, self.end}):
            outs = [read(q, self.k[:, :e], self.v[:, :e], path) for path in ("auto", "general")]
            assert (outs[0] - outs[1]).abs().max() <= ATOL


CacheStates.TestCase.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)
test_cache_states = CacheStates.TestCase


def test_the_state_machine_exercises_the_fast_read():
    reset_stats()
    machine = CacheStates()
    machine.write(0, 2)
    machine.write(1, 1)
    machine.write(2, 1)
    machine.roll(1)
    machine.fast_read_equals_general_read()
    machine.clone()
    machine.save_and_load()
    machine.fast_read_equals_general_read()
    assert stats()["fast_reads"] >= 4 and stats()["fast_tokens"] > 0
