"""The quantizer comparison behind ``qvg-compile quant-bench``: every method on the same K/V."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..quant.api import quantize
from ..quant.config import QVGConfig
from ..quant.metrics import attention_rel_err, rel_mse

DEFAULT_METHODS = ("qvg", "qvg_pro", "rtn", "rtn_sym", "kivi", "quarot")


def load_kv(path: str, layer: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Read ``k``, ``v`` (``[B, H, N, D]``) and optional ``q`` from a ``.pt`` or ``.safetensors`` file.

    A capture of several layers (``qvg-compile capture-kv``: ``k.<l>``, ``v.<l>``, ``q.<l>``) gives
    layer ``layer``, or by default every stored layer stacked along the heads (each quantizer
    works per head, so this is every layer's heads at once)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--kv: no such file {path!r}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        data = load_file(str(p))
    elif p.suffix == ".pt":
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"--kv: expected a .pt or .safetensors file, got {p.suffix!r}")
    if isinstance(data, dict) and "k" not in data:
        data = _pick_layer(data, path, layer)
    elif layer is not None:
        raise ValueError(f"layer: {path!r} holds one layer ('k', 'v'), got layer={layer}")
    if not isinstance(data, dict) or "k" not in data or "v" not in data:
        raise ValueError(f"--kv: {path!r} must hold tensors named 'k' and 'v' (and optionally 'q')")
    for name in ("q", "k", "v"):
        if name in data and data[name].dim() != 4:
            raise ValueError(f"--kv: tensor {name!r} must be [B, H, N, D], got {list(data[name].shape)}")
    return data


def _pick_layer(data: dict[str, torch.Tensor], path: str, layer: Optional[int]) -> dict[str, torch.Tensor]:
    """``k.<l>``/``v.<l>``/``q.<l>`` -> ``k``/``v``/``q`` of one layer, or all stacked on dim 1."""
    layers = sorted({int(n.split(".", 1)[1]) for n in data if n.startswith("k.") and n[2:].isdigit()})
    if not layers:
        return data
    if layer is not None and layer not in layers:
        raise ValueError(f"layer: {path!r} holds layers {layers}, got {layer}")
    chosen = layers if layer is None else [layer]
    missing = [f"v.{i}" for i in chosen if f"v.{i}" not in data]
    if missing:
        raise ValueError(f"--kv: {path!r} lacks {missing} beside its keys")
    names = ("k", "v", "q") if all(f"q.{i}" in data for i in chosen) else ("k", "v")
    return {n: torch.cat([data[f"{n}.{i}"] for i in chosen], dim=1) for n in names}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    k: torch.Tensor,
    v: torch.Tensor,
    q: Optional[torch.Tensor] = None,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    seed: int = 0,
) -> list[dict]:
    """One record per method: bits/element, compression vs BF16, K/V rel-MSE, attention-output
    relative error (when ``q`` is given) and K+V encode time in ms."""
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    records = []
    for name in methods:
        cfg = QVGConfig.preset(name, seed=seed)
        if k.device.type == "cuda":
            quantize(k, cfg, role="key")  # warm-up: first CUDA calls pay for kernel loading
            _sync(k.device)
        start = time.perf_counter()
        sk = quantize(k, cfg, role="key")
        sv = quantize(v, cfg, role="value")
        _sync(k.device)
        encode_ms = (time.perf_counter() - start) * 1e3
        k_hat, v_hat = sk.dequantize(), sv.dequantize()
        bits = (sk.nbytes + sv.nbytes) * 8 / (k.numel() + v.numel())
        records.append({
            "method": name,
            "bits_per_element": bits,
            "compression": 16 / bits,
            "k_rel_mse": rel_mse(k, k_hat),
            "v_rel_mse": rel_mse(v, v_hat),
            "attn_rel_err": attention_rel_err(q, k, v, k_hat, v_hat) if q is not None else None,
            "encode_ms": encode_ms,
        })
    return records
