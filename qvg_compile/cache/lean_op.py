"""`lean_op`: a ``qvg::`` operator registered with `torch.library.Library` directly, for the cache
ops a compiled model calls at every layer (a write and a read per layer and denoising pass).

`torch.library.custom_op` runs Python layers around the implementation on every call: autograd
(filling defaults into the arguments), the view/version step (bumping the version counter of each
mutated tensor: ~20 store arrays here) and an aliasing check of the outputs; measured on the CPU,
~120 us of a ~180 us non-sealing cache write. Registered as a ``CompositeExplicitAutograd`` kernel,
the dispatcher reaches the Python body straight away. What this gives up: the ops take no part in
autograd (the C++ fallback warns if an input requires grad; cache state is not differentiable),
and the version counters of mutated arrays are not bumped (no autograd graph saves them). The
schema, `register_fake` and ``torch.compile`` (functionalisation of the declared mutations) work
as for `custom_op`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

_lib = torch.library.Library("qvg", "FRAGMENT")

# Tags of every op that touches a cache: each call reads and changes host state (the token map,
# cached read plans, writes opened ahead), which a CUDA graph replay would skip. With Inductor's
# CUDA graphs on (`QVGBackend(cudagraphs=True)`), graph partitioning runs these ops between the
# captured graphs of the rest of the model.
CACHE_OP_TAGS = (torch.Tag.cudagraph_unsafe,)


class LeanOp:
    """The operator ``qvg::<name>``; calling it calls the op through the dispatcher."""

    def __init__(self, name: str, fn: Callable, mutates_args: Sequence[str], tags: Sequence[torch.Tag] = ()) -> None:
        schema = torch.library.infer_schema(fn, mutates_args=tuple(mutates_args))
        _lib.define(name + schema, tags=tuple(tags))
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        self.name = name
        self.__doc__ = fn.__doc__
        self._op = getattr(torch.ops.qvg, name).default

    def __call__(self, *args, **kwargs):
        return self._op(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        """Register the op's shape function (FakeTensor and meta)."""
        return torch.library.register_fake(f"qvg::{self.name}", fn, lib=_lib)


def lean_op(name: str, mutates_args: Sequence[str], tags: Sequence[torch.Tag] = ()) -> Callable[[Callable], LeanOp]:
    """Decorator: define ``qvg::<name>`` from a type-annotated function (as `custom_op` does),
    with the operator ``tags``."""
    if not name.isidentifier():
        raise ValueError(f"name: expected an operator name without namespace, got {name!r}")

    def wrap(fn: Callable) -> LeanOp:
        return LeanOp(name, fn, mutates_args, tags)

    return wrap
