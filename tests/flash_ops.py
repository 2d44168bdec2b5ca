"""Stand-ins for flash-attn's forward ops, for tests of the ``flash_attn`` reader kind: custom ops
whose names look like flash-attn's (what the reader matches) and that run SDPA underneath."""

import torch
import torch.nn.functional as F


def _sdpa_token_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on token-major operands ``[..., S, H, D]`` (flash-attn's ``[B, S, H, D]`` or varlen's
    ``[total, H, D]``) -> ``q``'s shape."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2))
    return out.transpose(-3, -2)


def flash_attn_op(qualname: str) -> torch.library.CustomOpDef:
    """A custom op ``qualname`` (``namespace::name``) computing :func:`_sdpa_token_major`, with a fake
    kernel so that Dynamo traces it whole."""
    op = torch.library.custom_op(qualname, _sdpa_token_major, mutates_args=())
    op.register_fake(lambda q, k, v: torch.empty_like(q))
    return op
