#!/usr/bin/env bash
# Pack what the GPU machine lacks (docs/benchmarks.md, "GPU recipe") into 57 MB parts under
# .gpu_carry/tN/ (git-ignored): the onnxruntime-gpu chunks that ../shared/tools/ortgpu-chunks.sh
# left in .ortgpu/, model.onnx (and explain.onnx with --explain), and the Python 3.12 wheels of
# pydicom, highdicom, pyjpegls and SimpleITK from a folder given as the first argument.
#   bash benchmarks/gpu_bundle.sh /tmp/whl312 [--explain]
# Each part then travels in its own call (carry [".gpu_carry/tN"], command
# `mkdir -p /tmp/b && cp .gpu_carry/t*/cpart* /tmp/b/`), with exported_models/*.onnx swapped for
# symlinks in the tree so that the tree stays small; the last call runs gpu_run_e2e.sh.
set -euo pipefail
wheels=${1:?give the folder with the py3.12 wheels}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bundle/ort" "$stage/bundle/models" "$stage/bundle/whl312"
cp .ortgpu/c*/part* "$stage/bundle/ort/"
models=(model.onnx)
if [ "${2:-}" = "--explain" ]; then models+=(explain.onnx); fi
for f in "${models[@]}"; do cp "exported_models/ggo-resnet50-unet/$f" "$stage/bundle/models/"; done
(cd "$stage/bundle/models" && sha256sum "${models[@]}" > SUMS)
cp "$wheels"/*.whl "$stage/bundle/whl312/"
rm -rf .gpu_carry/t*
tar -C "$stage/bundle" -cf - . | split -b 57M -d - "$stage/cpart"
n=0
for part in "$stage"/cpart*; do
  mkdir -p ".gpu_carry/t$n"
  mv "$part" ".gpu_carry/t$n/"
  n=$((n + 1))
done
du -sh .gpu_carry/t*
