"""The explain graph ``explain.onnx``: its contract, its validation against the model it
explains, and pruning it to one layer.

PyTorch is needed only to export the explain graph (``python -m training export-explain``),
never here. The graph ``explain.onnx`` lives beside ``model.onnx`` and carries its own
backward pass:

- inputs ``image`` float32 ``[N, 1, S, S]`` (the model's preprocessing) and ``target`` float32
  ``[N, T, S, S]``: one plane per model channel (``T = C``), the binary mask of the explained
  class on the model grid in its channel's plane and zeros elsewhere; graphs exported before
  issue 20 have ``T = 1`` (GGO only) and stay valid for GGO;
- outputs, in order: ``logits`` ``[N, C, S, S]``, then for each layer ``L`` of the metadata's
  ``layers``: ``activations.L`` ``[N, K, h, w]`` and ``gradients.L`` ``[N, K, h, w]``, the
  gradient of ``Score_n = sum_c sum(sigmoid(logits[n, c]) * target[n, c])`` with respect to
  them (for ``T = 1`` the GGO channel's term alone);
- ``metadata_props`` key ``ggo_cli_explain``: JSON with ``model_sha256`` (equal to the paired
  model's recorded digest), ``layers``, ``default_layer``, ``score``, ``sha256`` (graph digest as
  in :mod:`ggo_cli.onnx.model_info`) and ``faithfulness`` (how the default layer was chosen).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo, file_sha256, graph_sha256

EXPLAIN_NAME = "explain.onnx"
EXPLAIN_METADATA_KEY = "ggo_cli_explain"
TARGET_NAME = "target"
REQUIRED_KEYS = ("model_sha256", "layers", "default_layer", "score", "sha256", "faithfulness")
_PRODUCE_HINT = (
    "export it beside the model with `python -m training export-explain --checkpoint CKPT "
    "--model MODEL.onnx`"
)
_FLOAT_TYPE = 1  # onnx.TensorProto.FLOAT


def activations_name(layer: str) -> str:
    """Output name of a layer's activations."""
    return f"activations.{layer}"


def gradients_name(layer: str) -> str:
    """Output name of the score's gradient with respect to a layer's activations."""
    return f"gradients.{layer}"


def default_explain_path(model_path: Path) -> Path:
    """Where the explain graph of ``model_path`` lives: ``explain.onnx`` in the same folder."""
    return model_path.with_name(EXPLAIN_NAME)


@dataclass(frozen=True, slots=True)
class ExplainInfo:
    """A validated explain graph paired with a model.

    Attributes:
        path: the ONNX file.
        model_sha256: digest of the model it explains (equals ``ModelInfo.recorded_sha256``).
        layers: target layers offered, in output order.
        default_layer: the layer used when none is chosen.
        score: the differentiated score, as recorded.
        recorded_sha256: the graph digest recorded in the metadata.
        file_sha256: SHA-256 of the file's bytes (for manifests).
        faithfulness: the measurement behind ``default_layer``, as recorded.
        metadata: the whole ``ggo_cli_explain`` object.
        target_channels: planes of the ``target`` input: the model's channel count, or 1 for
            a graph that explains GGO only.
    """

    path: Path
    model_sha256: str
    layers: tuple[str, ...]
    default_layer: str
    score: str
    recorded_sha256: str
    file_sha256: str
    faithfulness: Any = field(repr=False)
    metadata: Mapping[str, Any] = field(repr=False)
    target_channels: int = 1

    def explains_channel(self, channel: int) -> bool:
        """Whether the graph's score can target model channel ``channel``."""
        return 0 <= channel < self.target_channels


def _fail(path: Path, message: str) -> ModelError:
    return ModelError(f"explain graph {path.name}: {message}")


def _parse_metadata(meta: Mapping[str, Any], model: ModelInfo, path: Path) -> dict[str, Any]:
    """Check the ``ggo_cli_explain`` object; return the typed fields of :class:`ExplainInfo`."""
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise _fail(path, f"metadata lacks required keys {missing}")
    for key in ("model_sha256", "default_layer", "score", "sha256"):
        if not isinstance(meta[key], str) or not meta[key]:
            raise _fail(path, f"metadata {key} must be a non-empty string, got {meta[key]!r}")
    if meta["model_sha256"] != model.recorded_sha256:
        raise _fail(
            path,
            f"model_sha256 {meta['model_sha256'][:12]}... does not match the model "
            f"{model.path.name} ({model.recorded_sha256[:12]}...); it explains another model: "
            + _PRODUCE_HINT,
        )
    layers = meta["layers"]
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(name, str) and name for name in layers)
        or len(set(layers)) != len(layers)
    ):
        raise _fail(
            path, f"metadata layers must be a non-empty list of unique names, got {layers!r}"
        )
    if meta["default_layer"] not in layers:
        raise _fail(path, f"default_layer {meta['default_layer']!r} is not among layers {layers}")
    return {
        "model_sha256": meta["model_sha256"],
        "layers": tuple(layers),
        "default_layer": meta["default_layer"],
        "score": meta["score"],
        "recorded_sha256": meta["sha256"],
        "faithfulness": meta["faithfulness"],
    }


def _dims(value_info: Any) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


