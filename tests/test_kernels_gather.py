"""`kernels.gather`: the Triton gather (interpreter, CPU) against `gather_reference`, and the
block table it runs from."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvg_compile import QVGConfig
from qvg_compile.kernels._triton_gather import GatherLaunch
from qvg_compile.kernels.gather import ROWS, SEALED, block_table, gather_pair, gather_reference, gather_supported
from test_kernels_decode import make_store
from interpreter import INTERPRETER_ONLY

pytestmark = INTERPRETER_ONLY


def runs_and_tails(seed):
    gen = torch.Generator().manual_seed(seed)
    k_tail = torch.randn(1, 2, 40, 32, generator=gen)
    v_tail = torch.randn(1, 2, 40, 32, generator=gen)
    # A sealed history crossing the two segments, the open rows, and a sealed run read after it
    # (view order need not follow store order); V reads its rows from elsewhere in its tail.
    k_runs = [(SEALED, 3, 0, 58), (ROWS, 5, 58, 21), (SEALED, 60, 79, 6)]
    v_runs = [(SEALED, 3, 0, 58), (ROWS, 17, 58, 21), (SEALED, 60, 79, 6)]
    return k_tail, v_tail, k_runs, v_runs


@pytest.mark.parametrize("changes", [dict(), dict(value_bits=4), dict(code_mode="asymmetric", scale_dtype="fp16"),
                                     dict(stages=0), dict(code_mode="symmetric", value_code_mode="symmetric_full"),
                                     dict(centroid_dtype="fp8_e4m3")],
                         ids=["default", "v4bit", "asym", "rtn", "modes_per_role", "fp8_centroids"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_triton_gather_equals_reference(changes, out_dtype):
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype="fp16").replace(**changes)
    k, v = make_store(3, cfg=cfg, role="key"), make_store(4, cfg=cfg, role="value")
    k_tail, v_tail, k_runs, v_runs = runs_and_tails(0)
    assert gather_supported(k, v, k_tail, v_tail, interpret=True)
    table = block_table(k_runs, v_runs, torch.device("cpu"), block=16)
    assert table[1] == 7  # blocks of 16 tokens: 4 for 58 sealed tokens, 2 for 21 rows, 1 for 6
    outs = [torch.full((1, 2, 90, 32), float("nan"), dtype=out_dtype) for _ in range(4)]
    gather_pair(k, v, k_tail, v_tail, k_runs, v_runs, table, outs[0], outs[1], use_triton=True)
    gather_pair(k, v, k_tail, v_tail, k_runs, v_runs, table, outs[2], outs[3], use_triton=False)
    for got, ref in ((outs[0], outs[2]), (outs[1], outs[3])):
        assert torch.equal(got[:, :, :85], ref[:, :, :85])  # bit-exact, as the decoder
        assert torch.isnan(got[:, :, 85:]).all()  # nothing past the runs is written
    assert torch.equal(outs[0][:, :, 58:79], k_tail[:, :, 5:26].to(out_dtype))


def test_reference_decodes_sealed_runs_like_the_store():
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype="fp16")
    k = make_store(5, cfg=cfg)
    out = torch.zeros(1, 2, 10, 32)
    gather_reference(k, torch.zeros(1, 2, 1, 32), [(SEALED, 30, 2, 8)], out)
    assert torch.equal(out[:, :, 2:], k.dequantize(30, 38)) and not out[:, :, :2].any()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([SEALED, ROWS]), st.integers(0, 50), st.integers(0, 70)), max_size=5),
       st.integers(1, 16))
def test_block_table_numbers_each_runs_blocks_in_order(runs, block):
    dst, k_runs = 0, []
    for kind, src, n in runs:
        k_runs.append((kind, src, dst, n))
        dst += n
    table, blocks = block_table(k_runs, k_runs[:1], torch.device("cpu"), block=block)
    assert table.shape == (2, max(1, len(k_runs)), 5)
    firsts = table[0, :, 4].tolist()
    assert blocks == sum(-(-n // block) for _, _, _, n in k_runs)
    expected, first = [], 0
    for run in k_runs:
        expected.append(first)
        first += -(-run[3] // block)
    assert firsts[:len(k_runs)] == expected and all(f == blocks for f in firsts[len(k_runs):])
    assert [tuple(r[:4]) for r in table[0, :len(k_runs)].tolist()] == k_runs


def test_block_table_rejects_bad_runs():
    with pytest.raises(ValueError, match="k_runs"):
        block_table([(2, 0, 0, 4)], [], torch.device("cpu"))
    with pytest.raises(ValueError, match="v_runs"):
        block_table([], [(SEALED, -1, 0, 4)], torch.device("cpu"))


@pytest.mark.parametrize("block,warps,options,changes", [
    (16, 4, dict(grouped=True), dict()), (32, 8, dict(), dict()), (32, 2, dict(grouped=True), dict()),
    (16, 2, dict(stream=True), dict()), (16, 2, dict(by_group=True), dict()),
    (32, 4, dict(by_group=True), dict(code_mode="asymmetric", value_code_mode="asymmetric", scale_dtype="fp16")),
    (16, 2, dict(by_group=True, packed_loads=False), dict(value_bits=4))])
def test_every_launch_setting_equals_reference(block, warps, options, changes):
    cfg = QVGConfig(centroids=8, group_size=16, kmeans_iters=1, centroid_dtype="fp16",
                    code_mode="symmetric", value_code_mode="symmetric_full").replace(**changes)
    k, v = make_store(3, cfg=cfg, role="key"), make_store(4, cfg=cfg, role="value")
    k_tail, v_tail, k_runs, v_runs = runs_and_tails(1)
    table, blocks = block_table(k_runs, v_runs, torch.device("cpu"), block=block)
    outs = [torch.full((1, 2, 85, 32), float("nan")) for _ in range(4)]
    GatherLaunch(k, v, k_tail, v_tail, block, num_warps=warps, **options)(table, blocks, outs[0], outs[1])
    gather_reference(k, k_tail, k_runs, outs[2])
    gather_reference(v, v_tail, v_runs, outs[3])
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
