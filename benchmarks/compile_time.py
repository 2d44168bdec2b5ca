"""Compile time on the CPU: the shipped tiny model under plain Inductor and under the QVG backend.

Each run is a fresh process with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR`` in a new
temporary folder), so both pay the cold cost a new user pays. A run generates ``--chunks`` chunks
with ``torch.compile(model)`` or ``torch.compile(model, backend=qvg_compile.backend(...))`` and
reports the first generate (compiles included), a second generate (warm), and the graphs Dynamo
compiled. The runs alternate (Inductor, QVG, Inductor, QVG, ...) ``--repeats`` times and every one
is printed, then the medians and the ratio the README quotes.

    python benchmarks/compile_time.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tabulate import tabulate

import qvg_compile
from qvg_compile.tiny.checkpoint import load_checkpoint
from qvg_compile.tiny.data import from_uint8
from qvg_compile.tiny.model import allocate_cache, generate

CHILD = "--child"


def child(kind: str, chunks: int) -> dict:
    """One measurement in this process (called in a fresh interpreter)."""
    ckpt = load_checkpoint(None)
    model = ckpt.model
    prompt = from_uint8(ckpt.prompts[:1])
    frames = chunks * model.cfg.frames_per_chunk
    if kind == "qvg":
        compiled = torch.compile(model, backend=qvg_compile.backend(chunk_tokens=model.cfg.chunk_tokens))
    else:
        compiled = torch.compile(model)
    times = []
    for _ in range(2):
        cache = allocate_cache(model, frames)
        start = time.perf_counter()
        generate(compiled, chunks, seed=0, cache=cache, prompt=prompt, progress=False)
        times.append(time.perf_counter() - start)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return {"kind": kind, "first_s": times[0], "warm_s": times[1], "graphs": graphs}


def run_child(kind: str, chunks: int) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
        out = subprocess.run([sys.executable, __file__, CHILD, kind, "--chunks", str(chunks)], env=env,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=6, help="chunks per generate (the prompt chunk included)")
    parser.add_argument("--repeats", type=int, default=2, help="Inductor/QVG pairs, each in fresh processes")
    args, rest = parser.parse_known_args(argv)
    if rest[:1] == [CHILD]:
        print(json.dumps(child(rest[1], args.chunks)))
        return 0
    if rest:
        parser.error(f"unrecognised arguments: {rest}")
    runs = [run_child(kind, args.chunks) for _ in range(args.repeats) for kind in ("inductor", "qvg")]
    print(tabulate([[r["kind"], f"{r['first_s']:.1f}", f"{r['warm_s']:.2f}", r["graphs"]] for r in runs],
                   headers=["backend", "first generate s (cold)", "second generate s", "graphs"], tablefmt="github"))
    first = {kind: statistics.median(r["first_s"] for r in runs if r["kind"] == kind) for kind in ("inductor", "qvg")}
    print(f"\nmedian first generate: Inductor {first['inductor']:.1f} s, QVG {first['qvg']:.1f} s "
          f"({first['qvg'] / first['inductor']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
