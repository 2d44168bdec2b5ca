"""``qvg_compile.patch``: regional compilation of the attention modules only, with ``undo()``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .backend import QVGBackend, backend as make_backend
from .passes.report import Report

# Source-level evidence that a module's own forward reads attention (the backend then decides,
# per captured graph, whether a KV cache is involved).
_ATTENTION_MARKERS = ("scaled_dot_product_attention", "flash_attn", "softmax(", "flex_attention")


@dataclass
class PatchHandle:
    """What `patch` changed; `undo()` restores every patched forward."""

    backend: QVGBackend
    modules: list[str] = field(default_factory=list)
    _originals: list[tuple[torch.nn.Module, bool, Any]] = field(default_factory=list, repr=False)

    @property
    def report(self) -> Report:
        return self.backend.report

    def undo(self) -> None:
        """Give every patched module its own forward back (caches already QVG stay QVG)."""
        for module, had_instance_forward, original in reversed(self._originals):
            if had_instance_forward:
                module.forward = original
            else:
                del module.forward
        self._originals.clear()
        self.modules.clear()


def _has_marker(fn: Any) -> bool:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return any(marker in src for marker in _ATTENTION_MARKERS)


def _reads_attention(module: torch.nn.Module) -> bool:
    """The forward of ``module``'s class, or a module-level function it calls, computes attention."""
    forward = type(module).forward
    if _has_marker(forward):
        return True
    code = getattr(forward, "__code__", None)
    scope = getattr(forward, "__globals__", {})
    helpers = (scope.get(name) for name in (code.co_names if code is not None else ()))
    return any(inspect.isfunction(fn) and _has_marker(fn) for fn in helpers)


def _is_compiled(fn: Any) -> bool:
    return getattr(fn, "_torchdynamo_orig_callable", None) is not None


def patch(model: torch.nn.Module, qvg: Optional[QVGBackend] = None, **config: Any) -> PatchHandle:
    """Compile, with the QVG backend, each submodule of ``model`` whose forward computes attention
    (regional compilation, for models that cannot be compiled whole): the outermost such module
    on each branch (its own forward, or a module-level function it calls, uses SDPA, flash-attn,
    flex_attention or a softmax). The backend then finds the KV caches those forwards write and
    read, and moves them into QVGCache on their first call.

    ``config`` goes to `qvg_compile.backend` (``config=QVGConfig``, ``preset``, ``bits``, cache
    options); or pass a backend as ``qvg``. Returns a `PatchHandle`: ``handle.modules`` (the
    compiled module paths), ``handle.report``, ``handle.undo()``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if qvg is not None and not isinstance(qvg, QVGBackend):
        raise TypeError(f"qvg: expected a QVGBackend (qvg_compile.backend(...)), got {type(qvg).__name__}")
    if qvg is not None and config:
        raise ValueError(f"pass either qvg or config options, not both (got {sorted(config)})")
    qvg = qvg or make_backend(**config)
    handle = PatchHandle(qvg)
    for name, module in model.named_modules():
        if not _reads_attention(module):
            continue
        if any(name.startswith(prefix + ".") for prefix in handle.modules if prefix):
            continue
        if _is_compiled(module.__dict__.get("forward")):
            qvg.report.notes.append(f"patch: {name or type(model).__name__} is already compiled; left as it is")
            continue
        had = "forward" in module.__dict__
        original = module.__dict__.get("forward")
        module.forward = torch.compile(module.forward, backend=qvg)
        handle._originals.append((module, had, original))
        handle.modules.append(name or type(model).__name__)
    if not handle.modules:
        qvg.report.notes.append("patch: no submodule computes attention; nothing was compiled")
    return handle
