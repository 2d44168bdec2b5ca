"""The eval's building blocks: teacher forcing equals cached generation, the simulated caches
match the real one, and a 2-chunk CPU eval returns sane records for every method."""

import math

import pytest
import torch

from qvg_compile import QVGConfig
import dataclasses
import json

from qvg_compile.cli import main
from qvg_compile.tiny import zoo
from qvg_compile.tiny.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from qvg_compile.tiny.data import from_uint8
from qvg_compile.tiny.evaluate import DEFAULT_METHODS, SimulatedCache, evaluate, method_config, rollout
from qvg_compile.tiny.media import save_psnr_plot
from qvg_compile.tiny.metrics import psnr_per_frame
from qvg_compile.tiny.model import TinyVideoConfig, TinyVideoModel
from tiny_rollout import teacher_forced_and_chunkwise


def test_teacher_forcing_equals_chunkwise_generation_with_a_cache():
    torch.manual_seed(0)
    m = TinyVideoModel(TinyVideoConfig()).eval()
    expected, got, _ = teacher_forced_and_chunkwise(m, (1, 6, 3, 16, 16), chunks=3, scale=0.1)
    assert (got - expected).abs().max() < 1e-4


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


def test_cli_eval_of_a_checkpoint_at_matched_and_published_bits(tmp_path, capsys):
    torch.manual_seed(0)
    # 64 tokens per frame: KIVI's key groups of 64 tokens fill every chunk.
    m = TinyVideoModel(dataclasses.replace(zoo.MODELS["proxy"].config, size=16, layers=2)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    prompts = torch.randint(0, 256, (1, 3, 3, 16, 16), dtype=torch.uint8)
    path = save_checkpoint(m, tmp_path / "proxy.safetensors", prompts)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(path), "--chunks", "3", "--prompts", "1", "--methods", "qvg,rtn,kivi",
                 "--settings", "matched,published", "--layer-errors", "--json-out", str(out),
                 "--plot", str(tmp_path / "psnr.png")]) == 0
    printed = capsys.readouterr().out
    assert "K/V rel-MSE" in printed and "RTN (matched)" in printed and (tmp_path / "psnr.png").is_file()
    records = {r["key"]: r for r in json.loads(out.read_text())}
    assert list(records) == ["bf16", "qvg@matched", "rtn@matched", "kivi@matched", "qvg", "rtn", "kivi"]
    assert records["kivi@matched"]["sealed_bits_per_element"] == 2.5 and records["kivi"]["sealed_bits_per_element"] == 3
    assert records["qvg@matched"]["psnr_db"] == records["qvg"]["psnr_db"]     # one config, one rollout
    for r in list(records.values())[1:]:
        assert [row["layer"] for row in r["layers"]] == [0, 1] and all(0 < row["k_rel_mse"] < 1 for row in r["layers"])
        assert r["bits_per_element"] > r["sealed_bits_per_element"] > 2


def test_a_model_whose_checkpoint_is_not_shipped_names_the_file(monkeypatch, capsys):
    spec = dataclasses.replace(zoo.MODELS["proxy"], checkpoint="absent_video.safetensors")
    monkeypatch.setitem(zoo.MODELS, "proxy", spec)
    with pytest.raises(FileNotFoundError, match="absent_video.safetensors.*--model proxy"):
        load_checkpoint(name="proxy")
    assert main(["eval", "--model", "proxy", "--chunks", "2", "--prompts", "1"]) == 2
    assert "absent_video.safetensors" in capsys.readouterr().err


def test_evaluate_stops_starting_methods_past_its_time_limit():
    ckpt = Checkpoint(TinyVideoModel(TinyVideoConfig()).eval(), torch.zeros(1, 2, 3, 16, 16, dtype=torch.uint8))
    with pytest.warns(UserWarning, match="skipped"):
        records, _ = evaluate(ckpt, chunks=2, prompts=1, methods=("rtn", "kivi"), dtype=torch.float32,
                              progress=False, time_limit=1e-9)
    assert [r["method"] for r in records] == ["bf16"]
    with pytest.raises(ValueError, match="settings"):
        evaluate(ckpt, chunks=2, prompts=1, settings=("budget",))


def test_the_shipped_proxy_loads_from_the_package_and_evaluates_a_short_rollout_on_cpu(tmp_path):
    ckpt = load_checkpoint(name="proxy")
    cfg = ckpt.model.cfg
    assert (cfg.head_dim, cfg.tokens_per_frame, cfg.frames_per_chunk, cfg.layers) == (128, 1024, 3, 4)
    assert ckpt.recipe["device"] == "NVIDIA H200" and ckpt.recipe["steps_done"] == 1200
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "proxy", "--chunks", "3", "--prompts", "1", "--methods", "qvg",
                 "--dtype", "fp32", "--json-out", str(out)]) == 0
    records = {r["key"]: r for r in json.loads(out.read_text())}
    # Measured on the CPU (fp32, seed 0): 33.1 dB against the dense rollout at 2.49 sealed bits.
    assert records["qvg"]["psnr_db"] == pytest.approx(33.1, abs=1.0)
    assert 2.3 < records["qvg"]["sealed_bits_per_element"] < 2.5
