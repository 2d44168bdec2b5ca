"""The host side of a cache op runs on one CPU thread.

A cache on an accelerator keeps its token state on the host (`StoreSpec`: ``pos_map``, slots,
codebook table), and every ``qvg::cache_*`` op does a few small tensor operations on it before
it launches device work. ATen runs a CPU operation over more than 32,768 elements on its whole
OpenMP team; at these sizes that buys nothing, and waking the team (and its threads spinning
afterwards) stalls the thread that launches the GPU work. Measured on the H100 machine (16
cores): a ``nonzero`` over 90k host elements took 0.38 ms median and 24 ms at worst with 16
threads; a sealing step of a Wan-size layer took 57-72 ms eagerly, against 8-15 ms with one
thread (benchmarks/RESULTS.md, "One cache step").

Caches on the CPU are left alone: there the same operations are the cache's real work (the
reference kernels), and the user's thread setting applies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def host_thread(device: torch.device) -> Iterator[None]:
    """Run the body with one intra-op CPU thread when ``device`` is not the CPU; restore after."""
    threads = torch.get_num_threads()
    if device.type == "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
