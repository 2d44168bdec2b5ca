"""Every eval method at a matched budget of bits per element (``qvg-compile eval --settings matched``).

The published settings cost different bits (KIVI's G=32 with FP16 scale and zero point: 3.0;
QuaRot's G=128: 2.25; QVG-Pro's four stages: ~3.1), so comparing them at those settings mixes
the quantizer's quality with its budget. The matched setting gives each method the finest
configuration of its own family whose sealed cost lands in `BUDGET` at head dim 128 (the proxy
model's and Wan's), counted all-in: codes, scales, zero points, k-means assignments, codebooks,
the cache's token state, and KIVI's full-precision tokens. What is not counted is the one open
chunk every method keeps dense while it is being denoised (the pipeline's cost, the same for all;
`bits_per_element` in the eval's records includes it, `sealed_bits_per_element` does not).

At head dim 128, chunks of 3,072 tokens (shares of two chunks per codebook):

| method | matched setting | codes | scales (+ zeros) | assignments | codebooks | token state | total |
|---|---|---|---|---|---|---|---|
| QVG | the preset (G=64, FP8 scale, S=1) | 2 | 0.125 | 0.0625 | ~0.17 | ~0.08 | ~2.44 |
| QVG asym | G=128, FP8 scale + zero | 2 | 0.125 | 0.0625 | ~0.17 | ~0.08 | ~2.44 |
| QVG-Pro | S=2, G=128, FP8 scale | 2 | 0.0625 | 0.125 | ~0.17 | ~0.08 | ~2.44 |
| QVG-Pro asym | S=2, G=128, FP8 scale + zero, codebooks 0.125 bit | 2 | 0.125 | 0.125 | ~0.08 | ~0.08 | ~2.42 |
| RTN | G=128, FP16 scale + zero | 2 | 0.25 | - | - | ~0.08 | ~2.33 |
| KIVI | G=64, FP16 scale + zero | 2 | 0.5 | - | - | - | 2.5 |
| QuaRot | G=64, FP16 scale + zero | 2 | 0.5 | - | - | - | 2.5 |

The eval measures the real bytes and records whether each method landed in the budget
(``in_budget``); at another head dim the groups are capped and the bits move. (Measured with
`QVGCache` on CPU at 3 heads x 4 chunks; the token state is 0.08 bits at 3 heads.)
"""

from __future__ import annotations

from typing import Any

from ..quant.config import QVGConfig

BUDGET = (2.3, 2.5)
SETTINGS = ("published", "matched")

# Per method: overrides of the published config (`evaluate.method_config`) and cache options.
MATCHED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "qvg": ({}, {}),
    "qvg_asym": (dict(group_size=128), {}),
    "qvg_pro": (dict(stages=2, group_size=128), {}),
    # Two stages of 32 centroids with asymmetric groups come to 2.50 bits: half the codebook.
    "qvg_pro_asym": (dict(stages=2, group_size=128), dict(codebook_bits=0.125)),
    "rtn": (dict(group_size=128), {}),
    "kivi": (dict(group_size=64), {}),
    "quarot": (dict(group_size=64), {}),
}


def matched_setting(published: QVGConfig, name: str, head_dim: int) -> tuple[QVGConfig, dict[str, Any]]:
    """Method ``name``'s config at the matched budget, from its ``published`` config (groups
    capped at ``head_dim`` as the published ones are), and the cache options it needs on top of
    the eval's (`CachePolicy` fields)."""
    if not isinstance(published, QVGConfig):
        raise TypeError(f"published: expected a QVGConfig, got {type(published).__name__}")
    if name not in MATCHED:
        raise ValueError(f"name: expected one of {sorted(MATCHED)}, got {name!r}")
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
    overrides, options = MATCHED[name]
    config = published.replace(**overrides)
    if config.group_size > head_dim:
        config = config.replace(group_size=head_dim)
    return config, dict(options)


def in_budget(bits: float) -> bool:
    """Whether ``bits`` per element lies in `BUDGET` (inclusive, to 4 decimals as reported)."""
    low, high = BUDGET
    return low <= round(bits, 4) <= high
