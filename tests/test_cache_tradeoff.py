"""benchmarks/cache_tradeoff.py on the CPU: the policy table and the per-chunk table on a
non-square token grid with a scene cut, and the cache defaults' per-chunk errors against the
published configuration pinned on Wan's token grid."""

from benchmark_scripts import load_benchmark
from qvg_compile.bench.synthetic import scene_cut_kv

tradeoff = load_benchmark("cache_tradeoff")


def test_per_chunk_table_on_a_non_square_grid(capsys):
    assert tradeoff.main(["--heads", "1", "--frames", "12", "--frame-shape", "6x10", "--scene-change",
                          "--per-chunk"]) == 0
    out = capsys.readouterr().out
    assert "K/V [1, 1, 720, 128], chunks of 180 tokens, 4 chunks" in out
    table = out.split("|   chunk |")[1].strip().splitlines()[2:]  # after the header and its rule
    assert len(table) == 4
    rows = [[float(c) for c in row.strip("|").split("|")] for row in table]
    assert [r[0] for r in rows] == [0, 1, 2, 3]
    # At this toy size (180 tokens a chunk) the cache's codebooks hold a handful of centroids, so
    # only the keys (outlier channels) are sure to beat per-token RTN; every error is a real number.
    assert all(0 < e < 1 for r in rows for e in r[1:])
    assert all(r[1] < r[3] for r in rows)


def test_defaults_against_the_published_configuration_on_wans_grid():
    # Wan's 30 x 52 token grid, 2 heads, 12 frames (4 chunks of 4,680 tokens), a cut after frame 6;
    # CPU, seed 1: each chunk's key error is at most 1.39x the published configuration's (one C=256
    # codebook per 8 chunks, fitted on all of them at once), values at most 0.75x, RTN ~0.6 / 0.2.
    # (At Wan-1.3B's 12 heads and 21 frames: keys <= 1.49x over seeds 1-3, README.) +10% for
    # k-means on another thread count.
    d = scene_cut_kv(heads=2, frames=12, height=30, width=52, seed=1)
    rows = [[float(x) for x in row] for row in tradeoff.per_chunk(d["k"], d["v"], 3 * 1560, span=8)]
    assert len(rows) == 4
    assert max(r[1] / r[2] for r in rows) <= 1.39 * 1.1
    assert max(r[4] / r[5] for r in rows) <= 0.75 * 1.1
    assert all(r[1] < r[3] and r[4] < r[6] for r in rows)
