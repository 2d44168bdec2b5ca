"""`encode_replayed` on the CPU (no graph: the eager encode) and its settings. The capture and
replay themselves run in the GPU suite (`tests/test_gpu_kernels.py`)."""

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.kernels.encode import encode_unchecked
from qvg_compile.kernels.encode_graph import captured_graphs, encode_replayed, graphs_enabled, release_graphs
from qvg_compile.quant.segment import residual_energy

CFG = QVGConfig(centroids=8, group_size=16, kmeans_iters=2)


def test_cpu_encode_is_the_eager_encode_and_captures_nothing():
    x = torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(0))
    release_graphs()
    for _ in range(3):
        seg, summary, energy = encode_replayed(x, CFG, "key", None, fit=True)
    ref, ref_summary, _ = encode_unchecked(x, CFG, -2, "key", None)
    assert torch.equal(seg.codes, ref.codes) and torch.equal(seg.scales, ref.scales)
    assert summary.tolist() == ref_summary.tolist() == [0, 0]
    assert float(energy) == float(residual_energy(x, ref))
    assert encode_replayed(x, CFG, "key", None)[2] is None
    assert captured_graphs() == 0


def test_cpu_refusal_raises_at_once():
    x = torch.randn(1, 1, 40, 32)
    x[0, 0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode_replayed(x, CFG, "key", None)


def test_env_switch_is_validated(monkeypatch):
    monkeypatch.setenv("QVG_SEAL_GRAPHS", "0")
    assert not graphs_enabled()
    monkeypatch.setenv("QVG_SEAL_GRAPHS", "yes")
    with pytest.raises(ValueError, match="QVG_SEAL_GRAPHS"):
        graphs_enabled()


def test_x_must_be_a_tensor():
    with pytest.raises(TypeError, match="x: expected a tensor"):
        encode_replayed([1.0], CFG, "key", None)
