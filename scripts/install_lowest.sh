#!/usr/bin/env bash
# The lowest supported stack in its own venv, .venv-lowest (git-ignored): Python 3.12, torch 2.11.0,
# torchvision 0.26.0, numpy 1.26.4 and every other dependency at its lower bound (constraints/lowest.txt),
# DALI through the CUDA 12 extra. CI runs the suite in it after the main stack's run (.ci/run).
#   bash scripts/install_lowest.sh            # then: .venv-lowest/bin/python -m pytest -q
# Python 3.12 is the first of: $LOWEST_PYTHON, python3.12 on PATH, pyenv's 3.12 (these machines ship one).
# Idempotent: a second run checks and returns in seconds. PyPI's torch 2.11 is a CUDA build that pulls the
# nvidia-* wheels (a few GB; about 3 minutes on the project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(pwd -P)/.venv-lowest
if [[ ! -x $venv/bin/python ]]; then
    base=""
    for candidate in ${LOWEST_PYTHON:-} "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
        # (a pyenv shim named python3.12 may be on PATH and still fail: run each one)
        if [[ -x $candidate ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            base=$candidate; break
        fi
    done
    if [[ -z $base ]]; then
        echo "install_lowest: no Python 3.12 found (set LOWEST_PYTHON=/path/to/python3.12)" >&2
        exit 1
    fi
    echo "== $base -m venv .venv-lowest"
    "$base" -m venv "$venv"
fi
PYTHON=$venv/bin/python CONSTRAINTS=constraints/lowest.txt DALI_EXTRA=dali-cuda12 bash scripts/install.sh
