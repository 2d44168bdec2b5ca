"""Explicit API: `compress` caches found in containers or modules, and `memory_report`."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from tabulate import tabulate

from ..quant.config import QVGConfig
from .tensor import QVGCache


def compress(obj: Any, config: Optional[QVGConfig] = None, seq_dim: int = 1) -> Any:
    """Convert a tensor, or every floating tensor of rank >= 3 in a nested list/dict (converted in
    place) / tuple (rebuilt) / module buffer, into `QVGCache`. Returns the converted object."""
    if isinstance(obj, QVGCache):
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() < 3 or not obj.dtype.is_floating_point:
            return obj
        return QVGCache.from_dense(obj, seq_dim=seq_dim, config=config)
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = compress(obj[key], config, seq_dim)
        return obj
    if isinstance(obj, list):
        obj[:] = [compress(item, config, seq_dim) for item in obj]
        return obj
    if isinstance(obj, tuple):
        return type(obj)(compress(item, config, seq_dim) for item in obj)
    if isinstance(obj, torch.nn.Module):
        for module in obj.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = compress(buf, config, seq_dim)
        return obj
    raise TypeError(f"obj: expected a tensor, list, dict, tuple or nn.Module, got {type(obj).__name__}")


def _walk(obj: Any, path: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((path or "<tensor>", obj))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _walk(value, f"{path}[{key!r}]", out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _walk(value, f"{path}[{i}]", out)
    elif isinstance(obj, torch.nn.Module):
        for name, buf in obj.named_buffers():
            out.append((f"{path}.{name}" if path else name, buf))


def memory_report(obj: Any) -> dict:
    """Bytes held by every cache tensor in ``obj`` against the dense equivalent.

    Returns ``{"rows": [...], "dense_bytes": int, "held_bytes": int, "compression": float,
    "table": str}``."""
    tensors: list[tuple[str, torch.Tensor]] = []
    _walk(obj, "", tensors)
    rows = []
    dense_total = held_total = 0
    for path, t in tensors:
        dense = math.prod(t.shape) * t.dtype.itemsize
        held = t.nbytes() if isinstance(t, QVGCache) else dense
        dense_total += dense
        held_total += held
        rows.append({"tensor": path, "shape": list(t.shape), "qvg": isinstance(t, QVGCache),
                     "dense_bytes": dense, "held_bytes": held})
    table = tabulate([[r["tensor"], "x".join(map(str, r["shape"])), "QVG" if r["qvg"] else "dense",
                       f"{r['dense_bytes'] / 2**20:.2f}", f"{r['held_bytes'] / 2**20:.2f}"] for r in rows]
                     + [["total", "", "", f"{dense_total / 2**20:.2f}", f"{held_total / 2**20:.2f}"]],
                     headers=["tensor", "shape", "storage", "dense MiB", "held MiB"], tablefmt="github")
    return {"rows": rows, "dense_bytes": dense_total, "held_bytes": held_total,
            "compression": dense_total / max(1, held_total), "table": table}
