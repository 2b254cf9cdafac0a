#!/usr/bin/env bash
# Last step of the issue-7 GPU end-to-end check (docs/benchmarks.md): assemble the bundle that
# earlier calls left in /tmp/b (onnxruntime-gpu, the models, wheels of pydicom, highdicom,
# pyjpegls and SimpleITK, the 10 test slices), run ggo-cli end to end on CUDA, then
# benchmarks/gpu_throughput.py: the fp16 accuracy check, or with `cuda-graph` CUDA graphs.
#   bash benchmarks/gpu_run_e2e.sh [eval|cuda-graph|d2s|e2e|jobs]
# jobs: predict's profile with the window in the graph and on the host, then end to end on
# eight studies with --jobs 1 (one process), 4 and 8 (worker processes);
# d2s: the fp16 model with and without the ConvTranspose rewrite, then end to end (no eval data);
# e2e: end to end with and without the lung mask, one series' stage times, and where predict's
# time goes on CUDA (windowing against the network).
set -euo pipefail
mkdir -p /tmp/b /tmp/bundle /tmp/ortgpu /tmp/site
cp .gpu_carry/t*/cpart* /tmp/b/ 2>/dev/null || true
cat /tmp/b/cpart* | tar -C /tmp/bundle -xf -
(cd /tmp/bundle/models && sha256sum -c SUMS)
cat /tmp/bundle/ort/part* | xz -dc -T8 | tar -C /tmp/ortgpu -xf -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  /tmp/bundle/whl312/*.whl
for path in /tmp/bundle/models/*.onnx; do
  f=$(basename "$path")
  rm -f "exported_models/ggo-resnet50-unet/$f"
  cp "$path" "exported_models/ggo-resnet50-unet/$f"
done
export PYTHONPATH=/tmp/ortgpu:/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
mode=${1:-eval}
if [ "$mode" = "jobs" ]; then
  # predict on one series with the window in the graph (the CUDA default) and on the host
  python3 benchmarks/gpu_e2e.py --work /tmp/e2e --studies 8 --variants > /dev/null
  for w in on off; do
    python3 benchmarks/predict_profile.py --input /tmp/e2e/studies/study0/ct --device cuda \
      --window-in-graph $w --out "$OUT/predict_profile_window_$w.json" | tail -n 16
  done
  # eight uncompressed 300-slice studies in one process, then in 4 and 8 worker processes
  # (the default on a 16-core GPU host is 8 already: every run names its --jobs)
  nproc; free -g | head -2
  python3 benchmarks/gpu_e2e.py --work /tmp/e2e --studies 8 --out "$OUT/gpu_e2e_jobs.json" \
    --reuse-studies --variants --jobs 1 4 8 | grep '^{"variant' | cut -c1-600
  exit 0
fi
if [ "$mode" = "e2e" ]; then
  # end to end with and without the lung mask, then the stage times of one series
  python3 benchmarks/gpu_e2e.py --work /tmp/e2e --out "$OUT/gpu_e2e.json" \
    --variants default no-lung-mask | grep '^{"variant' | cut -c1-400
  python3 benchmarks/memory_stages.py --input /tmp/e2e/studies/study0/ct --work /tmp/ms \
    | grep '^{"stage' | tee "$OUT/stages.jsonl"
  python3 benchmarks/predict_profile.py --input /tmp/e2e/studies/study0/ct --device cuda \
    --out "$OUT/predict_profile.json" | tail -n 30
  exit 0
fi
if [ "$mode" = "d2s" ]; then
  # the upsampling rewrite first (model only), then end to end with and without the lung mask
  python3 benchmarks/gpu_throughput.py --model exported_models/ggo-resnet50-unet/model.onnx \
    --no-torch --repeats 3 --variants fp16 fp16-d2s --layouts nhwc --batch-sizes 16 64 \
    --graph-ops --out "$OUT/gpu_d2s.json" | grep -v '^ ' | tail -n 30
  python3 benchmarks/gpu_e2e.py --work /tmp/e2e --out "$OUT/gpu_e2e.json" \
    --variants default no-lung-mask | tail -n 60
  exit 0
fi
python3 benchmarks/gpu_e2e.py --work /tmp/e2e --out "$OUT/gpu_e2e.json" | tail -n 80
if [ "$mode" = "cuda-graph" ]; then
  step=(--cuda-graph --batch-sizes 16 64 --out "$OUT/gpu_graph.json")
else
  step=(--eval /tmp/bundle/eval/test10.npz --batch-sizes 64 --out "$OUT/gpu_eval.json")
fi
python3 benchmarks/gpu_throughput.py --model exported_models/ggo-resnet50-unet/model.onnx \
  --no-torch --repeats 3 "${step[@]}" | grep -v '^ ' | tail -n 30
