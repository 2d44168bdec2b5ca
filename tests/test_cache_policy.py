"""`CachePolicy` validation and codebook sizing; `StoreSpec` layout and JSON round trip."""

from __future__ import annotations

import pytest

from qvg_compile import QVGConfig
from qvg_compile.cache import CachePolicy
from qvg_compile.cache.policy import policy_from_options
from qvg_compile.cache.spec import StoreSpec


def test_policy_validates_every_field():
    with pytest.raises(ValueError, match="dense_chunks"):
        CachePolicy(dense_chunks=0)
    with pytest.raises(ValueError, match="seal_chunks"):
        CachePolicy(dense_chunks=1, seal_chunks=2)
    with pytest.raises(ValueError, match="codebook_bits"):
        CachePolicy(codebook_bits=0)
    with pytest.raises(ValueError, match="warm_start"):
        CachePolicy(warm_start=1)
    for bad in (0, -1.0, True, "3"):
        with pytest.raises(ValueError, match="share_fit"):
            CachePolicy(share_fit=bad)
    assert CachePolicy(share_fit=None).share_fit is None and CachePolicy().share_fit == 3.0
    with pytest.raises(TypeError, match="unknown cache options"):
        policy_from_options(chunks=3)
    with pytest.raises(TypeError, match="CachePolicy"):
        policy_from_options("fast")


@pytest.mark.parametrize("tokens, chunks, expected", [(4680, 1, 64), (4680, 2, 128), (37440, 1, 256), (10, 1, 1)])
def test_codebook_size_fits_the_bit_budget(tokens, chunks, expected):
    policy = CachePolicy(codebook_bits=0.25, codebook_chunks=chunks)
    c = policy.codebook_size(QVGConfig.preset("qvg"), tokens)
    assert c == expected
    assert c <= 256 and c <= tokens


def test_spec_round_trips_through_json_and_sizes_its_arrays():
    spec = StoreSpec(QVGConfig.preset("qvg"), CachePolicy(), (128,), ("key",), "bfloat16").sized_for(4680, 32760)
    assert StoreSpec.from_json(spec.to_json()) == spec
    shapes = spec.shapes((1, 12), 32760)
    assert shapes["codes0"] == (1, 12, 32760, 32) and shapes["scales0"] == (1, 12, 32760, 2)
    assert shapes["tail0"] == (1, 12, 4680, 128) and shapes["cents0"][0] == spec.segments
    with pytest.raises(ValueError, match="group_size"):
        StoreSpec(QVGConfig.preset("qvg"), CachePolicy(), (96,), ("key",), "bfloat16")
    with pytest.raises(ValueError, match="method"):
        StoreSpec(QVGConfig.preset("kivi"), CachePolicy(), (128,), ("key",), "bfloat16")
