"""What the parallel examples' command lines and the multi-GPU benchmark share: building the same
seeded model on every rank, compiling it (Inductor or QVG), the common flags, and starting the
ranks either as spawned processes (``--nproc``) or as one ``torchrun`` process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import qvg_compile

from .parallel import init_from_env, launch

Worker = Callable[[int, int, argparse.Namespace], None]
"""``worker(rank, world_size, args)``, run once per rank inside its process group."""

Build = Callable[[str, torch.device, dist.ProcessGroup], nn.Module]
"""``build(config_name, device, group)``: an example's seeded model as this rank's part of it."""


def seeded_model(model_cls: Callable[[Any], nn.Module], config: Any, device: torch.device, seed: int,
                 dtype: torch.dtype, layers: int | None) -> nn.Module:
    """``model_cls(config)`` built on ``device`` from ``torch.manual_seed(seed)`` (so every rank
    holds the same full weights), cast to ``dtype``, in eval mode without gradients. ``layers``
    overrides the config's number of layers (real widths, shorter compiles)."""
    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config)
    return model.to(dtype).eval().requires_grad_(False)


def compile_model(model: nn.Module, qvg: bool) -> Any:
    """``torch.compile`` with the QVG backend (compressed caches) or with Inductor (BF16 caches)."""
    return torch.compile(model, backend=qvg_compile.backend()) if qvg else torch.compile(model)


def compiled_rank_model(build: Build, rank: int, args: argparse.Namespace) -> Any:
    """What a parallel example's worker runs: ``build`` of the ``--config`` on this rank's device in
    the default group, compiled with QVG when ``--qvg`` is set (`compile_model`)."""
    return compile_model(build(args.config, rank_device(rank, args.backend), dist.group.WORLD), args.qvg)


def rank_device(rank: int, backend: str) -> torch.device:
    """This rank's device: its local GPU under NCCL (``LOCAL_RANK`` under torchrun over several
    hosts), else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")


def print_memory(rank: int, world: int, latents: torch.Tensor, caches: Any) -> None:
    """One line per rank: the latents' shape and the KV bytes held against the dense BF16 bytes."""
    report = qvg_compile.memory_report(caches)
    print(f"rank {rank}/{world}: latents {list(latents.shape)}, KV held {report['held_bytes'] / 2**20:.3g} MiB "
          f"of {report['dense_bytes'] / 2**20:.3g} MiB dense ({report['compression']:.2f}x)", flush=True)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every parallel example takes: config, chunks, seed, ``--qvg``, ``--nproc``, ``--backend``."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("--config", choices=("tiny", "real"), default="tiny")
    out.add_argument("--chunks", type=int, default=3)
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--qvg", action="store_true", help="compile with the QVG backend")
    out.add_argument("--nproc", type=int, default=None, help="spawn this many processes (else torchrun)")
    out.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with GPUs)")
    return out


def run(worker: Worker, args: argparse.Namespace) -> None:
    """Run ``worker`` on every rank: ``args.nproc`` spawned processes, or this process as one rank
    of a ``torchrun`` launch. ``args.backend`` defaults to NCCL with GPUs, else gloo."""
    args.backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if args.nproc:
        launch(worker, args.nproc, args, backend=args.backend)
        return
    rank, world, _ = init_from_env(args.backend)
    try:
        worker(rank, world, args)
    finally:
        dist.destroy_process_group()
