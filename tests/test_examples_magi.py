"""MAGI-1 reference model (examples/models/magi.py): the staggered schedule, eager shapes and
determinism, and the QVG backend on it: each layer's lazily allocated packed K|V buffer is found
and moved into QVGCache, the compiled loop equals the eager loop run on caches compressed the
same way (max abs diff <= 1e-5, fp32), and the steady-state cost of a cached token is >= 6.5x
below BF16."""


import pytest
import torch

import qvg_compile
from qvg_compile import QVGCache

from example_models import CFG, TOL, seeded, steady_state_ratio
from examples.models import magi as mg


def make(**overrides):
    return seeded(mg.MagiModel, mg.tiny_config(**overrides))


def compress(params):
    # K and V packed along the channels: the layout is the caller's to state.
    qvg_compile.compress(params.key_value_memory_dict, CFG, seq_dim=1, roles=("key", "value"))


@pytest.fixture(scope="module")
def compiled_run():
    torch._dynamo.reset()
    m = make()
    cap = 3 * m.config.chunk_tokens
    expected = mg.generate(m, 3, seed=1, progress=False, cache_hook=compress,
                           inference_params=mg.InferenceParams(cap))
    qvg = qvg_compile.backend(CFG)
    params = mg.InferenceParams(cap)
    got = mg.generate(torch.compile(m, backend=qvg), 3, seed=1, progress=False, inference_params=params)
    torch._dynamo.reset()
    return m, got, expected, params, qvg.report


def test_schedule_staggers_chunks_and_ends_each_with_a_clean_pass():
    cfg = mg.tiny_config(window=2, steps=4)
    plan = mg.schedule(3, cfg)
    assert plan[0] == [(0, 0)] and plan[2] == [(0, 2), (1, 0)] and plan[4] == [(0, 4), (1, 2), (2, 0)]
    for c in range(3):
        steps = [k for active in plan for cc, k in active if cc == c]
        assert steps == list(range(5))  # 4 denoising steps, then t=0
    assert all([c for c, _ in active] == list(range(active[0][0], active[-1][0] + 1)) for active in plan)


def test_eager_shapes_determinism_and_lazy_packed_buffer():
    m = make()
    cfg = m.config
    params = mg.InferenceParams(3 * cfg.chunk_tokens)
    a = mg.generate(m, 3, seed=3, progress=False, inference_params=params)
    assert a.shape == (1, 16, 6, cfg.latent_height, cfg.latent_width) and torch.isfinite(a).all()
    assert torch.equal(a, mg.generate(m, 3, seed=3, progress=False))
    assert not torch.allclose(a, mg.generate(m, 3, seed=4, progress=False))
    assert sorted(params.key_value_memory_dict) == [0, 1]
    buf = params.key_value_memory_dict[0]
    assert tuple(buf.shape) == (1, 3 * cfg.chunk_tokens, cfg.num_kv_heads, 2 * cfg.head_dim)
    assert buf.abs().sum(dim=(0, 2, 3)).gt(0).all()
    with pytest.raises(ValueError, match="capacity"):
        mg.generate(m, 3, seed=3, progress=False, inference_params=mg.InferenceParams(cfg.chunk_tokens))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="window"):
        mg.tiny_config(window=3, steps=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        mg.tiny_config(num_kv_heads=4)


def test_compiled_equals_eager_with_the_same_quantization(compiled_run):
    m, got, expected, params, report = compiled_run
    assert (got - expected).abs().max().item() <= TOL
    assert all(isinstance(buf, QVGCache) for buf in params.key_value_memory_dict.values())
    sources = {s.source: s for s in report.sites}
    assert set(sources) == {f"L['inference_params'].key_value_memory_dict[{i}]" for i in range(2)}
    for site in sources.values():
        assert sorted(site.roles) == ["key", "value"] and site.seq_dim == 1 and "A" in site.idioms
    # The packed K|V buffers reach Inductor as their inner tensors in every graph over them.
    flat = [g.flat_inputs for g in report.graphs if g.inputs_are_caches]
    assert flat and all(f == "yes" for f in flat), flat
    dense = mg.generate(m, 3, seed=1, progress=False)
    assert (got - dense).abs().max().item() > 1e-4


def test_packed_kv_is_recognised_as_two_parts(compiled_run):
    _, _, _, params, report = compiled_run
    assert all("F" in s.idioms for s in report.sites)
    assert all(buf.spec.roles == ("key", "value") for buf in params.key_value_memory_dict.values())


def test_steady_state_kv_bytes_are_6_5x_below_bf16():
    # Steady state = the bytes each further chunk adds (capacity = the video's length).
    def run(m, n):
        params = mg.InferenceParams(n * m.config.chunk_tokens)
        mg.generate(m, n, seed=1, progress=False, cache_hook=compress, inference_params=params)
        return list(params.key_value_memory_dict.values())

    config = mg.tiny_config(num_layers=1, dim=2048, num_heads=16, num_kv_heads=8, latent_height=8, latent_width=8,
                            chunk_frames=3)
    marginal, whole = steady_state_ratio(mg.MagiModel, config, run)
    assert marginal >= 6.5, (marginal, whole)
