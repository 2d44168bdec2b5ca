"""`QVGConfig`: the one validated, immutable description of how a KV tensor is quantized.

Every layer (math, kernels, cache, passes) takes a `QVGConfig`; it is a frozen dataclass of
plain Python values, so it hashes, pickles, and can be part of a compiled graph's cache key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

Method = Literal["qvg", "rtn", "kivi", "quarot"]
CodeMode = Literal["symmetric", "symmetric_full", "asymmetric"]
ScaleDType = Literal["fp8_e4m3", "fp16"]
CentroidDType = Literal["bf16", "fp16", "fp32", "fp8_e4m3"]
Init = Literal["random", "kmeans++", "given"]

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("qvg", "rtn", "kivi", "quarot")
CODE_MODES = ("symmetric", "symmetric_full", "asymmetric")
SCALE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp16": torch.float16}
CENTROID_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                   "fp8_e4m3": torch.float8_e4m3fn}
INITS = ("random", "kmeans++", "given")


@dataclass(frozen=True)
class QVGConfig:
    """How keys and values are quantized.

    Attributes:
        method: ``"qvg"`` (k-means smoothing + residual group quantization; ``stages=0`` is plain
            per-token RTN), ``"rtn"``, ``"kivi"`` or ``"quarot"``.
        key_bits, value_bits: code width of the final group quantizer, one of 2, 3, 4, 8.
        group_size: channels per scale group (per-token methods) or tokens per group (KIVI keys).
        stages: number of progressive k-means residual stages S (0 disables smoothing).
        centroids: centroids C per stage (<= 256 so assignments fit in uint8).
        kmeans_iters: maximum Lloyd iterations per stage.
        kmeans_tol: early stop once no centroid moves by more than ``tol`` times the data RMS.
        init: k-means initialisation: seeded ``"random"`` tokens, seeded ``"kmeans++"``, or
            ``"given"`` centroids (warm start; the caller passes them to `quantize`).
        scale_dtype: storage of the per-group scale (and zero point): ``"fp8_e4m3"`` or ``"fp16"``.
        code_mode: ``"symmetric"`` (published: 2^b - 1 levels around 0, no zero point),
            ``"symmetric_full"`` (all 2^b levels at odd multiples of scale/2, no zero point) or
            ``"asymmetric"`` (min/max with a stored zero point, all 2^b levels): the keys' codes,
            and the values' unless ``value_code_mode`` is set.
        value_code_mode: the values' codes (None: as ``code_mode``). Keys, whose groups often
            hold an outlier channel, need the zero level of ``"symmetric"``; values do better with
            four levels (`qvg` preset, measured on video-like K/V: README, quant-bench).
        centroid_dtype: storage of the centroids. The residual is taken against the stored
            (rounded) centroids, so a coarser type costs only a slightly larger residual.
        seed: seed of every random choice (k-means init); the same seed gives bit-identical results.
        residual_window: KIVI only: most recent tokens kept in full precision (R).
        clip_ratio: QuaRot only: fraction of the min/max range kept before rounding.
        check_finite: raise on NaN/Inf input (the documented policy) instead of propagating it.
    """

    method: Method = "qvg"
    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 64
    stages: int = 1
    centroids: int = 256
    kmeans_iters: int = 4
    kmeans_tol: float = 1e-4
    init: Init = "random"
    scale_dtype: ScaleDType = "fp8_e4m3"
    code_mode: CodeMode = "symmetric_full"
    value_code_mode: Optional[CodeMode] = None
    centroid_dtype: CentroidDType = "bf16"
    seed: int = 0
    residual_window: int = 0
    clip_ratio: float = 1.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ValueError(f"QVGConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        need(self.method in METHODS, "method", f"one of {METHODS}")
        for name in ("key_bits", "value_bits"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) in SUPPORTED_BITS,
                 name, f"one of {SUPPORTED_BITS}")
        need(isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 0, "kmeans_iters",
             "a non-negative int (0 keeps the initial or given centroids)")
        for name in ("group_size", "centroids"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                 "a positive int")
        need(isinstance(self.stages, int) and 0 <= self.stages <= 16, "stages", "an int in [0, 16]")
        need(self.centroids <= 256, "centroids", "at most 256 (assignments are stored as uint8)")
        need(isinstance(self.kmeans_tol, (int, float)) and self.kmeans_tol >= 0, "kmeans_tol",
             "a non-negative float")
        need(self.init in INITS, "init", f"one of {INITS}")
        need(self.scale_dtype in SCALE_DTYPES, "scale_dtype", f"one of {tuple(SCALE_DTYPES)}")
        need(self.code_mode in CODE_MODES, "code_mode", f"one of {CODE_MODES}")
        need(self.value_code_mode is None or self.value_code_mode in CODE_MODES, "value_code_mode",
             f"None or one of {CODE_MODES}")
        need(self.centroid_dtype in CENTROID_DTYPES, "centroid_dtype",
             f"one of {tuple(CENTROID_DTYPES)}")
        need(isinstance(self.seed, int), "seed", "an int")
        need(isinstance(self.residual_window, int) and self.residual_window >= 0,
             "residual_window", "a non-negative int")
        need(isinstance(self.clip_ratio, (int, float)) and 0 < self.clip_ratio <= 1, "clip_ratio",
             "a float in (0, 1]")
        if self.method != "qvg":
            need(self.stages == 0, "stages", f"0 for method {self.method!r} (only qvg uses k-means)")

    @staticmethod
    def preset(name: str, **overrides: Any) -> "QVGConfig":
        """A named configuration, with keyword overrides.

        ``"qvg"``: S=1, G=64, C=256, 2-bit, FP8 scales and centroids (2.242 bits/element at
        N=37,440, D=128; 2.297 with the published configuration's BF16 centroids).
        ``"qvg_pro"``: S=4, G=16, C=256, FP8 centroids. ``"rtn"``: per-token asymmetric, G=64, FP16
        scale and zero. ``"rtn_sym"``: the published-style symmetric RTN with FP8 scales (QVG without
        smoothing). ``"kivi"``: G=32, R=128, FP16. ``"quarot"``: Hadamard + per-token asymmetric,
        G=128, FP16.
        """
        if name not in PRESETS:
            raise ValueError(f"QVGConfig.preset: name must be one of {sorted(PRESETS)}, got {name!r}")
        fields = {f.name for f in dataclasses.fields(QVGConfig)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"QVGConfig.preset: unknown fields {sorted(unknown)}")
        return QVGConfig(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "QVGConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def bits_for(self, role: str) -> int:
        """Code width for ``role`` ``"key"`` or ``"value"``."""
        if role == "key":
            return self.key_bits
        if role == "value":
            return self.value_bits
        raise ValueError(f"role: expected 'key' or 'value', got {role!r}")

    def code_mode_for(self, role: str) -> str:
        """Code mode for ``role`` ``"key"`` or ``"value"``."""
        if role == "key":
            return self.code_mode
        if role == "value":
            return self.value_code_mode or self.code_mode
        raise ValueError(f"role: expected 'key' or 'value', got {role!r}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def torch_centroid_dtype(self) -> torch.dtype:
        return CENTROID_DTYPES[self.centroid_dtype]


PRESETS: dict[str, dict[str, Any]] = {
    # Keys keep the published 3-level codes (their zero level), values use all 4 levels: on the
    # built-in video-like K/V, key rel-MSE 0.036 against 0.105 with 4 levels, value 0.030
    # against 0.058 with 3 (qvg_pro, whose residuals are smaller, is best with 4 levels for both).
    # FP8 centroids: in the cache the codebook budget buys twice the centroids (a sealed cache of
    # video-like K/V at Wan's frame grid: key rel-MSE 0.036 -> 0.028, value 0.039 -> 0.030 at the
    # same 2.53 bits); alone, 0.055 bits less at N=37,440 for ~1% more error. The published
    # configuration stores BF16 centroids (centroid_dtype="bf16").
    "qvg": dict(method="qvg", stages=1, group_size=64, centroids=256, code_mode="symmetric",
                value_code_mode="symmetric_full", centroid_dtype="fp8_e4m3"),
    # FP8 centroids here too: in a sealed cache at Wan's frame grid key rel-MSE 0.0092 -> 0.0065,
    # value 0.0164 -> 0.0120 at the same 3.09 bits; alone, 0.5 bits less at N=16,384 for ~5% more.
    "qvg_pro": dict(method="qvg", stages=4, group_size=16, centroids=256, centroid_dtype="fp8_e4m3"),
    "rtn": dict(method="rtn", stages=0, group_size=64, code_mode="asymmetric", scale_dtype="fp16"),
    "rtn_sym": dict(method="qvg", stages=0, group_size=64, code_mode="symmetric",
                    scale_dtype="fp8_e4m3"),
    "kivi": dict(method="kivi", stages=0, group_size=32, residual_window=128,
                 code_mode="asymmetric", scale_dtype="fp16"),
    "quarot": dict(method="quarot", stages=0, group_size=128, code_mode="asymmetric",
                   scale_dtype="fp16"),
}
