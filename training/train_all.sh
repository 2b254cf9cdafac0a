#!/usr/bin/env bash
# Train the paper's three networks concurrently (one process each, one GPU), then compare them.
#
# usage: bash training/train_all.sh DATA.npz RUNS_DIR [extra `train` options...]
#   e.g. bash training/train_all.sh data512.npz runs --epochs 300 --batch-size 8 --save-every 50
# Writes RUNS_DIR/<arch>/ (checkpoints, split.json, metrics.csv), RUNS_DIR/<arch>.{json,log},
# RUNS_DIR/table1.md and RUNS_DIR/compare.json. Needs only torch, numpy and tqdm (python3).
# The same --seed (default 0) gives all three the same split. COMPARE_DEVICE=cpu to compare on CPU.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash training/train_all.sh DATA.npz RUNS_DIR [train options...]" >&2
  exit 2
fi
data=$1
runs=$2
shift 2
mkdir -p "$runs"
archs=(unet resnet50-unet densenet121-unet)
pids=()
for arch in "${archs[@]}"; do
  python3 -m training train --arch "$arch" --data "$data" --out "$runs/$arch" --no-progress "$@" \
    >"$runs/$arch.json" 2>"$runs/$arch.log" &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "training ${archs[$i]} failed; see $runs/${archs[$i]}.log" >&2
    status=1
  fi
done
done_runs=()
for arch in "${archs[@]}"; do
  [ -f "$runs/$arch/best.pt" ] && done_runs+=("$runs/$arch")
done
if [ ${#done_runs[@]} -gt 0 ]; then
  python3 -m training compare --runs "${done_runs[@]}" --data "$data" --out "$runs/table1.md" \
    --device "${COMPARE_DEVICE:-cuda}" --json >"$runs/compare.json" 2>"$runs/compare.log" || status=1
fi
exit $status
