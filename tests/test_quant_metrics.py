import math

import pytest
import torch

from qvg_compile.quant import attention_rel_err, cosine_similarity, rel_mse, snr_db
from qvg_compile.bench.synthetic import video_like_kv


def test_metrics_on_known_values():
    x = torch.ones(4, 8)
    y = x * 1.1
    assert rel_mse(x, y) == pytest.approx(0.01, rel=1e-5)
    assert snr_db(x, y) == pytest.approx(20.0, rel=1e-5)
    assert snr_db(x, x) == math.inf
    assert cosine_similarity(x, y) == pytest.approx(1.0, abs=1e-6)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="approx"):
        rel_mse(x, x[:2])


def test_attention_error_zero_for_exact_and_positive_otherwise():
    d = video_like_kv(heads=2, frames=2, height=4, width=4, head_dim=64, queries=8)
    q, k, v = d["q"], d["k"], d["v"]
    assert attention_rel_err(q, k, v, k, v) == 0.0
    assert attention_rel_err(q, k, v, k, v * 1.01) == pytest.approx(0.01, rel=1e-3)


def test_synthetic_is_deterministic_and_shaped():
    a = video_like_kv(heads=3, frames=2, height=4, width=6, head_dim=64, queries=5, seed=1)
    b = video_like_kv(heads=3, frames=2, height=4, width=6, head_dim=64, queries=5, seed=1)
    assert a["k"].shape == (1, 3, 48, 64) and a["q"].shape == (1, 3, 5, 64)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="frames"):
        video_like_kv(frames=0)
