"""Explicit API: `compress` the caches of an object in place, `seal` them when a video ends, and
`memory_report`."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import torch
from tabulate import tabulate

from ..quant.config import QVGConfig
from .tensor import QVGCache

Select = Callable[[str, torch.Tensor], bool]
VALUE_NAMES = ("v", "value", "values", "v_cache", "value_cache", "cache_v")


def is_cache_like(path: str, t: torch.Tensor) -> bool:
    """The default choice of tensors to compress: floating point, rank >= 3, not a parameter."""
    return t.dtype.is_floating_point and t.dtype.itemsize > 1 and t.dim() >= 3 and not isinstance(t, torch.nn.Parameter)


def role_of(path: str) -> str:
    """``"value"`` when the last name in ``path`` (list indices skipped) says so (``["v"]``,
    ``.value_cache[3]``, ``v_txt``, ``cache_v``...); ``"key"`` otherwise."""
    names = [n for n in re.split(r"[\[\].'\"]+", path.lower()) if n and not n.lstrip("-").isdigit()]
    last = names[-1] if names else ""
    return "value" if last in VALUE_NAMES or last.endswith("_v") or last.startswith(("v_", "value_")) else "key"


def compress(obj: Any, config: Optional[QVGConfig] = None, seq_dim: int = 1,
             select: Optional[Select] = None, **options: Any) -> Any:
    """Convert a tensor, or every cache tensor inside ``obj``, into `QVGCache`.

    ``obj`` is a tensor (returned converted), a dict or list (converted in place), a tuple
    (rebuilt: tuples are immutable), or an ``nn.Module`` (its buffers and tensor attributes, and
    the containers it holds as attributes, converted in place). ``select(path, tensor)`` picks
    the tensors (default `is_cache_like`); the role (key or value) follows the name, and an
    unnamed pair of tensors is a ``(key, value)`` pair. K and V packed along the channels take
    ``roles=("key", "value")``.
    ``options`` go to `QVGCache.from_dense` (``chunk_tokens``, ``dense_chunks``...).
    Returns the converted object.
    """
    choose = select or is_cache_like
    return _convert(obj, "", config, seq_dim, choose, options)


def _convert(obj: Any, path: str, config: Optional[QVGConfig], seq_dim: int, choose: Select,
             options: dict, role: Optional[str] = None) -> Any:
    if isinstance(obj, QVGCache):
        return obj
    if isinstance(obj, torch.Tensor):
        if not choose(path, obj):
            return obj
        return QVGCache.from_dense(obj, seq_dim, config, role=role or role_of(path), **options)
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = _convert(obj[key], f"{path}[{key!r}]", config, seq_dim, choose, options)
        return obj
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            obj[i] = _convert(item, f"{path}[{i}]", config, seq_dim, choose, options)
        return obj
    if isinstance(obj, tuple):
        names = getattr(obj, "_fields", None) or [f"[{i}]" for i in range(len(obj))]
        # An unnamed pair of tensors is a (key, value) pair, the way pipelines return a layer's cache.
        pair = (not hasattr(obj, "_fields") and len(obj) == 2
                and all(isinstance(item, torch.Tensor) for item in obj))
        roles = ("key", "value") if pair else (None,) * len(obj)
        items = [_convert(item, f"{path}.{name}" if not name.startswith("[") else f"{path}{name}", config, seq_dim,
                          choose, options, role) for name, item, role in zip(names, obj, roles)]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, torch.nn.Module):
        for name, module in obj.named_modules():
            prefix = f"{path}.{name}" if name else path
            for key, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[key] = _convert(buf, f"{prefix}.{key}", config, seq_dim, choose, options)
            for key, value in list(vars(module).items()):
                if key.startswith("_") or isinstance(value, (torch.nn.Module, torch.nn.Parameter)):
                    continue
                if isinstance(value, (torch.Tensor, dict, list, tuple)):
                    setattr(module, key, _convert(value, f"{prefix}.{key}", config, seq_dim, choose, options))
        return obj
    return obj


def _tensors(obj: Any, path: str, out: list[tuple[str, torch.Tensor]], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path or "<tensor>", obj))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _tensors(value, f"{path}[{key!r}]", out, seen)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _tensors(value, f"{path}[{i}]", out, seen)
    elif isinstance(obj, torch.nn.Module):
        for name, module in obj.named_modules():
            prefix = f"{path}.{name}" if name else path
            for key, buf in module._buffers.items():
                if buf is not None:
                    _tensors(buf, f"{prefix}.{key}" if prefix else key, out, seen)
            for key, value in vars(module).items():
                if not key.startswith("_") and isinstance(value, (torch.Tensor, dict, list, tuple)) \
                        and not isinstance(value, torch.nn.Parameter):
                    _tensors(value, f"{prefix}.{key}" if prefix else key, out, seen)


def _walk(obj: Any) -> list[tuple[str, torch.Tensor, bool]]:
    """``(path, tensor, first)`` for every tensor in ``obj``; ``first`` is False for a `QVGCache`
    view of a store already listed (views of one store hold its bytes once)."""
    tensors: list[tuple[str, torch.Tensor]] = []
    _tensors(obj, "", tensors, set())
    stores: set[int] = set()
    out = []
    for path, t in tensors:
        first = not isinstance(t, QVGCache) or id(t._handle) not in stores
        if isinstance(t, QVGCache):
            stores.add(id(t._handle))
        out.append((path, t, first))
    return out


def seal(obj: Any, release: bool = True) -> int:
    """End of a video: `QVGCache.seal` every compressed cache in ``obj`` (a tensor, containers, a
    module's buffers and tensor attributes), so that no chunk stays BF16; with ``release`` the
    freed dense rows are given back (the next write allocates them again). Eager only.

    Returns the number of stores sealed (views of one store count once)."""
    if not isinstance(release, bool):
        raise TypeError(f"release: expected a bool, got {type(release).__name__}")
    sealed = 0
    for _, t, first in _walk(obj):
        if isinstance(t, QVGCache) and first:
            t.seal(release=release)
            sealed += 1
    return sealed


def memory_report(obj: Any) -> dict[str, Any]:
    """Bytes held by every tensor in ``obj`` (a tensor, containers, a module's buffers and tensor
    attributes) against their dense size.

    Returns ``{"rows": [{"tensor", "shape", "dtype", "storage", "dense_bytes", "held_bytes",
    "ratio"}...], "dense_bytes", "held_bytes", "compression", "table"}`` (``table``: GitHub
    markdown via tabulate)."""
    rows = []
    for path, t, first in _walk(obj):
        dense = math.prod(t.shape) * t.dtype.itemsize
        held = dense
        if isinstance(t, QVGCache):
            held = t.nbytes() if first else 0
        rows.append({"tensor": path, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                     "storage": "QVG" if isinstance(t, QVGCache) else "dense", "dense_bytes": dense,
                     "held_bytes": held, "ratio": dense / max(1, held)})
    dense_total = sum(r["dense_bytes"] for r in rows)
    held_total = sum(r["held_bytes"] for r in rows)
    mib = 2 ** 20
    table = tabulate(
        [[r["tensor"], "x".join(map(str, r["shape"])), r["dtype"], r["storage"], f"{r['dense_bytes'] / mib:.3f}",
          f"{r['held_bytes'] / mib:.3f}", f"{r['ratio']:.2f}"] for r in rows]
        + [["total", "", "", "", f"{dense_total / mib:.3f}", f"{held_total / mib:.3f}",
            f"{dense_total / max(1, held_total):.2f}"]],
        headers=["tensor", "shape", "dtype", "storage", "dense MiB", "held MiB", "x"], tablefmt="github")
    return {"rows": rows, "dense_bytes": dense_total, "held_bytes": held_total,
            "compression": dense_total / max(1, held_total), "table": table}
