"""`kernels.launch.Prebound`: a launch with fixed arguments computes what Triton's own launch
computes, call after call; `prepare` (Triton's warmup) never launches; bad grids are refused.
Under ``TRITON_INTERPRET=1`` every launch goes through Triton (there is no compiled kernel)."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from qvg_compile.kernels.launch import Prebound, address

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs the Triton interpreter or CUDA")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@triton.jit
def _add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


def test_a_prebound_launch_repeats_the_launch_it_binds():
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    out = torch.zeros_like(x)
    launch = Prebound(_add_one, (4,), (x, out, 100), {"BLOCK": 32})
    for _ in range(3):
        launch()
        assert torch.equal(out, x + 1)
        x.add_(1)  # the same pointers see new values: the arguments are bound, not the data


def test_prepare_does_not_launch():
    x = torch.ones(64, dtype=torch.float32, device=DEVICE)
    out = torch.zeros_like(x)
    launch = Prebound(_add_one, (2,), (x, out, 64), {"BLOCK": 32})
    launch.prepare()
    assert not out.any()
    launch()
    assert torch.equal(out, x + 1)


@pytest.mark.parametrize("grid", [(), (1, 2, 3, 4), (-1,), (1.5,)])
def test_a_bad_grid_is_a_clear_error(grid):
    with pytest.raises(ValueError, match="grid"):
        Prebound(_add_one, grid, (), {})


def test_only_cuda_tensors_become_addresses():
    cpu = torch.zeros(3)
    assert address(cpu) is cpu
    assert address(7) == 7 and address(None) is None and address(1.5) == 1.5
    if torch.cuda.is_available():
        x = torch.zeros(3, device="cuda")
        assert address(x) == x.data_ptr()
