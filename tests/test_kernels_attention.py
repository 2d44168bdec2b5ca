"""Attention over packed history + dense tail: Triton kernels (interpreter, CPU) against the reference."""


import math

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.kernels._triton_attention import attend_fused, merge_into
from qvg_compile.kernels.attention import (qvg_attention, reference_attention, stream_block_tokens,
                                           streamed_attention)
from qvg_compile.quant.qvg import encode_qvg
from qvg_compile.quant.packed import PackedStore
from interpreter import INTERPRETER_ONLY

pytestmark = INTERPRETER_ONLY


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_store(gen, b, h, n, d, cfg, role):
    segs = [encode_qvg(torch.randn(b, h, k, d, generator=gen), cfg, -2, role) for k in n]
    cat = lambda name: torch.cat([getattr(g, name) for g in segs], dim=-2)
    return PackedStore(cat("codes"), cat("scales"), None if segs[0].zeros is None else cat("zeros"),
                       torch.cat([g.assignments for g in segs], dim=-1), torch.stack([g.centroids for g in segs]),
                       torch.cat([torch.full((k,), i, dtype=torch.int32) for i, k in enumerate(n)]),
                       segs[0].bits, cfg.group_size, segs[0].code_mode)


def inputs(seed, b=1, hq=4, hkv=2, m=19, d=32, t=7, n=(37, 29), dtype=torch.float32, bshd=False, cfg=None):
    gen = torch.Generator().manual_seed(seed)
    cfg = cfg or QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype="fp16")
    ks, vs = make_store(gen, b, hkv, n, d, cfg, "key"), make_store(gen, b, hkv, n, d, cfg, "value")
    if bshd:
        q = torch.randn(b, m, hq, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, m, d, generator=gen).to(dtype)
    tk = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    tv = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    return q, ks, vs, tk, tv, gen


RANGES = [(0, 20), (25, 66)]  # two runs, one crossing the segment boundary, odd lengths


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("bshd", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_fused_matches_reference(dtype, tol, bshd, mask_kind):
    q, ks, vs, tk, tv, gen = inputs(1, dtype=dtype, bshd=bshd)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(19, 7, generator=gen) > 0.4
        mask[3] = False  # a row whose tail is fully masked still sees the history
    elif mask_kind == "additive":
        mask = torch.randn(1, 4, 19, 7, generator=gen)
    ref, ref_lse = reference_attention(q.float(), ks, vs, RANGES, tk.float(), tv.float(), mask, 0.3, return_lse=True)
    out, lse = attend_fused(q, ks, vs, RANGES, tk, tv, mask, 0.3)
    assert out.dtype == dtype and out.shape == (1, 4, 19, 32)
    assert rel(out, ref) < tol
    assert torch.allclose(lse, ref_lse, atol=1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("d,cdtype", [(16, "fp16"), (64, "fp16"), (32, "fp8_e4m3")])
def test_fused_head_dims_groups_and_batches(d, cdtype):
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype=cdtype, key_bits=4, stages=2)
    q, ks, vs, tk, tv, _ = inputs(2, b=2, hq=6, hkv=2, m=70, d=d, t=0, n=(40,), cfg=cfg)
    ref = reference_attention(q, ks, vs, [(3, 40)], tk, tv)
    out, _ = attend_fused(q, ks, vs, [(3, 40)], tk, tv, None, 1 / math.sqrt(d))
    assert rel(out, ref) < 1e-5


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    q, ks, vs, tk, tv, _ = inputs(3)
    mask = torch.zeros(19, 7, dtype=torch.bool)
    out, lse = attend_fused(q, ks, vs, [], tk, tv, mask, 0.2)
    ref, ref_lse = reference_attention(q, ks, vs, [], tk, tv, mask, 0.2, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out, ref)
    assert torch.isinf(lse).all() and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("mask", [False, True])
def test_streamed_matches_reference(mask):
    q, ks, vs, tk, tv, gen = inputs(4, bshd=True)
    m = (torch.rand(19, 7, generator=gen) > 0.3) if mask else None
    ref, ref_lse = reference_attention(q, ks, vs, RANGES, tk, tv, m, None, return_lse=True)
    # block_tokens=16: several blocks per range and blocks spanning two ranges.
    out, lse = streamed_attention(q, ks, vs, RANGES, tk, tv, m, 1 / math.sqrt(32), block_tokens=16)
    assert rel(out, ref) < 1e-5
    assert torch.allclose(lse, ref_lse, atol=1e-4)


def test_merge_handles_empty_partials():
    out = torch.full((1, 2, 5, 16), float("nan"))
    out.zero_()
    lse = torch.full((1, 2, 5), -math.inf)
    o1, l1 = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5)
    o2, l2 = torch.full((1, 2, 5, 16), float("nan")), torch.full((1, 2, 5), -math.inf)
    merge_into(out, lse, o1, l1)
    merge_into(out, lse, o2, l2)
    assert torch.allclose(out, o1, atol=1e-6) and torch.allclose(lse, l1)


