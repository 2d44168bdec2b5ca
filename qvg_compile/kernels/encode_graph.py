"""A QVG encode replayed from a CUDA graph captured once per input layout.

A cache seals the same shapes with the same settings at every layer of every chunk. Launched op
by op, `encode_unchecked` costs 2-4 ms of host time per seal (20-60 launches through Triton's
Python launcher and the torch ops between them) while the model, which synchronises with the GPU
every layer, waits. Captured once and replayed, a seal costs one copy in, one graph launch, and
the caller's copies out.

- Key: x's shape, dtype and device, the config, the role, the initial centroids' shape and dtype,
  whether the fit is asked for, and a caller's ``tag`` (two encodes whose outputs are alive at
  once need different tags).
- With ``fit``, the segment's codebook fit (`residual_energy`, summed by the quantize kernel) is
  an output of the graph too.
- The first call of a key runs eagerly (it compiles the Triton kernels, which a capture cannot);
  the second captures, then every call replays.
- Captured: encodes from given centroids (a warm start or a shared codebook), without k-means,
  or from a seeded ``"random"`` start (its picks are drawn once, at the eager first call, and
  kept on the device); a ``"kmeans++"`` start runs eagerly. Nothing is captured while the
  current stream is itself being captured (a caller's own CUDA graph), or with
  ``QVG_SEAL_GRAPHS=0``. A capture that fails is reported once (`QVGGraphWarning`) and that
  layout runs eagerly from then on: same results, more host time.
- All graphs of a device share one memory pool, so the outputs of a replay are overwritten by the
  next replay of any key: copy them out first (the cache does, straight after each call).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch

from ..quant.config import QVGConfig
from ..quant.segment import QVGSegment
from .encode import encode_unchecked, triton_supports


@dataclasses.dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor
    init: Optional[torch.Tensor]
    seg: QVGSegment
    summary: torch.Tensor
    fit: Optional[torch.Tensor]


_graphs: dict[tuple, _Captured] = {}
_seen: set[tuple] = set()
_failed: set[tuple] = set()
_pools: dict[int, tuple] = {}


class QVGGraphWarning(UserWarning):
    """An encode could not be captured as a CUDA graph and runs op by op."""


def graphs_enabled() -> bool:
    """False when ``QVG_SEAL_GRAPHS=0`` (every encode launches op by op)."""
    value = os.environ.get("QVG_SEAL_GRAPHS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"QVG_SEAL_GRAPHS: expected 0 or 1, got {value!r}")
    return value == "1"


def captured_graphs() -> int:
    """How many encode graphs are held (all devices)."""
    return len(_graphs)


def release_graphs() -> None:
    """Drop every captured encode graph and its memory pool (the next encodes capture again)."""
    _graphs.clear()
    _seen.clear()
    _failed.clear()
    _pools.clear()


def encode_replayed(x: torch.Tensor, config: QVGConfig, role: str, init: Optional[torch.Tensor],
                    tag: int = 0, fit: bool = False) -> tuple[QVGSegment, torch.Tensor, Optional[torch.Tensor]]:
    """`encode_unchecked` ``(x, config, -2, role, init)``, from a captured CUDA graph when it can be.

    Args:
        x: ``[*lead, N, D]`` 16/32-bit float, sequence next to last.
        init: ``[S, *lead, C, D]`` warm start (or the shared codebook), or None.
        tag: keeps the outputs of calls whose results are alive at the same time apart.
        fit: also return the segment's `residual_energy` over ``x``.

    Returns the segment, its refusal summary (int8 ``[2]``, see `encode_unchecked`) and the fit
    (0-dim fp32, or None without ``fit``). From a graph, all are the graph's own output buffers:
    valid until the next call of this function.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    capturable = init is not None or config.stages == 0 or config.init == "random"
    if not (x.is_cuda and triton_supports(x, config, role) and capturable
            and graphs_enabled() and not torch.cuda.is_current_stream_capturing()):
        return _eager(x, config, role, init, fit)
    key = (tuple(x.shape), x.dtype, x.device, config, role,
           None if init is None else (tuple(init.shape), init.dtype), fit, tag)
    cap = _graphs.get(key)
    if cap is None:
        if key not in _seen or key in _failed:
            _seen.add(key)
            return _eager(x, config, role, init, fit)
        try:
            cap = _graphs[key] = _capture(x, config, role, init, fit)
        except RuntimeError as err:
            _failed.add(key)
            warnings.warn(f"QVG encode: capturing a CUDA graph for a {list(x.shape)} {role} encode failed "
                          f"({err}); that layout runs op by op (same results, more host time)",
                          QVGGraphWarning, stacklevel=2)
            return _eager(x, config, role, init, fit)
    cap.x.copy_(x)
    if init is not None:
        cap.init.copy_(init)
    cap.graph.replay()
    return cap.seg, cap.summary, cap.fit


def _eager(x: torch.Tensor, config: QVGConfig, role: str, init: Optional[torch.Tensor],
           fit: bool) -> tuple[QVGSegment, torch.Tensor, Optional[torch.Tensor]]:
    return encode_unchecked(x, config, -2, role, init, fit)


def _static_like(t: torch.Tensor) -> torch.Tensor:
    """A dense copy in the caller's dimension order: the graph's input buffer. Every later copy
    into it then keeps the order of the tensor it copies (a token-major ``[B, N, H, D]`` input
    is not transposed into a ``[B, H, N, D]``-contiguous buffer); the kernels take any strides."""
    return torch.empty_like(t, memory_format=torch.preserve_format).copy_(t)


def _pool(device: torch.device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _pools:
        _pools[index] = torch.cuda.graph_pool_handle()
    return _pools[index]


def _capture(x: torch.Tensor, config: QVGConfig, role: str, init: Optional[torch.Tensor], fit: bool) -> _Captured:
    sx = _static_like(x)
    si = None if init is None else _static_like(init)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(x.device), torch.cuda.graph(graph, pool=_pool(x.device)):
        seg, summary, energy = _eager(sx, config, role, si, fit)
    return _Captured(graph, sx, si, seg, summary, energy)
