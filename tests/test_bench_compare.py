"""The acceptance numbers of the math layer on the built-in video-like data."""

from importlib import resources

import pytest

from qvg_compile.bench.compare import compare, load_kv
from qvg_compile.bench.synthetic import scene_cut_kv, video_like_kv


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


def test_errors_on_the_kv_captured_from_the_trained_proxy():
    """The shipped sample of the proxy model (`qvg_compile/tiny/proxy_kv.safetensors`, post-RoPE
    keys, values and queries of layers 0 and 3): numbers from a trained model, not a generator.
    Measured on the CPU (seed 0); +-5% (k-means on a different thread count)."""
    d = load_kv(str(resources.files("qvg_compile.tiny").joinpath("proxy_kv.safetensors")))
    got = {r["method"]: r for r in compare(d["k"].float(), d["v"].float(), d["q"].float(),
                                           methods=("qvg", "rtn", "kivi"))}
    assert got["qvg"]["k_rel_mse"] == pytest.approx(0.0333, rel=0.05)
    assert got["qvg"]["v_rel_mse"] == pytest.approx(0.0097, rel=0.05)
    assert got["rtn"]["k_rel_mse"] == pytest.approx(0.306, rel=0.05)
    # QVG's values are far closer than the per-token baselines'; KIVI's per-channel keys are closer.
    assert got["qvg"]["v_rel_mse"] * 15 < min(got["rtn"]["v_rel_mse"], got["kivi"]["v_rel_mse"])
    assert got["kivi"]["k_rel_mse"] < got["qvg"]["k_rel_mse"] < got["rtn"]["k_rel_mse"] / 8


@pytest.mark.parametrize("make,k_max", [(video_like_kv, 0.032), (scene_cut_kv, 0.038)])
def test_qvg_preset_at_the_published_geometry(make, k_max):
    """Video-like K/V ``[1, 4, 24960, 128]`` (16 frames of Wan's 30 x 52 token grid), the geometry
    the published kernels were measured at (key rel-MSE 0.029, value 0.088, ~2.35 bits). Measured
    on the CPU, seed 0: keys 0.0309 and values 0.0317 at 2.270 bits (FP8 centroids; 0.0306 / 0.0315
    at 2.352 with BF16 ones); with a scene cut half way 0.0359 and 0.0332. Bounds: the published
    configuration's errors (+10% for keys on the cut, which that measurement did not have), and
    >= 4x (K) / >= 2x (V) below per-token RTN."""
    d = make(heads=4, frames=16, height=30, width=52, head_dim=128, seed=0)
    records = {r["method"]: r for r in compare(d["k"], d["v"], None, methods=("qvg", "rtn"))}
    qvg, rtn = records["qvg"], records["rtn"]
    assert qvg["bits_per_element"] <= 2.28
    assert qvg["k_rel_mse"] <= k_max and qvg["v_rel_mse"] <= 0.097
    assert qvg["k_rel_mse"] * 4 <= rtn["k_rel_mse"] and qvg["v_rel_mse"] * 2 <= rtn["v_rel_mse"]
