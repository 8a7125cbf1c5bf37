#!/usr/bin/env bash
# The GPU measurements of one lease, in calls (benchmarks/gpu/README.md has the exact device calls):
#   bash benchmarks/gpu/run.sh core [--budget S]   call 1, with the core kit: machine facts, the corpus, the
#                                                   GPU-marked tests that need no DALI, the iBOT and DINOv2
#                                                   presets' training, the views engine alone with and without
#                                                   masks, the ffcv loader's time split per stage
#                                                   (--profile), ViT-S/16 ADCLR training (the headline)
#   bash benchmarks/gpu/run.sh dali [--budget S]   the call that installs DALI: dali views vs the op-per-view
#                                                   DALI graph, the DALI-marked GPU tests, DINO ViT-S/16 training
#   bash benchmarks/gpu/run.sh more [--budget S]   if device time is left: ADCLR ViT-B/16, ZeRO-0/3, ffcv and
#                                                   dali vs PIL
#   bash benchmarks/gpu/run.sh --cpu-smoke [--out DIR]   every stage here, on the CPU, tiny (tests/test_gpu_script.py)
#
# Decisions (issue 12 item 6):
# - Each stage runs under `timeout` (no limit above 150 s) and is skipped, with a line saying so, when the
#   budget's time left is below its limit; the headline (training) comes right after the corpus.
# - Each stage appends, as it ends, to $OUT/summary.txt (one line: exit code, seconds, headline figures)
#   and $OUT/run.log (its whole output), and its JSON goes straight to $OUT (pipeline.bench rewrites its
#   JSON after every round and on SIGTERM, train/main.py --benchmark reports what it measured when
#   stopped): a call cut short still returns what finished. At most 8 files per call (8 come back): the
#   corpus report stays on the device (its line is in summary.txt, its output in run.log).
# - The corpus is built on the device from the carried photos (.gpu-photos, made by prepare.sh) into
#   /tmp/gpu-bench, which lives as long as the machine stays warm; each stage's JSON is also kept there,
#   so the last call's figures.png plots every call of the lease.
# - python3 only (the device has no `python`); DALI stages are skipped cleanly when nvidia.dali is absent.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT  # every stage is a run of its own (a world of one)

mode=${1:-}
shift || true
budget="" out_dir=""
while (( $# )); do
    case $1 in
        --budget) budget=$2; shift 2 ;;
        --out) out_dir=$2; shift 2 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case $mode in
    core) budget=${budget:-420} ;;
    dali) budget=${budget:-300} ;;
    more) budget=${budget:-480} ;;
    --cpu-smoke) budget=${budget:-900} ;;
    *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac

if [[ $mode == --cpu-smoke ]]; then  # tiny sizes on the CPU; every stage of every call
    OUT=${out_dir:-${OUT:-/tmp/densessl-gpu-smoke}}
    work=$OUT/work
    rm -rf "$work"
    device=cpu workers=2 views_batch=8 train_batch=8 views_seconds=3 profile_seconds=3 bench_flags="--tiny --warmup-batches 1 --segment-batches 1"
    corpus_count=48 train_steps="--benchmark 2 --warmup-steps 1" engine_flags="--tiny --warmup 1 --runs 2"
    train_config=(--config configs/cpu_smoke.yaml data.canvas_size=96)
    mkdir -p "$work"  # the Python commands run in a pre-warmed interpreter (warm_python.py says why)
    warm_socket=$work/warm.sock
    python3 benchmarks/gpu/warm_python.py serve "$warm_socket" > "$work/warm.log" 2>&1 &
    warm_server=$!
    trap 'python3 benchmarks/gpu/warm_python.py stop "$warm_socket" 2> /dev/null; wait $warm_server' EXIT
    for _ in $(seq 600); do [[ -S $warm_socket ]] && break; sleep 0.1; done
    PY=(python3 benchmarks/gpu/warm_python.py run "$warm_socket")
