"""Triton encode kernels (interpreter, CPU) against the math layer, and the ``qvg::`` encode ops."""

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.kernels import _triton_encode as tk
from qvg_compile.kernels.encode import (_encode_all, encode_qvg, kmeans_assign, kmeans_update, quantize_residual, triton_encode,
                                       triton_encode_many)
from qvg_compile.quant.lloyd import assign as ref_assign
from qvg_compile.quant.lloyd import update as ref_update
from qvg_compile.quant.group import group_quantize
from qvg_compile.quant.qvg import encode_qvg as reference_encode
from qvg_compile.quant.segment import gather_centroids, residual_energy
from interpreter import INTERPRETER_ONLY

pytestmark = INTERPRETER_ONLY


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
    dict(centroid_dtype="fp8_e4m3"),
    dict(stages=2, group_size=16, centroid_dtype="fp8_e4m3"),
]


@pytest.mark.parametrize("changes", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_quantize_is_bit_exact_for_given_centroids(changes):
    cfg = QVGConfig(centroids=8, group_size=32, kmeans_iters=1).replace(**changes)
    x = rand(1, 2, 45, 64, seed=8) * 3
    s = cfg.stages
    cents = rand(max(s, 1), 2, 8, 64, seed=9)[:s].to(cfg.torch_centroid_dtype)
    assign = torch.randint(0, 8, (s, 2, 45), generator=torch.Generator().manual_seed(10)).to(torch.uint8)
    codes, scales, zeros, flags, energy = tk.quantize(x, cents, assign, cfg.key_bits, cfg.group_size,
                                                      cfg.code_mode, cfg.torch_scale_dtype)
    r = x.reshape(2, 45, 64).clone()
    for i in range(s):
        r -= gather_centroids(cents[i], assign[i])
    ref = group_quantize(r, cfg.key_bits, cfg.group_size, cfg.code_mode, cfg.torch_scale_dtype)
    assert torch.equal(codes, ref.codes)
    assert torch.equal(scales.view(torch.uint8 if scales.dtype.itemsize == 1 else torch.int16),
                       ref.scales.view(torch.uint8 if scales.dtype.itemsize == 1 else torch.int16))
    if ref.zeros is not None:
        assert torch.equal(zeros.view(torch.int16), ref.zeros.view(torch.int16))
    assert not flags.any() and flags.shape == (2, 2)  # 45 tokens: 2 blocks of 32
    # Per block: the residual's and x's energy (the fit's parts).
    blocks = torch.nn.functional.pad(r, (0, 0, 0, 19)).reshape(2, 2, 32, 64)
    xb = torch.nn.functional.pad(x.reshape(2, 45, 64), (0, 0, 0, 19)).reshape(2, 2, 32, 64)
    torch.testing.assert_close(energy, torch.stack([blocks.square().sum((2, 3)), xb.square().sum((2, 3))], -1),
                               rtol=1e-5, atol=1e-6)


def test_close_gives_each_parts_fit_and_the_summary():
    # Two parts of 3 sets x 5 blocks; the fit is each part's residual energy over its x energy.
    energy = torch.rand(6, 5, 2, generator=torch.Generator().manual_seed(40)) + 0.1
    flags = torch.zeros(6, 5, dtype=torch.int8)
    fits, summary = tk.close(flags, energy, 2)
    want = energy.view(2, 15, 2).sum(1)
    torch.testing.assert_close(fits, want[:, 0] / want[:, 1], rtol=1e-6, atol=0)
    assert summary.tolist() == [0, 0]
    flags[4, 3] = tk.FLAG_NONFINITE.value
    assert tk.close(flags, energy, 2)[1].tolist() == [0, 1]
    flags[0, 0] = tk.FLAG_RANGE.value
    assert tk.close(flags, energy, 2)[1].tolist() == [1, 1]
    assert float(tk.close(flags, torch.zeros(6, 5, 2), 1)[0][0]) == 0.0  # no energy: 0, not NaN
    with pytest.raises(ValueError, match="divisible by parts=4"):
        tk.close(flags, energy, 4)


def test_scales_round_up_exactly_including_subnormals():
    # Tiny and huge-range groups exercise the FP8 subnormal and normal paths of the rounding.
    x = torch.cat([rand(1, 1, 8, 64, seed=11) * 1e-3, rand(1, 1, 8, 64, seed=12) * 100], dim=2)
    codes, scales, _, _, _ = tk.quantize(x, x.new_zeros(0, 1, 1, 64), torch.zeros(0, 1, 16, dtype=torch.uint8), 2,
                                         16, "symmetric_full", torch.float8_e4m3fn)
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


class _PoisonedTorch:
    """``torch`` for the kernel module, whose fresh buffers are full of NaN / all-ones bytes, so
    an element a kernel forgets to write shows up as a mismatch."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, **kw):
        t = torch.empty(*size, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    @staticmethod
    def empty_like(t, **kw):
        out = torch.empty_like(t, **kw)
        return out.fill_(float("nan") if out.is_floating_point() else -1)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(tk, "torch", _PoisonedTorch())


def clustered(sets, n, d, c, seed, dtype=torch.float32, spread=0.05):
    """Tokens near ``c`` well separated centres per set, so every nearest centroid is unambiguous
    even in 16 bits. Returns (x [sets, n, d], centres [sets, c, d] fp32)."""
    centres = rand(sets, c, d, seed=seed) * 2
    idx = torch.randint(0, c, (sets, n), generator=torch.Generator().manual_seed(seed + 1))
    x = torch.gather(centres, 1, idx.unsqueeze(-1).expand(sets, n, d)) + spread * rand(sets, n, d, seed=seed + 2)
    return x.to(dtype), centres


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused", [True, False])
def test_lloyd_step_on_two_strided_inputs_matches_reference(dtype, fused, poisoned):
    # K and V as BSHD views ([1, 45, 2, 32] -> [1, 2, 45, 32]); 45 tokens in 3 ranges of 32-token
    # tiles; 12 centroids padded to 16 (the padding must never win).
    x, centres = clustered(4, 45, 32, 12, seed=20, dtype=dtype)
    k = x[:2].permute(1, 0, 2).unsqueeze(0).contiguous().transpose(1, 2)
    v = x[2:].permute(1, 0, 2).unsqueeze(0).contiguous().transpose(1, 2)
    cent = centres + 0.1 * rand(4, 12, 32, seed=23)
    book, cnorm = tk.codebook_buffers(4, 12, 32, dtype, torch.device("cpu"))
    tk.finish(None, None, cent, book, cnorm)
    new = tk.lloyd_step([k, v], cent, book, cnorm, fused=fused, splits=3)
    a, _ = ref_assign(x.float(), cent.to(dtype).float())
    ref = ref_update(x.float(), a, cent)
    assert torch.allclose(new, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(book[:, :12], new.to(dtype)) and torch.isinf(cnorm[:, 12:]).all()
    assert torch.allclose(cnorm[:, :12], new.to(dtype).float().pow(2).sum(-1), rtol=1e-6)
    tk.finish(None, None, cent, book, cnorm)
    assert torch.equal(new, tk.lloyd_step([k, v], cent, book, cnorm, fused=fused, splits=3))  # deterministic


def test_fused_and_separate_lloyd_steps_agree_and_stopped_parts_keep_centroids():
    # Two inputs (parts) of 2 sets; 20 centroids: blocks of 32 rows of the finish kernel span sets
    # and parts, so the per-row path of the move's atomic max runs too.
    x, centres = clustered(4, 70, 32, 20, seed=24)
    xs = [x[:2].unsqueeze(0), x[2:].unsqueeze(0)]
    cent = centres + 0.2 * rand(4, 20, 32, seed=25)
    threshold = torch.tensor([0.5, 0.5])
    outs, moves = [], []
    for fused in (True, False):
        book, cnorm = tk.codebook_buffers(4, 20, 32, torch.float32, torch.device("cpu"))
        tk.finish(None, None, cent, book, cnorm)
        # Iteration 1 after an iteration 0 in which part 1 moved less than its threshold.
        shifts = torch.tensor([[9.0, 0.25], [0.0, 0.0]])
        outs.append(tk.lloyd_step(xs, cent, book, cnorm, tk.EarlyStop(shifts, threshold, 1), fused))
        moves.append(shifts[1])
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(outs[0][2:], cent[2:]) and not torch.equal(outs[0][:2], cent[:2])
    want = (outs[0] - cent).norm(dim=-1).view(2, -1).amax(-1)
    for got in moves:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert float(want[1]) == 0.0


def test_assign_with_a_streamed_codebook_and_update_with_cluster_blocks(monkeypatch):
    # Force the paths of large codebooks: codebook blocks per tile, sums per block of clusters.
    monkeypatch.setattr(tk, "RESIDENT_BOOK_BYTES", 0)
    monkeypatch.setattr(tk, "MAX_SUM_ELEMENTS", 16 * 32)
    x = rand(1, 2, 37, 32, seed=26)
    c = rand(2, 100, 32, seed=27)  # 100 centroids: 2 blocks of 64 with padding
    a = tk.assign(x, c)
    assert torch.equal(a.long(), ref_assign(x.reshape(2, 37, 32), c)[0])
    assert not tk.fused_step_supported([x], 100)
    new = tk.update(x, a, c, splits=2)
    assert torch.allclose(new, ref_update(x.reshape(2, 37, 32), a.long(), c), rtol=1e-5, atol=1e-6)


def test_check_sets_and_splits():
    x = rand(1, 2, 40, 32)
    with pytest.raises(ValueError, match="strides"):
        tk.check_sets([x, x.transpose(1, 2).contiguous().transpose(1, 2)])
    with pytest.raises(ValueError, match="one or two"):
        tk.check_sets([x, x, x])
    assert tk.check_sets([x, x]) == (4, 40, 32)
    assert tk.choose_splits(100, 32, 4, torch.device("cpu")) == 2


SEG_FIELDS = ("codes", "scales", "zeros", "assignments", "centroids")


def assert_same_segment(a, b):
    for f in SEG_FIELDS:
        ta, tb = getattr(a, f), getattr(b, f)
        if ta is None:
            assert tb is None
            continue
        if ta.dtype == torch.float8_e4m3fn:
            ta, tb = ta.view(torch.uint8), tb.view(torch.uint8)
        assert torch.equal(ta, tb), f
    assert a.shape == b.shape and a.bits == b.bits and a.seq_dim == b.seq_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pair_encode_equals_two_encodes(dtype, poisoned):
    # Two stages (the second on the fp32 residual of both), early stopping on, different bits
    # for keys and values, BSHD inputs: one launch per kernel for both, same bits as one each.
    cfg = QVGConfig(centroids=8, group_size=16, stages=2, kmeans_iters=3, kmeans_tol=1e-3, key_bits=2,
                    value_bits=4, code_mode="asymmetric", scale_dtype="fp16")
    k = rand(1, 41, 2, 32, seed=28).to(dtype)
    v = rand(1, 41, 2, 32, seed=29).to(dtype) * 2
    ks, vs = triton_encode_many([k, v], cfg, 1, ["key", "value"])
    assert_same_segment(ks, triton_encode(k, cfg, 1, "key"))
    assert_same_segment(vs, triton_encode(v, cfg, 1, "value"))
    assert ks.codes.untyped_storage().data_ptr() != vs.codes.untyped_storage().data_ptr()
    assert ks.centroids.untyped_storage().data_ptr() != vs.centroids.untyped_storage().data_ptr()
    err = (vs.dequantize().float() - v.float()).norm() / v.float().norm()
    assert err < 0.1


def test_early_stop_without_sync_equals_reference():
    # Clustered data converges in a few iterations: the reference stops, the kernels freeze.
    cfg = QVGConfig(centroids=6, group_size=32, kmeans_iters=8, kmeans_tol=1e-3, centroid_dtype="fp32")
    x, _ = clustered(2, 60, 32, 6, seed=30, spread=0.02)
    x = x.unsqueeze(0)
    from qvg_compile.quant.lloyd import init_centroids, kmeans

    km = kmeans(x[0], 6, 8, 1e-3, centroids=init_centroids(x[0], 6, "random", 0))
    assert km.iterations < 8  # the test is about stopping early
    seg = triton_encode(x, cfg)
    ref = reference_encode(x, cfg)
    assert torch.equal(seg.assignments, ref.assignments)
    assert torch.allclose(seg.centroids, ref.centroids, rtol=1e-5, atol=1e-6)


def test_non_finite_input_is_caught_by_the_quantizer_flags():
    # No k-means stage: the interpreter's arg-min refuses all-NaN columns (the GPU does not).
    cfg = QVGConfig(stages=0, group_size=32)
    x = rand(1, 2, 20, 32, seed=31)
    x[0, 1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        triton_encode(x, cfg)
    x[0, 1, 7, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        triton_encode(x, cfg)
    seg = triton_encode(x, cfg.replace(check_finite=False))  # the policy is off: no range error either
    assert seg.codes.shape == (1, 2, 20, 8)


def test_encode_fits_are_each_inputs_residual_energy():
    cfg = QVGConfig(centroids=8, group_size=32, kmeans_iters=2)
    k, v = rand(1, 2, 45, 64, seed=41), rand(1, 2, 45, 64, seed=42) * 3
    segs, summary, fits = _encode_all([k, v], cfg, -2, ["key", "value"], [None, None], None)
    assert summary.tolist() == [0, 0] and len(fits) == 2
    for x, seg, fit in zip((k, v), segs, fits):
        assert fit.shape == () and abs(float(fit) - float(residual_energy(x, seg))) <= 1e-5 * float(fit)


def test_encode_with_fp8_centroids_quantizes_against_the_stored_centroids():
    """FP8 centroids: the kernels round the fitted centroids as the reference does and take the
    residual against the rounded ones (handed to the quantizer as uint8 codes)."""
    cfg = QVGConfig(centroids=8, group_size=32, kmeans_iters=2, kmeans_tol=0.0, centroid_dtype="fp8_e4m3")
    x = rand(2, 3, 40, 64, seed=16)
    seg = triton_encode(x, cfg, 2, "key")
    ref = reference_encode(x, cfg, 2, "key")
    assert seg.centroids.dtype == ref.centroids.dtype == torch.float8_e4m3fn
    assert torch.equal(seg.assignments, ref.assignments)
    same = (seg.centroids.view(torch.uint8) == ref.centroids.view(torch.uint8)).all(-1).all(-1)
    assert same.float().mean() > 0.5  # fp32 sums in another order: most sets round identically
    err = (seg.dequantize() - x).norm() / x.norm()
    ref_err = (ref.dequantize() - x).norm() / x.norm()
    assert abs(float(err - ref_err)) < 1e-3
