import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvg_compile.quant.group import (CODE_MODES, error_bound, group_dequantize, group_quantize,
                                     round_to_storage)

SCALE_DTYPES = [torch.float8_e4m3fn, torch.float16]


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), mode=st.sampled_from(CODE_MODES),
       sdtype=st.sampled_from(SCALE_DTYPES), group=st.sampled_from([8, 16, 32]),
       magnitude=st.floats(1e-2, 50.0), seed=st.integers(0, 2**31 - 1))
def test_error_within_analytic_bound(bits, mode, sdtype, group, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 64, generator=gen) * magnitude + torch.randn(3, 5, 1, generator=gen)
    g = group_quantize(x, bits, group, mode, sdtype)
    y = group_dequantize(g, bits, group, mode)
    bound = error_bound(g.scales, group)
    # fp32 arithmetic in the decode adds at most a few ulps of |x|.
    assert ((x - y).abs() <= bound + 4e-7 * x.abs() + 1e-12).all()


@pytest.mark.parametrize("sdtype", SCALE_DTYPES)
@pytest.mark.parametrize("up", [True, False])
def test_round_to_storage_is_directed_and_tight(sdtype, up):
    x = torch.cat([torch.randn(2000) * 3, torch.tensor([0.0, 1e-5, -1e-5, 0.5, -0.5])])
    y = round_to_storage(x, sdtype, up=up).float()
    assert ((y >= x) if up else (y <= x)).all()
    nearest = x.to(sdtype).float()
    # Never more than one representable step from round-to-nearest.
    assert ((y - nearest).abs() <= (nearest.abs() * 2 ** -2 + 2 ** -9)).all()


def test_all_levels_are_used():
    x = torch.linspace(-1, 1, 64).view(1, 64)
    for mode, levels in [("symmetric", 3), ("symmetric_full", 4), ("asymmetric", 4)]:
        from qvg_compile.quant.packing import unpack
        g = group_quantize(x, 2, 64, mode, torch.float16)
        assert unpack(g.codes, 2).unique().numel() == levels


def test_zero_group_decodes_near_zero():
    g = group_quantize(torch.zeros(2, 64), 2, 32, "symmetric", torch.float8_e4m3fn)
    assert torch.equal(group_dequantize(g, 2, 32, "symmetric"), torch.zeros(2, 64))


def test_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        group_quantize(torch.randn(4, 48), 2, 32, "symmetric", torch.float16)
    with pytest.raises(ValueError, match="code_mode"):
        group_quantize(torch.randn(4, 64), 2, 32, "weird", torch.float16)
    with pytest.raises(TypeError, match="floating"):
        group_quantize(torch.ones(4, 64, dtype=torch.int32), 2, 32, "symmetric", torch.float16)
    with pytest.raises(ValueError, match="fp16"):
        group_quantize(torch.full((1, 64), 1e4), 2, 32, "symmetric", torch.float8_e4m3fn)