def _check_io(graph: Any, layers: Sequence[str], model: ModelInfo, path: Path) -> int:
    """Check input and output names, order, types and the static dimensions against the model;
    return the planes of ``target`` (1, or the model's channels)."""
    initializers = {init.name for init in graph.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.name not in initializers}
    if sorted(inputs) != sorted([INPUT_NAME, TARGET_NAME]):
        raise _fail(path, f"inputs must be {[INPUT_NAME, TARGET_NAME]}, got {list(inputs)}")
    expected = [OUTPUT_NAME]
    for layer in layers:
        expected += [activations_name(layer), gradients_name(layer)]
    outputs = {vo.name: vo for vo in graph.output}
    if list(outputs) != expected:
        missing = [name for name in expected if name not in outputs]
        raise _fail(
            path,
            f"outputs must be {expected} (metadata layers order)"
            + (f"; missing {missing}" if missing else f", got {list(outputs)}"),
        )
    target_dims = _dims(inputs[TARGET_NAME])
    planes = target_dims[1] if len(target_dims) == 4 else 1  # a bad rank fails below
    if planes not in (1, model.n_channels):
        raise _fail(
            path,
            f"{TARGET_NAME!r} has {planes} planes; expected 1 (GGO only) or one per model "
            f"channel ({model.n_channels})",
        )
    target_planes = int(planes)
    # (value, channels, spatial size S); layer outputs have free channels and resolution.
    checks: list[tuple[Any, int | None, bool]] = [
        (inputs[INPUT_NAME], 1, True),
        (inputs[TARGET_NAME], target_planes, True),
        (outputs[OUTPUT_NAME], model.n_channels, True),
    ]
    checks += [(outputs[name], None, False) for name in expected[1:]]
    for vi, channels, model_grid in checks:
        dims = _dims(vi)
        if vi.type.tensor_type.elem_type != _FLOAT_TYPE or len(dims) != 4:
            raise _fail(path, f"{vi.name!r} must be float32 [N, C, H, W], got {dims}")
        if channels is not None and isinstance(dims[1], int) and dims[1] != channels:
            raise _fail(path, f"{vi.name!r} has {dims[1]} channels, expected {channels}")
        if model_grid and any(isinstance(d, int) and d != model.input_size for d in dims[2:]):
            raise _fail(
                path,
                f"{vi.name!r} spatial size {dims[2:]} does not match the model's input_size "
                f"{model.input_size}",
            )
    for layer in layers:
        a, g = _dims(outputs[activations_name(layer)]), _dims(outputs[gradients_name(layer)])
        if any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, g, strict=True)
        ):
            raise _fail(path, f"layer {layer!r}: activations {a} and gradients {g} differ")
    return target_planes


def load_explain_info(path: Path, model: ModelInfo) -> ExplainInfo:
    """Read an explain graph, check it against the contract and the model it must explain.

    Args:
        path: the ONNX file (usually :func:`default_explain_path` of the model).
        model: the validated segmentation model.

    Returns:
        The validated :class:`ExplainInfo`.

    Raises:
        ModelError: missing or unreadable file, metadata missing or malformed, paired with
            another model, I/O off contract, or a graph that does not match its digest.
    """
    import onnx  # deferred: only needed when explaining

    if not path.is_file():
        raise ModelError(f"explain graph not found: {path}; {_PRODUCE_HINT}")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...: all mean corrupt
        raise _fail(path, f"not a readable ONNX file: {exc}") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if EXPLAIN_METADATA_KEY not in props:
        raise _fail(path, f"no {EXPLAIN_METADATA_KEY!r} metadata; {_PRODUCE_HINT}")
    try:
        meta = json.loads(props[EXPLAIN_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise _fail(path, f"{EXPLAIN_METADATA_KEY!r} metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise _fail(path, f"{EXPLAIN_METADATA_KEY!r} metadata must be a JSON object")
    fields = _parse_metadata(meta, model, path)
    target_channels = _check_io(proto.graph, fields["layers"], model, path)
    actual = graph_sha256(proto.graph.SerializeToString(deterministic=True))
    if actual != fields["recorded_sha256"]:
        raise _fail(
            path,
            f"graph sha256 {actual[:12]}... does not match the recorded "
            f"{fields['recorded_sha256'][:12]}...; the file was altered or is corrupt",
        )
    return ExplainInfo(
        path=path,
        file_sha256=file_sha256(path),
        metadata=meta,
        target_channels=target_channels,
        **fields,
    )


def layer_subgraph(path: Path, layer: str) -> bytes:
    """The part of an explain graph that computes one layer's activations and gradients.

    The shipped graph returns every exported layer; ONNX Runtime would compute all of them
    whichever outputs are requested. Pruning to the nodes the chosen layer needs skips the
    backward pass below it (for ``decoder.2`` about 1.8 times faster on the CPU).

    Args:
        path: the (verified) explain graph.
        layer: one of its layers.

    Returns:
        The serialized subgraph with inputs ``image`` and ``target``.

    Raises:
        ModelError: the graph cannot be pruned.
    """
    import onnx  # deferred: keeps `ggo-cli --help` fast
    from onnx.utils import Extractor

    try:
        graph = onnx.load(str(path))
        sub = Extractor(graph).extract_model(
            [INPUT_NAME, TARGET_NAME], [activations_name(layer), gradients_name(layer)]
        )
    except Exception as exc:  # noqa: BLE001 - onnx raises several untyped errors
        raise _fail(path, f"cannot extract layer {layer!r}: {exc}") from exc
    sub.metadata_props.extend(graph.metadata_props)
    return bytes(sub.SerializeToString())
