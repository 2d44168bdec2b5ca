"""Triton decode (interpreter, CPU) against `PackedStore.dequantize`, and the ``qvg::decode`` op."""

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.kernels._triton_decode import decode_into, decode_pair_into, pairable
from qvg_compile.kernels.decode import dequantize_segment, dequantize_store, segment_as_store
from qvg_compile.quant.qvg import encode_qvg
from qvg_compile.quant.packed import PackedStore
from interpreter import INTERPRETER_ONLY

pytestmark = INTERPRETER_ONLY


def make_store(seed, b=1, h=2, n=(37, 29), d=32, cfg=None, role="key", cdtype="fp16"):
    """A store of several segments (different codebooks) written back to back."""
    cfg = cfg or QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype=cdtype)
    gen = torch.Generator().manual_seed(seed)
    segs = [encode_qvg(torch.randn(b, h, k, d, generator=gen), cfg, -2, role) for k in n]
    s = segs[0].stages
    cat = lambda name: torch.cat([getattr(g, name) for g in segs], dim=-2)
    cents = torch.stack([g.centroids for g in segs]) if s else torch.zeros(len(n), 0, b, h, 1, d, dtype=torch.float16)
    assign = torch.cat([g.assignments for g in segs], dim=-1)
    ids = torch.cat([torch.full((k,), i, dtype=torch.int32) for i, k in enumerate(n)])
    zeros = None if segs[0].zeros is None else cat("zeros")
    return PackedStore(cat("codes"), cat("scales"), zeros, assign, cents, ids, segs[0].bits, cfg.group_size,
                       segs[0].code_mode)


CASES = [
    dict(),
    dict(code_mode="symmetric"),
    dict(code_mode="asymmetric", scale_dtype="fp16"),
    dict(stages=2),
    dict(stages=0),
    dict(key_bits=4),
    dict(key_bits=8, group_size=32),
    dict(centroid_dtype="fp8_e4m3"),
    dict(centroid_dtype="fp8_e4m3", stages=2, scale_dtype="fp16", code_mode="asymmetric"),
]


@pytest.mark.parametrize("changes", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("out_dtype,grouped", [(torch.float32, True), (torch.float16, True), (torch.float32, False)])
def test_triton_decode_matches_reference(changes, out_dtype, grouped):
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype="fp16").replace(**changes)
    store = make_store(1, cfg=cfg)
    lo, hi = 5, 60  # crosses the segment boundary, not a multiple of the block
    ref = store.dequantize(lo, hi, out_dtype)
    out = torch.full((1, 2, hi - lo, 32), float("nan"), dtype=out_dtype)
    decode_into(store, lo, hi, out, grouped)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("changes", [dict(), dict(value_bits=4), dict(code_mode="asymmetric", scale_dtype="fp16"),
                                     dict(stages=0), dict(code_mode="symmetric", value_code_mode="symmetric_full")],
                         ids=["default", "v4bit", "asym", "rtn", "modes_per_role"])
def test_triton_decode_pair_equals_two_decodes(changes):
    """One launch for a K and a V block (int16 segment ids, a strided V output) gives what two
    `decode_into` calls give."""
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype="fp16").replace(**changes)
    k, v = make_store(3, cfg=cfg, role="key"), make_store(4, cfg=cfg, role="value")
    v.segment_ids = v.segment_ids.to(torch.int16)
    assert pairable(k, v)
    lo, hi = 3, 61
    k_out = torch.full((1, 2, hi - lo, 32), float("nan"))
    v_out = torch.full((1, hi - lo, 2, 32), float("nan")).transpose(1, 2)
    decode_pair_into(k, v, lo, hi, k_out, v_out)
    assert torch.equal(k_out, k.dequantize(lo, hi, torch.float32))
    assert torch.equal(v_out, v.dequantize(lo, hi, torch.float32))
    assert not pairable(k, make_store(5, cfg=cfg.replace(group_size=32)))


def test_triton_decode_strided_output_and_lead_views():
    store = make_store(2, b=2, h=3)
    # A head slice of the store (what the cache passes for a GQA / lead selection) and a BSHD output.
    view = PackedStore(store.codes[:, 1:], store.scales[:, 1:], None, store.assignments[:, :, 1:],
                       store.centroids[:, :, :, 1:], store.segment_ids, store.bits, store.group_size, store.code_mode)
    ref = view.dequantize(0, 66, torch.float32)
    out = torch.full((2, 66, 2, 32), float("nan")).transpose(1, 2)
    decode_into(view, 0, 66, out)
    assert torch.equal(out, ref)


def test_decode_op_cpu_and_opcheck():
    store = make_store(3)
    out = dequantize_store(store, 3, 40, torch.float16)
    assert torch.equal(out, store.dequantize(3, 40, torch.float16))
    # opcheck's schema test multiplies inputs, which CPU FP8 lacks: check the op on FP16 scales.
    store = make_store(3, cfg=QVGConfig(centroids=8, group_size=16, kmeans_iters=1, scale_dtype="fp16"))
    args = (store.codes, store.scales, store.zeros, store.assignments, store.centroids, store.segment_ids,
            store.bits, store.group_size, store.code_mode, 3, 40, torch.float16)
    torch.library.opcheck(torch.ops.qvg.decode.default, args)


def test_segment_roundtrip_and_bad_args():
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1)
    x = torch.randn(2, 19, 3, 32, generator=torch.Generator().manual_seed(4))
    seg = encode_qvg(x, cfg, 1, "value")
    assert torch.equal(dequantize_segment(seg, torch.float32), seg.dequantize())
    store = segment_as_store(seg)
    out = torch.empty(2, 3, 19, 32)
    assert torch.equal(decode_into(store, 0, 19, out), seg.dequantize_normalised(torch.float32))
    with pytest.raises(ValueError, match="start, end"):
        dequantize_store(store, 5, 100)
    with pytest.raises(TypeError, match="out_dtype"):
        dequantize_store(store, 0, 5, torch.int32)
    with pytest.raises(TypeError, match="PackedStore"):
        dequantize_store(seg, 0, 5)
