set -x
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, lightning, torchvision; print(torch.__version__, torchvision.__version__, lightning.__version__)"
timeout 60 python3 benchmarks/gpu_augment_check.py --batch-size 256 | tee $OUT/augcheck.json
python3 -c "from pathlib import Path; from benchmarks.throughput import synthetic_data; synthetic_data(Path('/tmp/xray'), 2048)" || exit 1
B="python3 benchmarks/throughput.py --device cuda --data /tmp/xray --cache-dir /tmp/benchcache --backbone resnet50 --batch-size 256 --steps 24 --precision bf16-mixed"
timeout 150 $B --augment radiograph --augment-on device 2>$OUT/dev.err | tee $OUT/bench_device.json
timeout 150 $B --augment radiograph --augment-on workers 2>$OUT/wrk.err | tee $OUT/bench_workers.json
python3 -c "from medtransfer.data.synthetic import generate_demo_dataset as g; g('/tmp/d', patients_per_class=16, images_per_patient=(1,2), val_patients_per_class=4, test_patients_per_class=6, image_size=96, seed=0)"
timeout 150 python3 -m medtransfer.cli train --data /tmp/d --out /tmp/run --backbone resnet18 --weights none --image-size 64 --set cache_size=72 --batch-size 16 --epochs 2 --bootstrap 50 --augment trivial --mixup 0.2 --cutmix 1.0 --no-progress --cache-dir /tmp/c > $OUT/train.log 2>&1; echo train rc $?
tail -5 $OUT/train.log; tail -3 $OUT/dev.err $OUT/wrk.err
