"""`qvg-compile demo` and `qvg-compile eval` at reduced sizes on the shipped checkpoint."""

import json
import math

import torch

from qvg_compile.cli import main
from qvg_compile.demo_run import psnr, run_demo


def test_demo_runs_and_reports(tmp_path):
    result = run_demo(chunks=3, seed=0, out=str(tmp_path / "demo.gif"), progress=False)
    assert (tmp_path / "demo.gif").stat().st_size > 0
    assert result["sealed_bytes"] < result["qvg_bytes"] < result["dense_bytes"]
    # The trained model continues the clip; the 2-bit cache moves it, but not into noise.
    assert 12 < result["psnr_db"] < math.inf and 0.3 < result["ssim"] <= 1
    assert {s.source for s in result["report"].sites} == {f"L['cache'][{i}]['{n}']" for i in range(4) for n in "kv"}


def test_cli_demo_and_eval_print_their_tables(tmp_path, capsys):
    assert main(["demo", "--chunks", "2", "--quiet", "--out", str(tmp_path / "d.gif")]) == 0
    out = capsys.readouterr().out
    assert "KV cache:" in out and "once the last chunk is sealed" in out and "PSNR" in out
    assert main(["eval", "--chunks", "3", "--prompts", "1", "--methods", "qvg,rtn", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in records] == ["bf16", "qvg", "rtn"]
    assert all(r["bits_per_element"] < 32 and r["psnr_db"] > 10 for r in records[1:])


def test_psnr_of_identical_videos_is_infinite():
    x = torch.rand(1, 2, 3, 4, 4) * 2 - 1
    assert psnr(x, x) == math.inf
    assert abs(psnr(x, x + 0.1) - 10 * math.log10(4 / 0.01)) < 1e-3
