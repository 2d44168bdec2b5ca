"""The matched setting puts every method in 2.3-2.5 bits per element at the proxy's geometry
(head dim 128, 3 heads, chunks of 3,072 tokens), measured from the stored bytes."""

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.cache import QVGCache
from qvg_compile.quant.api import quantize
from qvg_compile.tiny.budget import BUDGET, in_budget, matched_setting
from qvg_compile.tiny.evaluate import DEFAULT_METHODS, SIMULATED, method_config

CHUNK = 3072


@pytest.fixture(scope="module")
def keys():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 2 * CHUNK, 3, 128, generator=gen) + torch.randn(1, 1, 3, 128, generator=gen)


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_matched_bits_land_in_the_budget(name, keys):
    config, options = matched_setting(method_config(name, 128), name, 128)
    if name in SIMULATED:
        held = sum(quantize(x, config, seq_dim=1, role="key").nbytes for x in keys.split(CHUNK, dim=1))
    else:
        cache = QVGCache.empty_like(keys, 1, config, role="key", **options)
        for s in range(0, keys.shape[1], CHUNK):
            cache[:, s:s + CHUNK] = keys[:, s:s + CHUNK]
        held = cache.seal().nbytes()
    bits = 8 * held / keys.numel()
    assert in_budget(bits), f"{name}: {bits:.4f} bits outside {BUDGET}"


def test_matched_setting_validates_and_caps_groups():
    config, options = matched_setting(method_config("quarot", 32), "quarot", 32)
    assert config.group_size == 32 and options == {}
    assert matched_setting(method_config("qvg_pro_asym", 128), "qvg_pro_asym", 128)[1] == {"codebook_bits": 0.125}
    with pytest.raises(ValueError, match="name"):
        matched_setting(QVGConfig(), "bf16", 128)
    with pytest.raises(TypeError, match="published"):
        matched_setting({}, "qvg", 128)
    assert in_budget(2.5) and in_budget(2.3) and not in_budget(2.5001) and not in_budget(2.29)
