"""The torch-function layer both cache tensor classes (`QVGCache`, `JoinedCache`) inherit: an SDPA
call on a cache becomes one ``qvg::sdpa`` op, so ``__torch_dispatch__`` sees the attention whole
instead of the ATen ops it would decompose into; every other function runs as usual."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


class RoutesSdpa(torch.Tensor):
    """Base of the cache tensor classes: their ``__torch_function__``."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return torch.ops.qvg.sdpa(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
