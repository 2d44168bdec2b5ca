"""`QVGCache` to and from safetensors: the store's arrays as tensors, spec and view as JSON.

The file holds one tensor per array (named as in `StoreSpec.names`) and, in the safetensors
metadata, ``format`` (``qvg-cache/1``), ``spec`` (`StoreSpec.to_json`) and ``view``. A view of a
larger store is saved as its clone: the file holds the tokens the tensor shows, with one caveat:
dense tokens appended by ``cat`` are written into the clone as the pipeline would have written
them, so all but the last chunk's worth are quantized (as the cache does when it grows).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .dispatch import is_whole
from .spec import STAMP, StoreSpec, next_stamp
from .tensor import QVGCache, StoreHandle
from .view import Lead, View

FORMAT = "qvg-cache/1"


def _view_to_json(view: View) -> str:
    return json.dumps({"dims": list(view.dims), "lead": [[ax.offset, ax.length, ax.interleave, ax.tile]
                                                          for ax in view.lead],
                       "pieces": [list(p) for p in view.pieces], "parts": list(view.parts),
                       "bcast": list(view.bcast), "mode": view.mode})


def _view_from_json(text: str) -> View:
    d: dict[str, Any] = json.loads(text)
    return View(tuple(d["dims"]), tuple(Lead(*ax) for ax in d["lead"]), tuple(tuple(p) for p in d["pieces"]),
                tuple(d["parts"]), tuple(d["bcast"]), d["mode"])


def save(cache: QVGCache, path: str) -> None:
    """Write ``cache`` to ``path`` (safetensors)."""
    from safetensors.torch import save_file
    if not isinstance(cache, QVGCache):
        raise TypeError(f"cache: expected a QVGCache, got {type(cache).__name__}")
    if not is_whole(cache) or cache._view.mode != "view":
        cache = cache.clone()
    spec = cache.spec
    tensors = {name: a.detach().cpu().contiguous() for name, a in zip(spec.names(), cache._handle.arrays)}
    save_file(tensors, path, metadata={"format": FORMAT, "spec": spec.to_json(), "view": _view_to_json(cache._view)})


def load(path: str, device: torch.device | str = "cpu") -> QVGCache:
    """Read a cache written by `save`; device arrays go to ``device``, the token state stays on
    the host."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a QVGCache file (format {meta.get('format')!r}, expected {FORMAT!r})")
        spec = StoreSpec.from_json(meta["spec"])
        missing = [n for n in spec.names() if n not in f.keys()]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        arrays = [f.get_tensor(n) if spec.is_host(n) else f.get_tensor(n).to(device) for n in spec.names()]
    counters = spec.names().index("counters")
    # Files written before the state stamp existed hold two counters; a loaded store is a new
    # state either way.
    arrays[counters] = torch.cat([arrays[counters][:STAMP], torch.tensor([next_stamp()], dtype=torch.int64)])
    return QVGCache(StoreHandle(spec, arrays), _view_from_json(meta["view"]))
