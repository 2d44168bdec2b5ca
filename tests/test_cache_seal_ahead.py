"""`cache.seal_ahead` and `cache.ahead`: a sealing read opens the next layer's sealing write ahead,
so that write is a copy and its read a replay, and every op computes bit for bit what it would
without it (an AR loop; hypothesis sequences of AR steps and deviations: reads before the write,
partial writes, rewrites of the sealed chunk, seals, resets, clones, snapshots, save/load, dtype
conversions, whole-cache copies into and out of an opened cache)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import ahead, read_plan, reset_stats, seal_ahead, stats
from qvg_compile.cache.spec import POS_MAP_AT

from example_models import switch_seal_ahead

CFG = QVGConfig.preset("qvg").replace(centroids=8)
B, S, H, D, L = 1, 48, 2, 64, 8
LAYERS, PASSES = 3, 3


def empty(role: str) -> QVGCache:
    return QVGCache.empty((B, S, H, D), 1, CFG, role=role, dtype=torch.float32, chunk_tokens=L)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))


class Model:
    """``LAYERS`` K/V cache pairs driven like an AR video model: each chunk is written and read
    ``PASSES`` times, layer after layer (`step`), plus the deviations a hypothesis test draws."""

    def __init__(self) -> None:
        seal_ahead.forget()
        read_plan.clear_plans()
        self.caches = [(empty("key"), empty("value")) for _ in range(LAYERS)]
        self.gen = torch.Generator().manual_seed(0)
        self.chunk = self.done = 0
        self.outs: list[torch.Tensor] = []

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def write(self, layer: int, chunk: int, heads: slice = slice(None)) -> None:
        k, v = self.caches[layer]
        x = self.rand(B, L, H, D)[:, :, heads]
        k[:, chunk * L:(chunk + 1) * L, heads] = x
        v[:, chunk * L:(chunk + 1) * L, heads] = x.flip(-1) * 0.5

    def read(self, layer: int) -> None:
        k, v = self.caches[layer]
        e = (self.chunk + 1) * L
        self.outs.append(sdpa(self.rand(B, H, 4, D), k[:, :e], v[:, :e]))

    def step(self) -> None:
        """One layer's write and read of the current pass; the chunk advances after ``PASSES``."""
        if self.chunk >= S // L:
            return
        layer = self.done % LAYERS
        self.write(layer, self.chunk)
        self.read(layer)
        self.done += 1
        if self.done == LAYERS * PASSES:
            self.done = 0
            self.chunk += 1

    def result(self) -> list[torch.Tensor]:
        return self.outs + [t.dequantize() for pair in self.caches for t in pair]


def run(monkeypatch, switch: str, script) -> tuple[list[torch.Tensor], dict]:
    switch_seal_ahead(monkeypatch, switch)
    model = Model()
    script(model)
    return model.result(), stats()


def ar_chunks(n: int):
    def script(model: Model) -> None:
        for _ in range(n * LAYERS * PASSES):
            model.step()
    return script


def test_an_ar_loop_seals_ahead_and_computes_what_it_computes_without(monkeypatch):
    chunks = 5
    off, s_off = run(monkeypatch, "off", ar_chunks(chunks))
    on, s_on = run(monkeypatch, "on", ar_chunks(chunks))
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    # The order is learned over chunk 1's seals; from chunk 2 on every layer but the first is
    # opened ahead: its sealing write is a copy and its read a replay.
    opened = (chunks - 2) * (LAYERS - 1)
    assert s_on["seals_ahead"] == 2 * opened and s_on.get("seals_undone", 0) == 0
    assert s_on["seals"] == s_off["seals"] and s_on["sealed_tokens"] == s_off["sealed_tokens"]
    assert s_on["fast_writes"] - s_off["fast_writes"] == 2 * opened
    assert s_on["read_replays"] - s_off["read_replays"] == opened
    assert s_off.get("seals_ahead", 0) == 0


def test_a_bad_switch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QVG_SEAL_AHEAD", "maybe")
    with pytest.raises(ValueError, match="QVG_SEAL_AHEAD"):
        seal_ahead.enabled()


