"""Cache reads of a function no graph holds (a ``torch.compiler.disable``d one): idiom L.

Pattern: a function Dynamo skips takes containers (lists, dicts, tuples) of tensors the model
keeps across calls and reads some of them as attention's K or V after a ``cat`` along the
sequence with new tokens, possibly through batch repeats (``repeat``, ``expand`` + ``flatten``),
transposes and casts: ``sdpa(q, cat([repeat(kv[i]['k_txt']), cat([kv[i]['k_vision'], k], 2)], 2),
...)``. No graph shows it, so the graph passes cannot find it.

Rewrite: none here. `observe_reads` runs the function once on fake copies of its arguments (no
data, no side effects on the real tensors) under a torch-function mode that follows every tensor
from the containers to SDPA, and returns which container entries SDPA reads as K or V after a
sequence ``cat`` (their path from the argument names, sequence dim and role). The swap at the call
(`qvg_compile.disabled`) then puts a `QVGCache` there before the function reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

Path = tuple[Any, ...]
_DEPTH = 4


@dataclass(frozen=True)
class EagerRead:
    """A container entry read by attention: ``path`` from the argument name (``("kv_cache", 0,
    "k_vision")``), its sequence dim and its role (``"key"`` or ``"value"``)."""

    path: Path
    seq_dim: int
    role: str


def container_tensors(args: dict[str, Any]) -> dict[Path, torch.Tensor]:
    """Every tensor inside a list, dict or tuple argument, by path (bare tensor arguments are
    not included: the caller holds them in its own variables, where no swap can reach them)."""
    out: dict[Path, torch.Tensor] = {}

    def walk(obj: Any, path: Path, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            if len(path) > 1:
                out[path] = obj
        elif depth and isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, path + (key,), depth - 1)
        elif depth and isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, path + (i,), depth - 1)

    for name, value in args.items():
        walk(value, (name,), _DEPTH)
    return out


class _Follow(TorchFunctionMode):
    """Follows the container tensors through every torch call: ``origins[id(t)]`` is the set of
    ``(path, seq_dim or None)`` a tensor was computed from; a ``cat`` fixes the seq dim of the
    entries of same-rank inputs. SDPA records the entries of its K and V that have one."""

    def __init__(self, leaves: dict[int, Path]) -> None:
        super().__init__()
        self.origins: dict[int, frozenset[tuple[Path, Any]]] = {i: frozenset({(p, None)}) for i, p in leaves.items()}
        self.keep: list[Any] = []  # outputs stay alive so their ids are not reused
        self.reads: dict[Path, EagerRead] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        if func is F.scaled_dot_product_attention:
            self._attention(args, kwargs)
            return out
        found: set[tuple[Path, Any]] = set()
        cat_dim = _cat_dim(func, args, kwargs)
        for t in flat:
            if isinstance(t, torch.Tensor) and id(t) in self.origins:
                for path, seq in self.origins[id(t)]:
                    if seq is None and cat_dim is not None and isinstance(out, torch.Tensor) and t.dim() == out.dim():
                        seq = cat_dim % out.dim()
                    found.add((path, seq))
        if found:
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.origins[id(o)] = frozenset(found)
                    self.keep.append(o)
        return out

    def _attention(self, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value")
        operands = dict(zip(names, args)) | {n: kwargs[n] for n in names if n in kwargs}
        for name, role in (("key", "key"), ("value", "value")):
            t = operands.get(name)
            # Only entries appended along attention's own sequence dim ([B, H, S, D]: dim 2).
            for path, seq in self.origins.get(id(t), ()):
                if isinstance(t, torch.Tensor) and seq == t.dim() - 2 and path not in self.reads:
                    self.reads[path] = EagerRead(path, seq, role)


def _cat_dim(func: Callable, args: tuple, kwargs: dict) -> Any:
    if func not in (torch.cat, torch.concat, torch.concatenate):
        return None
    return args[1] if len(args) > 1 else kwargs.get("dim", 0)


def observe_reads(fn: Callable, args: dict[str, Any]) -> list[EagerRead]:
    """Run ``fn(**args)`` on fake copies of its tensors and return the container entries SDPA
    reads as K or V after a sequence ``cat`` (see the module docstring). Exceptions of ``fn``
    (a collective that needs real tensors...) propagate: the caller reports them."""
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if not isinstance(args, dict):
        raise TypeError(f"args: expected a dict of argument names to values, got {type(args).__name__}")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in fakes:
            # A QVGCache's fake is the dense tensor it stands for (made inside the mode).
            fakes[id(t)] = mode.from_tensor(t) if type(t) is torch.Tensor else \
                torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return fakes[id(t)]

    real = container_tensors(args)
    with mode:
        fake_args = torch.utils._pytree.tree_map(fake, args)
        follow = _Follow({id(fakes[id(t)]): path for path, t in real.items()})
        with follow:
            fn(**fake_args)
    return list(follow.reads.values())
