#!/usr/bin/env bash
# Last step of the GPU check (docs/benchmarks.md): assemble onnxruntime-gpu and the model that
# earlier calls left in /tmp, then run benchmarks/gpu_check.py on CUDA and on the host CPU.
set -euo pipefail
mkdir -p /tmp/chunks /tmp/mparts
cp .ortgpu/c*/part* /tmp/chunks/ 2>/dev/null || true
cp .gpu_carry/p*/mpart* /tmp/mparts/ 2>/dev/null || true
cat /tmp/mparts/mpart* > /tmp/model.onnx
rm -rf /tmp/ortgpu && mkdir -p /tmp/ortgpu
cat /tmp/chunks/part* | xz -dc -T8 | tar -C /tmp/ortgpu -xf -
export PYTHONPATH=/tmp/ortgpu:$PWD/.gpu_carry/whl:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_check.py --model /tmp/model.onnx --devices cuda cpu \
  --batch-sizes 1 16 64 --slices 256 --cpu-slices 16 --repeats 3 --out "$OUT/gpu_check.json"
