import math

import pytest
import torch

from qvg_compile import QVGConfig, quantize
from qvg_compile.quant import KIVISegment, QuaRotSegment
from qvg_compile.quant.hadamard import hadamard


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_hadamard_is_orthonormal_and_self_inverse():
    x = rand(3, 5, 64)
    y = hadamard(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard(y), x, rtol=1e-5, atol=1e-5)
    dense = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h = dense
    for _ in range(5):
        h = torch.kron(h, dense)
    torch.testing.assert_close(y, x @ h / math.sqrt(64), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(rand(2, 48))


def test_rtn_is_per_token_asymmetric():
    x = rand(1, 2, 50, 128, seed=1)
    seg = quantize(x, QVGConfig.preset("rtn"))
    assert seg.zeros is not None and seg.scales.shape == (1, 2, 50, 2) and seg.stages == 0
    err = (seg.dequantize() - x).abs()
    assert (err <= seg.scales.float().repeat_interleave(64, -1) / 2 + 1e-6).all()
    assert seg.bits_per_element == pytest.approx(2.5)


def test_kivi_keys_per_channel_values_per_token_and_window_exact():
    x = rand(1, 2, 300, 64, seed=2)
    cfg = QVGConfig.preset("kivi")
    k = quantize(x, cfg, role="key")
    v = quantize(x, cfg, role="value")
    assert isinstance(k, KIVISegment) and k.per_channel and not v.per_channel
    nq = (300 - 128) // 32 * 32
    assert k.codes.shape == (1, 2, 64, nq * 2 // 8) and k.scales.shape == (1, 2, 64, nq // 32)
    assert v.codes.shape == (1, 2, 300 - 128, 16) and v.scales.shape == (1, 2, 300 - 128, 2)
    assert torch.equal(k.dequantize()[..., nq:, :], x[..., nq:, :])
    assert torch.equal(v.dequantize()[..., 300 - 128:, :], x[..., 300 - 128:, :])
    assert (k.dequantize() - x).abs().max() < 2.0


def test_kivi_short_input_stays_full_precision():
    x = rand(1, 1, 100, 64, seed=3)
    seg = quantize(x, QVGConfig.preset("kivi"), role="key")
    assert seg.codes is None and torch.equal(seg.dequantize(), x)


def test_quarot_rotation_spreads_outliers():
    x = rand(1, 2, 200, 128, seed=4)
    x[..., 7] *= 30
    rot = quantize(x, QVGConfig.preset("quarot"))
    plain = quantize(x, QVGConfig.preset("rtn", group_size=128))
    assert isinstance(rot, QuaRotSegment)
    mse = lambda s: float((s.dequantize() - x).pow(2).mean())
    assert mse(rot) < mse(plain)
    assert rot.bits_per_element == pytest.approx(2.25)


def test_quarot_clip_ratio_changes_codes():
    x = rand(1, 1, 64, 128, seed=5)
    a = quantize(x, QVGConfig.preset("quarot"))
    b = quantize(x, QVGConfig.preset("quarot", clip_ratio=0.8))
    assert not torch.equal(a.scales, b.scales)


def test_baselines_reject_warm_start():
    with pytest.raises(ValueError, match="init_centroids"):
        quantize(rand(1, 1, 64, 64), QVGConfig.preset("kivi"), init_centroids=torch.zeros(1))
