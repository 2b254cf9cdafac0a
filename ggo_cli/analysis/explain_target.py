"""What an explanation targets: the explained class (``--target``), its model channel checked
against the model and the explain graph, the graph's ``target`` input on the model grid, the
slice selection (``--slices``) and the label map of both classes that the figures draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from ..domain import Prediction
from ..errors import InputError, ModelError
from ..onnx.explain_graph import ExplainInfo
from ..onnx.model_info import ModelInfo
from .measurements import consolidation_channel
from .preprocessing import to_model_grid

TARGET_THRESHOLD = 0.5
"""A model-grid pixel is target when more than half of its bilinear weight lies on the explained
class."""

FloatArray = npt.NDArray[np.float32]


class ExplainSlices(StrEnum):
    """Which slices :meth:`ggo_cli.analysis.explainer.OnnxExplainer.explain` explains: those
    with predicted GGO, those with the explained class (``target``: GGO or consolidation), or
    all."""

    GGO = "ggo"
    TARGET = "target"
    ALL = "all"


class ExplainTarget(StrEnum):
    """The class whose predicted voxels the GradCAM++ score sums."""

    GGO = "ggo"
    CONSOLIDATION = "consolidation"


LABEL_GGO = 1
LABEL_CONSOLIDATION = 2
"""Values of :attr:`Explanation.labels` (those of the COVID-SemiSeg masks: 1 GGO, 2
consolidation)."""


def target_channel(model: ModelInfo, explain: ExplainInfo, target: str) -> int:
    """The model channel that ``target`` explains, checked against the model and the graph.

    Args:
        model: the validated segmentation model.
        explain: its validated explain graph.
        target: ``ggo`` or ``consolidation``.

    Returns:
        The channel index (0 for GGO).

    Raises:
        InputError: an unknown target, or consolidation asked of a model without that channel.
        ModelError: the explain graph's score cannot target that channel (a graph exported
            before two-class models, whose ``target`` has one plane).
    """
    try:
        choice = ExplainTarget(target.lower())
    except ValueError:
        raise InputError(f"invalid --target {target!r}; use ggo or consolidation") from None
    if choice is ExplainTarget.GGO:
        return 0
    channel = consolidation_channel(model.segments)
    if channel is None:
        raise InputError(
            f"--target consolidation: model {model.name} has no consolidation channel "
            f"(its segments: {', '.join(spec.label for spec in model.segments)})"
        )
    if not explain.explains_channel(channel):
        raise ModelError(
            f"explain graph {explain.path.name} explains GGO only (its target has "
            f"{explain.target_channels} plane); export it again with `python -m training "
            "export-explain` to explain consolidation"
        )
    return channel


def model_grid_target(
    mask: npt.NDArray[np.bool_], size: int, *, planes: int = 1, channel: int = 0
) -> FloatArray:
    """A predicted class (source grid) as the graph's binary ``target`` on the model grid.

    The mask is letterboxed and resized exactly like the image (:func:`to_model_grid`) and
    thresholded at :data:`TARGET_THRESHOLD`; when the slice already has the model's size this
    is the predicted class pixel for pixel. It fills plane ``channel``; the other planes
    (other classes) are zero.

    Args:
        mask: the predicted class on the source grid. Shape: ``(n, rows, cols)``.
        size: the model's input size S.
        planes: planes of the graph's ``target`` (:attr:`ExplainInfo.target_channels`).
        channel: the explained class's model channel.

    Returns:
        float32 0/1 target. Shape: ``(n, planes, size, size)``.
    """
    on_grid = to_model_grid(mask.astype(np.float32), size)
    target = np.zeros((mask.shape[0], planes, size, size), dtype=np.float32)
    target[:, channel] = on_grid > TARGET_THRESHOLD
    return target


def label_map(
    prediction: Prediction, indices: Sequence[int], channel: int
) -> npt.NDArray[np.uint8]:
    """GGO (1) and consolidation (2) of some slices as one label map (0: neither).

    Args:
        prediction: the masks (GGO and consolidation exclusive, as the pipeline leaves them;
            a voxel in both would be labelled consolidation).
        indices: the slices.
        channel: the consolidation channel.

    Returns:
        uint8 labels. Shape: ``(len(indices), rows, cols)``.
    """
    chosen = list(indices)
    labels = prediction.ggo[chosen].astype(np.uint8) * np.uint8(LABEL_GGO)
    labels[prediction.masks[chosen, ..., channel]] = LABEL_CONSOLIDATION
    return labels


def select_slices(
    ggo: npt.NDArray[np.bool_],
    slices: str | Sequence[int],
    *,
    target: npt.NDArray[np.bool_] | None = None,
) -> tuple[int, ...]:
    """Resolve a slice selection to sorted 0-based indices.

    Args:
        ggo: the predicted GGO. Shape: ``(slices, rows, cols)``.
        slices: ``"ggo"`` (slices with predicted GGO), ``"target"`` (slices with the explained
            class), ``"all"``, or 0-based indices.
        target: the explained class's mask for ``"target"`` (``None``: the GGO).

    Returns:
        Sorted unique indices.

    Raises:
        InputError: an unknown keyword or an index out of range.
    """
    n = ggo.shape[0]
    if isinstance(slices, str):
        try:
            choice = ExplainSlices(slices.lower())
        except ValueError:
            raise InputError(
                f"invalid slice selection {slices!r}; use ggo, target, all or slice indices"
            ) from None
        if choice is ExplainSlices.ALL:
            return tuple(range(n))
        chosen = target if choice is ExplainSlices.TARGET and target is not None else ggo
        return tuple(np.flatnonzero(chosen.reshape(n, -1).any(axis=1)).tolist())
    indices = sorted({int(i) for i in slices})
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise InputError(f"slice indices {bad} are outside the volume's 0..{n - 1}")
    return tuple(indices)
