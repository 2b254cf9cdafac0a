#!/usr/bin/env bash
# Last step of the third issue-7 GPU check (docs/benchmarks.md): the same bundle as gpu_run7b.sh;
# end to end again (lungs now in the prefetch stage) and ORT with CUDA graphs.
set -euo pipefail
mkdir -p /tmp/b /tmp/bundle /tmp/ortgpu /tmp/site
cp .gpu_carry/t*/cpart* /tmp/b/ 2>/dev/null || true
cat /tmp/b/cpart* | tar -C /tmp/bundle -xf -
(cd /tmp/bundle && sha256sum -c models/SUMS)
cat /tmp/bundle/ort/part* | xz -dc -T8 | tar -C /tmp/ortgpu -xf -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  /tmp/bundle/whl312/*.whl
for f in model.onnx explain.onnx; do
  rm -f "exported_models/ggo-resnet50-unet/$f"
  cp "/tmp/bundle/models/$f" "exported_models/ggo-resnet50-unet/$f"
done
export PYTHONPATH=/tmp/ortgpu:/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_e2e.py --work /tmp/e2e --out "$OUT/gpu_e2e.json" | tail -n 80
python3 benchmarks/gpu_throughput.py --model exported_models/ggo-resnet50-unet/model.onnx --cuda-graph \
  --no-torch --batch-sizes 16 64 --repeats 3 \
  --out "$OUT/gpu_graph.json" | grep -v '^ ' | tail -n 30
