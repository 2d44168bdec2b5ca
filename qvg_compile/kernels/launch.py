"""`Prebound`: a Triton launch whose arguments never change, relaunched at the driver's cost.

A call through ``kernel[grid](*args, **meta)`` binds and specialises every argument, builds
the compile-cache key and checks the kernel's globals before it launches; with the gather's ~95
arguments that is most of a read's own host time. A read replayed from its plan passes the same
pointers, strides and grid every time, so the first launch goes through Triton as usual and
keeps the compiled kernel it returns; later launches hand the same argument list straight to
the compiled kernel's launcher (``CompiledKernel[grid]``), which is what Triton's own launch
ends in. CUDA tensors are handed to it as their device addresses: the launcher takes an int as
the pointer itself, where for a tensor it calls ``data_ptr()`` and asks the driver about the
address (``cuPointerGetAttribute``), once per tensor argument and launch. The bound tensors are
kept alive by the `Prebound`; their storage must not move while it is used (a store's arrays are
never resized in place: a new layout is new arrays, and `BoundRead.valid` checks identity).
Under the Triton interpreter (``TRITON_INTERPRET=1``) there is no compiled kernel and
every launch goes through Triton.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class Prebound:
    """``fn[grid](*args, **meta)`` with fixed ``args``, ``meta`` and ``grid``.

    Args:
        fn: a ``@triton.jit`` function.
        grid: the launch grid (1 to 3 ints).
        args: the positional arguments (tensors and scalars), in ``fn``'s parameter order.
        meta: the remaining parameters (constexprs) by name, plus launch options
            (``num_warps``...).
    """

    def __init__(self, fn: Any, grid: Sequence[int], args: Sequence[Any], meta: dict[str, Any]) -> None:
        if not 1 <= len(grid) <= 3 or not all(isinstance(g, int) and g >= 0 for g in grid):
            raise ValueError(f"grid: expected 1 to 3 non-negative ints, got {grid!r}")
        self.fn, self.grid, self.args, self.meta = fn, tuple(grid), list(args), dict(meta)
        self._runner: Any = None
        self._params: list[Any] = []

    def __call__(self) -> None:
        """Launch on the current stream."""
        if self._runner is not None:
            self._runner(*self._params)
            return
        self._keep(self.fn[self.grid](*self.args, **self.meta))

    def prepare(self) -> None:
        """Find the compiled kernel now, without launching (Triton's ``warmup``), so that the
        first call already goes straight to the launcher. Nothing to do under the interpreter."""
        warmup = getattr(self.fn, "warmup", None)
        if self._runner is not None or warmup is None or not hasattr(self.fn, "arg_names"):
            return
        self._keep(warmup(*self.args, grid=self.grid, **self.meta))

    def _keep(self, compiled: Any) -> None:
        """Keep ``compiled`` (what Triton's launch or warmup returned) and its argument list."""
        names = getattr(self.fn, "arg_names", None)
        if compiled is None or names is None or not hasattr(compiled, "__getitem__"):
            return
        # The launcher takes every parameter in signature order (constexprs included, as
        # Triton's own launch passes them); launch options are not parameters.
        given = dict(zip(names, self.args))
        missing = [n for n in names[len(self.args):] if n not in self.meta]
        if missing:
            raise TypeError(f"Prebound: no value for {missing} of {getattr(self.fn, '__name__', self.fn)}")
        given.update((n, self.meta[n]) for n in names[len(self.args):])
        grid = self.grid + (1,) * (3 - len(self.grid))
        self._params = [address(given[n]) for n in names]
        self._runner = compiled[grid]


def address(arg: Any) -> Any:
    """A CUDA tensor's device address (the compiled launcher's cheapest pointer argument); any
    other argument as it is (a CPU tensor stays a tensor, so that the launcher refuses it)."""
    return arg.data_ptr() if isinstance(arg, torch.Tensor) and arg.is_cuda else arg
