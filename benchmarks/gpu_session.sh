#!/usr/bin/env bash
# One short GPU session (about 4 minutes on one H200/H100, no network): every figure as one JSON file in $OUT.
#
#   OUT=/tmp/out DATA=shared/data/kermany-fullres-sample bash benchmarks/gpu_session.sh
#
# DATA: full-resolution images (DIR/CLASS/*.jpeg) for the prediction figures; when it is missing they use the
# synthetic images generated for the training throughput (then say so next to the figures).
# Each step has its own time limit and runs even when an earlier one failed; stderr goes to $OUT/*.log.
# throughput.py is being extended in parallel: the --compile variant runs only when its --help lists --compile.
set -u
OUT=${OUT:-/tmp/medtransfer-gpu}
DATA=${DATA:-shared/data/kermany-fullres-sample}
PY="env PYTHONPATH=src python3"
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: stdout (one JSON line) -> $OUT/NAME.json, stderr -> $OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
  for m in lightning timm onnxruntime onnx typer rich fastapi; do
    python3 -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1; done
} > "$OUT/environment.txt" 2>&1

# Training throughput needs more images than the 200-image real sample: 2048 synthetic 512 px grayscale JPEGs.
SYNTH=/tmp/medtransfer-synthetic
$PY - "$SYNTH" <<'PYEOF'
import sys
from multiprocessing import get_context
from pathlib import Path
import numpy as np
from PIL import Image

def write(i):
    label = ("NORMAL", "PNEUMONIA")[i % 2]
    pixels = np.random.default_rng(i).normal(110 + 30 * (i % 2), 40, (512, 512)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(Path(sys.argv[1]) / label / f"img{i:04d}.jpeg", quality=90)

for label in ("NORMAL", "PNEUMONIA"):
    (Path(sys.argv[1]) / label).mkdir(parents=True, exist_ok=True)
with get_context("fork").Pool() as pool:  # fork: `write` lives in this stdin script
    pool.map(write, range(2048))
PYEOF
[ -d "$DATA" ] || DATA=$SYNTH
echo "data: $DATA (predict), $SYNTH (throughput)" >> "$OUT/environment.txt"

# Training throughput, resnet50 224 px (bf16 autocast and channels_last are throughput.py's defaults on a GPU).
TP="benchmarks/throughput.py --data $SYNTH --device cuda --backbone resnet50 --batch-size 128 --images 2048 --warmup-batches 3 --seconds-per-phase 20"
step throughput_resnet50 100 $PY $TP
if $PY benchmarks/throughput.py --help 2>/dev/null | grep -q -- "--compile"; then
  step throughput_resnet50_compile 120 $PY $TP --compile
fi

# Prediction: medtransfer predict on the GPU vs the naive loop, single-image latency, and torch fp32 vs
# onnxruntime (CPU) images/s, latency and the largest probability difference, all in one JSON line.
step predict_speed 90 $PY benchmarks/predict_speed.py --data "$DATA" --accelerator gpu --images 128 --batch-size 64 --latency-calls 20

# The multi-device path on real CUDA (threads, streams): two copies on GPU 0 must give the one-device rows.
step multi_device_check 40 $PY - "$DATA" <<'PYEOF'
import json, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from predict_speed import build_demo_model
from medtransfer.artifacts import load_model
from medtransfer.predict import expand_inputs, predict_files
paths = expand_inputs([sys.argv[1]])[:128]
saved = load_model(build_demo_model(Path(tempfile.mkdtemp()) / "model"))
options = dict(batch_size=32, accelerator="gpu", precision="32-true", num_workers=4)
figures = {}
for name, devices in (("one", [torch.device("cuda", 0)]), ("two_copies_gpu0", [torch.device("cuda", 0)] * 2),
                      ("all_gpus", [torch.device("cuda", i) for i in range(torch.cuda.device_count())])):
    predict_files(saved, paths[:32], devices=devices, **options)  # warm-up
    start = time.perf_counter()
    figures[name] = (predict_files(saved, paths, devices=devices, **options), len(paths) / (time.perf_counter() - start))
one = figures["one"][0]
print(json.dumps({"benchmark": "multi_device_check", "gpus": torch.cuda.device_count(), "images": len(paths),
                  **{f"{k}_img_s": round(v[1], 1) for k, v in figures.items()},
                  "same_order": all([r["path"] for r in v[0]] == [r["path"] for r in one] for v in figures.values()),
                  "max_prob_difference": max(abs(a["prob_PNEUMONIA"] - b["prob_PNEUMONIA"])
                                             for v in figures.values() for a, b in zip(one, v[0]))}))
PYEOF
cat "$OUT/steps.txt"
