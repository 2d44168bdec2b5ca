"""`cache.host.host_thread`: one intra-op thread inside for caches off the CPU, the caller's
setting restored after (also on error); CPU caches keep the caller's setting."""

from __future__ import annotations

import pytest
import torch

from qvg_compile.cache.host import host_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_off_cpu_runs_on_one_thread_and_restores(two_threads):
    with host_thread(torch.device("meta")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        with host_thread(torch.device("meta")):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_cpu_caches_keep_the_callers_threads(two_threads):
    with host_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 2
