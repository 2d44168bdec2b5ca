"""The torch-function layer both cache tensor classes (`QVGCache`, `JoinedCache`) share: an SDPA
call on a cache becomes one ``qvg::sdpa`` op, so ``__torch_dispatch__`` sees the attention whole
instead of the ATen ops it would decompose into; every other function runs as usual."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def route_sdpa(func: Any, args: tuple, kwargs: Optional[dict]) -> Any:
    """The body of a cache class's ``__torch_function__``."""
    kwargs = kwargs or {}
    if func is F.scaled_dot_product_attention:
        return torch.ops.qvg.sdpa(*args, **kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)
