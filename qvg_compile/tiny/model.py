"""A small causal video transformer in the Self-Forcing style (what the demo and the eval run).

Frames ``[B, F, C, H, W]`` in [-1, 1] are cut into ``patch x patch`` tokens. A video is generated
chunk by chunk: a few flow-matching Euler steps denoise the chunk, each step rewriting the chunk's
slot of the KV cache that the pipeline preallocated, then one clean pass at t=0 writes the K/V
the later chunks attend to (docs/design.md §5, idiom A):

    cache[i]["k"][:, start:end] = k          # [B, S, H, D], post-RoPE keys
    keys = cache[i]["k"][:, :end]             # the whole history, read by SDPA

Positions are 3D RoPE (frame, row, column) as in Wan 2.1; queries and keys are RMS-normalised;
the timestep modulates every block (adaLN with a shared projection). For training the same
blocks run on a whole clip at once, block-causally, instead of the cache (`forward_train`): one
unmasked SDPA call per chunk, so flash attention runs and no masked score is computed.
Nothing here knows about QVG. Named configs (the shipped tiny model, the Wan-geometry proxy) are in
`qvg_compile.tiny.zoo`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TinyVideoConfig:
    """Architecture and sampler of `TinyVideoModel`. The defaults are a small random-weight
    workload (tests); the shipped checkpoint stores its own config."""

    channels: int = 3
    size: int = 16
    patch: int = 2
    dim: int = 128
    heads: int = 2
    layers: int = 2
    frames_per_chunk: int = 2
    steps: int = 3
    rope_theta: float = 10000.0
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("channels", "size", "patch", "dim", "heads", "layers", "frames_per_chunk", "steps",
                     "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TinyVideoConfig.{name}: expected a positive int, got {value!r}")
        if self.size % self.patch:
            raise ValueError(f"TinyVideoConfig.patch: must divide size={self.size}, got {self.patch}")
        if self.dim % self.heads or (self.dim // self.heads) % 2 or self.dim // self.heads < 6:
            raise ValueError(f"TinyVideoConfig.heads: dim/heads must be an even head dim >= 6 (3D RoPE), "
                             f"got dim={self.dim}, heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> int:
        """Tokens per side of a frame."""
        return self.size // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.grid ** 2

    @property
    def chunk_tokens(self) -> int:
        return self.frames_per_chunk * self.tokens_per_frame

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_frequencies(cfg: TinyVideoConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis rotation frequencies (frame, row, column) splitting the head dim as Wan does:
    the frame axis gets ``D - 4*(D//6)`` channels, rows and columns ``2*(D//6)`` each."""
    d = cfg.head_dim
    sizes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    return tuple((1.0 / cfg.rope_theta ** (torch.arange(0, s, 2, dtype=torch.float32) / s)).float() for s in sizes)


