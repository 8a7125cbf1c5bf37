#!/usr/bin/env bash
# Run HERE (the dev machine) before a GPU session: builds what the lent GPU machine cannot make itself
# (it has no network and no Debian wallpapers) into git-ignored folders that `device` calls carry.
#   bash benchmarks/gpu/prepare.sh
# Produces:
#   .gpu-data/photos.beton (+ manifest)   300 real photos (make_photo_corpus.py, N_PER=10), ~31 KB each
#   .gpu-data/dense.beton  (+ manifest)   300 denser photos (make_dense_corpus.py, 10 per photo), ~77 KB each
#   .gpu-kit/1..N                         DALI, ffcv, deepspeed for the GPU machine's Python 3.12
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${SHARED:-../shared}
mkdir -p .gpu-data
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if [[ ! -f .gpu-data/photos.beton ]]; then
    N_PER=10 python3 "$shared/data/make_photo_corpus.py" "$work/photos"
    python3 -m preprocess build-ffcv "$work/photos" .gpu-data/photos.beton --workers 2
fi
if [[ ! -f .gpu-data/dense.beton ]]; then
    python3 "$shared/data/make_dense_corpus.py" "$work/dense" 10
    python3 -m preprocess build-ffcv "$work/dense" .gpu-data/dense.beton --workers 2
fi
du -sh .gpu-data
[[ -d .gpu-kit ]] || bash "$shared/gpu/make-kit"
du -sh .gpu-kit/*
