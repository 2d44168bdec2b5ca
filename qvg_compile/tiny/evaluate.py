"""``qvg-compile eval``: what a quantized KV cache does to generated video.

Every method generates the same videos (same prompts, same noise seed) as the BF16-cache rollout;
the caches are either compressed up front with `qvg_compile.compress` (``via="compress"``: eager
`QVGCache`) or found and swapped by ``torch.compile(model, backend=qvg_compile.backend(config))``
(``via="compile"``: the same cache, compiled). Reported per method: per-frame and mean PSNR and
SSIM against the BF16 rollout over the generated frames, bits per element and compression of the
whole cache as held at the end (the open chunk's dense slot and every codebook included), and the
wall time of the rollout.

`QVGCache` stores QVG and RTN codes only, so KIVI and QuaRot run simulated (``via="simulated"``):
after each chunk's clean pass its K/V slot is replaced by ``quantize(...).dequantize()`` of the
math layer, which is what the cache does when it seals a chunk (the open chunk stays dense in
both). Their bits are the segments' own accounting plus the dense open chunk.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import torch

from ..backend import backend
from ..cache import compress, memory_report
from ..quant.api import quantize
from ..quant.config import QVGConfig
from .checkpoint import Checkpoint
from .data import from_uint8
from .metrics import psnr_per_frame, ssim_per_frame
from .model import TinyVideoModel, allocate_cache, generate

LABELS = {"bf16": "BF16 cache", "qvg": "QVG", "qvg_asym": "QVG asym", "qvg_pro": "QVG-Pro",
          "qvg_pro_asym": "QVG-Pro asym", "rtn": "RTN", "kivi": "KIVI", "quarot": "QuaRot"}
DEFAULT_METHODS = ("qvg", "qvg_asym", "qvg_pro", "qvg_pro_asym", "rtn", "kivi", "quarot")
SIMULATED = ("kivi", "quarot")
VIAS = ("compress", "compile")


def method_config(name: str, head_dim: int, bits: int = 2) -> QVGConfig:
    """The config of method ``name`` at ``bits`` for keys and values.

    ``qvg``/``qvg_pro`` are the presets (published symmetric codes); ``*_asym`` use asymmetric
    codes (all 4 levels, an FP8 zero point beside the FP8 scale). QuaRot's group (128 in its
    preset) is capped at the head dim; KIVI's full-precision window is 0 because the open chunk
    (a whole chunk of tokens) stays dense for every method."""
    if name not in LABELS or name == "bf16":
        raise ValueError(f"name: expected one of {sorted(set(LABELS) - {'bf16'})}, got {name!r}")
    preset = name.removesuffix("_asym")
    config = QVGConfig.preset(preset, key_bits=bits, value_bits=bits)
    if name.endswith("_asym"):
        config = config.replace(code_mode="asymmetric", value_code_mode="asymmetric")
    if name == "kivi":
        config = config.replace(residual_window=0)
    if config.group_size > head_dim:
        config = config.replace(group_size=head_dim)
    return config


class SimulatedCache:
    """``after_chunk`` hook of `generate`: quantizes each finished chunk of a dense cache in place
    with the math layer and counts the bytes its segments hold."""

    def __init__(self, config: QVGConfig) -> None:
        self.config = config
        self.chunk_bytes: list[int] = []

    def __call__(self, cache: list[dict], start: int, end: int) -> None:
        held = 0
        for layer in cache:
            for name, role in (("k", "key"), ("v", "value")):
                x = layer[name][:, start:end]
                segment = quantize(x, self.config, seq_dim=1, role=role)
                layer[name][:, start:end] = segment.dequantize().to(x.dtype)
                held += segment.nbytes
        self.chunk_bytes.append(held)

    def bits(self, cache: list[dict]) -> tuple[float, float]:
        """``(bits per element, compression)`` with every chunk but the last quantized."""
        elements = sum(layer[name].numel() for layer in cache for name in ("k", "v"))
        itemsize = cache[0]["k"].element_size()
        open_bytes = elements * itemsize // len(self.chunk_bytes)
        held = sum(self.chunk_bytes[:-1]) + open_bytes
        return 8 * held / elements, elements * itemsize / held


def rollout(model: TinyVideoModel, chunks: int, prompt: torch.Tensor, seed: int,
            config: Optional[QVGConfig] = None, via: str = "compress", progress: bool = False,
            after_chunk: Optional[Callable] = None,
            **cache_options: Any) -> tuple[torch.Tensor, list[dict], float]:
    """One video per prompt ``[B, F, C, H, W]`` with a dense cache (``config=None``) or a
    compressed one. Returns ``(frames [B, chunks*F, C, H, W], cache, seconds)``."""
    if via not in VIAS:
        raise ValueError(f"via: expected one of {VIAS}, got {via!r}")
    param = next(model.parameters())
    cache = allocate_cache(model, chunks * model.cfg.frames_per_chunk, batch=prompt.shape[0])
    runner: Callable = model
    if config is not None and via == "compress":
        compress(cache, config, seq_dim=1, **cache_options)
    elif config is not None:
        torch._dynamo.reset()
        runner = torch.compile(model, backend=backend(config, **cache_options))
    _sync(param.device)
    start = time.perf_counter()
    video = generate(runner, chunks, seed=seed, cache=cache, prompt=prompt.to(param.device, param.dtype),
                     progress=progress, after_chunk=after_chunk)
    _sync(param.device)
    return video, cache, time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bits(cache: list[dict]) -> tuple[float, float]:
    """``(bits per element, compression vs the dense dtype)`` of everything the cache holds."""
    mem = memory_report(cache)
    elements = sum(layer[name].numel() for layer in cache for name in ("k", "v"))
    return 8 * mem["held_bytes"] / elements, mem["compression"]


def evaluate(ckpt: Checkpoint, chunks: int = 24, prompts: int = 4, methods: Sequence[str] = DEFAULT_METHODS,
             bits: int = 2, seed: int = 0, via: str = "compress", device: str = "cpu",
             dtype: torch.dtype = torch.bfloat16, progress: bool = True,
             cache_options: Optional[dict] = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Roll out ``prompts`` shipped prompts for ``chunks`` chunks with every method.

    Returns ``(records, videos)``: one record per method, the BF16 reference first (``method``,
    ``label``, ``bits_per_element``, ``compression``, ``psnr_db``, ``ssim``, ``psnr_last_chunk_db``,
    ``per_frame_psnr_db``, ``per_frame_ssim``, ``first_frame``, ``seconds``, ``frames``, ``via``,
    ``config``), and the videos ``[B, T, C, H, W]`` by method. KIVI and QuaRot run simulated
    (``via="simulated"``, see the module docstring); the rest through ``via``.
    """
    from tqdm.auto import tqdm

    if not isinstance(chunks, int) or chunks < 2:
        raise ValueError(f"chunks: expected an int >= 2 (a prompt chunk and a generated one), got {chunks!r}")
    if not isinstance(prompts, int) or not 1 <= prompts <= len(ckpt.prompts):
        raise ValueError(f"prompts: expected an int in [1, {len(ckpt.prompts)}], got {prompts!r}")
    unknown = [m for m in methods if m not in LABELS or m == "bf16"]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {list(DEFAULT_METHODS)}")
    model = ckpt.model.to(device=device, dtype=dtype)
    cfg = model.cfg
    prompt = from_uint8(ckpt.prompts[:prompts])
    first = prompt.shape[1]
    options = dict(cache_options or {})
    reference, _, seconds = rollout(model, chunks, prompt, seed, progress=progress)
    records = [_record("bf16", None, reference, reference, first, seconds, float(torch.finfo(dtype).bits), 1.0, via)]
    videos = {"bf16": reference.float().cpu()}
    for name in tqdm(methods, desc="methods", unit="method", disable=not progress):
        config = method_config(name, cfg.head_dim, bits)
        if name in SIMULATED:
            hook = SimulatedCache(config)
            video, cache, seconds = rollout(model, chunks, prompt, seed, after_chunk=hook)
            (bpe, compression), how = hook.bits(cache), "simulated"
        else:
            video, cache, seconds = rollout(model, chunks, prompt, seed, config, via, **options)
            (bpe, compression), how = cache_bits(cache), via
        records.append(_record(name, config, reference, video, first, seconds, bpe, compression, how))
        videos[name] = video.float().cpu()
    return records, videos


def _record(name: str, config: Optional[QVGConfig], reference: torch.Tensor, video: torch.Tensor,
            first: int, seconds: float, bpe: float, compression: float, via: str) -> dict:
    ref, test = reference[:, first:], video[:, first:]
    psnr = psnr_per_frame(ref, test)
    ssim = ssim_per_frame(ref, test)
    last = psnr[-first:]
    finite = torch.isfinite(psnr)
    mean_psnr = float(psnr[finite].mean()) if bool(finite.all()) else float("inf")
    return {"method": name, "label": LABELS[name], "bits_per_element": round(bpe, 4),
            "compression": round(compression, 3), "psnr_db": mean_psnr, "ssim": float(ssim.mean()),
            "psnr_last_chunk_db": float(last.mean()) if bool(torch.isfinite(last).all()) else float("inf"),
            "per_frame_psnr_db": [float(x) for x in psnr], "per_frame_ssim": [float(x) for x in ssim],
            "first_frame": first, "frames": int(video.shape[1]), "seconds": round(seconds, 3), "via": via,
            "config": None if config is None else asdict(config)}
