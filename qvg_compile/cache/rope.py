"""Rotary position embedding (RoPE) applied lazily to a `QVGCache` view: its meaning and the op.

Pattern (idiom E of docs/design.md §5): a model caches keys before RoPE and rotates the whole
``cat([cache, k_new])`` at every read (LongCat-Video). Rotating a cache view would decode the
history into a dense copy; instead the rotation is kept as part of the view (`RopeSpec` plus the
cos/sin tables of its tokens) and applied by the read to the rows it decodes anyway.

The rotation is ``out = (x * cos + rot(x) * sin)`` computed in ``compute`` dtype and returned in
``x``'s dtype, with ``rot`` one of two channel layouts:

* ``pairs``: channels ``(2i, 2i + 1)`` form a pair, ``rot(x)[2i] = -x[2i + 1]``,
  ``rot(x)[2i + 1] = x[2i]`` (Wan, LongCat, GPT-J style);
* ``halves``: channel ``i`` pairs with ``i + D/2``, ``rot(x) = cat([-x[D/2:], x[:D/2]])``
  (Llama's ``rotate_half``).

``qvg::rope`` is the op a graph calls for it (`passes.rope_read` puts it there): on dense tensors
it computes the rotation; on a `QVGCache` the op table returns the lazily rotated view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("pairs", "halves")
# Rows rotated per step when a read rotates its workspace: bounds the fp32 temporaries.
ROTATE_BLOCK_ROWS = 1 << 16


@dataclass(frozen=True)
class RopeSpec:
    """How a rotated view's rows are rotated (picklable flatten metadata).

    Attributes:
        layout: one of `LAYOUTS`.
        compute: the dtype name the products are computed in (``"float32"``, ``"bfloat16"``, ...).
    """

    layout: str
    compute: str

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(getattr(torch, self.compute, None), torch.dtype):
            raise ValueError(f"compute: expected a torch dtype name, got {self.compute!r}")

    def __deepcopy__(self, memo: dict) -> "RopeSpec":
        return self  # immutable (see `StoreSpec.__deepcopy__`)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute)


def rotate_channels(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``rot(x)`` of `LAYOUTS` over the last dim of ``x`` (any shape, even last dim)."""
    if x.shape[-1] % 2:
        raise ValueError(f"x: RoPE needs an even last dim, got {x.shape[-1]}")
    if layout == "pairs":
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    if layout == "halves":
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """The rotation of ``x`` (``[..., n, D]``) by tables ``cos``/``sin`` that broadcast against it,
    in ``x``'s dtype (a new tensor)."""
    xc = x.to(spec.compute_dtype)
    return (xc * cos + rotate_channels(xc, spec.layout) * sin).to(x.dtype)


def rotate_rows_(rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate ``rows`` ``[..., n, D]`` in place by ``cos``/``sin`` ``[n, D]`` (row ``i`` by table
    row ``i``), a block of tokens at a time so the temporaries stay small; returns ``rows``."""
    n = rows.shape[-2]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != n or cos.shape[1] != rows.shape[-1]:
        raise ValueError(f"cos/sin: expected [{n}, {rows.shape[-1]}] tables, got {list(cos.shape)} "
                         f"and {list(sin.shape)}")
    lead = max(1, rows[..., :1, :].numel() // rows.shape[-1])
    step = max(1, ROTATE_BLOCK_ROWS // lead)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = rows[..., lo:hi, :]
        block.copy_(apply(block, cos[lo:hi], sin[lo:hi], spec))
    return rows


@torch.library.custom_op("qvg::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, compute: str) -> torch.Tensor:
    """RoPE of ``x`` by ``cos``/``sin`` (broadcasting against ``x``; see `apply`), in ``x``'s dtype."""
    return apply(x, cos, sin, RopeSpec(layout, compute)).contiguous()


@rope.register_fake
def _(x, cos, sin, layout, compute):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
