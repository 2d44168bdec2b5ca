"""`SealFlags`: a refusal summary is held until checked, raises with the cache's message, stays
until cleared; one flag set per cache, dropped with it. (CPU tensors: the copy lands at once; the
GPU's event path runs in `tests/test_gpu_fast_read.py`.)"""

import gc

import pytest
import torch

from qvg_compile import QVGConfig
from qvg_compile.cache import seal_flags
from qvg_compile.cache.seal_flags import SealFlags, flags_for, known_flags

CFG = QVGConfig.preset("qvg")


def test_clean_summaries_never_raise():
    f = SealFlags(torch.device("cpu"))
    f.check(CFG, wait=True)
    f.add(torch.zeros(2, dtype=torch.int8))
    f.check(CFG)
    f.check(CFG, wait=True)


@pytest.mark.parametrize("summary,match", [([0, 1], "NaN or Inf"), ([1, 0], "scale or zero point")])
def test_a_refusal_raises_until_cleared(summary, match):
    f = SealFlags(torch.device("cpu"))
    f.add(torch.tensor(summary, dtype=torch.int8))
    f.add(torch.zeros(2, dtype=torch.int8))  # a later clean seal does not hide it
    for _ in range(2):
        with pytest.raises(ValueError, match=match) as info:
            f.check(CFG)
        assert "raises on every seal until it is reset" in str(info.value)
    f.clear()
    f.check(CFG, wait=True)


def test_non_finite_is_ignored_without_check_finite():
    f = SealFlags(torch.device("cpu"))
    f.add(torch.tensor([0, 1], dtype=torch.int8))
    f.check(CFG.replace(check_finite=False), wait=True)


def test_one_flag_set_per_cache_dropped_with_it():
    pos_map = torch.zeros(8, dtype=torch.int32)
    f = flags_for(pos_map, torch.device("cpu"))
    assert flags_for(pos_map, torch.device("cpu")) is f and known_flags(pos_map) is f
    assert known_flags(torch.zeros(8)) is None
    key = id(pos_map)
    del pos_map
    gc.collect()
    assert key not in seal_flags._flags


def test_restore_puts_back_the_flags_a_later_seal_set():
    f = SealFlags(torch.device("cpu"))
    before = f.state()
    f.add(torch.tensor([0, 1], dtype=torch.int8))  # a seal made, then undone (`cache.ahead`)
    f.restore(before)
    f.check(CFG, wait=True)  # nothing published before it: no refusal
    assert not f.published
    f.add(torch.tensor([1, 0], dtype=torch.int8))
    refused = f.state()
    f.add(torch.tensor([0, 1], dtype=torch.int8))
    f.restore(refused)
    with pytest.raises(ValueError, match="scale or zero point") as info:
        f.check(CFG)
    assert "NaN" not in str(info.value)
