"""`OwnedOutputs`: a CUDA-graphed graph's outputs moved out of the graphs' memory pool.

Inductor's CUDA graph trees return outputs that live in the graphs' private memory pool, and a
later replay may overwrite them: PyTorch raises when such an output is read after that. Models
keep outputs across calls as a matter of course: Self-Forcing fills its text K/V cache on the
first forward of a video and reads it on every later one; LongCat's cache pass returns the K/V
its denoising passes read. With ``backend(cudagraphs=True)`` every graph's fresh outputs (those
that are not views of an input) are therefore copied out of the pool before the model sees
them, so the model runs unchanged, as it does without CUDA graphs.

Cost: one storage copy per fresh output per call (a layer's hidden states: ~14 MB at Wan-1.3B
size, ~10 us of device time); the graphs' own launches stay replayed. Outputs sharing a storage
keep sharing one copy, with their offsets and strides, so aliasing between outputs is kept.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


class OwnedOutputs:
    """``fn`` (a compiled graph; the backend wraps those over CUDA inputs) whose fresh tensor
    outputs are returned as copies in the caching allocator's ordinary memory.

    Which outputs are fresh is decided on the first call, by storage: an output whose storage is
    an input's (Dynamo hands back inputs and views of them) is returned as it is. The answer is a
    property of the graph, the same on every call.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.fresh: Optional[tuple[int, ...]] = None

    def __call__(self, *args: Any) -> Any:
        out = self.fn(*args)
        items = list(out) if isinstance(out, (list, tuple)) else [out]
        if self.fresh is None:
            inputs = {a.untyped_storage().data_ptr() for a in args if type(a) is torch.Tensor}
            self.fresh = tuple(i for i, t in enumerate(items)
                               if type(t) is torch.Tensor and t.untyped_storage().data_ptr() not in inputs)
        if not self.fresh:
            return out
        copies: dict[int, torch.UntypedStorage] = {}
        for i in self.fresh:
            items[i] = owned_copy(items[i], copies)
        if isinstance(out, tuple):
            return tuple(items)
        return items if isinstance(out, list) else items[0]


def owned_copy(t: torch.Tensor, copies: dict[int, torch.UntypedStorage]) -> torch.Tensor:
    """``t`` viewed the same way on a copy of its storage; ``copies`` (storage address -> copy)
    makes outputs that shared a storage share the copy. An output autograd tracks is cloned
    instead (a tensor set on a storage has no history)."""
    if t.requires_grad:
        return t.clone()
    storage = t.untyped_storage()
    key = storage.data_ptr()
    copy = copies.get(key)
    if copy is None:
        copy = copies[key] = torch.UntypedStorage(storage.nbytes(), device=t.device)
        copy.copy_(storage)
    return t.new_empty(0).set_(copy, t.storage_offset(), t.size(), t.stride())