def deviate(kind: str, layer: int):
    """A deviation from the AR order, applied to ``layer`` (the next layer's caches are the ones
    a sealing read may just have opened)."""
    def apply(model: Model) -> None:
        k, v = model.caches[layer]
        if kind == "read":
            model.read(layer)
        elif kind == "partial" and model.chunk < S // L:
            model.write(layer, model.chunk, slice(0, 1))
        elif kind == "old chunk" and model.chunk > 0:
            model.write(layer, model.chunk - 1)
        elif kind == "key only" and model.chunk < S // L:
            k[:, model.chunk * L:(model.chunk + 1) * L] = model.rand(B, L, H, D)
        elif kind == "seal":
            k.seal(release=False)
            v.seal(release=False)
        elif kind == "zero":
            k.zero_()
            v.zero_()
        elif kind == "clone":
            model.caches[layer] = (k.clone(), v.clone())
        elif kind == "snapshot":
            model.outs += [t.snapshot().dequantize() for t in (k, v)]
        elif kind == "save":
            with tempfile.TemporaryDirectory() as d:
                for name, t in (("k", k), ("v", v)):
                    t.save(os.path.join(d, name))
                    model.outs.append(QVGCache.load(os.path.join(d, name)).dequantize())
        elif kind == "to":
            model.outs += [t.to(torch.float64).dequantize() for t in (k, v)]
        elif kind == "copy in":
            for role, t in (("key", k), ("value", v)):
                fresh = empty(role)
                fresh[:, :L] = model.rand(B, L, H, D)
                t.copy_(fresh)
        elif kind == "copy out":
            for role, t in (("key", k), ("value", v)):
                fresh = empty(role)
                fresh.copy_(t)
                model.outs.append(fresh.dequantize())
    return apply


KINDS = ("read", "partial", "old chunk", "key only", "seal", "zero", "clone", "snapshot", "save", "to", "copy in",
         "copy out")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.just(None), st.tuples(st.sampled_from(KINDS), st.integers(0, LAYERS - 1))),
                min_size=1, max_size=90))
def test_deviations_from_the_ar_order_give_the_same_results_with_and_without(steps):
    def script(model: Model) -> None:
        # Two whole chunks first, so the order is learned and later seals are opened ahead.
        ar_chunks(2)(model)
        for step in steps:
            if step is None:
                model.step()
            else:
                deviate(*step)(model)
                model.step()

    with pytest.MonkeyPatch.context() as mp:
        off, _ = run(mp, "off", script)
        on, _ = run(mp, "on", script)
    assert len(on) == len(off)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_each_deviation_undoes_the_opened_write_it_reaches_first(monkeypatch):
    # A write of the keys alone at the opened positions is the write the keys' store was opened
    # for: it confirms it. Every other deviation reaches both stores before their write.
    for kind in KINDS:
        undone = []

        def script(model: Model, kind=kind, opens=False) -> None:
            ar_chunks(3)(model)
            model.step()  # chunk 3's sealing pass, layer 0: opens layer 1's write
            assert all(ahead.pending(id(t._handle.arrays[POS_MAP_AT])) for t in model.caches[1]) == opens
            before = stats().get("seals_undone", 0)
            deviate(kind, 1)(model)
            undone.append(stats().get("seals_undone", 0) - before)
            for _ in range(LAYERS * PASSES - 1):
                model.step()

        off, _ = run(monkeypatch, "off", script)
        on, _ = run(monkeypatch, "on", lambda model, kind=kind: script(model, kind, True))
        assert all(torch.equal(a, b) for a, b in zip(on, off)), kind
        assert undone == [0, 0 if kind == "key only" else 2], kind


