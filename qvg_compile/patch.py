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


def _reads_attention(module: torch.nn.Module) -> bool:
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return any(marker in src for marker in _ATTENTION_MARKERS)


def patch(model: torch.nn.Module, qvg: Optional[QVGBackend] = None, **config: Any) -> PatchHandle:
    """Compile, with the QVG backend, each submodule of ``model`` whose forward computes attention
    (regional compilation, for models that cannot be compiled whole). ``config`` goes to
    `qvg_compile.backend`. Returns a `PatchHandle`; ``handle.undo()`` reverts."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    qvg = qvg or make_backend(**config)
    handle = PatchHandle(qvg)
    for name, module in model.named_modules():
        if not _reads_attention(module):
            continue
        if any(name.startswith(prefix + ".") for prefix in handle.modules if prefix):
            continue
        had = "forward" in module.__dict__
        original = module.__dict__.get("forward")
        module.forward = torch.compile(module.forward, backend=qvg)
        handle._originals.append((module, had, original))
        handle.modules.append(name or type(model).__name__)
    if not handle.modules:
        qvg.report.notes.append("patch: no submodule computes attention; nothing was compiled")
    return handle