else
    [[ -f /tmp/kit/env.sh ]] && source /tmp/kit/env.sh
    OUT=${out_dir:-${OUT:-/tmp/out}}
    work=${GPU_BENCH_WORK:-/tmp/gpu-bench}
    device=cuda workers=16 views_batch=256 train_batch=256 views_seconds=50 profile_seconds=30 bench_flags=""
    corpus_count=8000 train_steps="--benchmark 30 --warmup-steps 10" engine_flags=""
    train_config=(log.progress_bar=false)
    PY=(python3)
fi
mkdir -p "$OUT" "$work/results"
rm -f "$OUT/summary.txt" "$OUT/run.log" "$OUT/figures.png" "$OUT"/*.json
beton=$work/bench.beton
deadline=$(( $(date +%s) + budget ))
export mode budget OUT work beton workers corpus_count

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

stage() {  # stage NAME LIMIT_S COMMAND...: run it if the time left allows; append its log and summary line
    local name=$1 limit=$2
    shift 2
    local left=$(( deadline - $(date +%s) ))
    if (( left < limit )); then
        note "$name: skipped (${left} s of the budget left, it may take ${limit} s)"
        return 1
    fi
    local started=$(date +%s) rc
    if declare -F "$1" > /dev/null; then  # a function of this script: through bash (exported below)
        timeout --kill-after=20 "$limit" bash -c '"$@"' "$name" "$@" > "$work/$name.log" 2>&1
    else
        timeout --kill-after=20 "$limit" "$@" > "$work/$name.log" 2>&1
    fi
    rc=$?
    local took=$(( $(date +%s) - started ))
    { echo "=== $name: exit $rc after ${took} s: $*"; cat "$work/$name.log"; echo; } >> "$OUT/run.log"
    local figures="" json=$OUT/$name.json
    [[ $name == corpus ]] && json=$work/results/corpus.json  # kept on the device: 8 files come back
    if [[ -f $json ]]; then
        [[ $json == "$OUT/$name.json" ]] && cp "$json" "$work/results/$name.json"
        figures="; $(python3 benchmarks/gpu/report.py line "$json" 2>&1)"
    elif [[ $name == gpu_tests* ]]; then
        # pytest's result line ("19 passed, ... in 42.79s"), not whatever a library printed at exit after it
        figures="; $(grep -E '(passed|failed|skipped|error).* in [0-9.]+s' "$work/$name.log" | tail -n 1)"
    fi
    note "$name: exit $rc after ${took} s${figures}"
    return $rc
}

machine_facts() {  # also the head of summary.txt
    facts | tee -a "$OUT/summary.txt"
}

facts() {
    echo "date $(date -u +%FT%TZ), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, mode $mode, budget ${budget} s"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (CPU)"
    python3 - <<'EOF'
import importlib.metadata as metadata, platform
found = []
for name in ("torch", "torchvision", "timm", "deepspeed", "ffcv", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "numpy"):
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} absent")
print("python", platform.python_version(), "|", ", ".join(found))
EOF
    cat .gpu-photos/revision.txt 2>/dev/null || echo "code revision: unknown (no .gpu-photos/revision.txt)"
}

photos_for_corpus() {  # the carried photos, or (smoke) a few synthetic ones
    if [[ $mode == --cpu-smoke ]]; then
        python3 -c "
import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import imagefactory
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for i in range(4):
    imagefactory.write_jpeg(out / f'p{i}.jpg', imagefactory.photo_like_image(i, 240, 320, seed=i))" "$work/photos"
        echo "$work/photos"
    else
        echo .gpu-photos
    fi
}

build_corpus() {  # corpus.json (on the device): the build's report (records, mean KB, seconds, records/s, quality)
    local report=$work/results/corpus.json
    [[ -f $beton ]] && { python3 -c "import json,sys; print(json.dumps({'reused': sys.argv[1]}))" "$beton" > "$report"; return 0; }
    python3 -c "
import json, sys
sys.path.insert(0, 'benchmarks')
import make_bench_corpus
report = make_bench_corpus.main(sys.argv[2:])
json.dump({**report, 'records_per_s': report['count'] / report['seconds'], 'workers': int(sys.argv[sys.argv.index('--workers') + 1])},
          open(sys.argv[1], 'w'), indent=2)" "$report" "$(photos_for_corpus)" "$beton" --count "$corpus_count" --workers "$workers"
}

views() {  # views NAME BACKEND VS [more pipeline.bench flags]
    local name=$1 backend=$2 vs=$3
    shift 3
    stage "$name" 110 "${PY[@]}" -m pipeline.bench --backend "$backend" --vs "$vs" --device $device --data "$beton" \
        --recipe adclr --batch-size $views_batch --workers $workers --seconds $views_seconds $bench_flags \
        --json "$OUT/$name.json" "$@"
}

train() {  # train NAME PRESET [overrides]: --benchmark from the .beton, bf16
    local name=$1 preset=$2
    shift 2
    stage "$name" 150 "${PY[@]}" train/main.py --config "$preset" "${train_config[@]}" $train_steps --json "$OUT/$name.json" \
        data.path="$beton" data.workers=$workers data.batch_size=$train_batch eval.train_path= eval.test_path= "$@"
}

have_dali() { python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nvidia.dali') is None)" 2> /dev/null; }

core_stages() {  # issue 23's GPU proof first (the GPU tests of masks/iBOT/DINOv2 and both presets), then the rest
    stage machine 30 machine_facts
    stage corpus 120 build_corpus
    stage gpu_tests 150 "${PY[@]}" -m pytest -q -m "gpu and not dali" -p no:cacheprovider tests
    train train_ibot_vit_s16 configs/ibot_vit_s16.yaml data.backend=ffcv deepspeed.zero_stage=2
    train train_dinov2_vit_s16 configs/dinov2_vit_s16.yaml data.backend=ffcv deepspeed.zero_stage=2
    stage views_engine 60 "${PY[@]}" benchmarks/gpu/profile_views.py --data "$beton" --recipe dinov2 --without-masks \
        --device $device --batch-size $views_batch $engine_flags --json "$OUT/views_engine.json"
    stage views_profile 110 "${PY[@]}" -m pipeline.bench --backend ffcv --device $device --data "$beton" --recipe adclr \
        --swap --profile --batch-size $views_batch --workers $workers --seconds $profile_seconds $bench_flags \
        --json "$OUT/views_profile.json"
    train train_adclr_vit_s16 configs/adclr_vit_s16.yaml data.backend=ffcv deepspeed.zero_stage=2
}

dali_stages() {
    if ! have_dali; then
        note "dali stages: skipped (nvidia.dali is not installed: bring the kit's DALI parts first)"
        return
    fi
    [[ -f $beton ]] || stage corpus 120 build_corpus
    views views_dali_vs_dali-ops dali dali-ops  # the op-per-view graph makes no swaps: both without
    stage gpu_tests_dali 150 "${PY[@]}" -m pytest -q -m "gpu and dali" -p no:cacheprovider tests
    train train_dino_vit_s16 configs/dino_vit_s16.yaml data.backend=dali
}

more_stages() {
    [[ -f $beton ]] || stage corpus 120 build_corpus
    views views_ffcv_vs_reference ffcv reference --swap
    train train_adclr_vit_b16 configs/adclr_vit_b16.yaml data.backend=ffcv data.batch_size=$(( train_batch / 2 ))
    for zero in 0 3; do
        train train_adclr_vit_s16_zero$zero configs/adclr_vit_s16.yaml data.backend=ffcv deepspeed.zero_stage=$zero
    done
    if have_dali; then
        views views_dali_vs_reference dali reference --swap
    else
        note "views_dali_vs_reference: skipped (nvidia.dali is not installed)"
    fi
}

export -f machine_facts facts photos_for_corpus build_corpus

case $mode in
    core) core_stages ;;
    dali) dali_stages ;;
    more) more_stages ;;
    --cpu-smoke) core_stages; dali_stages; more_stages ;;
esac
deadline=$(( deadline + 30 ))  # the plot is short and always worth its seconds
stage figures 30 "${PY[@]}" benchmarks/gpu/report.py plot "$work/results" --out "$OUT/figures.png"
echo "--- $OUT/summary.txt"
cat "$OUT/summary.txt"