def opens_per_chunk(monkeypatch, switch: str) -> list[int]:
    """Seals opened ahead in each chunk, under ``switch``, when opens 1, 2 and 4 end late."""
    late = iter([True, True, False, True, False, False, False, False])
    real_open = seal_ahead._open

    def timed_open(*args):
        opened, _ = real_open(*args)
        return opened, next(late) if opened else False

    monkeypatch.setattr(seal_ahead, "_open", timed_open)
    monkeypatch.setenv("QVG_SEAL_AHEAD", switch)
    reset_stats()
    model = Model()
    opens = []
    for _ in range(S // L):
        before = stats().get("seals_ahead", 0)
        ar_chunks(1)(model)
        opens.append((stats().get("seals_ahead", 0) - before) // 2)
    return opens


def test_backoff_skips_the_opens_after_one_that_ended_after_its_attention(monkeypatch):
    # Layers 0 and 1 open the next layer from chunk 2 on. Opens 1, 2 and 4 end late: layer 0's
    # read skips chunk 3 and opens again in chunk 4 (in time: no more skips); layer 1's skips
    # chunk 3, opens late in chunk 4 and skips two chunks (5 and the next).
    assert opens_per_chunk(monkeypatch, "backoff") == [0, 0, 2, 0, 2, 1]


def test_the_default_opens_whether_or_not_the_last_open_ended_late(monkeypatch):
    assert opens_per_chunk(monkeypatch, "on") == [0, 0, 2, 2, 2, 2]


def test_a_successor_whose_opened_write_was_undone_backs_off(monkeypatch):
    monkeypatch.setenv("QVG_SEAL_AHEAD", "on")
    reset_stats()
    model = Model()
    opens, undone = [], []
    for chunk in range(S // L):
        before = (stats().get("seals_ahead", 0), stats().get("seals_undone", 0))
        model.step()  # layer 0's write and read: from chunk 2 on, its read opens layer 1's write
        deviate("read", 1)(model)  # layer 1 read before its write: undoes what was opened
        for _ in range(LAYERS * PASSES - 1):
            model.step()
        opens.append((stats().get("seals_ahead", 0) - before[0]) // 2)
        undone.append((stats().get("seals_undone", 0) - before[1]) // 2)
    # Layer 1 -> 2 opens every chunk from 2 on; layer 0 -> 1 opens in chunk 2, is undone, finds
    # that in chunk 3 and skips chunks 3 and 4, and opens (and is undone) again in chunk 5.
    assert opens == [0, 0, 2, 1, 1, 2]
    assert undone == [0, 0, 1, 0, 0, 1]


def test_a_seal_the_encoder_refuses_is_not_opened_and_raises_at_its_own_write(monkeypatch):
    for switch in ("off", "on"):
        monkeypatch.setenv("QVG_SEAL_AHEAD", switch)
        model = Model()
        ar_chunks(3)(model)  # chunks 0-2 done; chunk 3's sealing pass is next
        k, v = model.caches[1]
        k[:, 2 * L:3 * L] = torch.full((B, L, H, D), float("nan"))
        model.step()  # layer 0 seals and reads; with seal ahead it tries to open layer 1
        # The keys' seal is refused and not opened (the values' is, with seal ahead).
        assert not ahead.pending(id(k._handle.arrays[POS_MAP_AT]))
        assert ahead.pending(id(v._handle.arrays[POS_MAP_AT])) == (switch == "on")
        with pytest.raises(ValueError, match="NaN or Inf|cannot be quantized"):
            model.step()  # layer 1's own sealing write


def test_an_undone_seal_puts_back_the_codebook_it_overwrote(monkeypatch):
    """A codebook slot with no live token keeps its centroids and uid; a copy from a clone that
    shares the uid imports it by match. An early seal that wrote its codebook there must put the
    old centroids back when it is undone (one codebook per segment makes the slot free)."""
    def one_chunk_codebooks(role: str) -> QVGCache:
        return QVGCache.empty((B, S, H, D), 1, CFG, role=role, dtype=torch.float32, chunk_tokens=L,
                              codebook_chunks=1)

    monkeypatch.setattr(sys.modules[__name__], "empty", one_chunk_codebooks)

    def script(model: Model) -> None:
        ar_chunks(3)(model)
        k, v = model.caches[1]
        saved = (k.clone(), v.clone())
        k[:, :L].zero_()  # chunk 0's codebook slot now holds no live token
        v[:, :L].zero_()
        model.step()  # layer 0 opens layer 1: its seal takes the free slot
        k[:, :L] = saved[0][:, :L]  # undoes, then imports chunk 0 by codebook uid
        v[:, :L] = saved[1][:, :L]
        model.outs += [k.dequantize(), v.dequantize()]
        for _ in range(LAYERS * PASSES - 1):
            model.step()

    off, _ = run(monkeypatch, "off", script)
    on, s_on = run(monkeypatch, "on", script)
    assert s_on["seals_undone"] == 2
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_a_failure_while_opening_warns_once_and_turns_seal_ahead_off(monkeypatch):
    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(seal_ahead, "_open", broken)
    off, _ = run(monkeypatch, "off", ar_chunks(4))
    with pytest.warns(RuntimeWarning, match="out of memory") as caught:
        on, s_on = run(monkeypatch, "on", ar_chunks(4))
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    assert s_on.get("seals_ahead", 0) == 0


def test_arrays_copied_in_behind_the_ops_make_the_record_stale_not_restored(monkeypatch):
    # What a compiled graph's copy-back of a mutated input would do: every array copied raw.
    def script(model: Model) -> None:
        ar_chunks(3)(model)
        model.step()  # opens layer 1
        for role, t in zip(("key", "value"), model.caches[1]):
            fresh = empty(role)
            fresh[:, :L] = model.rand(B, L, H, D)
            for a, b in zip(t._handle.arrays, fresh._handle.arrays):
                a.copy_(b)
        model.outs += [t.dequantize() for t in model.caches[1]]

    off, _ = run(monkeypatch, "off", script)
    on, s_on = run(monkeypatch, "on", script)
    assert s_on.get("seals_undone", 0) == 0
    assert all(torch.equal(a, b) for a, b in zip(on, off))
