"""Per-layer K/V error of each cache method on the dense rollout's K/V."""

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.cache import QVGCache
from qvg_compile.tiny.kv_error import layer_errors


def reference(layers: int = 2, chunks: int = 3, chunk: int = 64) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{n: torch.randn(1, chunks * chunk, 2, 64, generator=gen) for n in "kv"} for _ in range(layers)]


def test_cache_and_simulated_rtn_agree_and_finer_groups_err_less():
    ref = reference()
    cached = layer_errors(ref, QVGConfig.preset("rtn"), 64)
    simulated = layer_errors(ref, QVGConfig.preset("rtn"), 64, simulated=True)
    assert [r["layer"] for r in cached] == [0, 1]
    for a, b in zip(cached, simulated):
        assert a["k_rel_mse"] == pytest.approx(b["k_rel_mse"], rel=1e-3)
        assert 0.05 < a["v_rel_mse"] < 0.3
    fine = layer_errors(ref, QVGConfig.preset("rtn", group_size=16), 64)
    assert all(f["k_rel_mse"] < c["k_rel_mse"] for f, c in zip(fine, cached))
    kivi = layer_errors(ref, QVGConfig.preset("kivi", residual_window=0), 64, simulated=True)
    assert all(0 < r["k_rel_mse"] < 0.5 for r in kivi)


def test_inputs_are_checked():
    with pytest.raises(TypeError, match="config"):
        layer_errors(reference(), "rtn", 64)
    with pytest.raises(ValueError, match="chunk_tokens"):
        layer_errors(reference(), QVGConfig.preset("rtn"), 0)
    ref = reference(1)
    ref[0]["k"] = QVGCache.from_dense(ref[0]["k"], 1, QVGConfig.preset("rtn"))
    with pytest.raises(TypeError, match="dense"):
        layer_errors(ref, QVGConfig.preset("rtn"), 64)
