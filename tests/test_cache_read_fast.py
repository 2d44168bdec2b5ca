"""`cache.read_fast`: a planned read is one gather and one SDPA whatever the history's length,
histories past the workspace cap run in merged blocks, and rewrites of an open chunk are plain
copies (`store.replay_rows_write`); a read of a plan after its first is replayed from the op's
arguments (`read_fast.replay`)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import read_fast, read_plan, reset_stats, stats
from qvg_compile.cache.read_fast import fold_queries, unfold_output
from qvg_compile.kernels.gather import Gather

CFG = QVGConfig.preset("qvg").replace(centroids=8)
B, H, D, L = 1, 2, 64, 8
ATOL = 2e-5


def filled(chunks: int, role: str, seed: int, cap: int = 96) -> QVGCache:
    gen = torch.Generator().manual_seed(seed)
    c = QVGCache.empty((B, cap, H, D), 1, CFG, role=role, dtype=torch.float32, chunk_tokens=L)
    for i in range(chunks):
        c[:, i * L:(i + 1) * L] = torch.randn(B, L, H, D, generator=gen)
    return c


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))


@pytest.fixture
def launches(monkeypatch):
    """Counts of the fast read's device work: gathers and SDPA calls (with or without lse)."""
    counts = {"gather": 0, "sdpa": 0}
    gather = Gather.__call__

    def count(name, fn):
        def wrapped(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(Gather, "__call__", count("gather", gather))
    for name in ("sdpa_with_lse", "sdpa_fused"):
        monkeypatch.setattr(read_fast, name, count("sdpa", getattr(read_fast, name)))
    return counts


@pytest.mark.parametrize("chunks", [2, 5, 11])
def test_a_fast_read_is_one_gather_and_one_sdpa_at_any_history_length(launches, chunks):
    k, v = filled(chunks, "key", 0), filled(chunks, "value", 1)
    q = torch.randn(B, H, L, D)
    e = chunks * L
    reset_stats()
    out = sdpa(q, k[:, :e], v[:, :e])
    s = stats()
    ref = F.scaled_dot_product_attention(q, k[:, :e].dequantize().transpose(1, 2), v[:, :e].dequantize().transpose(1, 2))
    assert (out - ref).abs().max() <= ATOL
    assert launches == {"gather": 1, "sdpa": 1}
    assert s["fast_reads"] == 1 and s["fast_tokens"] == (chunks - 1) * L and s["fast_rows"] == L
    assert s["decoded_tokens"] == 0


def test_a_history_past_the_workspace_cap_runs_in_merged_blocks(launches, monkeypatch):
    k, v = filled(11, "key", 2), filled(11, "value", 3)
    q = torch.randn(B, H, 5, D)
    full = sdpa(q, k[:, :88], v[:, :88])
    # 88 tokens x K+V x 2 heads x 64 ch x 4 bytes = 90,112 bytes: a 40,000-byte cap gives 3 blocks.
    monkeypatch.setattr(read_plan, "DEFAULT_WORKSPACE_BYTES", 40_000)
    read_plan.clear_plans()
    launches.update(gather=0, sdpa=0)
    blocked = sdpa(q, k[:, :88], v[:, :88])
    assert launches == {"gather": 3, "sdpa": 3}
    assert (blocked - full).abs().max() <= ATOL
    # The next read of the same state replays all three blocks.
    reset_stats()
    assert torch.equal(sdpa(q, k[:, :88], v[:, :88]), blocked) and stats()["read_replays"] == 1
    assert launches == {"gather": 6, "sdpa": 6}
    read_plan.clear_plans()


def test_cfg_copies_and_gqa_heads_read_one_stored_row(launches):
    k, v = filled(4, "key", 4), filled(4, "value", 5)
    kk = k[:, :32].transpose(1, 2).repeat(2, 1, 1, 1).repeat_interleave(3, 1)
    vv = v[:, :32].transpose(1, 2).repeat(2, 1, 1, 1).repeat_interleave(3, 1)
    q = torch.randn(2, 6, 4, D)
    reset_stats()
    out = F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
    assert launches == {"gather": 1, "sdpa": 1} and stats()["fast_tokens"] == 24
    ref = F.scaled_dot_product_attention(q, kk.dequantize(), vv.dequantize(), enable_gqa=True)
    assert (out - ref).abs().max() <= ATOL


def test_fold_and_unfold_are_inverse_and_group_heads_by_repeat_interleave():
    q = torch.randn(2 * 3, 4 * 2, 5, 8)
    folded = fold_queries(q, 2, 2)
    assert folded.shape == (3, 4, 2 * 2 * 5, 8)
    # Row 0 of copy 1, query head 3 (kv head 1 under repeat_interleave by 2).
    assert torch.equal(folded[0, 1, (1 * 2 + 1) * 5:(1 * 2 + 1) * 5 + 5], q[3, 3])
    assert torch.equal(unfold_output(folded, 2, 2, 5), q)


def test_rewrites_of_the_open_chunk_are_plain_copies():
    c = QVGCache.empty((B, 64, H, D), 1, CFG, role="key", dtype=torch.float32, chunk_tokens=L)
    reset_stats()
    for chunk in range(3):
        for step in range(5):
            x = torch.randn(B, L, H, D)
            c[:, chunk * L:(chunk + 1) * L] = x
            assert torch.equal(c[:, chunk * L:(chunk + 1) * L].dequantize(), x)
    # The first write of a chunk takes a slot (and seals the previous chunk); the four after it copy.
    assert stats()["fast_writes"] == 3 * 4 and stats()["seals"] == 2


def test_a_plan_binds_its_gather_once_and_rebinds_for_other_arrays():
    k, v = filled(3, "key", 8), filled(3, "value", 9)
    q = torch.randn(B, H, 2, D)
    read_plan.clear_plans()
    sdpa(q, k[:, :24], v[:, :24])
    (_, _, plan), = read_plan._plans.values()
    bound = plan.gather
    sdpa(q, k[:, :24], v[:, :24])
    assert plan.gather is bound  # the same arrays: nothing rebuilt
    copy = k.clone()  # other arrays, same token state content but a new store: its own plan
    out = sdpa(q, copy[:, :24], v[:, :24])
    assert (out - sdpa(q, k[:, :24], v[:, :24])).abs().max() <= ATOL and len(read_plan._plans) == 2


def test_plans_of_a_dropped_cache_are_forgotten():
    read_plan.clear_plans()
    k, v = filled(2, "key", 10), filled(2, "value", 11)
    sdpa(torch.randn(B, H, 2, D), k[:, :16], v[:, :16])
    assert len(read_plan._plans) == 1
    del k, v
    gc.collect()
    assert len(read_plan._plans) == 0


def test_workspace_is_shared_and_released():
    k, v = filled(3, "key", 6), filled(3, "value", 7)
    read_fast.release_workspace()
    sdpa(torch.randn(B, H, 2, D), k[:, :24], v[:, :24])
    held = read_fast.workspace_bytes()
    assert held == 2 * B * H * 24 * D * 4
    sdpa(torch.randn(B, H, 2, D), k[:, :16], v[:, :16])
    assert read_fast.workspace_bytes() == held  # a shorter read reuses it
    read_fast.release_workspace()
    assert read_fast.workspace_bytes() == 0


def test_a_bad_workspace_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QVG_READ_WORKSPACE_MB", "lots")
    with pytest.raises(ValueError, match="QVG_READ_WORKSPACE_MB"):
        read_plan.workspace_limit()
    monkeypatch.setenv("QVG_READ_PATH", "fastest")
    with pytest.raises(ValueError, match="QVG_READ_PATH"):
        read_plan.fast_reads_enabled()


def host_ops(fn) -> list[str]:
    """The ATen ops a ``qvg::cache_*`` op body issues on the host (torch.profiler, CPU)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is not None
            and e.cpu_parent.name.startswith("qvg::cache")]


@pytest.mark.parametrize("chunks", [3, 12])
def test_a_planned_read_and_a_rewrite_issue_a_pinned_number_of_host_ops(monkeypatch, chunks):
    """With the gather's device work left out, a read replayed from its plan issues 1 host op
    (the SDPA: the two state stamps are read through NumPy views of the counters, the workspace
    views and the gather's arguments are bound once per plan) and a rewrite of the open chunk 2
    (the rows' view, one copy), at any history length: no planning, no per-token work (it was 5
    and 4 while the stamps were read with ``tolist``)."""
    monkeypatch.setattr(Gather, "__call__", lambda self, *args: None)
    k, v = filled(chunks, "key", 12, cap=256), filled(chunks, "value", 13, cap=256)
    q = torch.randn(B, H, 8, D)
    e = chunks * L
    kt, vt = k[:, :e].transpose(1, 2), v[:, :e].transpose(1, 2)
    read = host_ops(lambda: F.scaled_dot_product_attention(q, kt, vt))
    assert len(read) == 1 and "attention" in read[0]
    x = torch.randn(B, L, H, D)
    rewrite = host_ops(lambda: k.__setitem__((slice(None), slice(e - L, e)), x))
    assert len(rewrite) == 2 and rewrite.count("aten::copy_") == 1, rewrite


def test_a_read_is_replayed_from_its_arguments_until_the_store_changes(launches):
    """The first read of a cache state builds its plan and binds it; every later read with the
    same arguments is a replay (no store built) with the same output, until a write that seals
    changes the token state; `release_workspace` drops the bound views with the workspace."""
    k, v = filled(4, "key", 20), filled(4, "value", 21)
    q = torch.randn(B, H, L, D)
    e = 4 * L

    def read():
        return sdpa(q, k[:, :e], v[:, :e])

    reset_stats()
    first, second, third = read(), read(), read()
    assert stats()["fast_reads"] == 3 and stats()["read_replays"] == 2
    assert torch.equal(first, second) and torch.equal(first, third)
    ref = F.scaled_dot_product_attention(q, k[:, :e].dequantize().transpose(1, 2),
                                         v[:, :e].dequantize().transpose(1, 2))
    assert (second - ref).abs().max() <= ATOL
    # A new chunk seals the last one: a new state, a new plan, whose first read is not a replay.
    gen = torch.Generator().manual_seed(22)
    k[:, e:e + L] = torch.randn(B, L, H, D, generator=gen)
    v[:, e:e + L] = torch.randn(B, L, H, D, generator=gen)
    reset_stats()
    e += L
    after = read()
    assert stats()["read_replays"] == 0
    ref = F.scaled_dot_product_attention(q, k[:, :e].dequantize().transpose(1, 2),
                                         v[:, :e].dequantize().transpose(1, 2))
    assert (after - ref).abs().max() <= ATOL
    read_fast.release_workspace()
    reset_stats()
    assert torch.equal(read(), after) and stats()["read_replays"] == 0
    assert torch.equal(read(), after) and stats()["read_replays"] == 1
    assert launches["gather"] == 6 and launches["sdpa"] == 6
