"""GPU checks of the encode, decode and attention kernels against the math layer (``pytest -m gpu``
on a CUDA machine; skipped elsewhere), for the presets' per-role code modes: keys and values of
the ``qvg`` preset use different codes, so every kernel here runs with K_MODE != V_MODE."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from qvg_compile import QVGConfig
from qvg_compile.kernels._common import scale_format
from qvg_compile.kernels._jit import load_scale
from qvg_compile.kernels.attention import qvg_attention, reference_attention
from qvg_compile.kernels.decode import dequantize_segment
from qvg_compile.kernels.encode import encode_qvg_pair, encode_unchecked
from qvg_compile.kernels.encode_graph import captured_graphs, encode_replayed, release_graphs
from qvg_compile.quant.qvg import encode_qvg as reference_encode
from qvg_compile.quant.segment import residual_energy
from qvg_compile.quant.packed import PackedStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# The presets (FP8 centroids, decoded by the hardware's conversion here) and the qvg preset with
# the published configuration's BF16 centroids.
CONFIGS = {"qvg": QVGConfig.preset("qvg"), "qvg_pro": QVGConfig.preset("qvg_pro"),
           "qvg_bf16_centroids": QVGConfig.preset("qvg", centroid_dtype="bf16")}
PRESETS = list(CONFIGS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def kv(seed: int, n: int = 4680, h: int = 4, d: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = torch.randn(1, h, n, d, generator=gen) + 4 * torch.randn(1, h, 1, d, generator=gen)
    k[..., :4] *= 8  # outlier channels on keys
    v = torch.randn(1, h, n, d, generator=gen)
    return k.cuda(), v.cuda()


@pytest.mark.parametrize("preset", PRESETS)
def test_pair_encode_on_cuda_matches_reference_error(preset):
    cfg = CONFIGS[preset]
    k, v = kv(0)
    ks, vs = encode_qvg_pair(k, v, cfg)
    assert ks.code_mode == cfg.code_mode_for("key") and vs.code_mode == cfg.code_mode_for("value")
    for seg, x, role in ((ks, k, "key"), (vs, v, "value")):
        ref = reference_encode(x.cpu(), cfg, -2, role)
        got_err, ref_err = rel(seg.dequantize().cpu(), x.cpu()), rel(ref.dequantize(), x.cpu())
        # Same algorithm, k-means on tensor cores vs fp32 on the CPU: errors within 5% of each other.
        assert abs(got_err - ref_err) <= 0.05 * ref_err, (role, got_err, ref_err)


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_kernel_equals_reference_decode_on_cuda(preset):
    cfg = CONFIGS[preset]
    k, v = kv(1)
    for seg in encode_qvg_pair(k, v, cfg):
        got = dequantize_segment(seg, torch.float32)
        ref = seg.dequantize().float()
        assert rel(got, ref) <= 1e-6


def store_of(segs) -> PackedStore:
    cat = lambda name: torch.cat([getattr(g, name) for g in segs], dim=-2)
    return PackedStore(cat("codes"), cat("scales"), None if segs[0].zeros is None else cat("zeros"),
                       torch.cat([g.assignments for g in segs], dim=-1), torch.stack([g.centroids for g in segs]),
                       torch.cat([torch.full((g.codes.shape[-2],), i, dtype=torch.int32, device="cuda")
                                  for i, g in enumerate(segs)]),
                       segs[0].bits, segs[0].group_size, segs[0].code_mode)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_fused_attention_on_cuda_matches_reference(preset, dtype, tol):
    cfg = CONFIGS[preset]
    pairs = [encode_qvg_pair(*kv(s, n=1560), cfg) for s in (2, 3)]
    ks, vs = store_of([p[0] for p in pairs]), store_of([p[1] for p in pairs])
    gen = torch.Generator(device="cpu").manual_seed(4)
    q = torch.randn(1, 8, 300, 128, generator=gen).cuda().to(dtype)
    tk = torch.randn(1, 4, 50, 128, generator=gen).cuda().to(dtype)
    tv = torch.randn(1, 4, 50, 128, generator=gen).cuda().to(dtype)
    ranges = [(0, 1000), (1200, 3120)]
    got = qvg_attention(q, ks, vs, ranges, tk, tv)
    ref = reference_attention(q.float(), ks, vs, ranges, tk.float(), tv.float())
    assert rel(got, ref) <= tol


def test_replayed_encode_equals_eager_encode_on_cuda():
    release_graphs()
    cfg = QVGConfig.preset("qvg")
    init = kv(5, n=1560)[0][..., :256, :].unsqueeze(0).contiguous()
    for seed in (6, 7, 8, 9):
        x = kv(seed, n=1560)[0]
        got, got_summary, energy = encode_replayed(x, cfg, "key", init, fit=True)
        got = [t.clone() for t in (got.codes, got.scales, got.assignments, got.centroids, energy)]
        ref, ref_summary, ref_energy = encode_unchecked(x, cfg, -2, "key", init, fit=True)
        for a, b in zip(got, (ref.codes, ref.scales, ref.assignments, ref.centroids, ref_energy)):
            assert torch.equal(a, b)
        assert got_summary.tolist() == ref_summary.tolist() == [0, 0]
        # The kernel sums the fit in its own order: within fp32 summation error of the ATen form.
        assert abs(float(energy) - float(residual_energy(x, ref))) <= 1e-5 * float(energy)
    assert captured_graphs() == 1  # first call eager, second captures, the rest replay


@triton.jit
def _scales_kernel(codes, out, FORMAT: tl.constexpr):
    i = tl.arange(0, 256)
    tl.store(out + i, load_scale(codes + i, i < 256, FORMAT))


def test_hardware_fp8_scale_decode_equals_the_integer_decode():
    """Every finite FP8 E4M3 scale code decodes to the same fp32 by the hardware conversion the
    kernels use on the GPU (``SCALE_FP8=2``) as by the integer decode the interpreter runs (1),
    and to what PyTorch's float8_e4m3fn gives; `scale_format` picks the hardware path here."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).cuda()
    finite = torch.isfinite(codes.view(torch.float8_e4m3fn).float())
    out = {f: torch.empty(256, dtype=torch.float32, device="cuda") for f in (1, 2)}
    for f, o in out.items():
        _scales_kernel[(1,)](codes, o, FORMAT=f)
    assert torch.equal(out[1][finite], out[2][finite])
    assert torch.equal(out[2][finite], codes.view(torch.float8_e4m3fn).float()[finite])
    assert scale_format(codes.view(torch.float8_e4m3fn)) == 2 and finite.sum() == 254
