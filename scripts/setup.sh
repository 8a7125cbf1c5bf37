#!/usr/bin/env bash
# From a fresh clone to a trained demo: install, build the Fashion-MNIST datasets, train the tiny
# preset on this machine (CPU is fine, ~10 minutes) and print its k-NN accuracy next to a random-init
# backbone and raw pixels. Idempotent: installed packages and built datasets are kept.
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

if [[ ${SKIP_DEMO:-0} != 1 ]]; then
    $PYTHON train/main.py --config configs/demo_fashion_mnist.yaml
fi
