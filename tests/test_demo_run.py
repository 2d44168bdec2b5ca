"""`qvg-compile demo` at a reduced size: runs end to end, writes the video, reports sane numbers."""

import math

import pytest

from qvg_compile.cli import main
from qvg_compile.demo_run import psnr, run_demo


def test_demo_runs_and_reports(tmp_path):
    pytest.importorskip("PIL")
    result = run_demo(chunks=2, seed=0, out=str(tmp_path / "demo.gif"), progress=False)
    assert (tmp_path / "demo.gif").stat().st_size > 0
    assert result["qvg_bytes"] < result["dense_bytes"]
    assert 10 < result["psnr_db"] < math.inf  # quantized (not identical), not garbage
    assert result["report"].sites


def test_cli_demo_prints_summary(tmp_path, capsys):
    pytest.importorskip("PIL")
    assert main(["demo", "--chunks", "2", "--quiet", "--out", str(tmp_path / "d.gif")]) == 0
    out = capsys.readouterr().out
    assert "KV cache:" in out and "PSNR" in out


def test_psnr_of_identical_videos_is_infinite():
    import torch
    x = torch.rand(1, 2, 3, 4, 4)
    assert psnr(x, x) == math.inf
    assert psnr(x, x + 0.1) < 30
