"""The eval's building blocks: teacher forcing equals cached generation, the simulated caches
match the real one, and a 2-chunk CPU eval returns sane records for every method."""

import math

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.tiny.checkpoint import load_checkpoint
from qvg_compile.tiny.data import from_uint8
from qvg_compile.tiny.evaluate import DEFAULT_METHODS, SimulatedCache, evaluate, method_config, rollout
from qvg_compile.tiny.media import save_psnr_plot
from qvg_compile.tiny.metrics import psnr_per_frame
from qvg_compile.tiny.model import TinyVideoConfig, TinyVideoModel, allocate_cache


def test_teacher_forcing_equals_chunkwise_generation_with_a_cache():
    torch.manual_seed(0)
    m = TinyVideoModel(TinyVideoConfig()).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    clean, noisy, t = torch.randn(1, 6, 3, 16, 16), torch.randn(1, 6, 3, 16, 16), torch.rand(1, 3)
    with torch.no_grad():
        expected = m.forward_train(clean, noisy, t)
        cache = allocate_cache(m, 6)
        got = []
        for c in range(3):
            start = c * m.cfg.chunk_tokens
            got.append(m(noisy[:, 2 * c:2 * c + 2], t[:, c], cache, start))
            m(clean[:, 2 * c:2 * c + 2], torch.zeros(1), cache, start)
    assert (torch.cat(got, 1) - expected).abs().max() < 1e-4


def test_method_configs():
    assert method_config("qvg", 64).code_mode_for("key") == "symmetric"
    assert method_config("qvg", 64).code_mode_for("value") == "symmetric_full"
    assert {method_config("qvg_asym", 64).code_mode_for(r) for r in ("key", "value")} == {"asymmetric"}
    assert method_config("qvg_pro_asym", 64).stages == 4
    assert method_config("quarot", 64).group_size == 64
    assert method_config("kivi", 64).residual_window == 0
    with pytest.raises(ValueError, match="name"):
        method_config("bf16", 64)


def test_simulated_rtn_matches_the_compressed_cache():
    ckpt = load_checkpoint()
    prompt = from_uint8(ckpt.prompts[:1])
    reference, _, _ = rollout(ckpt.model, 3, prompt, seed=0)
    config = QVGConfig.preset("rtn")
    cached, _, _ = rollout(ckpt.model, 3, prompt, seed=0, config=config)
    simulated, cache, _ = rollout(ckpt.model, 3, prompt, seed=0, after_chunk=SimulatedCache(config))
    first = prompt.shape[1]
    p_cached = psnr_per_frame(reference[:, first:], cached[:, first:]).mean()
    p_sim = psnr_per_frame(reference[:, first:], simulated[:, first:]).mean()
    assert abs(float(p_cached - p_sim)) < 1.0 and 15 < float(p_sim) < 60


def test_two_chunk_eval_returns_sane_records_for_every_method(tmp_path):
    records, videos = evaluate(load_checkpoint(), chunks=2, prompts=1, dtype=torch.float32, progress=False)
    assert [r["method"] for r in records] == ["bf16", *DEFAULT_METHODS]
    assert records[0]["psnr_db"] == math.inf and records[0]["bits_per_element"] == 32
    for r in records[1:]:
        assert 10 < r["psnr_db"] < math.inf and 0 < r["ssim"] <= 1
        assert 2 < r["bits_per_element"] < 32 and r["compression"] > 1
        assert len(r["per_frame_psnr_db"]) == r["frames"] - r["first_frame"]
    assert {r["via"] for r in records if r["method"] in ("kivi", "quarot")} == {"simulated"}
    assert set(videos) == {r["method"] for r in records}
    assert save_psnr_plot(records, tmp_path / "psnr.png").stat().st_size > 1000
