"""`QVGCache.save` / `QVGCache.load` (safetensors): exact round trip, views saved as clones,
writes continue after loading, clear errors on foreign files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache.io import write_store

CFG = QVGConfig.preset("qvg").replace(centroids=16)


def filled() -> QVGCache:
    torch.manual_seed(0)
    c = QVGCache.empty((1, 64, 2, 64), 1, CFG, dtype=torch.float32, chunk_tokens=16)
    for s in range(0, 48, 16):
        c[:, s:s + 16] = torch.randn(1, 16, 2, 64)
    return c


def test_round_trip_is_exact_and_writes_continue(tmp_path):
    c = filled()
    path = str(tmp_path / "k.safetensors")
    c.save(path)
    back = QVGCache.load(path)
    assert back.shape == c.shape and back.token_counts() == c.token_counts()
    assert torch.equal(back.dequantize(), c.dequantize())
    new = torch.randn(1, 16, 2, 64)
    back[:, 48:64] = new
    c[:, 48:64] = new
    assert torch.equal(back.dequantize(), c.dequantize())


def test_fp8_centroids_round_trip_exactly(tmp_path):
    torch.manual_seed(1)
    c = QVGCache.empty((1, 64, 2, 64), 1, CFG.replace(centroid_dtype="fp8_e4m3"), dtype=torch.float32,
                       chunk_tokens=16)
    for s in range(0, 48, 16):
        c[:, s:s + 16] = torch.randn(1, 16, 2, 64)
    path = str(tmp_path / "k.safetensors")
    c.save(path)
    back = QVGCache.load(path)
    assert torch.equal(back.dequantize(), c.dequantize())
    with safe_open(path, "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys() if n.startswith("cents")} == {"F8_E4M3"}


def test_a_view_is_saved_as_what_it_shows(tmp_path):
    c = filled()
    path = str(tmp_path / "v.safetensors")
    view = c[:, 8:40].transpose(1, 2)
    view.save(path)
    back = QVGCache.load(path)
    assert back.shape == view.shape and torch.equal(back.dequantize(), view.dequantize())


def test_foreign_files_and_bad_arguments_are_clear_errors(tmp_path):
    path = str(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a QVGCache file"):
        QVGCache.load(path)
    cache = QVGCache.empty((1, 8, 2, 64), 1, CFG, dtype=torch.float32)
    with pytest.raises(TypeError, match="path"):
        cache.save(3)
    with pytest.raises(TypeError, match="StoreSpec"):
        write_store(path, "spec", [], cache._view)


def test_a_sealed_session_saves_loads_and_resumes(tmp_path):
    """Pause an interactive session: `seal` (dense rows freed), save, load, write the next chunk."""
    cache = QVGCache.empty((1, 96, 2, 64), 1, CFG, dtype=torch.float32, chunk_tokens=16)
    x = torch.randn(1, 96, 2, 64, generator=torch.Generator().manual_seed(21))
    for s in range(0, 48, 16):
        cache[:, s:s + 16] = x[:, s:s + 16]
    cache.seal()
    sealed = cache.dequantize()
    cache.save(str(tmp_path / "session.safetensors"))
    resumed = QVGCache.load(str(tmp_path / "session.safetensors"))
    assert resumed.token_counts() == {"sealed": 48, "dense": 0, "holes": 48, "segments": 2}
    assert torch.equal(resumed.dequantize(), sealed)
    resumed[:, 48:64] = x[:, 48:64]
    assert resumed.spec.slot_tokens == 16 and resumed.token_counts()["dense"] == 16
    out = resumed.dequantize()
    assert torch.equal(out[:, :48], sealed[:, :48]) and torch.equal(out[:, 48:64], x[:, 48:64])
