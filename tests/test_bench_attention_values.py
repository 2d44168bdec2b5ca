"""`benchmarks/attention_values.py`: the K/V variants it attends over and its table (CPU smoke)."""

import torch

from benchmark_scripts import load_benchmark

av = load_benchmark("attention_values")
NAMES = ["randn", "randn in FP8", "QVG, FP8 centroids", "QVG, BF16 centroids", "zeros"]


def test_variants_hold_the_values_they_name():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, av.H, 600, av.D, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, av.H, 600, av.D, generator=gen).to(torch.bfloat16)
    pairs = av.variants(k, v)
    assert list(pairs) == NAMES
    for kk, vv in pairs.values():
        assert kk.shape == k.shape and vv.shape == v.shape and kk.dtype == torch.bfloat16
    assert pairs["randn"][0] is k
    fk, fv = pairs["randn in FP8"]
    # E4M3 keeps 3 mantissa bits: every value survives a second rounding unchanged, and the
    # rounding costs ~1e-3 of the energy of Gaussian data.
    assert torch.equal(fk.to(torch.float8_e4m3fn).to(torch.bfloat16), fk)
    assert av.rel_mse(k, fk) < 2e-3 and av.rel_mse(v, fv) < 2e-3
    # Gaussian noise has no clusters for the centroids to find: at 600 tokens the 2-bit codes
    # leave 0.270 of the keys' energy and 0.137-0.138 of the values' (full-range codes), the same
    # within 0.5% for both centroid types (measured; +-10% allowed).
    for name in ("QVG, FP8 centroids", "QVG, BF16 centroids"):
        qk, qv = pairs[name]
        assert 0.243 < av.rel_mse(k, qk) < 0.297, name
        assert 0.124 < av.rel_mse(v, qv) < 0.152, name
    assert not pairs["zeros"][0].any() and not pairs["zeros"][1].any()


def test_main_prints_one_row_per_variant(capsys):
    assert av.main(["--frames", "1", "--queries", "16", "--calls", "1", "--reps", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "SDPA 16 queries x 1560 keys" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "K/V values" not in line]
    assert [r.split("|")[1].strip() for r in rows] == NAMES
    # The randn row is the reference of the "against randn" column.
    assert float(rows[0].split("|")[5]) == 0.0
