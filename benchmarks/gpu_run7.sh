#!/usr/bin/env bash
# Last step of the issue-7 GPU check (docs/benchmarks.md): assemble the bundle that earlier calls
# left in /tmp/b (onnxruntime-gpu, model.onnx, explain.onnx, pydicom), then run
# benchmarks/gpu_throughput.py.
set -euo pipefail
mkdir -p /tmp/b /tmp/bundle /tmp/ortgpu
cp .gpu_carry/s*/bpart* /tmp/b/ 2>/dev/null || true
cat /tmp/b/bpart* | tar -C /tmp/bundle -xf -
(cd /tmp/bundle && sha256sum -c models/SUMS)
cat /tmp/bundle/ort/part* | xz -dc -T8 | tar -C /tmp/ortgpu -xf -
export PYTHONPATH=/tmp/ortgpu:/tmp/bundle/whl:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
lscpu | grep -E "Model name|^CPU\(s\)" || true
python3 benchmarks/gpu_throughput.py --model /tmp/bundle/models/model.onnx \
  --explain /tmp/bundle/models/explain.onnx --batch-sizes 16 64 --repeats 5 \
  --out "$OUT/gpu_throughput.json"
