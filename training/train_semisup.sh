#!/usr/bin/env bash
# Two-class (GGO + consolidation) supervised baseline and semi-supervised student on one GPU,
# both evaluated on the same test split with bootstrap intervals; the better one is exported.
#
# usage: bash training/train_semisup.sh DATA2.npz UNLABELED_DIR RUNS_DIR [extra train options...]
#   DATA2.npz: `python -m training pack --data ../shared/data/covid-semiseg-train
#              --out runs/data/covid512-2c.npz --size 512 --classes ggo,consolidation`
#   UNLABELED_DIR: a copy of ../shared/data/covid-semiseg-unlabeled/images (1600 JPEGs, 33 MB)
# Steps (docs/training.md, "Two classes and semi-supervised training"):
#   1. RUNS/sup2: `train --classes ggo,consolidation` (the teacher and the baseline)
#   2. RUNS/semi2: `train-semisup --teacher RUNS/sup2` (same split, pseudo-labels of UNLABELED)
#   3. RUNS/{sup2,semi2}.test.json: `evaluate --split test --ci` (threshold 0.5, bootstrap CI)
#      RUNS/table1_classes.md, RUNS/compare.json: `compare` (threshold chosen on validation,
#      Table 1 per class with bootstrap intervals; the shipped one-class model beside them)
#   4. RUNS/best.txt: the run with the higher mean per-class pooled Dice on VALIDATION (the
#      test split only reports); exported (float16 weights, with its explain graph, whose target
#      has a plane per class: `ggo-cli explain --target consolidation`) to
#      RUNS/export/ggo-consolidation-resnet50-unet/ when onnx, onnxruntime and pydicom are
#      importable, else RUNS/export_command.txt holds the command to run on a CPU machine.
# Epochs: TEACHER_EPOCHS (300, as the shipped model) and STUDENT_EPOCHS (200; the student starts
# from the teacher's weights). Expected on one H100/H200: about 2 min teacher, 2-3 min student
# (twice the images per step), 1 min loading, pseudo-labelling, evaluation: 5-7 min in all.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash training/train_semisup.sh DATA2.npz UNLABELED_DIR RUNS_DIR [train options]" >&2
  exit 2
fi
data=$1
unlabeled=$2
runs=$3
shift 3
device=${COMPARE_DEVICE:-cuda}
common=(--batch-size 8 --save-every 100 --plateau-patience 20 --patience 0 --no-progress)
mkdir -p "$runs"
started=$(date +%s)
stamp() { echo "[$(($(date +%s) - started)) s] $*" >&2; }

stamp "teacher / supervised baseline"
python3 -m training train --classes ggo,consolidation --data "$data" --out "$runs/sup2" \
  --epochs "${TEACHER_EPOCHS:-300}" "${common[@]}" "$@" \
  >"$runs/sup2.json" 2>"$runs/sup2.log" || { echo "teacher failed: $runs/sup2.log" >&2; exit 1; }

stamp "semi-supervised student"
python3 -m training train-semisup --teacher "$runs/sup2" --unlabeled "$unlabeled" \
  --data "$data" --out "$runs/semi2" --epochs "${STUDENT_EPOCHS:-200}" "${common[@]}" "$@" \
  >"$runs/semi2.json" 2>"$runs/semi2.log" || { echo "student failed: $runs/semi2.log" >&2; exit 1; }

stamp "evaluation"
status=0
for run in sup2 semi2; do
  python3 -m training evaluate --model "$runs/$run" --data "$data" --split test \
    --split-file "$runs/$run/split.json" --json --ci --device "$device" \
    >"$runs/$run.test.json" 2>>"$runs/evaluate.log" || status=1
done
# the shipped one-class model beside them, on its recorded split (the same seed-0 split of the
# same 50 slices), where ONNX Runtime is installed; SHIPPED= (empty) leaves it out
shipped=${SHIPPED-exported_models/ggo-resnet50-unet}
extra=()
if [ -n "$shipped" ] && [ -f "$shipped/model.onnx" ] && python3 -c "import onnxruntime" 2>/dev/null
then
  extra=("$shipped")
fi
python3 -m training compare --runs "$runs/sup2" "$runs/semi2" "${extra[@]}" --data "$data" \
  --out "$runs/table1_classes.md" --device "$device" --json \
  >"$runs/compare.json" 2>"$runs/compare.log" || status=1

best=$(python3 - "$runs/compare.json" <<'EOF'
import json, sys
runs = [r for r in json.load(open(sys.argv[1]))["runs"] if r["source"].endswith(("sup2", "semi2"))]
def val(r):
    per = r["per_class"]
    return sum(per[c]["val"]["dice"] for c in per) / len(per)
print(max(runs, key=val)["source"])
EOF
) || { echo "no comparison: $runs/compare.log" >&2; exit 1; }
echo "$best" >"$runs/best.txt"
stamp "better on validation: $best"

model_dir="$runs/export/ggo-consolidation-resnet50-unet"
# EXPORT_WEIGHTS: --fp16-weights (default, as the shipped model) or empty for float32 weights
# (a barely trained smoke-test model fails the float16 CAM check of the explain graph)
weights=${EXPORT_WEIGHTS---fp16-weights}
export_cmd=(python3 -m training export --checkpoint "$best/best.pt" --out "$model_dir"
  --data "$data" ${weights:+"$weights"} --name ggo-consolidation-resnet50-unet --json)
if python3 -c "import onnx, onnxruntime, pydicom" 2>/dev/null; then
  "${export_cmd[@]}" >"$runs/export.json" 2>"$runs/export.log" || status=1
else
  echo "${export_cmd[*]}" >"$runs/export_command.txt"
  stamp "no onnx/onnxruntime/pydicom here: run $runs/export_command.txt on a CPU machine"
fi
stamp "done (status $status)"
exit $status
