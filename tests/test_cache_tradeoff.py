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
    for row in table:
        chunk, k_cache, k_pub, k_rtn, v_cache, v_pub, v_rtn = (float(c) for c in row.strip("|").split("|"))
        assert 0 < k_cache < k_rtn and 0 < v_cache < v_rtn  # the cache never stores worse than RTN