def test_op_cpu_dispatch_and_opcheck():
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, scale_dtype="fp16")
    q, ks, vs, tk, tv, gen = inputs(5, cfg=cfg)
    mask = torch.rand(19, 7, generator=gen) > 0.5
    out, lse = qvg_attention(q, ks, vs, RANGES, tk, tv, mask, 0.25, return_lse=True)
    ref, ref_lse = reference_attention(q, ks, vs, RANGES, tk, tv, mask, 0.25, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    args = (q, ks.codes, ks.scales, ks.zeros, ks.assignments, ks.centroids, ks.segment_ids,
            vs.codes, vs.scales, vs.zeros, vs.assignments, vs.centroids, vs.segment_ids,
            [0, 20, 25, 66], tk, tv, mask, ks.bits, vs.bits, ks.group_size, ks.code_mode, vs.code_mode, 0.25)
    torch.library.opcheck(torch.ops.qvg.attention.default, args)


def test_bad_inputs_raise_clear_errors():
    q, ks, vs, tk, tv, _ = inputs(6)
    with pytest.raises(TypeError, match="q: expected one of"):
        qvg_attention(q.to(torch.int32), ks, vs, RANGES, tk, tv)
    with pytest.raises(ValueError, match="heads a multiple"):
        qvg_attention(q[:, :3], ks, vs, RANGES, tk, tv)
    with pytest.raises(ValueError, match="ranges"):
        qvg_attention(q, ks, vs, [(0, 67)], tk, tv)
    with pytest.raises(ValueError, match="tail_v"):
        qvg_attention(q, ks, vs, RANGES, tk, tv[:, :, :3])
    with pytest.raises(ValueError, match="tail_mask"):
        qvg_attention(q, ks, vs, RANGES, tk, tv, torch.ones(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="one device"):
        qvg_attention(q.to("meta"), ks, vs, RANGES, tk, tv)
    with pytest.raises(TypeError, match="PackedStore"):
        qvg_attention(q, tk, vs, RANGES, tk, tv)


def test_stream_block_rule_and_its_override(monkeypatch):
    monkeypatch.delenv("QVG_STREAM_BLOCK_TOKENS", raising=False)
    # A quarter of the history rounded up to 1024, within [16384, 65536], never past the history.
    assert [stream_block_tokens(n) for n in (100, 32760, 93600, 187200, 10**6)] == [100, 16384, 23552, 47104, 65536]
    assert all(math.ceil(n / stream_block_tokens(n)) == 4 for n in (65536, 93600, 187200))
    monkeypatch.setenv("QVG_STREAM_BLOCK_TOKENS", "8192")
    assert stream_block_tokens(93600) == 8192 and stream_block_tokens(5000) == 5000
    monkeypatch.setenv("QVG_STREAM_BLOCK_TOKENS", "lots")
    with pytest.raises(ValueError, match="QVG_STREAM_BLOCK_TOKENS"):
        stream_block_tokens(93600)


def test_fused_reads_keys_and_values_of_different_code_modes():
    """Keys with the published 3-level codes, values with 4 levels (the `qvg` preset)."""
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype="fp16", code_mode="symmetric",
                    value_code_mode="symmetric_full")
    q, ks, vs, tk, tv, _ = inputs(3, cfg=cfg)
    assert (ks.code_mode, vs.code_mode) == ("symmetric", "symmetric_full")
    ref = reference_attention(q, ks, vs, RANGES, tk, tv, None, 0.3)
    out, _ = attend_fused(q, ks, vs, RANGES, tk, tv, None, 0.3)
    assert rel(out, ref) < 1e-5
