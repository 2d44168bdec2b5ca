"""`compress` (tensors, containers, modules; in place where mutable), `seal` and `memory_report`."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache.api import role_of

CFG = QVGConfig.preset("qvg").replace(centroids=16)


def kv(seed: int, n: int = 48) -> torch.Tensor:
    x = torch.zeros(1, 64, 2, 64)
    x[:, :n] = torch.randn(1, n, 2, 64, generator=torch.Generator().manual_seed(seed))
    return x


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("k_cache", kv(0))
        self.cache = {"k": kv(1), "v": kv(2)}
        self.index = torch.zeros(1, dtype=torch.long)


def test_compress_converts_containers_in_place_and_picks_roles_by_name():
    caches = [{"k": kv(0), "v": kv(1)}, {"k": kv(2), "v": kv(3)}]
    same = qvg_compile.compress(caches, CFG, seq_dim=1, chunk_tokens=16)
    assert same is caches
    assert all(isinstance(t, QVGCache) for layer in caches for t in layer.values())
    assert caches[0]["v"].spec.roles == ("value",) and caches[0]["k"].spec.roles == ("key",)
    assert caches[0]["k"].token_counts()["dense"] == 16  # the last chunk stays dense


def test_compress_tuples_namedtuples_and_modules():
    Pair = namedtuple("Pair", "k v")
    out = qvg_compile.compress(Pair(kv(0), kv(1)), CFG, seq_dim=1)
    assert isinstance(out, Pair) and isinstance(out.v, QVGCache) and out.v.spec.roles == ("value",)
    layer = Layer()
    qvg_compile.compress(layer, CFG, seq_dim=1)
    assert isinstance(layer.k_cache, QVGCache) and isinstance(layer.cache["v"], QVGCache)
    assert not isinstance(layer.proj.weight, QVGCache) and not isinstance(layer.index, QVGCache)
    picked = qvg_compile.compress({"a": kv(0), "b": kv(1)}, CFG, seq_dim=1, select=lambda path, t: "a" in path)
    assert isinstance(picked["a"], QVGCache) and not isinstance(picked["b"], QVGCache)


def test_compress_rejects_unknown_options():
    with pytest.raises(TypeError, match="unknown cache options"):
        qvg_compile.compress(kv(0), CFG, seq_dim=1, chunk=16)


def test_memory_report_counts_shared_stores_once():
    caches = qvg_compile.compress({"k": kv(0), "v": kv(1)}, CFG, seq_dim=1)
    dense = 2 * 64 * 2 * 64 * 4
    report = qvg_compile.memory_report(caches)
    assert report["dense_bytes"] == dense
    assert report["held_bytes"] == caches["k"].nbytes() + caches["v"].nbytes()
    assert report["compression"] == pytest.approx(dense / report["held_bytes"])
    assert "total" in report["table"] and "QVG" in report["table"]
    views = {"a": caches["k"], "b": caches["k"][:, :8]}
    assert qvg_compile.memory_report(views)["held_bytes"] == caches["k"].nbytes()


def test_seal_quantizes_every_store_once_and_frees_the_dense_chunks():
    caches = [{"k": kv(0), "v": kv(1)}, {"k": kv(2), "v": kv(3)}]
    qvg_compile.compress(caches, CFG, seq_dim=1, chunk_tokens=16)
    before = qvg_compile.memory_report(caches)["held_bytes"]
    views = [caches, caches[0]["k"][:, :8]]  # a view of a store already in caches
    stores = [cache for layer in caches for cache in layer.values()]
    dense = [kv(i) for i in range(4)]
    older = [cache[:, :32].dequantize() for cache in stores]
    assert qvg_compile.seal(views) == 4
    after = qvg_compile.memory_report(caches)["held_bytes"]
    assert after < before
    for cache, x, old in zip(stores, dense, older):
        assert cache.token_counts() == {"sealed": 48, "dense": 0, "holes": 16, "segments": 2}
        out = cache.dequantize()
        torch.testing.assert_close(out[:, :32], old, rtol=0, atol=0)  # sealed tokens untouched
        # the chunk that was dense is now quantized: 2-bit error on Gaussian data, measured 0.51 and
        # 0.54 for keys (three-level codes: Gaussian data has no outlier channel to need them),
        # 0.28 and 0.26 for values (four levels)
        err = (out[:, 32:48] - x[:, 32:48]).pow(2).mean() / x[:, 32:48].pow(2).mean()
        low, high = (0.4, 0.65) if cache._handle.spec.roles == ("key",) else (0.2, 0.35)
        assert low < err < high
    with pytest.raises(TypeError, match="release"):
        qvg_compile.seal(caches, release="yes")


@pytest.mark.parametrize("path,role", [("['v']", "value"), (".value_cache[3]", "value"), ("['v_vision']", "value"),
                                       ("['v_txt']", "value"), ("['cache_v']", "value"), ("['k_vision']", "key"),
                                       ("['kv']", "key"), (".key_cache[0]", "key"), ("['value_txt']", "value")])
def test_role_follows_the_last_name(path, role):
    assert role_of(path) == role


def test_an_unnamed_pair_is_a_key_and_a_value():
    layers = [(kv(0), kv(1)), (kv(2), kv(3))]
    layers = qvg_compile.compress(layers, QVGConfig.preset("qvg"), seq_dim=1, chunk_tokens=16)
    roles = [(k._handle.spec.roles, v._handle.spec.roles) for k, v in layers]
    assert roles == [(("key",), ("value",))] * 2
