"""The acceptance numbers of the math layer on the built-in video-like data."""

import pytest

from qvg_compile.bench.compare import compare
from qvg_compile.bench.synthetic import video_like_kv


@pytest.fixture(scope="module")
def records():
    d = video_like_kv(heads=2, frames=16, height=32, width=32, head_dim=128, queries=256, seed=0)
    return {r["method"]: r for r in compare(d["k"], d["v"], d["q"])}


def test_qvg_beats_rtn_at_fewer_bits(records):
    qvg, rtn = records["qvg"], records["rtn"]
    assert qvg["bits_per_element"] <= rtn["bits_per_element"]
    assert qvg["k_rel_mse"] * 4 <= rtn["k_rel_mse"]
    assert qvg["v_rel_mse"] * 2 <= rtn["v_rel_mse"]


def test_qvg_pro_beats_qvg(records):
    assert records["qvg_pro"]["k_rel_mse"] < records["qvg"]["k_rel_mse"]
    assert records["qvg_pro"]["v_rel_mse"] < records["qvg"]["v_rel_mse"]
    assert records["qvg_pro"]["attn_rel_err"] < records["qvg"]["attn_rel_err"]


def test_records_have_the_documented_keys(records):
    for r in records.values():
        assert {"method", "bits_per_element", "compression", "k_rel_mse", "v_rel_mse",
                "attn_rel_err", "encode_ms"} <= set(r)
        assert r["compression"] == pytest.approx(16 / r["bits_per_element"])
