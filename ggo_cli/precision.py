"""Model variants for speed: fp16 compute on CUDA, made in memory from the shipped model.

The shipped ``model.onnx`` stores float16 weights that ``Cast`` nodes widen to float32, so every
provider computes in float32. On CUDA, :func:`fp16_model_bytes` makes the float16-compute
variant with float32 inputs and outputs (the model contract is unchanged): the ``Cast`` nodes
on weights are folded, then ``onnxruntime.transformers.float16.convert_float_to_float16``
(``keep_io_types=True``) converts the graph. It takes about 0.7 s and is deterministic, so no
second 40 MB file is shipped. Measured on an H200 (docs/benchmarks.md): with the CUDA
provider's ``prefer_nhwc`` it runs 1.65 times as many slices/s as the float32 graph in NCHW.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ModelError

log = logging.getLogger(__name__)


class Precision(StrEnum):
    """``--precision``: which variant of the model runs."""

    AUTO = "auto"  # fp16 on CUDA; on CPU int8 where a validated int8 model ships, else fp32
    FP32 = "fp32"
    FP16 = "fp16"  # CUDA only
    INT8 = "int8"  # CPU only, needs model.int8.onnx beside the model


CUDA_NHWC_OPTIONS = {"prefer_nhwc": 1}
"""CUDA provider options of the segmentation session (NHWC kernels where ORT has them)."""


@lru_cache(maxsize=2)
def fp16_model_bytes(path: Path, file_sha256: str) -> bytes:
    """The float16-compute variant of an ONNX model, serialized (float32 inputs and outputs).

    Args:
        path: the (verified) model file.
        file_sha256: its digest (the cache key: a changed file is converted again).

    Returns:
        The converted model, with the original ``metadata_props``.

    Raises:
        ModelError: the conversion failed.
    """
    import onnx  # deferred: keeps `ggo-cli --help` fast
    from onnx import numpy_helper

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(path))
        initializers = {i.name: i for i in model.graph.initializer}
        kept_nodes = []
        widened = []
        for node in model.graph.node:
            source = initializers.get(node.input[0]) if node.input else None
            if (
                node.op_type == "Cast"
                and source is not None
                and source.data_type == onnx.TensorProto.FLOAT16
            ):
                values = numpy_helper.to_array(source).astype(np.float32)
                widened.append(numpy_helper.from_array(values, node.output[0]))
                continue
            kept_nodes.append(node)
        used = {name for node in kept_nodes for name in node.input}
        kept_initializers = [i for i in model.graph.initializer if i.name in used]
        kept_initializers += [i for i in widened if i.name in used]
        del model.graph.node[:]
        model.graph.node.extend(kept_nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept_initializers)
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    except Exception as exc:  # noqa: BLE001 - onnx and the converter raise untyped errors
        raise ModelError(f"cannot make the float16 variant of {path.name}: {exc}") from exc
    log.debug("float16 variant of %s made (%d nodes)", path.name, len(half.graph.node))
    return bytes(half.SerializeToString())
