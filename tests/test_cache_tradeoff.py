"""CPU smoke of benchmarks/cache_tradeoff.py: the policy table and the per-chunk table on a
non-square token grid with a scene cut."""

from benchmark_scripts import load_benchmark

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
