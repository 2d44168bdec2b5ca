"""`qvg_compile.patch`: regional compilation of the modules that compute attention, for a model
whose top level cannot be compiled whole; the caches they keep become QVGCache, outputs equal
the eager model on caches quantized the same way, `undo()` restores every forward."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qvg_compile
from qvg_compile import QVGCache, QVGConfig

CFG = QVGConfig.preset("qvg", centroids=8, kmeans_iters=2, group_size=16)
DIM, HEADS, N, C = 32, 2, 16, 4
TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def attention(q, k, v):
    """A module-level helper: patch must see through it."""
    return F.scaled_dot_product_attention(q, k, v)


class CachedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.register_buffer("k_cache", torch.zeros(1, HEADS, N, DIM // HEADS))
        self.register_buffer("v_cache", torch.zeros(1, HEADS, N, DIM // HEADS))

    def forward(self, x, s: int, e: int):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        self.k_cache[:, :, s:e] = k
        self.v_cache[:, :, s:e] = v
        return attention(q, self.k_cache[:, :, :e], self.v_cache[:, :, :e]).transpose(1, 2).flatten(2)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CachedAttention()
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())

    def forward(self, x, s: int, e: int):
        x = x + self.attn(x, s, e)
        return x + self.mlp(x)


class Pipeline(nn.Module):
    """Its forward keeps Python-side bookkeeping that a whole-model compile would trip on."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.log: list[float] = []

    def forward(self, x, s: int, e: int):
        for block in self.blocks:
            x = block(x, s, e)
        self.log.append(float(x.norm()))
        return x


def make():
    torch.manual_seed(0)
    return Pipeline().eval()


def chunks(n=4):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(1, C, DIM, generator=g), i * C, (i + 1) * C) for i in range(n)]


def test_patch_compiles_attention_regions_equal_eager_and_frees_dense():
    ref = qvg_compile.compress(make(), CFG, seq_dim=2)
    m = make()
    refs = [weakref.ref(b.attn.k_cache) for b in m.blocks]
    handle = qvg_compile.patch(m, config=CFG)
    assert handle.modules == ["blocks.0.attn", "blocks.1.attn"]
    with torch.no_grad():
        for x, s, e in chunks():
            assert (m(x, s, e) - ref(x, s, e)).abs().max() <= TOL
    gc.collect()
    assert all(r() is None for r in refs)
    assert all(isinstance(b.attn.k_cache, QVGCache) and isinstance(b.attn.v_cache, QVGCache) for b in m.blocks)
    report = handle.report
    assert {s.module_path for s in report.sites} == {"k_cache", "v_cache"}  # relative to each region
    assert all(n <= 3 for n in report.compiles_per_frame().values())
    assert len(m.log) == 4  # the un-compiled top level ran its Python bookkeeping


def test_undo_restores_forwards_and_the_model_keeps_working():
    ref = qvg_compile.compress(make(), CFG, seq_dim=2)
    m = make()
    forwards = [b.attn.forward for b in m.blocks]
    handle = qvg_compile.patch(m, config=CFG)
    assert all("forward" in b.attn.__dict__ for b in m.blocks)
    data = chunks()
    with torch.no_grad():
        for x, s, e in data[:2]:
            m(x, s, e), ref(x, s, e)
        handle.undo()
        assert handle.modules == [] and all("forward" not in b.attn.__dict__ for b in m.blocks)
        assert [b.attn.forward for b in m.blocks] == forwards
        for x, s, e in data[2:]:  # eager again, on the caches that stay QVG
            assert (m(x, s, e) - ref(x, s, e)).abs().max() <= TOL
    assert isinstance(m.blocks[0].attn.k_cache, QVGCache)


def test_patch_twice_does_not_compile_twice_and_undo_is_idempotent():
    m = make()
    first = qvg_compile.patch(m, config=CFG)
    second = qvg_compile.patch(m, qvg=first.backend)
    assert second.modules == [] and any("already compiled" in n for n in first.report.notes)
    first.undo()
    first.undo()
    assert all("forward" not in b.attn.__dict__ for b in m.blocks)


def test_model_without_attention_is_left_alone():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = copy.deepcopy(mlp.state_dict())
    handle = qvg_compile.patch(mlp)
    assert handle.modules == [] and "nothing was compiled" in handle.report.summary()
    assert all("forward" not in mod.__dict__ for mod in mlp.modules())
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        qvg_compile.patch("model")
    with pytest.raises(ValueError, match="key_bits"):
        qvg_compile.patch(make(), bits=5)
    with pytest.raises(TypeError, match="qvg"):
        qvg_compile.patch(make(), qvg="qvg")
    with pytest.raises(ValueError, match="either qvg or config"):
        qvg_compile.patch(make(), qvg=qvg_compile.backend(CFG), bits=2)
