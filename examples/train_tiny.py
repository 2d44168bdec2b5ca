"""Train the tiny AR video model shipped with qvg-compile (the recipe; reproducible from a seed).

    pip install -e ".[train]"                      # scikit-image: its bundled photos are the data
    python examples/train_tiny.py --out runs/tiny  # one GPU, about 5 minutes on an H100
    cp runs/tiny/tiny_video.safetensors qvg_compile/tiny/

Data (`qvg_compile.tiny.data`): clips of 24 frames, 32x32 RGB, camera pans / zooms / oscillations
over 12 photographs of scikit-image plus up to 3 bouncing sprites, made on the GPU from a seed.
Objective: flow matching (x_t = (1-t) x + t noise, target noise - x) with teacher forcing in the
Self-Forcing layout: every chunk of 4 frames gets its own noise level and attends to the clean
chunks before it and to itself (`TinyVideoModel.forward_train`), exactly what chunk-by-chunk
generation with a KV cache shows it. AdamW, bf16 autocast, EMA weights are saved.
At the end the EMA model continues held-out clips (photos never seen in training) from their
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

from qvg_compile.tiny.checkpoint import CHECKPOINT_NAME, save_checkpoint
from qvg_compile.tiny.data import HELD_OUT_PHOTOS, TRAIN_PHOTOS, ClipSampler, load_photos, prompt_clips, to_uint8
from qvg_compile.tiny.model import TinyVideoConfig, TinyVideoModel, generate

SHIPPED = TinyVideoConfig(size=32, patch=4, dim=256, heads=4, layers=4, frames_per_chunk=4, steps=4)


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    mse = float((reference.float() - test.float()).pow(2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SHIPPED
    sampler = ClipSampler(load_photos(TRAIN_PHOTOS).to(device), size=cfg.size, frames=args.frames, seed=args.seed)
    model = TinyVideoModel(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 1)
    chunks = args.frames // cfg.frames_per_chunk
    log = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        clean = sampler.sample(args.batch)
        noise = torch.randn(clean.shape, generator=noise_gen, device=device)
        t = torch.rand(args.batch, chunks, generator=noise_gen, device=device)
        t_frames = t.repeat_interleave(cfg.frames_per_chunk, dim=1)[:, :, None, None, None]
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
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            log.append({"step": step, "loss": float(loss), "lr": lr, "seconds": elapsed})
            print(f"step {step:6d}  loss {float(loss):.4f}  lr {lr:.2e}  {elapsed:6.1f} s", flush=True)
    seconds = time.perf_counter() - start

    truth = prompt_clips(args.prompts, args.frames, size=cfg.size, photos=load_photos(HELD_OUT_PHOTOS).to(device))
    prompts = to_uint8(truth[:, :cfg.frames_per_chunk])
    ema_bf16 = copy.deepcopy(ema).to(torch.bfloat16)
    video = generate(ema_bf16, chunks, seed=0, prompt=truth[:, :cfg.frames_per_chunk].to(torch.bfloat16),
                     progress=False)
    held_out = psnr(truth[:, cfg.frames_per_chunk:], video[:, cfg.frames_per_chunk:])
    recipe = {"script": "examples/train_tiny.py", "args": vars(args), "config": cfg.to_dict(),
              "train_photos": list(TRAIN_PHOTOS), "held_out_photos": list(HELD_OUT_PHOTOS),
              "train_seconds": round(seconds, 1), "final_loss": log[-1]["loss"],
              "held_out_continuation_psnr_db": round(held_out, 2),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters())}
    path = save_checkpoint(ema, out / CHECKPOINT_NAME, prompts, recipe)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the checkpoint, log.json and samples.png")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=24, help="frames per training clip (6 chunks of 4)")
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompt clips stored with the weights")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train(parser.parse_args())


if __name__ == "__main__":
    main()
