"""The model contract: an ONNX file that describes itself, parsed and validated on load.

Contract (written by ``training/export.py``, read here):

- input ``image``: float32 ``[N, 1, S, S]`` (lung-windowed slices in ``[0, 1]``, see
  :mod:`ggo_cli.analysis.preprocessing`); output ``logits``: float32 ``[N, C, S, S]``;
  channel 0 is GGO.
- ``metadata_props`` key ``ggo_cli``: JSON object with at least ``name``, ``version``,
  ``architecture``, ``input_size`` (S), ``window_center``, ``window_width`` (HU), ``threshold``
  (probability), ``segments`` (one per channel: ``label``, ``property_category`` and
  ``property_type`` as ``{"value", "scheme", "meaning"}``), ``training_data``, ``metrics`` and
  ``sha256``.
- ``sha256`` is the hex SHA-256 of the model's graph (operators and weights) serialised
  deterministically: ``onnx.load(path).graph.SerializeToString(deterministic=True)``. It does
  not cover ``metadata_props``, so it can live inside the file it describes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.sr.coding import Code

from ..errors import ModelError

METADATA_KEY = "ggo_cli"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
REQUIRED_KEYS = (
    "name",
    "version",
    "architecture",
    "input_size",
    "window_center",
    "window_width",
    "threshold",
    "segments",
    "training_data",
    "metrics",
    "sha256",
)
_FLOAT_TYPE = 1  # onnx.TensorProto.FLOAT


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """What one output channel segments, in DICOM coded terms.

    Attributes:
        label: short label (SegmentLabel).
        property_category: SegmentedPropertyCategoryCodeSequence.
        property_type: SegmentedPropertyTypeCodeSequence.
    """

    label: str
    property_category: Code
    property_type: Code


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A validated model file and its self-description.

    Attributes:
        path: the ONNX file.
        name: model name (the SEG's algorithm name).
        version: model version (the SEG's algorithm version).
        architecture: network architecture.
        input_size: S, the side of the square input.
        window_center_hu: lung window centre in HU.
        window_width_hu: lung window width in HU.
        threshold: probability threshold for a positive pixel.
        segments: one spec per output channel; channel 0 is GGO.
        recorded_sha256: the graph digest recorded in the metadata.
        file_sha256: SHA-256 of the file's bytes (for manifests).
        metadata: the whole ``ggo_cli`` metadata object.
    """

    path: Path
    name: str
    version: str
    architecture: str
    input_size: int
    window_center_hu: float
    window_width_hu: float
    threshold: float
    segments: tuple[SegmentSpec, ...]
    recorded_sha256: str
    file_sha256: str
    metadata: Mapping[str, Any] = field(repr=False)

    @property
    def n_channels(self) -> int:
        """Number of output channels (segments)."""
        return len(self.segments)