def rope_angles(cfg: TinyVideoConfig, first_frame: Any, frames: int, freqs: tuple[torch.Tensor, ...],
                device: torch.device) -> torch.Tensor:
    """Angles ``[frames * tokens_per_frame, D/2]`` (fp32) of the tokens of ``frames`` frames from
    ``first_frame`` on, in frame-major, row-major order."""
    g = cfg.grid
    t = torch.arange(frames, device=device, dtype=torch.float32) + first_frame
    r = torch.arange(g, device=device, dtype=torch.float32)
    ft, fr, fc = (f.to(device) for f in freqs)
    at = (t[:, None] * ft).view(frames, 1, 1, -1).expand(frames, g, g, -1)
    ar = (r[:, None] * fr).view(1, g, 1, -1).expand(frames, g, g, -1)
    ac = (r[:, None] * fc).view(1, 1, g, -1).expand(frames, g, g, -1)
    return torch.cat([at, ar, ac], dim=-1).reshape(frames * g * g, -1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` ``[B, N, H, D]`` by ``angles`` ``[N, D/2]``."""
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: TinyVideoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        hidden = cfg.mlp_ratio * cfg.dim
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(6, cfg.dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, angles: torch.Tensor,
                cache: Optional[dict] = None, start: int = 0, chunks: int = 0) -> torch.Tensor:
        """x ``[B, N, dim]``, mod ``[B, G, 6, dim]`` (one modulation per run of N/G consecutive
        tokens), angles ``[N, D/2]``. With ``cache`` (``{"k", "v": [B, S, H, D]}``) the tokens are
        written at ``[start, start+N)`` and attend to ``[0, start+N)``; without it x is a clip's
        ``[clean; noisy]`` tokens of ``chunks`` chunks each, attending as `block_causal_attention`."""
        b, n, _ = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.modulation)[:, :, None].unbind(-2)
        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(b, n, 3, self.cfg.heads, self.cfg.head_dim).unbind(2)
        q = apply_rope(self.q_norm(q), angles)
        k = apply_rope(self.k_norm(k), angles)
        if cache is None:
            attn = block_causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), chunks)
        else:
            end = start + n
            cache["k"][:, start:end] = k
            cache["v"][:, start:end] = v
            keys = cache["k"][:, :end]
            values = cache["v"][:, :end]
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        x = x + _gate(self.proj(attn.transpose(1, 2).reshape(b, n, -1)), gate1)
        return x + _gate(self.mlp(_modulate(self.norm2(x), shift2, scale2)), gate2)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, N, dim]`` -> ``[B, G, N/G, dim]`` (a view): per-chunk modulation broadcasts over
    its tokens without a per-token copy of the modulation."""
    b, n, d = x.shape
    return x.view(b, groups, n // groups, d)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with shift/scale ``[B, G, 1, dim]`` per group of tokens."""
    return (_grouped(x, shift.shape[1]) * (1 + scale) + shift).flatten(1, 2)


def _gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (_grouped(x, gate.shape[1]) * gate).flatten(1, 2)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int) -> torch.Tensor:
    """Teacher-forcing attention over a clip's tokens ``[clean; noisy]``: q, k, v ``[B, H, 2N, D]``
    with N = ``chunks`` equal chunks; returns ``[B, H, 2N, D]``.

    Clean chunk i attends clean chunks <= i; noisy chunk i attends clean chunks < i and itself
    (what generation with a cache shows it). Both rows of chunk i see (i+1) chunks of keys, so
    they run as one unmasked SDPA call with clean and noisy rows stacked on the batch: flash
    attention applies and the masked half of the scores is never computed."""
    if not isinstance(chunks, int) or chunks < 1 or q.shape[2] % (2 * chunks):
        raise ValueError(f"chunks: expected a positive int dividing half of {q.shape[2]} tokens, got {chunks!r}")
    n = q.shape[2] // 2
    size = n // chunks
    clean_out, noisy_out = [], []
    for i in range(chunks):
        s, e = i * size, (i + 1) * size
        rows = torch.cat([q[:, :, s:e], q[:, :, n + s:n + e]])
        keys = torch.cat([k[:, :, :e], torch.cat([k[:, :, :s], k[:, :, n + s:n + e]], dim=2)])
        values = torch.cat([v[:, :, :e], torch.cat([v[:, :, :s], v[:, :, n + s:n + e]], dim=2)])
        clean, noisy = F.scaled_dot_product_attention(rows, keys, values).chunk(2)
        clean_out.append(clean)
        noisy_out.append(noisy)
    return torch.cat(clean_out + noisy_out, dim=2)


class TinyVideoModel(nn.Module):
    """Predicts the flow-matching velocity ``noise - clean`` of a chunk of frames given the cached
    history (`forward`), or of a whole clip block-causally (`forward_train`)."""

    def __init__(self, cfg: TinyVideoConfig = TinyVideoConfig()) -> None:
        super().__init__()
        if not isinstance(cfg, TinyVideoConfig):
            raise TypeError(f"cfg: expected a TinyVideoConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        patch_dim = cfg.channels * cfg.patch ** 2
        self.embed = nn.Linear(patch_dim, cfg.dim)
        self.time = nn.Sequential(nn.Linear(64, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_mod = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.out_mod = nn.Parameter(torch.zeros(2, cfg.dim))
        self.out = nn.Linear(cfg.dim, patch_dim)
        self._freqs = rope_frequencies(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small random init; residual gates start near zero so the stack starts near identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=0.02)
        nn.init.normal_(self.out_mod, std=0.02)

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, F, C, H, W]`` -> ``[B, F*tokens_per_frame, C*p*p]``."""
        b, f, c, hh, ww = frames.shape
        p = self.cfg.patch
        tokens = frames.reshape(b, f, c, hh // p, p, ww // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return tokens.reshape(b, f * (hh // p) * (ww // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        cfg = self.cfg
        g, p = cfg.grid, cfg.patch
        out = tokens.reshape(-1, frames, g, g, cfg.channels, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(-1, frames, cfg.channels, cfg.size, cfg.size)

    def modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``[B, G]`` in [0, 1] (one per group of tokens) -> block modulation
        ``[B, G, 6, dim]`` and the time embedding ``[B, G, dim]``."""
        half = 32
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        arg = t.float()[..., None] * 1000.0 * freqs
        temb = self.time(torch.cat([arg.sin(), arg.cos()], dim=-1).to(self.embed.weight.dtype))
        mod = self.time_mod(temb).unflatten(-1, (6, self.cfg.dim))
        return mod, temb

    def head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x ``[B, N, dim]``, temb ``[B, G, dim]`` -> patches ``[B, N, C*p*p]``."""
        shift, scale = (self.out_mod + temb[..., None, :])[:, :, None].unbind(-2)
        return self.out(_modulate(self.norm_out(x), shift, scale))

    def forward(self, frames: torch.Tensor, t: torch.Tensor, cache: list[dict], start: int) -> torch.Tensor:
        """One chunk: frames ``[B, F, C, H, W]`` (noisy at level ``t`` ``[B]``), cache as made by
        `allocate_cache`, ``start`` the chunk's first token. Returns the velocity, like ``frames``."""
        f = frames.shape[1]
        x = self.embed(self.patchify(frames))
        mod, temb = self.modulation(t[:, None])
        angles = rope_angles(self.cfg, start // self.cfg.tokens_per_frame, f, self._freqs, frames.device)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, mod, angles, cache=layer_cache, start=start)
        return self.unpatchify(self.head(x, temb), f)

    def forward_train(self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Teacher forcing in one pass. ``clean``, ``noisy`` ``[B, T, C, H, W]`` with T a multiple
        of ``frames_per_chunk``; ``t`` ``[B, T / frames_per_chunk]`` the noise level of each noisy
        chunk. The clean tokens play the cache (t=0, clean chunk i sees clean chunks <= i); noisy
        chunk i sees clean chunks < i and itself, exactly what `generate` shows it. Returns the
        velocity for ``noisy``."""
        cfg = self.cfg
        b, frames = clean.shape[:2]
        if noisy.shape != clean.shape or frames % cfg.frames_per_chunk:
            raise ValueError(f"clean, noisy: expected equal shapes [B, T, C, H, W] with T a multiple of "
                             f"{cfg.frames_per_chunk}, got {list(clean.shape)} and {list(noisy.shape)}")
        chunks = frames // cfg.frames_per_chunk
        n = frames * cfg.tokens_per_frame
        x = self.embed(self.patchify(torch.cat([clean, noisy], dim=1)))
        mod, temb = self.modulation(torch.cat([torch.zeros_like(t), t], dim=1))
        angles = rope_angles(cfg, 0, frames, self._freqs, clean.device).repeat(2, 1)
        for block in self.blocks:
            x = block(x, mod, angles, chunks=chunks)
        return self.unpatchify(self.head(x[:, n:], temb[:, chunks:]), frames)


def allocate_cache(model: TinyVideoModel, num_frames: int, batch: int = 1,
                   dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> list[dict]:
    """The pipeline's dense KV cache: per layer ``{"k", "v": zeros[B, S, H, D]}`` with
    ``S = num_frames * tokens_per_frame``; dtype and device default to the model's."""
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
    cfg = model.cfg
    param = next(model.parameters())
    shape = (batch, num_frames * cfg.tokens_per_frame, cfg.heads, cfg.head_dim)
    return [{"k": torch.zeros(shape, dtype=dtype or param.dtype, device=device or param.device),
             "v": torch.zeros(shape, dtype=dtype or param.dtype, device=device or param.device)}
            for _ in range(cfg.layers)]


def timesteps(steps: int) -> list[float]:
    """The Euler schedule from t=1 (noise) to t=0: ``steps + 1`` points, uniform."""
    return [1.0 - i / steps for i in range(steps + 1)]


@torch.no_grad()
def generate(model: nn.Module, num_chunks: int, seed: int = 0, cache: Optional[list[dict]] = None,
             prompt: Optional[torch.Tensor] = None, progress: bool = True,
             steps: Optional[int] = None,
             after_chunk: Optional[Callable[[list[dict], int, int], None]] = None) -> torch.Tensor:
    """Auto-regressive generation; returns frames ``[B, num_chunks * F, C, H, W]`` in the model's dtype.

    ``prompt`` ``[B, k * F, C, H, W]`` (optional) fills the first k chunks: they only get the
    clean pass. Every other chunk starts from seeded noise (drawn on the CPU, so a seed gives the
    same noise on every device) and gets ``steps`` Euler steps, each rewriting the chunk's cache
    slot, then the clean pass at t=0. ``model`` may be the compiled module; ``cache`` defaults to
    a fresh `allocate_cache`. ``after_chunk(cache, start, end)`` runs after each clean pass (the
    eval uses it to quantize a finished chunk in place).
    """
    from tqdm.auto import tqdm

    base = getattr(model, "_orig_mod", model)
    cfg = base.cfg
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks: expected a positive int, got {num_chunks!r}")
    param = next(base.parameters())
    batch = 1 if prompt is None else prompt.shape[0]
    prompt_chunks = 0
    if prompt is not None:
        if prompt.dim() != 5 or prompt.shape[1] % cfg.frames_per_chunk or prompt.shape[2:] != (
                cfg.channels, cfg.size, cfg.size):
            raise ValueError(f"prompt: expected [B, k*{cfg.frames_per_chunk}, {cfg.channels}, {cfg.size}, "
                             f"{cfg.size}], got {list(prompt.shape)}")
        prompt_chunks = prompt.shape[1] // cfg.frames_per_chunk
        if prompt_chunks > num_chunks:
            raise ValueError(f"num_chunks: expected at least the prompt's {prompt_chunks} chunks, got {num_chunks}")
    cache = allocate_cache(base, num_chunks * cfg.frames_per_chunk, batch) if cache is None else cache
    gen = torch.Generator().manual_seed(seed)
    schedule = timesteps(steps or cfg.steps)
    shape = (batch, cfg.frames_per_chunk, cfg.channels, cfg.size, cfg.size)
    zero = torch.zeros(batch, device=param.device, dtype=param.dtype)
    frames = []
    for c in tqdm(range(num_chunks), desc="generating", unit="chunk", disable=not progress):
        start = c * cfg.chunk_tokens
        if c < prompt_chunks:
            x = prompt[:, c * cfg.frames_per_chunk:(c + 1) * cfg.frames_per_chunk].to(param.device, param.dtype)
        else:
            x = torch.randn(shape, generator=gen).to(param.device, param.dtype)
            for t0, t1 in zip(schedule[:-1], schedule[1:]):
                velocity = model(x, torch.full_like(zero, t0), cache, start)
                x = x + (t1 - t0) * velocity
        model(x, zero, cache, start)
        if after_chunk is not None:
            after_chunk(cache, start, start + cfg.chunk_tokens)
        frames.append(x)
    return torch.cat(frames, dim=1)
