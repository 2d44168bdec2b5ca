"""The ``qvg-compile`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from tabulate import tabulate


def _quant_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench.compare import DEFAULT_METHODS, compare, load_kv
    from .bench.synthetic import scene_cut_kv, video_like_kv

    device = torch.device(args.device)
    if args.kv and args.scene_change:
        raise ValueError("--scene-change: applies to the built-in generator, not to --kv")
    if args.kv:
        data = load_kv(args.kv, layer=args.layer)
    elif args.layer is not None:
        raise ValueError("--layer: needs --kv (a file captured from several layers)")
    elif args.scene_change and args.frames < 2:
        raise ValueError(f"--scene-change: needs at least 2 frames, got --frames {args.frames}")
    else:
        make = scene_cut_kv if args.scene_change else video_like_kv
        data = make(heads=args.heads, frames=args.frames, height=args.height, width=args.width,
                    head_dim=args.head_dim, seed=args.seed)
    data = {name: t.to(device) for name, t in data.items()}
    methods = tuple(args.methods.split(",")) if args.methods else DEFAULT_METHODS
    records = compare(data["k"], data["v"], data.get("q"), methods=methods, seed=args.seed)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    k = data["k"]
    source = ("file " + args.kv if args.kv else
              "built-in video-like data" + (", a scene cut half way" if args.scene_change else ""))
    print(f"K/V {list(k.shape)} {k.dtype} on {device} ({source})")
    rows = [[r["method"], f"{r['bits_per_element']:.3f}", f"{r['compression']:.2f}x",
             f"{r['k_rel_mse']:.4f}", f"{r['v_rel_mse']:.4f}",
             "-" if r["attn_rel_err"] is None else f"{r['attn_rel_err']:.4f}", f"{r['encode_ms']:.1f}"]
            for r in records]
    print(tabulate(rows, headers=["method", "bits/elem", "vs BF16", "K rel-MSE", "V rel-MSE",
                                  "attn rel-err", "encode ms"], tablefmt="github"))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo_run import run_demo

    result = run_demo(chunks=args.chunks, seed=args.seed, out=args.out, progress=not args.quiet)
    print(result["report"].summary())
    print()
    print(result["memory_table"])
    print()
    print(f"KV cache: {result['dense_bytes'] / 2**20:.2f} MiB dense -> {result['qvg_bytes'] / 2**20:.2f} MiB "
          f"with QVG while generating ({result['dense_bytes'] / max(1, result['qvg_bytes']):.2f}x less), "
          f"{result['sealed_bytes'] / 2**20:.2f} MiB once the last chunk is sealed "
          f"({result['dense_bytes'] / max(1, result['sealed_bytes']):.2f}x less)")
    print(f"QVG video against the dense-cache video (same seed), {result['frames']} generated frames: "
          f"PSNR {result['psnr_db']:.2f} dB, SSIM {result['ssim']:.3f}")
    print(f"time: dense eager {result['dense_seconds']:.1f} s, QVG compiled {result['qvg_seconds']:.1f} s "
          "(including compilation)")
    print(f"video (dense | QVG): {result['video']}")
    return 0


def _eval_table(records: list) -> str:
    table = tabulate([[r["label"], r["via"], f"{r['bits_per_element']:.3f}", f"{r['sealed_bits_per_element']:.3f}",
                       f"{r['compression']:.2f}x", f"{r['psnr_db']:.2f}", f"{r['ssim']:.3f}",
                       f"{r['psnr_last_chunk_db']:.2f}", f"{r['seconds']:.1f}"] for r in records],
                     headers=["cache", "how", "bits/elem", "sealed bits", "vs dense", "PSNR dB", "SSIM",
                              "PSNR last chunk", "s"], tablefmt="github")
    with_layers = [r for r in records if r.get("layers")]
    if not with_layers:
        return table
    count = len(with_layers[0]["layers"])
    errors = tabulate([[r["label"]] + [f"{row[f'{n}_rel_mse']:.4f}" for row in r["layers"] for n in "kv"]
                       for r in with_layers],
                      headers=["K/V rel-MSE"] + [f"{n.upper()} L{i}" for i in range(count) for n in "kv"],
                      tablefmt="github")
    return f"{table}\n\n{errors}"


def _load_eval_checkpoint(args: argparse.Namespace):
    from .tiny.checkpoint import load_checkpoint

    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    try:
        return load_checkpoint(name=args.model)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from exc


def _eval(args: argparse.Namespace) -> int:
    import math

    import torch

    from .tiny.evaluate import evaluate

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    records_so_far: list = []

    def clean(r: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()}

    def keep(record: dict) -> None:
        # Written after every method, so a run cut short by a time-out keeps what it measured.
        records_so_far.append(record)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump([clean(r) for r in records_so_far], f, indent=1)

    ckpt = _load_eval_checkpoint(args)
    records, videos = evaluate(ckpt, chunks=args.chunks, prompts=args.prompts,
                               methods=args.methods.split(","), bits=args.bits, seed=args.seed, via=args.via,
                               device=args.device, dtype=dtype, progress=not args.json,
                               settings=args.settings.split(","), layer_errors=args.layer_errors,
                               time_limit=args.time_limit, on_record=keep)
    if args.json:
        print(json.dumps([clean(r) for r in records], indent=1))
    else:
        print(_eval_table(records))
    note = sys.stderr if args.json else sys.stdout
    if args.plot:
        from .tiny.media import save_psnr_plot
        name = args.checkpoint or args.model
        path = save_psnr_plot(records, args.plot, title=f"{name}: {args.chunks} chunks, {args.prompts} prompt(s), "
                                                        f"{args.dtype}")
        print(f"plot: {path}", file=note)
    if args.gif:
        from .tiny.media import save_strip
        path = save_strip([v[0] for v in videos.values()], [r["label"] for r in records], args.gif)
        print(f"video strip: {path}", file=note)
    return 0


def _capture_kv(args: argparse.Namespace) -> int:
    import torch

    from .tiny.capture import capture_kv, save_kv

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    ckpt = _load_eval_checkpoint(args)
    layers = [int(x) for x in args.layers.split(",")]
    heads = [int(x) for x in args.heads.split(",")]
    tensors = capture_kv(ckpt, chunks=args.chunks, frames=args.frames, layers=layers, heads=heads,
                         queries=args.queries, seed=args.seed, device=args.device, dtype=dtype)
    cfg = ckpt.model.cfg
    info = {"model": args.checkpoint or args.model, "config": cfg.to_dict(), "chunks": args.chunks,
            "frames": args.frames, "layers": layers, "heads": heads, "queries": args.queries, "seed": args.seed,
            "device": args.device, "recipe_model": ckpt.recipe.get("model")}
    path = save_kv(tensors, args.out, info)
    print(f"{path}: {', '.join(f'{n} {list(t.shape)}' for n, t in tensors.items())} {str(dtype)[6:]}, "
          f"{path.stat().st_size / 2**20:.2f} MiB")
    return 0


def _load_factory(spec: str):
    """``FILE.py:FACTORY`` -> the factory callable (the file's directory is importable meanwhile)."""
    import importlib.util
    from pathlib import Path

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"expected FILE.py:FACTORY, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(f"qvg_inspect_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(file.resolve().parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{path} defines no callable {name!r}")
    return factory


def _inspect_inputs(built):
    """What a factory returns: ``(model, args)``, ``(model, args, kwargs)`` or a dict with keys
    ``model``, ``args`` and optionally ``kwargs``."""
    if isinstance(built, dict):
        model, args, kwargs = built.get("model"), built.get("args", ()), built.get("kwargs", {})
    elif isinstance(built, tuple) and len(built) in (2, 3):
        model, args, kwargs = built[0], built[1], built[2] if len(built) == 3 else {}
    else:
        raise ValueError("the factory must return (model, args), (model, args, kwargs) or "
                         "{'model': ..., 'args': ..., 'kwargs': ...}")
    if not callable(model):
        raise ValueError(f"the factory's model is not callable ({type(model).__name__})")
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    if not isinstance(kwargs, dict):
        raise ValueError(f"the factory's kwargs must be a dict, got {type(kwargs).__name__}")
    return model, args, kwargs


def _option_value(text: str):
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _inspect(args: argparse.Namespace) -> int:
    from . import backend as make_backend
    from .explain import explain

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = _option_value(value)
    try:
        qvg = make_backend(preset=args.preset, **options)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    model, call_args, call_kwargs = _inspect_inputs(_load_factory(args.target)())
    report = explain(model, *call_args, config=qvg.config, calls=args.calls, cache_options=qvg.cache_options,
                     **call_kwargs)
    print(report.to_json() if args.json else report.summary(diff=args.diff))
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    from .tiny.zoo import MODELS

    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="which shipped model (tiny: the CPU demo's; proxy: Wan latent geometry)")
    parser.add_argument("--checkpoint", help="a checkpoint file to use instead of the shipped one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvg-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    qb = sub.add_parser("quant-bench", help="compare QVG with RTN, KIVI and QuaRot on K/V tensors")
    qb.add_argument("--kv", help=".pt or .safetensors file with tensors k, v [B, H, N, D] (and optional q)")
    qb.add_argument("--device", default="cpu", help="where the quantizers run (cpu, cuda)")
    qb.add_argument("--seed", type=int, default=0, help="seed of the built-in generator and of k-means")
    qb.add_argument("--methods", help="comma-separated presets (default: all)")
    qb.add_argument("--heads", type=int, default=2, help="built-in generator: attention heads")
    qb.add_argument("--frames", type=int, default=16, help="built-in generator: latent frames")
    qb.add_argument("--height", type=int, default=32, help="built-in generator: tokens per frame, vertically")
    qb.add_argument("--width", type=int, default=32, help="built-in generator: tokens per frame, horizontally")
    qb.add_argument("--head-dim", type=int, default=128, help="built-in generator: channels per head")
    qb.add_argument("--scene-change", action="store_true",
                    help="built-in generator: the second half of the frames from another video (a cut)")
    qb.add_argument("--layer", type=int, help="--kv from capture-kv: this layer only (default: all, stacked on heads)")
    qb.add_argument("--json", action="store_true", help="print a JSON list of records")
    qb.set_defaults(func=_quant_bench)

    demo = sub.add_parser("demo", help="continue a clip with the shipped tiny video model and a 2-bit QVG KV cache (CPU, ~45 s cold)")
    demo.add_argument("--chunks", type=int, default=12, help="chunks of 4 frames to generate, the prompt chunk included")
    demo.add_argument("--seed", type=int, default=0, help="noise seed (the same for the dense and the QVG run)")
    demo.add_argument("--out", default="qvg_demo.gif", help="GIF of the two videos side by side (dense | QVG)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="video quality of QVG and baseline caches against the dense-cache rollout")
    _model_options(ev)
    ev.add_argument("--chunks", type=int, default=12, help="chunks per video, the prompt chunk included")
    ev.add_argument("--prompts", type=int, default=2, help="held-out prompt clips to continue")
    ev.add_argument("--methods", default="qvg,qvg_asym,qvg_pro,qvg_pro_asym,rtn,kivi,quarot",
                    help="comma-separated: qvg, qvg_asym, qvg_pro, qvg_pro_asym, rtn (in QVGCache), kivi, quarot (simulated)")
    ev.add_argument("--bits", type=int, default=2, help="code bits of every method")
    ev.add_argument("--seed", type=int, default=0, help="noise seed of every rollout")
    ev.add_argument("--via", choices=["compress", "compile"], default="compress",
                    help="caches compressed eagerly (compress) or by torch.compile with the QVG backend")
    ev.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    ev.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="model and cache dtype")
    ev.add_argument("--plot", help="write a PNG of PSNR per frame here (matplotlib)")
    ev.add_argument("--gif", help="write the first prompt's videos side by side here (Pillow)")
    ev.add_argument("--settings", default="published",
                    help="comma-separated: published (each method's own setting), matched (2.3-2.5 bits each)")
    ev.add_argument("--layer-errors", action="store_true",
                    help="also each method's per-layer K/V rel-MSE on the dense rollout's K/V")
    ev.add_argument("--time-limit", type=float, help="seconds after which no further method starts")
    ev.add_argument("--json-out", help="write the records as JSON here (rewritten after every method)")
    ev.add_argument("--json", action="store_true", help="print the records as JSON")
    ev.set_defaults(func=_eval)

    cap = sub.add_parser("capture-kv", help="save K/V (and queries) of a model's dense rollout for quant-bench --kv")
    _model_options(cap)
    cap.add_argument("--out", required=True, help="the .safetensors file to write")
    cap.add_argument("--chunks", type=int, default=3, help="chunks to roll out, the prompt chunk included")
    cap.add_argument("--frames", type=int, default=4, help="last frames of the history to keep")
    cap.add_argument("--layers", default="0,-1", help="comma-separated layer indices")
    cap.add_argument("--heads", default="0", help="comma-separated head indices")
    cap.add_argument("--queries", type=int, default=256, help="queries of the last clean pass to keep")
    cap.add_argument("--seed", type=int, default=0, help="noise seed of the rollout")
    cap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    cap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="model and file dtype")
    cap.set_defaults(func=_capture_kv)

    ins = sub.add_parser("inspect", help="what the QVG backend finds and rewrites in a model built by FILE.py:FACTORY")
    ins.add_argument("target", metavar="FILE.py:FACTORY",
                     help="a function returning (model, args), (model, args, kwargs) or a dict with those keys")
    ins.add_argument("--preset", default="qvg", help="quantization preset (default: qvg)")
    ins.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a QVGConfig field (group_size=16) or cache option (chunk_tokens=1560); repeatable")
    ins.add_argument("--calls", type=int, default=2, help="calls to make (the 2nd runs the QVGCache graph)")
    ins.add_argument("--diff", action="store_true", help="also print each graph's unified code diff")
    ins.add_argument("--json", action="store_true", help="print the report as JSON (diffs included)")
    ins.set_defaults(func=_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"qvg-compile {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
