"""bench/synthetic.py: the video-like generator with a scene cut, and quant-bench's --scene-change."""

import torch

from qvg_compile.bench.synthetic import scene_cut_kv, video_like_kv
from qvg_compile.cli import main


def test_a_scene_cut_is_one_video_then_another():
    cut = scene_cut_kv(heads=2, frames=5, height=3, width=4, seed=7)
    a = video_like_kv(heads=2, frames=5, height=3, width=4, seed=7)
    b = video_like_kv(heads=2, frames=5, height=3, width=4, seed=8)
    n = 2 * 12  # frames // 2 frames of 3 x 4 tokens from the first video
    for name in ("k", "v"):
        assert cut[name].shape == a[name].shape == (1, 2, 60, 128)
        assert torch.equal(cut[name][:, :, :n], a[name][:, :, :n])
        assert torch.equal(cut[name][:, :, n:], b[name][:, :, n:])
    assert torch.equal(cut["q"], b["q"])


def test_quant_bench_scene_change(capsys):
    assert main(["quant-bench", "--heads", "1", "--frames", "4", "--height", "8", "--width", "8",
                 "--methods", "qvg,rtn", "--scene-change"]) == 0
    out = capsys.readouterr().out
    assert "a scene cut half way" in out and "| qvg " in out and "| rtn " in out
    assert main(["quant-bench", "--kv", "x.pt", "--scene-change"]) == 2  # a usage error, printed
    assert "--scene-change: applies to the built-in generator" in capsys.readouterr().err
