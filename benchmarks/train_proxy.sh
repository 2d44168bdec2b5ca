#!/usr/bin/env bash
# Issue #18 in one GPU session (~7.5 min on one H200): train the Wan-geometry proxy model, capture a
# K/V sample from it, and evaluate every cache method at its published setting and at a matched
# 2.3-2.5-bit budget on 4 prompts x 96 frames. Run from the repository root:
#
#     bash benchmarks/train_proxy.sh OUT
#
# Writes to OUT (7 files): proxy_video.safetensors, log.json, samples.png (training), proxy_kv.safetensors
# (capture), eval.json, psnr.png (eval), run.log (everything printed). Every stage has a time
# guard (training anneals and stops at TRAIN_S, the eval starts no method past its share, and an
# outer timeout), and the eval rewrites eval.json after every method, so a slow run still leaves
# results. Needs torch, numpy, safetensors, tabulate, tqdm; scikit-image + Pillow (the photos) and
# matplotlib (the plot) are used when installed, else procedural textures / no plot.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/train_proxy.sh OUT}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL_S=${TOTAL_S:-470}
TRAIN_S=${TRAIN_S:-225}
# Overrides for a CPU smoke run of this script, e.g. DEVICE=cpu CHUNKS=2 PROMPTS=1
# TRAIN_ARGS="--steps 1 --batch 1 --frames 3 --prompts 1" EVAL_ARGS="--methods qvg,kivi".
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
CHUNKS=${CHUNKS:-32}
PROMPTS=${PROMPTS:-4}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
LOG="$OUT/run.log"
start=$SECONDS
left() { echo $(( TOTAL_S - (SECONDS - start) )); }
stage() { echo "== $1 (t=$((SECONDS - start)) s)" | tee -a "$LOG"; }

stage "environment"
python - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print({m: importlib.util.find_spec(m) is not None for m in ("triton", "skimage", "PIL", "matplotlib", "safetensors")})
EOF

stage "train (time limit ${TRAIN_S} s)"
timeout $(( TRAIN_S + 90 )) python examples/train_tiny.py --model proxy --out "$OUT" --time-limit "$TRAIN_S" \
    --device "$DEVICE" "${TRAIN_EXTRA[@]}" 2>&1 | tee -a "$LOG"
CKPT="$OUT/proxy_video.safetensors"
if [ ! -f "$CKPT" ]; then
    stage "no checkpoint: training failed or ran out of time"
    exit 1
fi

stage "capture K/V"
timeout 60 python -m qvg_compile capture-kv --checkpoint "$CKPT" --out "$OUT/proxy_kv.safetensors" \
    --chunks 3 --frames 4 --layers 0,-1 --heads 0 --device "$DEVICE" --dtype bf16 2>&1 | tee -a "$LOG"

EVAL_S=$(( $(left) - 30 ))
stage "eval (methods start within ${EVAL_S} s)"
PLOT=()
python -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/psnr.png")
timeout $(( EVAL_S + 60 )) python -m qvg_compile eval --checkpoint "$CKPT" --device "$DEVICE" --dtype "$DTYPE" \
    --chunks "$CHUNKS" --prompts "$PROMPTS" --settings matched,published --layer-errors --time-limit "$EVAL_S" \
    --json-out "$OUT/eval.json" "${PLOT[@]}" "${EVAL_EXTRA[@]}" 2>&1 | tee -a "$LOG"

stage "done"
python - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
recipe = json.loads((out / "log.json").read_text())["recipe"]
print({k: recipe[k] for k in ("steps_done", "stopped", "train_seconds", "final_loss",
                              "held_out_continuation_psnr_db", "data", "params")})
path = out / "eval.json"
records = json.loads(path.read_text()) if path.exists() else []
print(f"{'cache':28s} {'sealed bits':>11s} {'in budget':>9s} {'PSNR dB':>8s} {'SSIM':>6s}  K/V rel-MSE by layer")
for r in records[1:]:
    layers = " ".join(f"{l['k_rel_mse']:.3f}/{l['v_rel_mse']:.3f}" for l in r.get("layers", []))
    print(f"{r['label']:28s} {r['sealed_bits_per_element']:11.3f} {str(r['in_budget']):>9s} "
          f"{r['psnr_db'] or float('inf'):8.2f} {r['ssim']:6.3f}  {layers}")
EOF
