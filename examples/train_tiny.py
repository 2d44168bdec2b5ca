"""Train a video model shipped with qvg-compile (the recipe; reproducible from a seed).

    pip install -e ".[train]"                      # scikit-image: its bundled photos are the data
    python examples/train_tiny.py --out runs/tiny  # one GPU, about 5 minutes on an H100
    cp runs/tiny/tiny_video.safetensors qvg_compile/tiny/
    python examples/train_tiny.py --model proxy --out runs/proxy --time-limit 230   # Wan geometry

``--model`` picks a named model of `qvg_compile.tiny.zoo` (architecture, checkpoint file name and
the defaults of every option below). Data (`qvg_compile.tiny.data`): clips (tiny: 24 frames of
32x32 RGB; proxy: 12 frames of 64x64) of camera pans / zooms / oscillations over 12 photographs of
scikit-image plus up to 3 bouncing sprites, made on the GPU from a seed; without scikit-image or
Pillow (``--data auto``) procedural 1/f textures stand in, and the recipe says so.
Objective: flow matching (x_t = (1-t) x + t noise, target noise - x) with teacher forcing in the
Self-Forcing layout: every chunk gets its own noise level and attends to the clean chunks before it
and to itself (`TinyVideoModel.forward_train`), exactly what chunk-by-chunk generation with a KV
cache shows it. AdamW, bf16 autocast, EMA weights are saved. The learning rate follows a cosine
over the planned ``--steps``, or over ``--time-limit`` seconds when that comes first; the loop
stops at whichever ends first and logs why, so a slow machine still writes an annealed checkpoint.
At the end the EMA model continues held-out clips (images never seen in training) from their
first chunk, and the PSNR of that continuation against the true clip is stored in the recipe.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qvg_compile.tiny.checkpoint import save_checkpoint
from qvg_compile.tiny.data import (HELD_OUT_PHOTOS, TRAIN_PHOTOS, ClipSampler, load_photos, photos_available,
                                   procedural_photos, prompt_clips, to_uint8)
from qvg_compile.tiny.model import TinyVideoModel, generate
from qvg_compile.tiny.zoo import MODELS, get_model_spec

# Procedural textures: training and held-out images come from disjoint seeds.
PROCEDURAL_TRAIN_SEED, PROCEDURAL_HELD_OUT_SEED = 100, 200


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    mse = float((reference.float() - test.float()).pow(2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def images(data: str, held_out: bool, side: int, device: torch.device) -> torch.Tensor:
    """The training (or held-out) images ``[P, 3, side, side]`` on ``device``."""
    if data == "photos":
        return load_photos(HELD_OUT_PHOTOS if held_out else TRAIN_PHOTOS, side=side).to(device)
    count = len(HELD_OUT_PHOTOS) if held_out else len(TRAIN_PHOTOS)
    return procedural_photos(count, side, PROCEDURAL_HELD_OUT_SEED if held_out else PROCEDURAL_TRAIN_SEED).to(device)


def resolve_data(data: str, side: int) -> str:
    """``"auto"`` -> ``"photos"`` when scikit-image's photos load here, else ``"procedural"``
    (some scikit-image installs fetch their sample images on demand and lack them offline)."""
    if data != "auto":
        return data
    if photos_available():
        try:
            load_photos(TRAIN_PHOTOS + HELD_OUT_PHOTOS, side=side)
            return "photos"
        except (ImportError, OSError, ValueError) as exc:
            print(f"--data auto: the photos do not load ({exc}); using procedural textures", flush=True)
    return "procedural"


def schedule(args: argparse.Namespace, step: int, elapsed: float) -> tuple[float, float]:
    """``(progress in [0, 1], learning rate)``: warm-up, then a cosine from lr to lr/10 over the
    planned steps or the time limit, whichever is nearer its end."""
    progress = step / args.steps
    if args.time_limit:
        progress = max(progress, elapsed / args.time_limit)
    progress = min(progress, 1.0)
    lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    return progress, lr


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_model_spec(args.model)
    cfg = spec.config
    if args.frames % cfg.frames_per_chunk:
        raise ValueError(f"--frames: expected a multiple of {cfg.frames_per_chunk}, got {args.frames}")
    data = resolve_data(args.data, args.photo_side)
    sampler = ClipSampler(images(data, False, args.photo_side, device), size=cfg.size, frames=args.frames,
                          seed=args.seed)
    model = TinyVideoModel(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 1)
    chunks = args.frames // cfg.frames_per_chunk
    log, stopped, step = [], "steps", 0
    start = time.perf_counter()
    while step < args.steps:
        step += 1
        progress, lr = schedule(args, step, time.perf_counter() - start)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = train_step(model, ema, opt, sampler, noise_gen, args, chunks, step)
        last = progress >= 1.0 or step == args.steps
        if step % args.log_every == 0 or last:
            elapsed = time.perf_counter() - start
            log.append({"step": step, "loss": float(loss), "lr": lr, "seconds": elapsed})
            print(f"step {step:6d}  loss {float(loss):.4f}  lr {lr:.2e}  {elapsed:6.1f} s", flush=True)
        if progress >= 1.0 and step < args.steps:
            stopped = "time_limit"
            print(f"stopped at step {step} of {args.steps}: time limit of {args.time_limit} s reached", flush=True)
            break
    seconds = time.perf_counter() - start
    return finish(args, spec, ema, data, log, seconds, step, stopped, device)


def train_step(model: TinyVideoModel, ema: TinyVideoModel, opt: torch.optim.Optimizer, sampler: ClipSampler,
               noise_gen: torch.Generator, args: argparse.Namespace, chunks: int, step: int) -> torch.Tensor:
    """One AdamW step on a fresh batch, then the EMA update; returns the loss (on the device)."""
    device = next(model.parameters()).device
    fpc = model.cfg.frames_per_chunk
    clean = sampler.sample(args.batch)
    noise = torch.randn(clean.shape, generator=noise_gen, device=device)
    t = torch.rand(args.batch, chunks, generator=noise_gen, device=device)
    t_frames = t.repeat_interleave(fpc, dim=1)[:, :, None, None, None]
    noisy = (1 - t_frames) * clean + t_frames * noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        velocity = model.forward_train(clean, noisy, t)
    loss = F.mse_loss(velocity.float(), noise - clean)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        decay = min(args.ema, (1 + step) / (10 + step))
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
    return loss.detach()


def finish(args: argparse.Namespace, spec, ema: TinyVideoModel, data: str, log: list, seconds: float,
           steps_done: int, stopped: str, device: torch.device) -> dict:
    """Held-out continuation PSNR, then the checkpoint, log.json and samples.png in ``--out``."""
    cfg, out = spec.config, Path(args.out)
    fpc = cfg.frames_per_chunk
    truth = prompt_clips(args.prompts, args.frames, size=cfg.size, photos=images(data, True, args.photo_side, device))
    prompts = to_uint8(truth[:, :fpc])
    ema_bf16 = copy.deepcopy(ema).to(torch.bfloat16)
    video = generate(ema_bf16, args.frames // fpc, seed=0, prompt=truth[:, :fpc].to(torch.bfloat16), progress=False)
    held_out = psnr(truth[:, fpc:], video[:, fpc:])
    recipe = {"script": "examples/train_tiny.py", "model": spec.name, "args": vars(args), "config": cfg.to_dict(),
              "data": data, "train_photos": list(TRAIN_PHOTOS), "held_out_photos": list(HELD_OUT_PHOTOS),
              "train_seconds": round(seconds, 1), "steps_done": steps_done, "stopped": stopped,
              "final_loss": log[-1]["loss"], "held_out_continuation_psnr_db": round(held_out, 2),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "params": sum(p.numel() for p in ema.parameters())}
    if data == "procedural":
        recipe.update(train_photos=f"procedural_photos(seed={PROCEDURAL_TRAIN_SEED})",
                      held_out_photos=f"procedural_photos(seed={PROCEDURAL_HELD_OUT_SEED})")
    path = save_checkpoint(ema, out / spec.checkpoint, prompts, recipe)
    (out / "log.json").write_text(json.dumps({"recipe": recipe, "log": log}, indent=1))
    _save_samples(truth, video, out / "samples.png")
    print(json.dumps({k: v for k, v in recipe.items() if k != "args"}, indent=1))
    print(f"checkpoint: {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    return recipe


def _save_samples(truth: torch.Tensor, video: torch.Tensor, path: Path) -> None:
    """Rows: true clip, then the model's continuation of its first chunk, per prompt."""
    try:
        from PIL import Image
    except ImportError:
        return
    pairs = torch.stack([truth.float().cpu(), video.float().cpu()], dim=1).flatten(0, 1)   # [2P, T, C, H, W]
    n, t, c, h, w = pairs.shape
    grid = to_uint8(pairs).permute(0, 3, 1, 4, 2).reshape(n * h, t * w, c)
    Image.fromarray(grid.numpy()).save(path)


def parse_args(argv=None) -> argparse.Namespace:
    """Options; those left unset take the named model's defaults (`qvg_compile.tiny.zoo`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny", help="which named model to train")
    parser.add_argument("--out", required=True, help="folder for the checkpoint, log.json and samples.png")
    parser.add_argument("--steps", type=int, help="planned optimizer steps (tiny: 6000, proxy: 1200)")
    parser.add_argument("--batch", type=int, help="clips per step (tiny: 32, proxy: 8)")
    parser.add_argument("--frames", type=int, help="frames per training clip (tiny: 24, proxy: 12)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--ema", type=float)
    parser.add_argument("--photo-side", type=int, help="side the images are resized to before the camera moves")
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds of training at most: the schedule anneals over it and the loop stops")
    parser.add_argument("--data", choices=["auto", "photos", "procedural"], default="auto",
                        help="scikit-image photos, procedural textures, or photos when installed (auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompt clips stored with the weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for key, value in get_model_spec(args.model).train.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit: expected a positive number of seconds, got {args.time_limit}")
    return args


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
