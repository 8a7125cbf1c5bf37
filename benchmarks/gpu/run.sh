#!/usr/bin/env bash
# Run ON the lent GPU machine, in the call that installs the last kit part (or later, warm):
#   bash .gpu-kit/N/kit.sh && bash benchmarks/gpu/run.sh
# Expects /tmp/gpu-data (copied there by an earlier call: `cp -r .gpu-data /tmp/gpu-data`, carry
# [".gpu-data"]). Writes every log and JSON under $OUT, which comes back to the dev machine.
# Stages are independent: one failing does not stop the others; budget ~8 minutes in all.
set -uo pipefail
source /tmp/kit/env.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
data=/tmp/gpu-data
stage() { echo "=== $1"; shift; timeout "$@"; echo "=== rc=$?"; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, torchvision, timm, nvidia.dali, ffcv, deepspeed; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'dali', nvidia.dali.__version__, 'deepspeed', deepspeed.__version__)"
    nproc; date -u
} > "$OUT/machine.txt" 2>&1

stage "GPU tests" 240 python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"

bench() {  # name, then pipeline.bench arguments
    local name=$1; shift
    stage "bench $name" 120 python -m pipeline.bench --device cuda --recipe adclr --swap --batch-size 256 \
        --workers 16 --seconds 20 --json "$OUT/bench_$name.json" "$@" 2>&1 | tee "$OUT/bench_$name.log"
}
bench dali_vs_reference --backend dali --vs reference --data $data/photos.beton
bench ffcv_vs_dali-ops --backend ffcv --vs dali-ops --data $data/photos.beton
bench dali_dense_profile --backend dali --profile --data $data/dense.beton

train() {  # name, preset, then overrides
    local name=$1 preset=$2; shift 2
    stage "train $name" 150 python train/main.py --config "$preset" --benchmark 30 --warmup-steps 5 \
        data.path=$data/photos.beton data.backend=dali data.workers=16 eval.train_path= eval.test_path= \
        "$@" 2>&1 | tee "$OUT/train_$name.log"
}
train adclr_vit_s16 configs/adclr_vit_s16.yaml data.batch_size=256
train dino_vit_s16 configs/dino_vit_s16.yaml data.batch_size=256
train adclr_vit_b16 configs/adclr_vit_b16.yaml data.batch_size=128
