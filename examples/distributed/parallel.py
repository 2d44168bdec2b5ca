"""torch.distributed building blocks for the parallel reference models.

Every collective is a functional collective (``torch.distributed._functional_collectives``), so
Dynamo traces it into the graph as ``_c10d_functional.*`` + ``wait_tensor`` and the QVG backend
sees it next to the cache reads and writes. With ``group=None`` (one process) every helper is the
identity, so the same model code is the single-process reference.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

Group = dist.ProcessGroup | None

# NVLink multicast stays off on shared multi-GPU hosts (see the device notes): set before NCCL
# initialises in every process started here.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def rank_and_size(group: Group) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without a group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def split_evenly(name: str, total: int, parts: int) -> int:
    """``total // parts``; raise ValueError naming ``name`` when it does not divide."""
    if total % parts:
        raise ValueError(f"{name}={total} is not divisible by the group size {parts}")
    return total // parts


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of ``x`` over ``group``."""
    if group is None:
        return x
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenation along ``dim`` of every rank's ``x`` (same shape on every rank), in rank order."""
    if group is None:
        return x
    _, size = rank_and_size(group)
    dim = dim % x.dim()
    gathered = funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), 0, group))  # [size*s0, ...]
    if dim == 0:
        return gathered
    parts = gathered.unflatten(0, (size, x.shape[0]))                                   # [size, *x.shape]
    return parts.movedim(0, dim).flatten(dim, dim + 1)


def seq_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Ulysses all-to-all: ``[B, H, n, D]`` (all heads, this rank's ``n`` tokens) ->
    ``[B, H/P, P*n, D]`` (this rank's heads, every rank's tokens in rank order)."""
    if group is None:
        return x
    _, size = rank_and_size(group)
    b, h, n, d = x.shape
    hp = split_evenly("heads", h, size)
    send = x.reshape(b, size, hp, n, d).transpose(0, 1).contiguous()          # [P, B, H/P, n, D] by head group
    recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))  # [P, B, H/P, n, D] by source
    return recv.permute(1, 2, 0, 3, 4).reshape(b, hp, size * n, d)


def heads_to_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Inverse of `seq_to_heads`: ``[B, H/P, P*n, D]`` -> ``[B, H, n, D]``."""
    if group is None:
        return x
    _, size = rank_and_size(group)
    b, hp, m, d = x.shape
    n = split_evenly("tokens", m, size)
    send = x.reshape(b, hp, size, n, d).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, H/P, n, D] by token block
    recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))  # [P, B, H/P, n, D] by head group
    return recv.transpose(0, 1).reshape(b, size * hp, n, d)


# ---------------------------------------------------------------------------- sharded layers


def column_shard(linear: nn.Linear, group: Group) -> nn.Linear:
    """This rank's block of ``linear``'s output features (input replicated, output sharded)."""
    rank, size = rank_and_size(group)
    out = split_evenly("out_features", linear.out_features, size)
    rows = slice(rank * out, (rank + 1) * out)
    shard = nn.Linear(linear.in_features, out, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        shard.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            shard.bias.copy_(linear.bias[rows])
    return shard.requires_grad_(linear.weight.requires_grad)


class RowParallelLinear(nn.Module):
    """This rank's block of ``linear``'s input features; partial products are summed over the
    group (input sharded, output replicated). The bias is added once, after the sum."""

    def __init__(self, linear: nn.Linear, group: Group) -> None:
        super().__init__()
        rank, size = rank_and_size(group)
        cols = split_evenly("in_features", linear.in_features, size)
        self.group = group
        grad = linear.weight.requires_grad
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone(), requires_grad=grad)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class ShardedRMSNorm(nn.Module):
    """RMS norm over a feature dim split across the group (Wan normalises q and k over all heads):
    the sum of squares is reduced over the group, in fp32."""

    def __init__(self, norm: nn.Module, group: Group) -> None:
        super().__init__()
        rank, size = rank_and_size(group)
        full = norm.weight.shape[0]
        part = split_evenly("norm features", full, size)
        self.group, self.full, self.eps = group, full, norm.eps
        self.weight = nn.Parameter(norm.weight.detach()[rank * part:(rank + 1) * part].clone(),
                                   requires_grad=norm.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sq = all_reduce(xf.pow(2).sum(-1, keepdim=True), self.group)
        return (xf * torch.rsqrt(sq / self.full + self.eps)).to(x.dtype) * self.weight


# ------------------------------------------------------------------------------ save / load


def save_caches(caches: list[dict[str, torch.Tensor]], directory: str | Path, rank: int) -> None:
    """Write this rank's per-layer cache dicts: ``rank{r}.layer{i}.{name}.safetensors`` per tensor
    (a `QVGCache` through `QVGCache.save`, packed; any other tensor as it is) and ``rank{r}.json``
    naming them. Ranks write disjoint files, so all may share ``directory``."""
    from safetensors.torch import save_file

    from qvg_compile import QVGCache
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = []
    for i, layer in enumerate(caches):
        names = {}
        for name, tensor in layer.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"caches[{i}][{name!r}]: expected a tensor, got {type(tensor).__name__}")
            path = directory / f"rank{rank}.layer{i}.{name}.safetensors"
            if isinstance(tensor, QVGCache):
                tensor.save(str(path))
                names[name] = "qvg"
            else:
                save_file({"tensor": tensor.detach().cpu().contiguous()}, str(path))
                names[name] = "dense"
        index.append(names)
    (directory / f"rank{rank}.json").write_text(json.dumps(index))


def load_caches(directory: str | Path, rank: int, device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """Read what `save_caches` wrote for ``rank``, onto ``device``."""
    from safetensors.torch import load_file

    from qvg_compile import QVGCache
    directory = Path(directory)
    index_path = directory / f"rank{rank}.json"
    if not index_path.exists():
        raise ValueError(f"{index_path}: no caches saved for rank {rank}")
    out = []
    for i, names in enumerate(json.loads(index_path.read_text())):
        layer = {}
        for name, kind in names.items():
            path = str(directory / f"rank{rank}.layer{i}.{name}.safetensors")
            layer[name] = QVGCache.load(path, device) if kind == "qvg" else load_file(path)["tensor"].to(device)
        out.append(layer)
    return out


# ------------------------------------------------------------------------------- launching


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes, each in a process
    group of ``backend`` (``"gloo"`` on CPU, ``"nccl"`` with one GPU per rank), then tear down."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "rendezvous"), backend, fn, args),
                 nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, path: str, backend: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(NCCL_SAFE_ENV)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{path}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def init_from_env(backend: str | None = None) -> tuple[int, int, torch.device]:
    """For ``torchrun``: join the default group from the environment; returns (rank, world size,
    this rank's device)."""
    os.environ.update(NCCL_SAFE_ENV)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device
