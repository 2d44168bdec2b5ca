"""The shipped checkpoint: weights, config, recipe and prompt frames in one safetensors file.

Layout: the model's ``state_dict`` (bf16) plus ``prompts`` ``[P, F, 3, size, size]`` uint8 (the
first chunk of held-out clips, to start videos from); the metadata holds ``config`` and ``recipe``
as JSON. The files live inside the package (``qvg_compile/tiny/<name>_video.safetensors``, one per
model of `qvg_compile.tiny.zoo`) so that non-editable installs have them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .model import TinyVideoConfig, TinyVideoModel
from .zoo import get_model_spec

FORMAT = "qvg-compile-tiny-video/1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its prompts ``[P, F, 3, size, size]`` uint8
    and the training recipe it records."""

    model: TinyVideoModel
    prompts: torch.Tensor
    recipe: dict[str, Any] = field(default_factory=dict)


def default_path(name: str = "tiny") -> Path:
    """Where the package ships the checkpoint of model ``name`` (the file may be missing)."""
    return Path(str(resources.files("qvg_compile.tiny").joinpath(get_model_spec(name).checkpoint)))


def save_checkpoint(model: TinyVideoModel, path: Union[str, Path], prompts: torch.Tensor,
                    recipe: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model`` (weights cast to bf16), ``prompts`` (uint8) and ``recipe`` to ``path``."""
    from safetensors.torch import save_file

    if not isinstance(model, TinyVideoModel):
        raise TypeError(f"model: expected a TinyVideoModel, got {type(model).__name__}")
    if prompts.dtype != torch.uint8 or prompts.dim() != 5:
        raise ValueError(f"prompts: expected uint8 [P, F, C, H, W], got {prompts.dtype} {list(prompts.shape)}")
    tensors = {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    tensors["prompts"] = prompts.detach().cpu().contiguous()
    metadata = {"format": FORMAT, "config": json.dumps(model.cfg.to_dict()),
                "recipe": json.dumps(recipe or {})}
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_checkpoint(path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32, name: str = "tiny") -> Checkpoint:
    """Load a checkpoint with safetensors (no pickle): ``path``, or else the one the package ships
    for model ``name`` (`qvg_compile.tiny.zoo`); the model is built from the stored config, cast
    to ``dtype`` on ``device``, in eval mode."""
    from safetensors import safe_open

    if path is None:
        path = default_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model {name!r}: its checkpoint {path.name} is not in the package ({path.parent}); "
                                    f"train it with examples/train_tiny.py --model {name} and copy it there")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tiny-video checkpoint at {path}: train one with examples/train_tiny.py")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"path: {path} is not a {FORMAT} checkpoint (format={meta.get('format')!r})")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    cfg = TinyVideoConfig(**json.loads(meta["config"]))
    model = TinyVideoModel(cfg)
    prompts = tensors.pop("prompts")
    model.load_state_dict(tensors)
    model = model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model=model, prompts=prompts, recipe=json.loads(meta.get("recipe", "{}")))
