#!/usr/bin/env bash
# Run HERE (the dev machine) before a GPU lease:   bash benchmarks/gpu/prepare.sh
# Makes the git-ignored folders that the device calls carry, checks that every call fits in 64 MiB, and
# prints the exact call sequence (benchmarks/gpu/README.md explains it):
#   .gpu-kit/1..N   ../shared/gpu/make-kit (minutes of CPU, once): the core group (ffcv, deepspeed, timm),
#                   then the DALI parts; each part is at most 56 MiB
#   .gpu-photos/    the Debian wallpapers shrunk (benchmarks/make_bench_corpus.py --shrink-photos) to the
#                   largest long side that fits beside the working tree and the last core part in one
#                   call, plus revision.txt (the code revision the measurements are of)
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${SHARED:-../shared}
limit=$(( 64 * 1024 * 1024 ))

[[ -f .gpu-kit/1/index ]] || bash "$shared/gpu/make-kit"
parts=$(ls -d .gpu-kit/*/ | wc -l)
last_core=0 last_dali=0
for k in $(seq 1 "$parts"); do
    read -r group _ _ < ".gpu-kit/$k/index"
    [[ $group == core ]] && last_core=$k
    [[ $group == dali ]] && last_dali=$k
done
(( last_core > 0 )) || { echo "prepare.sh: no core part in .gpu-kit (rebuild it: rm -rf .gpu-kit; $shared/gpu/make-kit)"; exit 1; }

# What travels in every call besides `carry`: tracked files and untracked ones git does not ignore.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2> /dev/null | awk '{s += $1} END {print s + 0}')
core_part=$(du -sb ".gpu-kit/$last_core" | cut -f1)
room=$(( limit - tree - core_part - 1024 * 1024 ))  # 1 MiB to spare
size=0
for side in 1600 1280 1024 800 640; do
    rm -rf .gpu-photos
    python3 benchmarks/make_bench_corpus.py --shrink-photos .gpu-photos --long-side "$side"
    size=$(du -sb .gpu-photos | cut -f1)
    (( size <= room )) && break
done
if (( size > room )); then
    echo "prepare.sh: the photos ($size bytes) do not fit beside the working tree ($tree) and .gpu-kit/$last_core ($core_part)"
    exit 1
fi
echo "code revision $(git rev-parse --short HEAD)$([[ -z $(git status --porcelain) ]] || echo ' + uncommitted changes'), prepared $(date -u +%FT%TZ)" \
    > .gpu-photos/revision.txt
for k in $(seq 1 "$parts"); do
    extra=0
    (( k == last_core )) && extra=$(du -sb .gpu-photos | cut -f1)
    total=$(( tree + $(du -sb ".gpu-kit/$k" | cut -f1) + extra ))
    awk -v k="$k" -v t="$total" 'BEGIN { printf "call with .gpu-kit/%s: %.1f MiB of 64\n", k, t / 1048576 }'
    (( total <= limit )) || { echo "prepare.sh: that call is over 64 MiB"; exit 1; }
done

echo
echo "Device calls, back to back (the machine goes back after ~30 s idle); budgets from status's budget_left_s:"
for k in $(seq 1 "$parts"); do
    if (( k == last_core )); then
        echo "  run(command=\"bash .gpu-kit/$k/kit.sh && source /tmp/kit/env.sh && bash benchmarks/gpu/run.sh core\", carry=[\".gpu-kit/$k\", \".gpu-photos\"], timeout_s=540)"
    elif (( k == last_dali )); then
        echo "  run(command=\"bash .gpu-kit/$k/kit.sh && source /tmp/kit/env.sh && bash benchmarks/gpu/run.sh dali --budget B\", carry=[\".gpu-kit/$k\"], timeout_s=B+120)"
    else
        echo "  run(command=\"bash .gpu-kit/$k/kit.sh\", carry=[\".gpu-kit/$k\"], timeout_s=120)"
    fi
done
echo "  only if >= 9 minutes are left: run(command=\"bash benchmarks/gpu/run.sh more --budget B\", timeout_s=B+60)"
echo "  then give_back()"
