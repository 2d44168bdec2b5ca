"""Triton encode kernels (interpreter, CPU) against the math layer, and the ``qvg::`` encode ops."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.kernels import _triton_encode as tk
from qvg_compile.kernels.encode import encode_qvg, kmeans_assign, kmeans_update, quantize_residual, triton_encode
from qvg_compile.quant.kmeans import assign as ref_assign
from qvg_compile.quant.kmeans import update as ref_update
from qvg_compile.quant.group import group_quantize
from qvg_compile.quant.qvg import encode_qvg as reference_encode
from qvg_compile.quant.segment import gather_centroids


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_assign_is_the_argmin_without_an_n_by_c_matrix():
    x = rand(2, 3, 70, 32, seed=1)  # 70 tokens: not a multiple of the block
    c = rand(6, 20, 32, seed=2)  # 20 centroids: not a power of two
    out = tk.assign(x, c)
    ref, _ = ref_assign(x.reshape(6, 70, 32), c)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), ref)


def test_assign_fp16_input_picks_a_nearest_centroid_of_the_rounded_codebook():
    x = rand(1, 2, 50, 32, seed=3).half()
    c = rand(2, 16, 32, seed=4)
    out = tk.assign(x, c).long()
    dist = ((x.reshape(2, 50, 1, 32).float() - c.half().float().unsqueeze(1)) ** 2).sum(-1)
    picked = dist.gather(-1, out.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(picked, dist.min(-1).values, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_update_matches_reference_means(dtype):
    x = rand(1, 3, 90, 32, seed=5).to(dtype)
    prev = rand(3, 12, 32, seed=6)
    a = torch.randint(0, 11, (3, 90), generator=torch.Generator().manual_seed(7)).to(torch.uint8)  # centroid 11 empty
    out = tk.update(x, a, prev, splits=3)
    ref = ref_update(x.reshape(3, 90, 32), a.long(), prev)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, 11], prev[:, 11])
    assert torch.equal(out, tk.update(x, a, prev, splits=3))  # deterministic


CASES = [
    dict(),
    dict(code_mode="symmetric"),
    dict(code_mode="asymmetric", scale_dtype="fp16"),
    dict(stages=2, group_size=16),
    dict(stages=0),
    dict(key_bits=4, centroid_dtype="fp16"),
    dict(key_bits=8, scale_dtype="fp16"),
]


@pytest.mark.parametrize("changes", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_quantize_is_bit_exact_for_given_centroids(changes):
    cfg = QVGConfig(centroids=8, group_size=32, kmeans_iters=1).replace(**changes)
    x = rand(1, 2, 45, 64, seed=8) * 3
    s = cfg.stages
    cents = rand(max(s, 1), 2, 8, 64, seed=9)[:s].to(cfg.torch_centroid_dtype)
    assign = torch.randint(0, 8, (s, 2, 45), generator=torch.Generator().manual_seed(10)).to(torch.uint8)
    codes, scales, zeros, flags = tk.quantize(x, cents, assign, cfg.key_bits, cfg.group_size, cfg.code_mode,
                                              cfg.torch_scale_dtype)
    r = x.reshape(2, 45, 64).clone()
    for i in range(s):
        r -= gather_centroids(cents[i], assign[i])
    ref = group_quantize(r, cfg.key_bits, cfg.group_size, cfg.code_mode, cfg.torch_scale_dtype)
    assert torch.equal(codes, ref.codes)
    assert torch.equal(scales.view(torch.uint8 if scales.dtype.itemsize == 1 else torch.int16),
                       ref.scales.view(torch.uint8 if scales.dtype.itemsize == 1 else torch.int16))
    if ref.zeros is not None:
        assert torch.equal(zeros.view(torch.int16), ref.zeros.view(torch.int16))
    assert not flags.any()


def test_scales_round_up_exactly_including_subnormals():
    # Tiny and huge-range groups exercise the FP8 subnormal and normal paths of the rounding.
    x = torch.cat([rand(1, 1, 8, 64, seed=11) * 1e-3, rand(1, 1, 8, 64, seed=12) * 100], dim=2)
    codes, scales, _, _ = tk.quantize(x, x.new_zeros(0, 1, 1, 64), torch.zeros(0, 1, 16, dtype=torch.uint8), 2, 16,
                                      "symmetric_full", torch.float8_e4m3fn)
    ref = group_quantize(x.reshape(1, 16, 64), 2, 16, "symmetric_full", torch.float8_e4m3fn)
    assert torch.equal(scales.view(torch.uint8), ref.scales.view(torch.uint8))
    assert torch.equal(codes, ref.codes)


def test_out_of_range_scale_raises():
    cfg = QVGConfig(stages=0, group_size=32)
    with pytest.raises(ValueError, match="range of the scale dtype"):
        triton_encode(rand(1, 1, 8, 32) * 1000, cfg)


@pytest.mark.parametrize("seq_dim", [2, 1])
def test_encode_matches_reference_end_to_end(seq_dim):
    cfg = QVGConfig(centroids=8, group_size=32, kmeans_iters=2, kmeans_tol=0.0)
    x = rand(2, 40, 3, 64, seed=13) if seq_dim == 1 else rand(2, 3, 40, 64, seed=13)
    seg = triton_encode(x, cfg, seq_dim, "value")
    ref = reference_encode(x, cfg, seq_dim, "value")
    assert torch.equal(seg.assignments, ref.assignments)
    assert torch.allclose(seg.centroids.float(), ref.centroids.float(), rtol=1e-2, atol=1e-2)
    same = (seg.centroids == ref.centroids).all(-1).all(-1)
    assert same.float().mean() > 0.5  # bf16 centroids: most sets round to identical values
    err = (seg.dequantize() - x).norm() / x.norm()
    ref_err = (ref.dequantize() - x).norm() / x.norm()
    assert abs(float(err - ref_err)) < 1e-3 and seg.dequantize().shape == x.shape


def test_encode_warm_start_and_multi_stage_equal_reference_with_given_init():
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, init="given", stages=2, centroid_dtype="fp32")
    x = rand(1, 2, 33, 32, seed=14)
    init = rand(2, 1, 2, 8, 32, seed=15)
    seg = triton_encode(x, cfg, -2, "key", init)
    ref = reference_encode(x, cfg, -2, "key", init)
    assert torch.equal(seg.assignments, ref.assignments)
    assert torch.allclose(seg.centroids, ref.centroids, rtol=1e-5, atol=1e-6)
    assert torch.allclose(seg.dequantize(), ref.dequantize(), atol=1e-5)


def test_ops_cpu_reference_and_opcheck():
    x = rand(1, 2, 30, 32, seed=16)
    c = rand(2, 8, 32, seed=17)
    a = kmeans_assign(x, c)
    assert torch.equal(a.long(), ref_assign(x.reshape(2, 30, 32), c)[0])
    torch.library.opcheck(torch.ops.qvg.kmeans_assign.default, (x, c))
    torch.library.opcheck(torch.ops.qvg.kmeans_update.default, (x, a, c))
    cents = c.unsqueeze(0).half()
    torch.library.opcheck(torch.ops.qvg.quantize_residual.default,
                          (x, cents, a.unsqueeze(0), 2, 16, "asymmetric", torch.float16))
    codes, scales, zeros = quantize_residual(x, cents, a.unsqueeze(0), 2, 16, "symmetric_full", torch.float16)
    assert zeros.shape == (2, 30, 0) and codes.shape == (2, 30, 8)
    assert kmeans_update(x, a, c).shape == c.shape


def test_encode_dispatch_on_cpu_is_the_reference_and_validates():
    cfg = QVGConfig(centroids=8, group_size=32, kmeans_iters=1)
    x = rand(1, 2, 20, 64, seed=18)
    assert torch.equal(encode_qvg(x, cfg).codes, reference_encode(x, cfg).codes)
    with pytest.raises(ValueError, match="centroids"):
        triton_encode(x[:, :, :5], cfg)
    with pytest.raises(ValueError, match="init_centroids"):
        triton_encode(x, cfg.replace(init="given"))
    with pytest.raises(ValueError, match="Triton encoder"):
        triton_encode(x, cfg.replace(key_bits=3))
