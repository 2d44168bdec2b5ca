"""CPU smoke of benchmarks/end_to_end.py at a tiny config, plus its accounting helpers."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from benchmark_scripts import load_benchmark

e2e = load_benchmark("end_to_end")


def event(name, us, parent=None):
    return SimpleNamespace(name=name, cpu_time_total=us, device_time_total=us, cpu_parent=parent)


def test_device_busy_counts_each_kernel_once():
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [SimpleNamespace(device_type=cpu, self_device_time_total=300.0),    # op that launched it
              SimpleNamespace(device_type=cuda, self_device_time_total=300.0),   # the kernel itself
              SimpleNamespace(device_type=cpu, self_device_time_total=20.0)]
    assert e2e.device_busy_s(events) == pytest.approx(320e-6)


def test_time_shares_counts_outermost_ops_only():
    outer = event("qvg::cache_attention", 300.0)
    nested_sdpa = event("aten::_scaled_dot_product_flash_attention", 200.0, parent=outer)
    seal = event("qvg::cache_seal", 40.0, parent=event("qvg::cache_write", 50.0))
    write = seal.cpu_parent
    decode = event("qvg::cache_decode", 7.0)
    other = event("aten::mm", 1000.0)
    shares = e2e.time_shares([outer, nested_sdpa, write, seal, decode, other], cuda=True)
    assert shares == pytest.approx({"quantize": 50e-6, "dequantize": 7e-6, "attention": 300e-6,
                                    "host_quantize": 50e-6, "host_dequantize": 7e-6, "host_attention": 300e-6})


def test_budget_search_matches_the_byte_count_for_bf16():
    cfg = e2e.sf.tiny_config(dim=128, num_heads=2, ffn_dim=128)
    per_frame = 2 * cfg.num_layers * cfg.frame_tokens * cfg.dim * 2  # K and V, bf16
    weights, reserve = 10_000, 3_000
    budget = weights + reserve + 50 * per_frame + per_frame // 2
    qvg = e2e.qvg_compile.backend()
    got = e2e.max_frames_in_budget("bf16", cfg, budget, reserve, torch.device("cpu"), torch.bfloat16, qvg,
                                   limit_frames=300, weight_bytes=weights)
    assert got["frames"] == 48  # the largest multiple of the 3-frame chunk <= 50
    assert not got["hit_limit"]
    qgot = e2e.max_frames_in_budget("qvg", cfg, budget, reserve, torch.device("cpu"), torch.bfloat16, qvg,
                                    limit_frames=300, weight_bytes=weights)
    assert qgot["frames"] > 2 * got["frames"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_benchmark_runs_end_to_end_on_cpu(tmp_path, fresh_dynamo):
    results = e2e.main(["--config", "tiny", "--device", "cpu", "--contexts", "9", "--timed-chunks", "1",
                        "--profile-at", "9", "--budget-gb", "0.002", "--fit-limit", "600", "--longcat-layers", "0",
                        "--qvg-env", "QVG_READ_PATH=general", "--qvg-config", "centroid_dtype=bf16",
                        "--out", str(tmp_path)])
    runs = {r["backend"]: r for r in results["runs"]}
    # The config variant stores BF16 centroids, a byte more per value than the default FP8 (the
    # tiny model's chunks are too short for the codebook budget to even it out).
    bf16_cents = runs["qvg[config: centroid_dtype=bf16]"]["rows"][0]
    assert bf16_cents["kv_bytes"] > runs["qvg"]["rows"][0]["kv_bytes"] and bf16_cents["stats"]["fast_reads"] > 0
    with pytest.raises(ValueError, match="--qvg-config"):
        e2e.config_fields("no_such_field=1")
    assert e2e.config_fields("centroids=64,kmeans_tol=0.5,centroid_dtype=fp16") == {
        "centroids": 64, "kmeans_tol": 0.5, "centroid_dtype": "fp16"}
    # The variant ran with every read on the general path, and the setting was restored after it.
    general = runs["qvg[QVG_READ_PATH=general]"]["rows"][0]["stats"]
    assert general["general_reads"] > 0 and general["fast_reads"] == 0
    assert "QVG_READ_PATH" not in e2e.os.environ
    assert runs["bf16"]["cache_types"] == ["Tensor"] and runs["qvg"]["cache_types"] == ["QVGCache"]
    bf16, qvg = runs["bf16"]["rows"][0], runs["qvg"]["rows"][0]
    assert bf16["kv_dense_bytes"] == bf16["kv_bytes"] == qvg["kv_dense_bytes"]
    assert bf16["kv_bytes"] / qvg["kv_bytes"] > 2.0
    assert runs["bf16"]["kv_sealed_bytes"] == bf16["kv_bytes"] and runs["qvg"]["kv_sealed_bytes"] < qvg["kv_bytes"]
    assert qvg["stats"]["seals"] > 0 and qvg["stats"]["fast_tokens"] > 0 and qvg["stats"]["general_reads"] == 0
    assert qvg["workspace_bytes"] > 0 and bf16["workspace_bytes"] == 0
    assert qvg["shares"]["quantize"] > 0 and qvg["shares"]["attention"] > 0
    assert bf16["shares"]["quantize"] == 0 and bf16["shares"]["attention"] > 0
    assert 0 < results["output_rel_diff"][9] < math.inf
    fit = {f["kind"]: f["frames"] for f in results["fit"]["results"]}
    assert fit["qvg"] > 2 * fit["bf16"] > 0
    saved = json.loads((tmp_path / "end_to_end.json").read_text())
    assert saved["runs"][1]["rows"][0]["kv_bytes"] == qvg["kv_bytes"]
    table = (tmp_path / "end_to_end_table.md").read_text()
    assert "overhead %" in table and "KV once the video ends" in table and "qvg[QVG_READ_PATH=general]" in table
    assert "median overhead %" in table


def test_longcat_run_times_a_second_video_with_every_cache_compressed():
    # The tiny LongCat replica through the benchmark's LongCat run: each backend generates the video
    # twice and the second (nothing left to compile) is timed; QVG holds its cache compressed and
    # reads it without a dense fallback (RoPE at read).
    cpu = torch.device("cpu")
    lines = []
    out = e2e.run_longcat(1, 2, "tiny", cpu, 0, e2e.Clock(cpu), e2e.qvg_compile.backend(), lines.append,
                          deadline=math.inf)
    bf16, qvg = out["runs"]
    assert [r["backend"] for r in out["runs"]] == ["bf16", "qvg"]
    assert len(bf16["chunk_s"]) == len(qvg["chunk_s"]) == 2 and all(t > 0 for t in qvg["chunk_s"])
    assert qvg["stats"]["seals"] > 0 and qvg["stats"]["fast_reads"] > 0
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 13):
        assert qvg["stats"]["fallback_total"] == 0
    assert bf16["kv_bytes"] > 3 * qvg["kv_bytes"] > 0
    assert any("second video chunk times" in line for line in lines)


def test_interleaved_run_times_every_video_chunk_for_chunk(tmp_path, fresh_dynamo):
    # Three videos in one process, advancing chunk for chunk: each keeps its own counters (the
    # variant's reads all took the general path, the plain QVG video's none), its environment
    # only while its own chunks run, and per-chunk overheads land in the table.
    results = e2e.main(["--config", "tiny", "--device", "cpu", "--contexts", "9", "--timed-chunks", "2",
                        "--profile-at", "0", "--time-limit", "0", "--longcat-layers", "0", "--interleave",
                        "--qvg-env", "QVG_READ_PATH=general", "--out", str(tmp_path)])
    runs = {r["backend"]: r for r in results["runs"]}
    assert list(runs) == ["bf16", "qvg", "qvg[QVG_READ_PATH=general]"]
    general, fast = runs["qvg[QVG_READ_PATH=general]"]["rows"][0], runs["qvg"]["rows"][0]
    assert general["stats"]["general_reads"] > 0 and general["stats"]["fast_reads"] == 0
    assert fast["stats"]["general_reads"] == 0 and fast["stats"]["fast_reads"] > 0
    # Each video's own read workspace, though the buffer is shared: the general path uses none.
    assert general["workspace_bytes"] == 0 and fast["workspace_bytes"] > 0
    assert "QVG_READ_PATH" not in e2e.os.environ
    assert all(len(r["rows"][0]["chunk_times"]) == 2 for r in runs.values())
    assert runs["bf16"]["cache_types"] == ["Tensor"] and runs["qvg"]["cache_types"] == ["QVGCache"]
    assert runs["bf16"]["rows"][0]["kv_bytes"] / fast["kv_bytes"] > 2.0
    # Same seed, same history: the videos differ only by the cache's quantization.
    assert 0 < results["output_rel_diff"][9] < 0.5
    table = (tmp_path / "end_to_end_table.md").read_text()
    assert "chunks" in table and "quartiles %" in table and "qvg[QVG_READ_PATH=general]" in table


def test_profile_files_get_plain_names():
    assert e2e.file_stem("bf16+cg") == "bf16_cg"
    assert e2e.file_stem("qvg[config: centroid_dtype=bf16]") == "qvg_config_centroid_dtype_bf16"
    assert e2e.file_stem("qvg[QVG_READ_PATH=general]") == "qvg_QVG_READ_PATH_general"


def test_stats_delta_and_sum_keep_the_per_name_counts():
    before = {"seals": 2, "fallbacks": {"clone": 1}, "general_why": {}}
    after = {"seals": 5, "fallbacks": {"clone": 1, "cat": 2}, "general_why": {"holes": 1}}
    delta = e2e.stats_delta(before, after)
    assert delta == {"seals": 3, "fallbacks": {"cat": 2}, "general_why": {"holes": 1}}
    total = e2e.add_stats(e2e.add_stats({}, delta), delta)
    assert total == {"seals": 6, "fallbacks": {"cat": 4}, "general_why": {"holes": 2}}


def test_interleaved_schedule_settles_each_timed_chunk_and_rotates_the_lanes():
    order = e2e.schedule(["bf16", "qvg", "var"], rounds=3, settle=1)
    timed = [(i, lane) for i, (lane, t) in enumerate(order) if t]
    assert len(order) == 18 and len(timed) == 9
    # Every timed chunk comes right after an untimed chunk of its own video.
    assert all(order[i - 1] == (lane, False) for i, lane in timed)
    # Over 3 rounds every lane is timed once in every position of its round.
    positions = {lane: sorted(j % 3 for j, (_, lane2) in enumerate(timed) if lane2 == lane) for lane in ("bf16", "qvg", "var")}
    assert all(p == [0, 1, 2] for p in positions.values())
    assert e2e.schedule(["a", "b"], rounds=2, settle=0) == [("a", True), ("b", True), ("b", True), ("a", True)]
