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

``settings`` runs each method at its published setting and/or at a matched budget of bits per
element (`qvg_compile.tiny.budget`); ``sealed_bits_per_element`` is what the budget counts (all
but the open chunk). ``layer_errors=True`` adds each method's per-layer K/V rel-MSE on the dense
rollout's K/V (`qvg_compile.tiny.kv_error`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import torch

from ..backend import backend
from ..cache import compress, memory_report, seal
from ..quant.api import quantize
from ..quant.config import QVGConfig
from .budget import SETTINGS, in_budget, matched_setting
from .checkpoint import Checkpoint
from .data import from_uint8
from .kv_error import layer_errors as replay_layer_errors
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

    def sealed_bits(self, cache: list[dict]) -> float:
        """Bits per element with every chunk quantized (the video sealed)."""
        elements = sum(layer[name].numel() for layer in cache for name in ("k", "v"))
        return 8 * sum(self.chunk_bytes) / elements


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
             cache_options: Optional[dict] = None, settings: Sequence[str] = ("published",),
             layer_errors: bool = False, time_limit: Optional[float] = None,
             on_record: Optional[Callable[[dict], None]] = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Roll out ``prompts`` shipped prompts for ``chunks`` chunks with every method, at every
    setting of ``settings`` (``"published"``, ``"matched"``: `qvg_compile.tiny.budget`).

    Returns ``(records, videos)``: one record per method and setting, the BF16 reference first
    (``key``, ``method``, ``setting``, ``label``, ``bits_per_element``, ``sealed_bits_per_element``,
    ``in_budget``, ``compression``, ``psnr_db``, ``ssim``, ``psnr_last_chunk_db``,
    ``per_frame_psnr_db``, ``per_frame_ssim``, ``first_frame``, ``seconds``, ``frames``, ``via``,
    ``config``, and with ``layer_errors`` ``layers``: per-layer ``k_rel_mse``/``v_rel_mse``), and the
    videos ``[B, T, C, H, W]`` by record ``key``. KIVI and QuaRot run simulated (``via="simulated"``,
    see the module docstring); the rest through ``via``. A setting whose config equals one already
    run reuses its rollout. Past ``time_limit`` seconds no further method starts (a warning names
    the ones skipped); ``on_record`` gets each record as soon as it is made.
    """
    from tqdm.auto import tqdm

    _check_evaluate(ckpt, chunks, prompts, methods, settings, time_limit)
    begin = time.perf_counter()
    model = ckpt.model.to(device=device, dtype=dtype)
    prompt = from_uint8(ckpt.prompts[:prompts])
    options = dict(cache_options or {})
    reference, ref_cache, seconds = rollout(model, chunks, prompt, seed, progress=progress)
    first = prompt.shape[1]
    records = [_record("bf16", None, reference, reference, first, seconds, float(torch.finfo(dtype).bits), 1.0, via)]
    records[0].update(sealed_bits_per_element=records[0]["bits_per_element"], in_budget=None)
    videos = {"bf16": reference.float().cpu()}
    if on_record is not None:
        on_record(records[0])
    plan = [(setting, name) for setting in settings for name in methods]
    done: dict[tuple, tuple[dict, torch.Tensor]] = {}
    for i, (setting, name) in enumerate(tqdm(plan, desc="methods", unit="method", disable=not progress)):
        if time_limit is not None and time.perf_counter() - begin > time_limit:
            warnings.warn(f"time limit of {time_limit} s reached: skipped {[f'{n} ({s})' for s, n in plan[i:]]}")
            break
        config, extra = method_config(name, model.cfg.head_dim, bits), {}
        if setting == "matched":
            config, extra = matched_setting(config, name, model.cfg.head_dim)
        run_options = {**options, **extra}
        same = (config, tuple(sorted(run_options.items())))
        if same in done:
            record, video = dict(done[same][0]), done[same][1]
        else:
            record, video = _run_method(model, name, config, chunks, prompt, seed, via, run_options, reference, first)
            if layer_errors:
                record["layers"] = replay_layer_errors(ref_cache, config, model.cfg.chunk_tokens,
                                                       simulated=name in SIMULATED, cache_options=run_options)
            record["cache_options"] = run_options
            done[same] = (record, video)
        key = name if setting == "published" else f"{name}@{setting}"
        record.update(key=key, setting=setting, in_budget=in_budget(record["sealed_bits_per_element"]),
                      label=LABELS[name] + ("" if setting == "published" else f" ({setting})"))
        records.append(record)
        videos[key] = video
        if on_record is not None:
            on_record(record)
    return records, videos


def _check_evaluate(ckpt: Checkpoint, chunks: int, prompts: int, methods: Sequence[str], settings: Sequence[str],
                    time_limit: Optional[float]) -> None:
    if not isinstance(chunks, int) or chunks < 2:
        raise ValueError(f"chunks: expected an int >= 2 (a prompt chunk and a generated one), got {chunks!r}")
    if not isinstance(prompts, int) or not 1 <= prompts <= len(ckpt.prompts):
        raise ValueError(f"prompts: expected an int in [1, {len(ckpt.prompts)}], got {prompts!r}")
    unknown = [m for m in methods if m not in LABELS or m == "bf16"]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {list(DEFAULT_METHODS)}")
    if not settings or any(s not in SETTINGS for s in settings):
        raise ValueError(f"settings: expected some of {list(SETTINGS)}, got {list(settings)}")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError(f"time_limit: expected a positive number of seconds or None, got {time_limit!r}")


def _run_method(model: TinyVideoModel, name: str, config: QVGConfig, chunks: int, prompt: torch.Tensor, seed: int,
                via: str, options: dict, reference: torch.Tensor, first: int) -> tuple[dict, torch.Tensor]:
    """One method's rollout and its record (bits while generating and once sealed)."""
    if name in SIMULATED:
        hook = SimulatedCache(config)
        video, cache, seconds = rollout(model, chunks, prompt, seed, after_chunk=hook)
        (bpe, compression), how = hook.bits(cache), "simulated"
        sealed = hook.sealed_bits(cache)
    else:
        video, cache, seconds = rollout(model, chunks, prompt, seed, config, via, **options)
        (bpe, compression), how = cache_bits(cache), via
        seal(cache)
        sealed = cache_bits(cache)[0]
    record = _record(name, config, reference, video, first, seconds, bpe, compression, how)
    record["sealed_bits_per_element"] = round(sealed, 4)
    return record, video.float().cpu()


def _record(name: str, config: Optional[QVGConfig], reference: torch.Tensor, video: torch.Tensor,
            first: int, seconds: float, bpe: float, compression: float, via: str) -> dict:
    ref, test = reference[:, first:], video[:, first:]
    psnr = psnr_per_frame(ref, test)
    ssim = ssim_per_frame(ref, test)
    last = psnr[-first:]
    finite = torch.isfinite(psnr)
    mean_psnr = float(psnr[finite].mean()) if bool(finite.all()) else float("inf")
    return {"key": name, "method": name, "setting": "published", "label": LABELS[name],
            "bits_per_element": round(bpe, 4),
            "compression": round(compression, 3), "psnr_db": mean_psnr, "ssim": float(ssim.mean()),
            "psnr_last_chunk_db": float(last.mean()) if bool(torch.isfinite(last).all()) else float("inf"),
            "per_frame_psnr_db": [float(x) for x in psnr], "per_frame_ssim": [float(x) for x in ssim],
            "first_frame": first, "frames": int(video.shape[1]), "seconds": round(seconds, 3), "via": via,
            "config": None if config is None else asdict(config)}
