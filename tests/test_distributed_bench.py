"""benchmarks/multi_gpu.py's report: slowest rank, per-rank KV bytes, ratios (no processes)."""

import argparse
import json

import pytest

from benchmark_scripts import load_benchmark

mg = load_benchmark("multi_gpu")


def row(cache, rank, s, kv, peak=0, fallbacks=0):
    return {"model": "tp self-forcing", "cache": cache, "rank": rank, "world": 2, "heads": 6, "layers": 30, "history": 60,
            "s_per_chunk": s, "kv_bytes": kv, "kv_dense_bytes": 8_000, "peak_bytes": peak, "fallbacks": fallbacks}


def test_report_takes_the_slowest_rank_and_the_largest_cache(tmp_path, capsys):
    rows = [row("bf16", 0, 1.0, 8_000, 3e9), row("bf16", 1, 1.2, 8_000, 3e9),
            row("qvg", 0, 1.5, 1_000, 2e9), row("qvg", 1, 1.26, 1_250, 2.5e9, fallbacks=1)]
    args = argparse.Namespace(out=str(tmp_path), device="cpu", argv=["--nproc", "2"])
    mg._report(rows, args)
    table = (tmp_path / "multi_gpu_table.md").read_text().splitlines()
    qvg = [c.strip() for c in table[3].split("|")[1:-1]]
    # slowest qvg rank 1.5 s against slowest bf16 rank 1.2 s; largest per-rank cache 1,250 bytes
    assert qvg[:6] == ["tp self-forcing", "qvg", "2", "30", "6", "60"]
    assert qvg[6:] == ["1.500", "+25.0", "1.25e-06", "6.40", "2.50", "1"]
    saved = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert saved["command"] == "python benchmarks/multi_gpu.py --nproc 2" and len(saved["rows"]) == 4
    assert "s/chunk (slowest)" in capsys.readouterr().out


def test_main_rejects_unknown_models_and_missing_gpus():
    with pytest.raises(ValueError, match="--models"):
        mg.main(["--models", "tp,magi", "--device", "cpu"])
