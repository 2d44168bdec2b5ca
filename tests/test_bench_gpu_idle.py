"""benchmarks/gpu_idle.py: device idle time charged to the host work running meanwhile."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gpu_idle  # noqa: E402


def span(cat: str, name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1 if cat != "kernel" else 0, "tid": tid}


EVENTS = [
    span("user_annotation", "Torch-Compiled Region: 0/0", 0, 100),
    span("cpu_op", "qvg::cache_attention", 10, 40),
    span("cpu_op", "aten::empty", 20, 5),
    span("cpu_op", "qvg::cache_write", 110, 20),
    span("cpu_op", "aten::mm", 300, 5, tid=2),  # another thread: never charged
    span("kernel", "k1", 0, 15, tid=7),
    span("kernel", "k2", 30, 30, tid=7),
    span("kernel", "k3", 80, 10, tid=7),
    span("kernel", "k4", 150, 10, tid=7),
]


def test_idle_intervals_are_the_gaps_between_merged_device_work():
    overlapping = EVENTS + [span("kernel", "k5", 10, 25, tid=8)]  # fills 15-30 on a second stream
    assert gpu_idle.idle_intervals(EVENTS) == [(15.0, 30.0), (60.0, 80.0), (90.0, 150.0)]
    assert gpu_idle.idle_intervals(overlapping) == [(60.0, 80.0), (90.0, 150.0)]


def test_host_segments_follow_the_innermost_event():
    segments = gpu_idle.host_segments(EVENTS)
    assert segments[:4] == [
        (0.0, 10.0, ("Torch-Compiled Region: 0/0",)),
        (10.0, 20.0, ("Torch-Compiled Region: 0/0", "qvg::cache_attention")),
        (20.0, 25.0, ("Torch-Compiled Region: 0/0", "qvg::cache_attention", "aten::empty")),
        (25.0, 50.0, ("Torch-Compiled Region: 0/0", "qvg::cache_attention")),
    ]
    assert (100.0, 110.0, ()) in segments and (110.0, 130.0, ("qvg::cache_write",)) in segments


def test_idle_time_is_charged_by_category_and_leaf():
    got = gpu_idle.attribute(EVENTS)
    assert got["span_us"] == pytest.approx(160.0) and got["idle_us"] == pytest.approx(95.0) and got["gaps"] == 3
    # 15-30: the read (15 us, 5 of them in aten::empty); 60-80 and 90-100: the compiled region
    # outside the cache ops; 100-150: 20 us in the write, 30 us outside everything.
    assert got["by_category"] == pytest.approx({
        "read op (qvg::cache_attention)": 15.0, "compiled region, outside cache ops": 30.0,
        "write op (qvg::cache_write)": 20.0, "outside compiled regions (guards, eager code)": 30.0})
    assert got["by_leaf"]["aten::empty"] == pytest.approx(5.0)
    assert got["by_leaf"]["(no host event)"] == pytest.approx(30.0)


def test_a_device_never_idle_gives_zeros(tmp_path):
    busy = [span("cpu_op", "aten::mm", 0, 10), span("kernel", "k", 0, 50, tid=7)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": busy}))
    got = gpu_idle.attribute(gpu_idle.load_events(path))
    assert got["idle_us"] == 0.0 and got["by_category"] == {}
    assert "idle 0.0 ms" in gpu_idle.table(got)


def test_a_write_that_launches_the_encode_graph_is_charged_as_sealing():
    events = EVENTS + [span("cpu_op", "qvg::cache_write", 200, 30), span("cuda_runtime", "cudaGraphLaunch", 205, 5),
                       span("kernel", "k6", 260, 10, tid=7)]
    got = gpu_idle.attribute(events)
    # 160-200 outside everything, 200-230 in the sealing write, 230-260 outside again.
    assert got["by_category"][gpu_idle.SEALING] == pytest.approx(30.0)
    assert got["by_category"]["write op (qvg::cache_write)"] == pytest.approx(20.0)
    assert gpu_idle.sealing_writes(events) == [(200.0, 230.0)]
