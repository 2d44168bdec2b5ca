"""Attention over a compressed history plus a dense tail: ``qvg::attention``.

``softmax(q K^T * scale) V`` where K and V are the sealed token ``ranges`` of two `PackedStore`s
(read in order) followed by a dense tail. Three implementations with one contract:

- `reference_attention` (PyTorch, any device): decodes at most ``block`` tokens at a time and
  merges blocks by log-sum-exp. Runs on CPU and wherever Triton cannot.
- ``"fused"`` (Triton, CUDA): K/V tiles are decoded from the 2-bit codes inside a
  flash-attention kernel; no dense history exists at any time.
- ``"streamed"`` (CUDA): bounded blocks of history are decoded to BF16/FP16 by the Triton
  decoder, attended by the framework's fastest SDPA kernel that returns the log-sum-exp (cuDNN,
  else flash), and merged in place by a Triton kernel. Extra memory: one K+V block plus one
  partial output.

``"streamed"`` is the default on CUDA: 1.05x BF16 cuDNN SDPA at 93,600 keys on H100, against
7.9x for the fused kernel as it stands (benchmarks/RESULTS.md). The fused kernel is kept for
its zero extra memory and as the base for a faster in-kernel decode.

`qvg_attention` validates, then dispatches: CUDA -> `DEFAULT_IMPL` (overridable with the
environment variable ``QVG_ATTENTION_IMPL=fused|streamed|reference``), other devices -> the
reference. 3-bit codes, head dims other than 16/32/64/128/256, and K/V head dims that differ
fall back to the reference on every device.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from ..quant.packed import PackedStore
from ._common import check_store, make_store, triton_supports

BLOCK_TOKENS = 4096
DEFAULT_IMPL = "streamed"
IMPLS = ("fused", "streamed", "reference")
Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_HEAD_DIMS = (16, 32, 64, 128, 256)
# Streamed blocks: the history in STREAM_BLOCKS blocks (rounded up to 1024 tokens), clamped to
# [MIN, MAX] tokens; ``QVG_STREAM_BLOCK_TOKENS`` fixes the block length instead. Measured on H100
# (4,680 queries, 12 heads): blocks of 4,096 keys run cuDNN at 1.6-1.8x the one-shot time, 8,192
# and more at 1.04-1.14x. Each block costs four launches of host time (~0.2 ms, host-bound at
# real sizes: benchmarks/RESULTS.md), so blocks are as large as memory allows: a quarter of one
# layer's history, one layer at a time (K+V block buffers plus the fp32 accumulator ~30% of that
# layer's BF16 history; ~1% of a 30-layer cache).
STREAM_BLOCKS = 4
STREAM_MIN_TOKENS = 16384
STREAM_MAX_TOKENS = 65536


def stream_block_tokens(total: int) -> int:
    """Tokens per streamed block for a history of ``total`` sealed tokens."""
    fixed = os.environ.get("QVG_STREAM_BLOCK_TOKENS")
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise ValueError(f"QVG_STREAM_BLOCK_TOKENS: expected a positive int, got {fixed!r}")
        return min(total, int(fixed))
    share = math.ceil(math.ceil(total / STREAM_BLOCKS) / 1024) * 1024
    return min(total, max(STREAM_MIN_TOKENS, min(STREAM_MAX_TOKENS, share)))


def reference_attention(
    q: torch.Tensor,
    k_store: PackedStore,
    v_store: PackedStore,
    ranges: Sequence[tuple[int, int]],
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    block: int = BLOCK_TOKENS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `qvg_attention` (fp32 inside, at most ``block`` dense tokens at a time)."""
    b, hq, m, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float() * scale
    acc = torch.zeros(b, hq, m, tail_v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, m), -math.inf, dtype=torch.float32, device=q.device)

    def fold(k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        nonlocal acc, lse
        groups = hq // k.shape[1]
        k = k.float().repeat_interleave(groups, dim=1) if groups > 1 else k.float()
        v = v.float().repeat_interleave(groups, dim=1) if groups > 1 else v.float()
        s = qf @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
        new = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
        # Rows with nothing kept so far have lse = -inf: shift by 0 instead of NaN.
        shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
        acc = acc * torch.exp(lse - shift).unsqueeze(-1) + torch.exp(s - shift.unsqueeze(-1)) @ v
        lse = new

    for start, end in ranges:
        for lo in range(start, end, block):
            hi = min(end, lo + block)
            fold(k_store.dequantize(lo, hi), v_store.dequantize(lo, hi), None)
    if tail_k.shape[-2]:
        fold(tail_k, tail_v, tail_mask)
    out = acc.to(q.dtype)
    return (out, lse) if return_lse else out


def qvg_attention(
    q: torch.Tensor,
    k_store: PackedStore,
    v_store: PackedStore,
    ranges: Sequence[tuple[int, int]],
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q K^T * scale) V`` over the sealed ``ranges`` of the stores, then the dense tail.

    Args:
        q: ``[B, Hq, M, D]`` fp16/bf16/fp32, any strides (BHSD or a BSHD transpose); Hq a
            multiple of the stores' heads Hkv (GQA: query head h reads key head ``h // (Hq/Hkv)``).
        k_store, v_store: ``[B, Hkv, capacity, ...]`` packed tokens (same B, Hkv, capacity).
        ranges: ``(start, end)`` token ranges read from both stores, in order.
        tail_k, tail_v: ``[B, Hkv, T, D]`` dense keys/values after the ranges (T may be 0).
        tail_mask: bool (True keeps) or additive float, broadcastable to ``[B, Hq, M, T]``; tail only.
        scale: SDPA's scale; defaults to ``1 / sqrt(D)``.
        return_lse: also return the fp32 natural log-sum-exp ``[B, Hq, M]`` (-inf where no key is kept).

    Returns the output ``[B, Hq, M, D]`` (contiguous, q's dtype); rows with no key kept are 0.
    """
    flat = _check(q, k_store, v_store, ranges, tail_k, tail_v, tail_mask, scale)
    k, v = k_store, v_store
    out, lse = torch.ops.qvg.attention(
        q, k.codes, k.scales, k.zeros, k.assignments, k.centroids, k.segment_ids,
        v.codes, v.scales, v.zeros, v.assignments, v.centroids, v.segment_ids,
        flat, tail_k, tail_v, tail_mask, k.bits, v.bits, k.group_size, k.code_mode, v.code_mode,
        None if scale is None else float(scale))
    return (out, lse) if return_lse else out


def implementation(q: torch.Tensor, k_store: PackedStore, v_store: PackedStore) -> str:
    """Which implementation `qvg_attention` runs for these inputs."""
    if not q.is_cuda:
        return "reference"
    d = q.shape[-1]
    if not (triton_supports(k_store) and triton_supports(v_store) and d in FUSED_HEAD_DIMS
            and k_store.head_dim == v_store.head_dim == d):
        return "reference"
    impl = os.environ.get("QVG_ATTENTION_IMPL", DEFAULT_IMPL)
    if impl not in IMPLS:
        raise ValueError(f"QVG_ATTENTION_IMPL: expected one of {IMPLS}, got {impl!r}")
    # ATen's fused SDPA kernels take only 16-bit inputs.
    return "fused" if impl == "streamed" and q.dtype == torch.float32 else impl


def streamed_attention(q: torch.Tensor, k_store: PackedStore, v_store: PackedStore,
                       ranges: Sequence[tuple[int, int]], tail_k: torch.Tensor, tail_v: torch.Tensor,
                       tail_mask: Optional[torch.Tensor], scale: float,
                       block_tokens: Optional[int] = None,
                       acc_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounded blocks: Triton decode (K and V in one launch) -> SDPA with log-sum-exp -> in-place
    Triton merge.

    GQA folds the query heads of a group into the query rows, so no K/V head is repeated. The
    running output is kept in ``acc_dtype``: fp32 by default, because partial outputs of
    near-uniform attention are several times larger than the final one and rounding each
    merge to BF16 costs about 2e-2 relative error at 93,600 keys (measured); q's dtype halves
    that buffer.
    """
    from ._triton_attention import attend_fused, merge_into
    from ._triton_decode import decode_into, decode_pair_into, pairable

    b, hq, m, d = q.shape
    hkv = k_store.codes.shape[1]
    g = hq // hkv
    qf = q.reshape(b, hkv, g * m, d)
    out = torch.zeros(b, hkv, g * m, d, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, hkv, g * m), -math.inf, dtype=torch.float32, device=q.device)
    total = sum(e - s for s, e in ranges)
    blk = min(total, block_tokens) if block_tokens else stream_block_tokens(total)
    if total:
        kbuf = torch.empty(b, hkv, blk, d, dtype=q.dtype, device=q.device)
        vbuf = torch.empty_like(kbuf)
        paired = pairable(k_store, v_store)
        fill = 0
        for start, end in ranges:
            lo = start
            while lo < end:
                take = min(end - lo, blk - fill)
                if paired:
                    decode_pair_into(k_store, v_store, lo, lo + take, kbuf[:, :, fill:fill + take],
                                     vbuf[:, :, fill:fill + take])
                else:
                    decode_into(k_store, lo, lo + take, kbuf[:, :, fill:fill + take])
                    decode_into(v_store, lo, lo + take, vbuf[:, :, fill:fill + take])
                fill += take
                lo += take
                if fill == blk:
                    merge_into(out, lse, *sdpa_with_lse(qf, kbuf, vbuf, scale))
                    fill = 0
        if fill:
            merge_into(out, lse, *sdpa_with_lse(qf, kbuf[:, :, :fill], vbuf[:, :, :fill], scale))
    if tail_k.shape[-2]:
        if tail_mask is None:
            part = sdpa_with_lse(qf, tail_k.to(q.dtype), tail_v.to(q.dtype), scale)
        else:
            empty = make_store(*(_empty_like_store(k_store)), k_store.bits, k_store.group_size, k_store.code_mode)
            o_t, l_t = attend_fused(q, empty, empty, [], tail_k, tail_v, tail_mask, scale)
            part = (o_t.view(b, hkv, g * m, d), l_t.view(b, hkv, g * m))
        merge_into(out, lse, *part)
    return out.view(b, hq, m, d).to(q.dtype), lse.view(b, hq, m)


def merge_partial(acc: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """Merge a partial attention ``(o [B, H, M, D], l [B, H, M])`` into the contiguous fp32
    ``(acc, lse)`` in place, by log-sum-exp (one Triton launch on CUDA, PyTorch elsewhere)."""
    if acc.is_cuda:
        from ._triton_attention import merge_into

        merge_into(acc, lse, o, l)
        return
    new = torch.logaddexp(lse, l.float())
    shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    acc.mul_(torch.exp(lse - shift).unsqueeze(-1)).add_(o.float() * torch.exp(l.float() - shift).unsqueeze(-1))
    lse.copy_(new)


_SDPA_BACKEND: dict[tuple, str] = {}


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with log-sum-exp through ATen's fused kernels: ``(out [B,H,M,D], lse [B,H,M] fp32)``.

    CUDA tries cuDNN, then flash (the first that works for a dtype/head dim is remembered);
    CPU uses the CPU flash kernel.
    """
    out, lse = _fused_sdpa(q, k, v, scale, True)
    m = q.shape[2]
    lse = lse.reshape(*lse.shape[:2], -1)[..., :m] if lse.dim() != 3 or lse.shape[-1] != m else lse
    return out, lse


def sdpa_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """`sdpa_with_lse`'s output ``[B,H,M,D]`` alone: cuDNN is asked for no log-sum-exp (a read of
    one workspace block merges nothing), and the op overload is called directly, which saves host
    time on the path every fast read takes."""
    return _fused_sdpa(q, k, v, scale, False)[0]


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, lse: bool) -> tuple:
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, False, scale=scale)
    key = (q.dtype, q.shape[-1], q.device)
    order = [_SDPA_BACKEND[key]] if key in _SDPA_BACKEND else ["cudnn", "flash"]
    for name in order:
        try:
            if name == "cudnn":
                res = torch.ops.aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, lse, 0.0, False,
                                                                                False, scale=scale)
            else:
                res = torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, False, False,
                                                                                scale=scale)
        except RuntimeError:
            continue
        _SDPA_BACKEND[key] = name
        return res[0], res[1]
    raise RuntimeError(f"no fused SDPA kernel with log-sum-exp for {q.dtype}, head_dim {q.shape[-1]}")


def _empty_like_store(store: PackedStore) -> tuple:
    z = store.codes[:, :, :0]
    return (z, store.scales[:, :, :0], None if store.zeros is None else store.zeros[:, :, :0],
            store.assignments[:, :, :, :0], store.centroids, store.segment_ids[:0])


def _check(q, k_store, v_store, ranges, tail_k, tail_v, tail_mask, scale) -> list[int]:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a [B, Hq, M, D] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in Q_DTYPES:
        raise TypeError(f"q: expected one of {Q_DTYPES}, got {q.dtype}")
    kb, kh, cap, kd = check_store(k_store, "k_store")
    vb, vh, vcap, vd = check_store(v_store, "v_store")
    if (kb, kh, cap) != (vb, vh, vcap):
        raise ValueError(f"v_store: expected [B, H, capacity] = {[kb, kh, cap]} like k_store, got {[vb, vh, vcap]}")
    if k_store.group_size != v_store.group_size:
        raise ValueError("v_store: group_size must match k_store's")
    if (k_store.scales.dtype != v_store.scales.dtype):
        raise ValueError("v_store: scales dtype must match k_store's")
    b, hq, m, d = q.shape
    if b != kb or hq % kh:
        raise ValueError(f"q: expected batch {kb} and heads a multiple of {kh}, got {list(q.shape)}")
    if kd != d:
        raise ValueError(f"k_store: head_dim {kd} differs from q's {d}")
    for name, t, dd in (("tail_k", tail_k, d), ("tail_v", tail_v, vd)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[:2]) != (b, kh) or t.shape[-1] != dd:
            raise ValueError(f"{name}: expected [{b}, {kh}, T, {dd}], got {getattr(t, 'shape', type(t).__name__)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if tail_k.shape[-2] != tail_v.shape[-2]:
        raise ValueError(f"tail_v: expected {tail_k.shape[-2]} tokens like tail_k, got {tail_v.shape[-2]}")
    devices = {q.device, tail_k.device, tail_v.device, k_store.codes.device, v_store.codes.device}
    if tail_mask is not None:
        if not isinstance(tail_mask, torch.Tensor):
            raise TypeError(f"tail_mask: expected a tensor or None, got {type(tail_mask).__name__}")
        if tail_mask.dtype != torch.bool and not tail_mask.dtype.is_floating_point:
            raise TypeError(f"tail_mask: expected bool or floating point, got {tail_mask.dtype}")
        try:
            torch.broadcast_shapes(tail_mask.shape, (b, hq, m, tail_k.shape[-2]))
        except RuntimeError:
            raise ValueError(f"tail_mask: shape {list(tail_mask.shape)} does not broadcast to "
                             f"{[b, hq, m, tail_k.shape[-2]]}") from None
        devices.add(tail_mask.device)
    if len(devices) != 1:
        raise ValueError(f"q, stores, tail_k, tail_v, tail_mask: expected one device, got {sorted(map(str, devices))}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    flat = []
    for r in ranges:
        if len(r) != 2 or not all(isinstance(x, int) for x in r) or not 0 <= r[0] <= r[1] <= cap:
            raise ValueError(f"ranges: expected (start, end) ints with 0 <= start <= end <= {cap}, got {r!r}")
        flat += [int(r[0]), int(r[1])]
    return flat


@torch.library.custom_op("qvg::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k_codes: torch.Tensor, k_scales: torch.Tensor, k_zeros: Optional[torch.Tensor], k_assignments: torch.Tensor,
    k_centroids: torch.Tensor, k_segment_ids: torch.Tensor,
    v_codes: torch.Tensor, v_scales: torch.Tensor, v_zeros: Optional[torch.Tensor], v_assignments: torch.Tensor,
    v_centroids: torch.Tensor, v_segment_ids: torch.Tensor,
    ranges: list[int], tail_k: torch.Tensor, tail_v: torch.Tensor, tail_mask: Optional[torch.Tensor],
    k_bits: int, v_bits: int, group_size: int, k_code_mode: str, v_code_mode: str, scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    ks = make_store(k_codes, k_scales, k_zeros, k_assignments, k_centroids, k_segment_ids, k_bits, group_size,
                    k_code_mode)
    vs = make_store(v_codes, v_scales, v_zeros, v_assignments, v_centroids, v_segment_ids, v_bits, group_size,
                    v_code_mode)
    pairs = [(ranges[i], ranges[i + 1]) for i in range(0, len(ranges), 2) if ranges[i + 1] > ranges[i]]
    impl = implementation(q, ks, vs)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if impl == "fused":
        from ._triton_attention import attend_fused

        return attend_fused(q, ks, vs, pairs, tail_k, tail_v, tail_mask, sc)
    if impl == "streamed":
        out, lse = streamed_attention(q, ks, vs, pairs, tail_k, tail_v, tail_mask, sc)
        return out, lse
    out, lse = reference_attention(q, ks, vs, pairs, tail_k, tail_v, tail_mask, scale, return_lse=True)
    return out.contiguous(), lse


@_attention_op.register_fake
def _attention_fake(q, k_codes, k_scales, k_zeros, k_assignments, k_centroids, k_segment_ids, v_codes, v_scales,
                    v_zeros, v_assignments, v_centroids, v_segment_ids, ranges, tail_k, tail_v, tail_mask, k_bits,
                    v_bits, group_size, k_code_mode, v_code_mode, scale):
    b, hq, m, _ = q.shape
    return q.new_empty(b, hq, m, tail_v.shape[-1]), q.new_empty(b, hq, m, dtype=torch.float32)
