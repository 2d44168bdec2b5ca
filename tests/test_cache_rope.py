"""cache/rope.py: the canonical rotation (both layouts, in fp32 or the input dtype), the in-place
row rotation the reads use, ``qvg::rope`` on dense tensors, and bad arguments."""

import pytest
import torch

from qvg_compile.cache.rope import RopeSpec, apply, rotate_channels, rotate_rows_


def _tables(n: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ang = torch.rand(n, d // 2, generator=gen) * 6
    return torch.cos(ang).repeat_interleave(2, -1), torch.sin(ang).repeat_interleave(2, -1)


def test_pairs_layout_rotates_each_channel_pair_like_complex_multiplication():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cos, sin = _tables(5, 8)
    got = apply(x, cos.double(), sin.double(), RopeSpec("pairs", "float64"))
    as_complex = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    turn = torch.polar(torch.ones(5, 4, dtype=torch.float64), torch.atan2(sin[:, ::2], cos[:, ::2]).double())
    want = torch.view_as_real(as_complex * turn).flatten(-2)
    assert torch.allclose(got, want, atol=1e-6)  # the fp32 tables are unit length to ~1e-7


def test_halves_layout_is_rotate_half():
    x = torch.randn(4, 6)
    assert torch.equal(rotate_channels(x, "halves"), torch.cat([-x[:, 3:], x[:, :3]], -1))
    cos, sin = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(apply(x, cos, sin, RopeSpec("halves", "float32")),
                          x * cos + torch.cat([-x[:, 3:], x[:, :3]], -1) * sin)


def test_result_keeps_the_input_dtype_and_computes_in_the_spec_dtype():
    x = torch.randn(3, 7, 16).to(torch.bfloat16)
    cos, sin = _tables(7, 16)
    out = apply(x, cos, sin, RopeSpec("pairs", "float32"))
    assert out.dtype == torch.bfloat16
    ref = (x.float() * cos + rotate_channels(x.float(), "pairs") * sin).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_rotate_rows_in_place_in_blocks_equals_apply(monkeypatch):
    monkeypatch.setattr("qvg_compile.cache.rope.ROTATE_BLOCK_ROWS", 6)  # 3 rows of 2 heads per step
    rows = torch.randn(1, 2, 11, 8)
    cos, sin = _tables(11, 8, seed=1)
    spec = RopeSpec("pairs", "float32")
    want = apply(rows, cos, sin, spec)
    assert rotate_rows_(rows, cos, sin, spec) is rows
    assert torch.equal(rows, want)


def test_rope_op_on_dense_tensors_is_apply():
    x = torch.randn(2, 2, 5, 8)
    cos, sin = _tables(5, 8)
    out = torch.ops.qvg.rope(x, cos, sin, "pairs", "float32")
    assert torch.equal(out, apply(x, cos, sin, RopeSpec("pairs", "float32"))) and out.is_contiguous()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="layout"):
        RopeSpec("spiral", "float32")
    with pytest.raises(ValueError, match="compute"):
        RopeSpec("pairs", "float33")
    with pytest.raises(ValueError, match="even last dim"):
        rotate_channels(torch.zeros(2, 3), "pairs")
    with pytest.raises(ValueError, match="tables"):
        rotate_rows_(torch.zeros(1, 4, 8), torch.zeros(3, 8), torch.zeros(3, 8), RopeSpec("pairs", "float32"))
