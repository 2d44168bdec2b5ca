"""A store to and from safetensors: its arrays as tensors, spec and view as JSON (`QVGCache.save`
and `QVGCache.load` are built on it; this module knows nothing of the tensor class).

The file holds one tensor per array (named as in `StoreSpec.names`) and, in the safetensors
metadata, ``format`` (``qvg-cache/1``), ``spec`` (`StoreSpec.to_json`) and ``view``. A view of a
larger store is saved as its clone: the file holds the tokens the tensor shows, with one caveat:
dense tokens appended by ``cat`` are written into the clone as the pipeline would have written
them, so all but the last chunk's worth are quantized (as the cache does when it grows).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from .spec import STAMP, StoreSpec, next_stamp
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


def write_store(path: str, spec: StoreSpec, arrays: Sequence[torch.Tensor], view: View) -> None:
    """Write a whole store (``arrays`` in `StoreSpec.names` order) and the view over it to
    ``path`` (safetensors). `QVGCache.save` calls it with a cache that is its whole store."""
    from safetensors.torch import save_file
    if not isinstance(spec, StoreSpec):
        raise TypeError(f"spec: expected a StoreSpec, got {type(spec).__name__}")
    if len(arrays) != len(spec.names()):
        raise ValueError(f"arrays: expected {len(spec.names())} arrays {spec.names()}, got {len(arrays)}")
    tensors = {name: a.detach().cpu().contiguous() for name, a in zip(spec.names(), arrays)}
    save_file(tensors, path, metadata={"format": FORMAT, "spec": spec.to_json(), "view": _view_to_json(view)})


def read_store(path: str, device: torch.device | str = "cpu") -> tuple[StoreSpec, list[torch.Tensor], View]:
    """``(spec, arrays, view)`` of a file written by `write_store`; device arrays go to
    ``device``, the token state stays on the host, and the store takes a fresh state stamp."""
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
    return spec, arrays, _view_from_json(meta["view"])
