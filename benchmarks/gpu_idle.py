"""Where the GPU waits for the host: idle time of a profiled region attributed to host work.

Reads a Chrome trace written by `torch.profiler` (``prof.export_chrome_trace``). The device's
busy intervals are the union of its kernels, copies and fills; every stretch in between, from
the first device event to the last, is *idle*. The host thread that launched the most work is
split into segments by its innermost running event, and each idle microsecond is charged to
the host work running at that moment:

* by category: inside ``qvg::cache_attention`` (a read), ``qvg::cache_write`` (a write; a write
  that seals, told by the encode's CUDA graph launched inside it, apart from one that does not), another
  ``qvg::`` op, inside a compiled region but outside the cache ops (AOTAutograd's wrappers,
  Inductor's generated code: ``Torch-Compiled Region``), or outside every compiled region
  (Dynamo's guards, the model's eager code between graphs, the pipeline's own loop);
* by the innermost host event's name (the top entries).

A device that is never idle gives zeros. The idle time of a chunk is what the host adds to its
latency one for one, since the model reads ``.item()`` at every layer (no queue builds up).

    python benchmarks/gpu_idle.py trace.json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tabulate import tabulate

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
COMPILED = "Torch-Compiled Region"
Interval = tuple[float, float]


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def idle_intervals(events: Sequence[dict[str, Any]]) -> list[Interval]:
    """Stretches between the device's busy intervals, from its first event to its last (us)."""
    busy = _merge((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
                  if e.get("cat") in DEVICE_CATS)
    return [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] > a[1]]


def host_segments(events: Sequence[dict[str, Any]]) -> list[tuple[float, float, tuple[str, ...]]]:
    """``(start, end, stack)`` of the busiest host thread: the stack of nested event names
    (outermost first) running over ``[start, end)``; gaps between events have an empty stack."""
    host = [e for e in events if e.get("cat") in HOST_CATS and "dur" in e]
    if not host:
        return []
    tid = collections.Counter((e["pid"], e["tid"]) for e in host).most_common(1)[0][0]
    spans = sorted(((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in host
                    if (e["pid"], e["tid"]) == tid), key=lambda s: (s[0], -s[1]))
    segments: list[tuple[float, float, tuple[str, ...]]] = []
    stack: list[tuple[float, str]] = []  # (end, name), properly nested
    t = spans[0][0]

    def emit(upto: float) -> None:
        nonlocal t
        if upto > t:
            segments.append((t, upto, tuple(n for _, n in stack)))
            t = upto

    for start, end, name in spans:
        while stack and stack[-1][0] <= start:
            emit(stack[-1][0])
            stack.pop()
        emit(start)
        stack.append((min(end, stack[-1][0]) if stack else end, name))
    while stack:
        emit(stack[-1][0])
        stack.pop()
    return segments


def category(stack: Sequence[str]) -> str:
    """The attribution class of a host stack (outermost first)."""
    for name in stack:
        if name.startswith("qvg::cache_attention"):
            return "read op (qvg::cache_attention)"
        if name.startswith("qvg::cache_write"):
            return "write op (qvg::cache_write)"
        if name.startswith("qvg::"):
            return "other qvg:: op"
    if any(name.startswith(COMPILED) for name in stack):
        return "compiled region, outside cache ops"
    return "outside compiled regions (guards, eager code)"


SEALING = "write op, sealing (qvg::cache_write + encode graph)"


def sealing_writes(events: Sequence[dict[str, Any]]) -> list[Interval]:
    """The ``qvg::cache_write`` spans that launch a CUDA graph (a seal's replayed encode)."""
    writes = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                    if e.get("cat") in HOST_CATS and "dur" in e and e["name"].startswith("qvg::cache_write"))
    graphs = sorted(float(e["ts"]) for e in events if e.get("name", "").startswith("cudaGraphLaunch"))
    return [(a, b) for a, b in writes
            if bisect.bisect_left(graphs, a) < len(graphs) and graphs[bisect.bisect_left(graphs, a)] <= b]


def _inside(spans: Sequence[Interval], starts: Sequence[float], t: float) -> bool:
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and spans[i][0] <= t <= spans[i][1]


def attribute(events: Sequence[dict[str, Any]], top: int = 12) -> dict[str, Any]:
    """Idle microseconds by category and by innermost host event (see the module docstring)."""
    idle = idle_intervals(events)
    segments = host_segments(events)
    starts = [s[0] for s in segments]
    seals = sealing_writes(events)
    seal_starts = [a for a, _ in seals]
    by_cat: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    for a, b in idle:
        i = max(0, bisect.bisect_right(starts, a) - 1)
        covered = 0.0
        while i < len(segments) and segments[i][0] < b:
            s, e, stack = segments[i]
            overlap = min(b, e) - max(a, s)
            if overlap > 0:
                covered += overlap
                cat = category(stack)
                if cat.startswith("write op") and _inside(seals, seal_starts, max(a, s)):
                    cat = SEALING
                by_cat[cat] += overlap
                by_leaf[stack[-1] if stack else "(no host event)"] += overlap
            i += 1
        if b - a > covered:
            by_cat["outside compiled regions (guards, eager code)"] += b - a - covered
            by_leaf["(no host event)"] += b - a - covered
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    span = (max(float(e["ts"]) + float(e.get("dur", 0)) for e in device) - min(float(e["ts"]) for e in device)
            if device else 0.0)
    return {"span_us": span, "idle_us": sum(b - a for a, b in idle), "gaps": len(idle),
            "by_category": dict(by_cat.most_common()), "by_leaf": dict(by_leaf.most_common(top))}


def load_events(path: Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    return data["traceEvents"] if isinstance(data, dict) else data


def table(result: dict[str, Any]) -> str:
    """The attribution as two small tables (ms)."""
    head = (f"device span {result['span_us'] / 1e3:.1f} ms, idle {result['idle_us'] / 1e3:.1f} ms "
            f"({100 * result['idle_us'] / max(result['span_us'], 1e-9):.1f}%) in {result['gaps']} gaps")
    cats = tabulate([[k, f"{v / 1e3:.2f}"] for k, v in result["by_category"].items()],
                    headers=["device idle while the host runs", "ms"], tablefmt="github")
    leaves = tabulate([[k[:70], f"{v / 1e3:.2f}"] for k, v in result["by_leaf"].items()],
                      headers=["innermost host event", "ms"], tablefmt="github")
    return "\n\n".join([head, cats, leaves])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="Chrome trace JSON from torch.profiler")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    print(table(attribute(load_events(args.trace), args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
