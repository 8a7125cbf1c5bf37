#!/usr/bin/env bash
# From a fresh clone to a trained demo: install, build the Fashion-MNIST datasets and mosaics, train the
# tiny preset on this machine (CPU is fine: 30,000 images, under 10 minutes at 80 images/s) and print its
# k-NN accuracy and dense mIoU next to a random-init backbone and raw pixels. Idempotent: installed
# packages, built datasets and a finished demo are kept (a second run only reprints its tables).
#   bash scripts/setup.sh            # everything
#   SKIP_DEMO=1 bash scripts/setup.sh   # install + datasets only
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

bash scripts/install.sh

mkdir -p data
for split in train test; do
    out=data/fashion-mnist-$split.beton
    if [[ -f $out && -f data/fashion-mnist-$split.manifest.json ]]; then
        echo "== $out exists (delete it to rebuild)"
    else
        $PYTHON -m preprocess build-ffcv /usr/share/datasets/fashion-mnist "$out" --split "$split" --workers 2 --overwrite
    fi
done

# The dense task of the demo and the methods' table: mosaics of 2-3 items (64 px, per-pixel labels);
# the first 500 train / 250 val mosaics are the dense evaluation's memory and validation sets.
if [[ -f data/fashion-mosaics-train.beton && -f data/fashion-mosaics-val.beton ]]; then   # written last
    echo "== data/fashion-mosaics-{train,val}.beton exist (delete them to rebuild)"
else
    $PYTHON -m preprocess build-mosaics /usr/share/datasets/fashion-mnist data/fashion-mosaics \
        --train-count 1000 --val-count 500 --workers 2 --overwrite
fi

if [[ ${SKIP_DEMO:-0} != 1 ]]; then
    $PYTHON train/main.py --config configs/demo_fashion_mnist.yaml
fi
