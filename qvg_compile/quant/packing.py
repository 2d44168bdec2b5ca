"""Bit packing of unsigned integer codes along the last dimension.

Layout (the kernels rely on it): codes of width b are packed little-endian along the last dim.
For b in (2, 4, 8), byte j holds codes ``j*8/b ... (j+1)*8/b - 1``, code i at bit ``(i % (8/b)) * b``.
For b = 3, every 8 codes form a 24-bit little-endian word split into 3 bytes, code i at bit
``3 * (i % 8)`` of its word. So the packed last dim is ``D * b / 8`` bytes.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 3, 4, 8)


def codes_per_unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole unit: (4, 1) for 2 bits, (8, 3) for 3 bits, ..."""
    _check_bits(bits)
    if bits == 3:
        return 8, 3
    return 8 // bits, 1


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of width ``bits`` occupy; ``n`` must fill whole units."""
    codes, nbytes = codes_per_unit(bits)
    if n % codes:
        raise ValueError(f"last dim: expected a multiple of {codes} for {bits}-bit packing, got {n}")
    return n // codes * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` ``[..., D]`` (integers in ``[0, 2**bits)``) into uint8 ``[..., D*bits/8]``."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer tensor, got {codes.dtype}")
    n = codes.shape[-1]
    per, nbytes = codes_per_unit(bits)
    packed_size(n, bits)
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], n // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    word = (c << shifts).sum(-1)
    if bits == 3:
        byte_shifts = torch.arange(3, device=codes.device, dtype=torch.int32) * 8
        word = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return word.to(torch.uint8).reshape(*codes.shape[:-1], n // per * nbytes)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 ``[..., P]`` to uint8 codes ``[..., P*8/bits]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected uint8, got {packed.dtype}")
    per, nbytes = codes_per_unit(bits)
    p = packed.shape[-1]
    if p % nbytes:
        raise ValueError(f"packed: last dim must be a multiple of {nbytes} for {bits} bits, got {p}")
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], p // nbytes, nbytes)
    if bits == 3:
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    else:
        word = b[..., 0]
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], p // nbytes * per)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits: expected one of {PACKABLE_BITS}, got {bits!r}")
