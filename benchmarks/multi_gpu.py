"""Multi-GPU: per-rank KV memory and per-chunk latency, BF16 against QVG, under tensor parallelism
(the Self-Forcing-style model, `examples/distributed/tp_self_forcing.py`) and Ulysses sequence
parallelism (the HY-WorldPlay-style model, `examples/distributed/ulysses_worldplay.py`).

Every rank builds the same model, keeps its share, and generates with its own caches: BF16 under
``torch.compile`` (Inductor) or compressed by ``torch.compile(backend=qvg_compile.backend())``.
Self-Forcing: the history is written by one clean forward per chunk (untimed), then
``--timed-chunks`` whole chunks (4 + 1 forwards) are timed with CUDA events. WorldPlay: its own
pipeline (`worldplay.generate`, 4 denoising forwards + a cache pass per chunk) runs until the
history reaches ``--history`` frames; the last ``--timed-chunks`` chunks are timed. Per rank: KV
bytes held (`qvg_compile.memory_report`), peak allocated memory; latency is the slowest rank's.
A short table is printed last and everything goes to ``--out`` as JSON.

    python benchmarks/multi_gpu.py --nproc 2                         # 2 GPUs, NCCL, real configs
    python benchmarks/multi_gpu.py --nproc 2 --device cpu --config tiny --history 6 --out /tmp/mg
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch.distributed as dist  # noqa: E402
from tabulate import tabulate  # noqa: E402

import qvg_compile  # noqa: E402
from end_to_end import GB, Clock, Video  # noqa: E402
from examples.distributed import parallel  # noqa: E402
from examples.distributed.cli import compile_model  # noqa: E402
from examples.distributed import tp_self_forcing as tp  # noqa: E402
from examples.distributed import ulysses_worldplay as uw  # noqa: E402
from examples.models import worldplay as wp  # noqa: E402

MODELS = ("tp", "ulysses")
CACHES = ("bf16", "qvg")


def _kv_bytes(caches: Any) -> tuple[int, int]:
    report = qvg_compile.memory_report(caches)
    rows = [r for r in report["rows"] if r["tensor"].endswith(("['k']", "['v']"))]
    return sum(r["held_bytes"] for r in rows), sum(r["dense_bytes"] for r in rows)


def _progress(msg: str) -> None:
    """One line from rank 0, flushed: a long run on real configs shows where it is."""
    if dist.get_rank() == 0:
        print(msg, flush=True)


def run_tp(cache: str, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    """Tensor-parallel Self-Forcing: time ``--timed-chunks`` chunks after ``--history`` frames."""
    group = dist.group.WORLD
    model = tp.build(args.config, device, group, seed=args.seed, layers=args.layers)
    cfg = model.config
    history = args.history // cfg.chunk_frames * cfg.chunk_frames
    capacity = max(history, 3 * cfg.chunk_frames) + args.timed_chunks * cfg.chunk_frames
    video = Video(model, compile_model(model, cache == "qvg"), capacity, args.seed,
                  kv=tp.init_kv_cache(model, 1, capacity), cross=tp.init_crossattn_cache(model, 1))
    t0 = time.perf_counter()
    video.clean_pass()
    video.clean_pass()
    video.chunk()
    clock.sync()
    warmup = time.perf_counter() - t0
    _progress(f"tp {cache}: compiled and warm after {warmup:.1f} s")
    while video.frames < history:
        video.clean_pass()
    _progress(f"tp {cache}: history of {video.frames} frames written at {time.perf_counter() - t0:.1f} s")
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    start_frames = video.frames
    times = [clock.time(video.chunk) for _ in range(args.timed_chunks)]
    held, dense = _kv_bytes(video.kv)
    return {"model": "tp self-forcing", "history": start_frames, "times": times, "warmup_s": warmup,
            "kv_bytes": held, "kv_dense_bytes": dense, "heads": tp.local_heads(model), "layers": cfg.num_layers}


def run_ulysses(cache: str, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    """Ulysses WorldPlay: its pipeline until ``--history`` frames, the last chunks timed."""
    group = dist.group.WORLD
    model = uw.build(args.config, device, group, seed=args.seed, layers=args.layers)
    cfg = model.config
    chunks = max(args.history // cfg.chunk_frames, 2) + args.timed_chunks
    fn = compile_model(model, cache == "qvg")
    marks: list[float] = []
    last: list[Any] = []

    def on_chunk(index: int, kv: Any) -> None:
        clock.sync()
        marks.append(time.perf_counter())
        _progress(f"ulysses {cache}: chunk {index + 1}/{chunks} done at {marks[-1] - t0:.1f} s")
        last[:] = [kv]
        if index == chunks - args.timed_chunks - 1 and clock.cuda:
            torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    wp.generate(fn, chunks, args.seed, progress=False, on_chunk=on_chunk)
    times = [b - a for a, b in zip([t0] + marks[:-1], marks)][-args.timed_chunks:]
    held, dense = _kv_bytes(last[0])
    return {"model": "ulysses worldplay", "history": (chunks - args.timed_chunks) * cfg.chunk_frames,
            "times": times, "warmup_s": marks[0] - t0, "kv_bytes": held, "kv_dense_bytes": dense,
            "heads": cfg.num_heads // dist.get_world_size(), "layers": cfg.num_layers}


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    clock = Clock(device)
    rows = []
    for name in args.models:
        for cache in CACHES:
            torch._dynamo.reset()
            qvg_compile.reset_stats()
            if clock.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = (run_tp if name == "tp" else run_ulysses)(cache, args, device, clock)
            row.update(cache=cache, rank=rank, world=world, s_per_chunk=statistics.median(row["times"]),
                       peak_bytes=torch.cuda.max_memory_allocated(device) if clock.cuda else 0,
                       fallbacks=qvg_compile.stats()["fallback_total"])
            rows.append(row)
            dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        _report([r for part in gathered for r in part], args)


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"command": "python benchmarks/multi_gpu.py " + " ".join(args.argv), "device": device,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "rows": rows}
    (out / "multi_gpu.json").write_text(json.dumps(result, indent=1))
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by_cache = {c: [r for r in rows if r["model"] == model and r["cache"] == c] for c in CACHES}
        base = max(r["s_per_chunk"] for r in by_cache["bf16"])
        for cache, ranks in by_cache.items():
            slowest = max(r["s_per_chunk"] for r in ranks)
            kv = max(r["kv_bytes"] for r in ranks)
            table.append([model, cache, ranks[0]["world"], ranks[0]["layers"], ranks[0]["heads"], ranks[0]["history"], f"{slowest:.3f}",
                          f"{100 * (slowest / base - 1):+.1f}", f"{kv / GB:.3g}",
                          f"{ranks[0]['kv_dense_bytes'] / max(1, kv):.2f}",
                          f"{max(r['peak_bytes'] for r in ranks) / GB:.2f}", sum(r["fallbacks"] for r in ranks)])
    text = tabulate(table, headers=["model", "cache", "ranks", "layers", "heads/rank", "history frames", "s/chunk (slowest)",
                                    "vs bf16 %", "KV GB/rank", "KV x", "peak GB/rank", "fallbacks"],
                    tablefmt="github", disable_numparse=True)
    (out / "multi_gpu_table.md").write_text(text + "\n")
    print(f"\n{device} x {rows[0]['world']}; {result['date']}\n\n{text}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=("real", "tiny"), default="real")
    parser.add_argument("--models", default="tp,ulysses")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the number of layers (real widths; WorldPlay's pipeline compiles ~6 graphs "
                             "per cache kind before its shapes settle, each of the whole model)")
    parser.add_argument("--history", type=int, default=60, help="latent frames of history before the timed chunks")
    parser.add_argument("--timed-chunks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="multi_gpu_out")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise ValueError(f"--models: unknown {sorted(unknown)}; expected some of {MODELS}")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise ValueError(f"--nproc {args.nproc} needs as many GPUs; {torch.cuda.device_count()} visible")
    parallel.launch(_worker, args.nproc, args, backend="nccl" if args.device == "cuda" else "gloo")


if __name__ == "__main__":
    main()
