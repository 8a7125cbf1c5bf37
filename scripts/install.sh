#!/usr/bin/env bash
# Install everything densessl needs into the current Python environment (a venv, a conda env, or the
# system interpreter). Idempotent: a second run checks and returns in seconds.
#   bash scripts/install.sh
# The exact versions come from a constraints file (CONSTRAINTS, default constraints/tested.txt: the main
# stack), DALI from the extra for one CUDA major (DALI_EXTRA, default dali-cuda13; dali-cuda12 for CUDA 12
# drivers). scripts/install_lowest.sh runs this for the lowest supported stack in .venv-lowest.
# Into a cluster's own torch: `pip install -e '.[dali-cuda12]'` (no constraints; see README "On a cluster").
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS:-constraints/tested.txt}
DALI_EXTRA=${DALI_EXTRA:-dali-cuda13}

# ffcv compiles against OpenCV and libjpeg-turbo; the demo data comes from Debian's Fashion-MNIST package,
# the photo benchmarks from Debian's wallpaper packages (real photographs).
apt_packages="libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist plasma-workspace-wallpapers mate-backgrounds"
missing=""
for p in $apt_packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [[ -n $missing ]]; then
    echo "== apt-get install$missing"
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# torch first, at the constraints' versions, so that nothing below can pull a different build.
torch_pin=$(grep -E '^torch==' "$CONSTRAINTS" | cut -d= -f3)
torchvision_pin=$(grep -E '^torchvision==' "$CONSTRAINTS" | cut -d= -f3)
if ! $PYTHON -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != sys.argv[1] or torchvision.__version__.split('+')[0] != sys.argv[2])" "$torch_pin" "$torchvision_pin" 2>/dev/null; then
    echo "== pip install torch==$torch_pin torchvision==$torchvision_pin"
    $PYTHON -m pip install -q -c "$CONSTRAINTS" "torch==$torch_pin" "torchvision==$torchvision_pin"
fi
# find_spec locates without importing (importing deepspeed and DALI takes seconds).
required="ffcv nvidia.dali deepspeed timm safetensors tensorboard tqdm yaml psutil matplotlib pytest hypothesis importlinter"
if ! (cd / && $PYTHON -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" $required); then
    echo "== pip install -c $CONSTRAINTS -e .[test,$DALI_EXTRA]"
    $PYTHON -m pip install -q -c "$CONSTRAINTS" -e ".[test,$DALI_EXTRA]"
fi
# The editable install (console script `preprocess`, imports from anywhere) must point at this checkout
# and know all five packages; an install made from an older clone or before a package existed does not.
here=$(pwd -P)
mapped=$(cd / && $PYTHON -c "
import importlib.util as u, os
roots = set()
for name in ('preprocess', 'pipeline', 'model', 'evaluation', 'train'):
    spec = u.find_spec(name)
    roots.add(os.path.dirname(os.path.dirname(os.path.realpath(spec.origin))) if spec and spec.origin else None)
print(roots.pop() if len(roots) == 1 else '')" 2>/dev/null || true)
if [[ $mapped != "$here" ]]; then
    echo "== pip install -e . (this checkout: $here)"
    $PYTHON -m pip install -q --no-deps -e .
fi
echo "densessl: dependencies installed in $($PYTHON -c 'import sys; print(sys.prefix)')"