def code_to_json(code: Code) -> dict[str, str]:
    """Serialise a coded concept as ``{"value", "scheme", "meaning"}``."""
    return {"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}


def _code_from_json(obj: object, where: str) -> Code:
    if not isinstance(obj, Mapping) or not all(
        isinstance(obj.get(k), str) and obj.get(k) for k in ("value", "scheme", "meaning")
    ):
        raise ModelError(
            f"model metadata {where} must be an object with string value, scheme and meaning; "
            f"got {obj!r}"
        )
    return Code(obj["value"], obj["scheme"], obj["meaning"])


def graph_sha256(graph_bytes: bytes) -> str:
    """Return the contract digest of a serialised graph (hex SHA-256)."""
    return hashlib.sha256(graph_bytes).hexdigest()


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dims(value_info: Any) -> list[int | str]:
    dims: list[int | str] = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return dims


def _check_io(graph: Any, input_size: int, n_segments: int, path: Path) -> None:
    inputs = {vi.name: vi for vi in graph.input}
    initializers = {init.name for init in graph.initializer}
    real_inputs = [name for name in inputs if name not in initializers]
    if real_inputs != [INPUT_NAME]:
        raise ModelError(
            f"model {path.name}: inputs must be exactly [{INPUT_NAME!r}], got {real_inputs}"
        )
    outputs = [vo.name for vo in graph.output]
    if not outputs or outputs[0] != OUTPUT_NAME:
        raise ModelError(f"model {path.name}: first output must be {OUTPUT_NAME!r}, got {outputs}")
    for role, vi, channels in (
        ("input", inputs[INPUT_NAME], 1),
        ("output", graph.output[0], n_segments),
    ):
        if vi.type.tensor_type.elem_type != _FLOAT_TYPE:
            raise ModelError(f"model {path.name}: {role} {vi.name!r} must be float32")
        dims = _dims(vi)
        if len(dims) != 4:
            raise ModelError(
                f"model {path.name}: {role} {vi.name!r} must be [N, C, S, S], got {dims}"
            )
        if isinstance(dims[1], int) and dims[1] != channels:
            raise ModelError(
                f"model {path.name}: {role} {vi.name!r} has {dims[1]} channels, "
                f"the metadata implies {channels}"
            )
        for dim in dims[2:]:
            if isinstance(dim, int) and dim != input_size:
                raise ModelError(
                    f"model {path.name}: {role} {vi.name!r} spatial size {dims[2:]} does not "
                    f"match metadata input_size {input_size}"
                )


def _number(meta: Mapping[str, Any], key: str, path: Path) -> float:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ModelError(
            f"model {path.name}: metadata {key} must be a finite number, got {value!r}"
        )
    return float(value)


def parse_metadata(meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Validate the ``ggo_cli`` metadata object and return its typed fields.

    Args:
        meta: the decoded JSON object.
        path: the model file, for messages.

    Returns:
        Keyword arguments for :class:`ModelInfo` (without path and digests).

    Raises:
        ModelError: naming the first missing or malformed key.
    """
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ModelError(f"model {path.name}: metadata lacks required keys {missing}")
    for key in ("name", "version", "architecture", "sha256"):
        if not isinstance(meta[key], str) or not meta[key]:
            raise ModelError(f"model {path.name}: metadata {key} must be a non-empty string")
    size = meta["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ModelError(
            f"model {path.name}: metadata input_size must be an integer >= 16, got {size!r}"
        )
    threshold = _number(meta, "threshold", path)
    if not 0.0 < threshold < 1.0:
        raise ModelError(
            f"model {path.name}: metadata threshold must be in (0, 1), got {threshold}"
        )
    width = _number(meta, "window_width", path)
    if width <= 0:
        raise ModelError(f"model {path.name}: metadata window_width must be positive, got {width}")
    segments_raw = meta["segments"]
    if not isinstance(segments_raw, list) or not segments_raw:
        raise ModelError(f"model {path.name}: metadata segments must be a non-empty list")
    segments = []
    for i, seg in enumerate(segments_raw):
        if not isinstance(seg, Mapping) or not isinstance(seg.get("label"), str):
            raise ModelError(f"model {path.name}: metadata segments[{i}] needs a string label")
        segments.append(
            SegmentSpec(
                label=seg["label"],
                property_category=_code_from_json(
                    seg.get("property_category"), f"segments[{i}].property_category"
                ),
                property_type=_code_from_json(
                    seg.get("property_type"), f"segments[{i}].property_type"
                ),
            )
        )
    return {
        "name": meta["name"],
        "version": meta["version"],
        "architecture": meta["architecture"],
        "input_size": size,
        "window_center_hu": _number(meta, "window_center", path),
        "window_width_hu": width,
        "threshold": threshold,
        "segments": tuple(segments),
        "recorded_sha256": meta["sha256"],
    }


def load_model_info(path: Path) -> ModelInfo:
    """Read a model file, check it against the contract and return its description.

    Args:
        path: the ONNX file.

    Returns:
        The validated :class:`ModelInfo`.

    Raises:
        ModelError: missing or unreadable file, not ONNX, metadata missing or malformed, I/O
            names, types or shapes off contract, or weights that do not match the recorded
            digest.
    """
    import onnx  # deferred: only needed when a model is actually loaded

    if not path.is_file():
        raise ModelError(f"model file not found: {path} (pass --model PATH or set GGO_MODEL)")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...: all mean corrupt
        raise ModelError(f"model {path.name} is not a readable ONNX file: {exc}") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ModelError(
            f"model {path.name} has no {METADATA_KEY!r} metadata; export it with "
            "`python -m training export`"
        )
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"model {path.name}: {METADATA_KEY!r} metadata is not JSON: {exc}"
        ) from exc
    if not isinstance(meta, dict):
        raise ModelError(f"model {path.name}: {METADATA_KEY!r} metadata must be a JSON object")
    fields = parse_metadata(meta, path)
    _check_io(proto.graph, fields["input_size"], len(fields["segments"]), path)
    actual = graph_sha256(proto.graph.SerializeToString(deterministic=True))
    if actual != fields["recorded_sha256"]:
        raise ModelError(
            f"model {path.name}: graph sha256 {actual[:12]}... does not match the recorded "
            f"{fields['recorded_sha256'][:12]}...; the file was altered or is corrupt"
        )
    return ModelInfo(path=path, file_sha256=file_sha256(path), metadata=meta, **fields)


def stamp_metadata(proto: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write the contract metadata into an ``onnx.ModelProto``, with the graph digest filled in.

    Used by ``training/export.py`` and by test fixtures, so that writer and reader share one
    definition of the digest.

    Args:
        proto: the ``onnx.ModelProto`` to stamp (modified in place).
        meta: the metadata without (or with a stale) ``sha256``.

    Returns:
        The metadata as written, ``sha256`` included.
    """
    stamped = dict(meta)
    stamped["sha256"] = graph_sha256(proto.graph.SerializeToString(deterministic=True))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    for prop in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(stamped, sort_keys=True)
    return stamped
