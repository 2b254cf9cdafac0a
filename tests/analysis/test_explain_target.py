"""``--target``: GradCAM++ of consolidation beside GGO (issue 20), on the analytic two-class
conv model (channel 0 fires above -750 HU, channel 1, consolidation, above -300 HU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from pydicom.dataset import Dataset

from ggo_cli.analysis.explain_target import (
    LABEL_CONSOLIDATION,
    LABEL_GGO,
    model_grid_target,
    select_slices,
    target_channel,
)
from ggo_cli.analysis.explainer import OnnxExplainer
from ggo_cli.analysis.measurements import resolve_overlap
from ggo_cli.analysis.segmenter import OnnxSegmenter
from ggo_cli.domain import CtVolume, Prediction, SeriesInfo
from ggo_cli.errors import InputError, ModelError
from ggo_cli.onnx.explain_graph import ExplainInfo, load_explain_info
from ggo_cli.onnx.model_info import ModelInfo, load_model_info
from ggo_cli.writers.gradcam_png import (
    GradcamFigures,
    panel_origins,
    render_gradcam_figure,
    render_gradcam_png,
    write_gradcam_npz,
)
from ggo_cli.writers.overlay_legend import CONSOLIDATION_RGB
from ggo_cli.writers.overlay_png import GGO_RGB, LABEL_PX
from tests.onnx_models import (
    conv_explain_model,
    stamp_explain_metadata,
    write_conv_explain_pair,
)

AIR_HU, GGO_HU, CONSOLIDATION_HU = -1000.0, -600.0, 0.0
GGO_BLOB = (slice(8, 24), slice(8, 24))
GGO_CORE = (slice(9, 23), slice(9, 23))
CONSOLIDATION_BLOB = (slice(36, 56), slice(36, 56))
CONSOLIDATION_CORE = (slice(38, 54), slice(38, 54))
"""The blob less its rim: the rim's 3 x 3 means (about -330 HU) are GGO, the core's are not."""
WINDOW = {"window_center_hu": -600.0, "window_width_hu": 1500.0}


def _load(folder: Path, **kw: int) -> tuple[ModelInfo, ExplainInfo]:
    model_path, explain_path = write_conv_explain_pair(folder, **kw)  # type: ignore[arg-type]
    model = load_model_info(model_path)
    return model, load_explain_info(explain_path, model)


@pytest.fixture(scope="module")
def two_class(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelInfo, ExplainInfo]:
    return _load(tmp_path_factory.mktemp("two"), channels=2)


@pytest.fixture(scope="module")
def volume() -> CtVolume:
    """Slice 0: a GGO blob only; slice 1: both blobs; slice 2: air."""
    hu = np.full((3, 64, 64), AIR_HU, dtype=np.float32)
    hu[0][GGO_BLOB] = GGO_HU
    hu[1][GGO_BLOB] = GGO_HU
    hu[1][CONSOLIDATION_BLOB] = CONSOLIDATION_HU
    datasets = []
    for i in range(3):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.4.{i + 1}"
        datasets.append(ds)
    return CtVolume(SeriesInfo("1.2.3", "1.2.3.4", (), "x"), hu, tuple(datasets), 2.0, (0.5, 0.5))


@pytest.fixture(scope="module")
def prediction(two_class: tuple[ModelInfo, ExplainInfo], volume: CtVolume) -> Prediction:
    """The two-class model's masks, made exclusive as the pipeline makes them."""
    model, _ = two_class
    return resolve_overlap(OnnxSegmenter(model, device="cpu").predict(volume), 1)


def test_the_two_class_graph_has_one_target_plane_per_channel(
    two_class: tuple[ModelInfo, ExplainInfo], tmp_path: Path
) -> None:
    model, info = two_class
    assert model.n_channels == 2 and info.target_channels == 2
    assert info.explains_channel(1) and not info.explains_channel(2)
    _, old = _load(tmp_path / "old", channels=2, explain_channels=1)
    assert old.target_channels == 1 and not old.explains_channel(1)


def test_a_target_with_planes_matching_neither_is_a_model_error(
    two_class: tuple[ModelInfo, ExplainInfo], tmp_path: Path
) -> None:
    model, info = two_class
    wrong = conv_explain_model(64, channels=2, target_planes=3)
    stamp_explain_metadata(wrong, {k: v for k, v in info.metadata.items() if k != "sha256"})
    path = tmp_path / "explain.onnx"
    onnx.save(wrong, str(path))
    with pytest.raises(ModelError, match="3 planes"):
        load_explain_info(path, model)


def test_each_target_plane_drives_its_own_channel(two_class: tuple[ModelInfo, ExplainInfo]) -> None:
    """dScore/dlogits is s (1 - s) on the target plane's pixels of that channel only."""
    _, info = two_class
    session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, (2, 1, 64, 64)).astype(np.float32)
    for plane in (0, 1):
        target = np.zeros((2, 2, 64, 64), dtype=np.float32)
        target[:, plane] = rng.uniform(0.0, 1.0, (2, 64, 64)) > 0.5
        logits, _, _, _, gradient = session.run(None, {"image": image, "target": target})
        s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        # float32's 1 - s near saturation: absolute 1e-6 of a derivative at most 0.25
        np.testing.assert_allclose(gradient, s * (1 - s) * target, rtol=1e-4, atol=1e-6)
        assert not gradient[:, 1 - plane].any()


def test_target_channel_checks_model_and_graph(
    two_class: tuple[ModelInfo, ExplainInfo], tmp_path: Path
) -> None:
    model, info = two_class
    assert target_channel(model, info, "ggo") == 0
    assert target_channel(model, info, "Consolidation") == 1
    with pytest.raises(InputError, match="invalid --target"):
        target_channel(model, info, "lesion")
    one_model, one_info = _load(tmp_path / "one")
    with pytest.raises(InputError, match="no consolidation channel"):
        target_channel(one_model, one_info, "consolidation")
    old_model, old_info = _load(tmp_path / "old", channels=2, explain_channels=1)
    assert target_channel(old_model, old_info, "ggo") == 0
    with pytest.raises(ModelError, match="explains GGO only.*export-explain"):
        target_channel(old_model, old_info, "consolidation")
    with pytest.raises(ModelError, match="explains GGO only"):
        OnnxExplainer(old_model, old_info, device="cpu", target="consolidation")


def test_model_grid_target_fills_only_the_explained_plane() -> None:
    mask = np.zeros((1, 64, 64), dtype=bool)
    mask[0, 5:9, 5:9] = True
    target = model_grid_target(mask, 64, planes=2, channel=1)
    assert target.shape == (1, 2, 64, 64) and not target[:, 0].any()
    np.testing.assert_array_equal(target[0, 1].astype(bool), mask[0])


def test_target_slice_selection_follows_the_explained_class(prediction: Prediction) -> None:
    assert select_slices(prediction.ggo, "ggo") == (0, 1)
    assert select_slices(prediction.ggo, "target", target=prediction.masks[..., 1]) == (1,)
    assert select_slices(prediction.ggo, "target") == (0, 1)  # no target given: GGO


def _mean(cam: npt.NDArray[np.float32], region: tuple[slice, slice]) -> float:
    return float(cam[region].mean())


def test_consolidation_map_lights_the_consolidation_not_the_ggo(
    two_class: tuple[ModelInfo, ExplainInfo], volume: CtVolume, prediction: Prediction
) -> None:
    model, info = two_class
    assert prediction.masks[1][CONSOLIDATION_CORE][..., 1].all()
    assert prediction.ggo[1][CONSOLIDATION_CORE].sum() == 0  # exclusive, as in the pipeline
    explainer = OnnxExplainer(model, info, device="cpu", target="consolidation")
    explanation = explainer.explain(volume, prediction, slices="target")
    assert explanation.slice_indices == (1,) and explanation.target == "consolidation"
    np.testing.assert_array_equal(explanation.mask[0], prediction.masks[1, ..., 1])
    assert explanation.labels is not None
    assert set(np.unique(explanation.labels[0][CONSOLIDATION_CORE])) == {LABEL_CONSOLIDATION}
    assert set(np.unique(explanation.labels[0][GGO_CORE])) == {LABEL_GGO}
    cam = explanation.cam[0]
    assert _mean(cam, CONSOLIDATION_CORE) > 0.5
    assert _mean(cam, GGO_BLOB) < 0.05  # below -300 HU: no part of the consolidation call
    ggo = OnnxExplainer(model, info, device="cpu").explain(volume, prediction, slices="target")
    assert ggo.slice_indices == (0, 1) and ggo.target == "ggo"
    np.testing.assert_array_equal(ggo.mask, prediction.ggo[[0, 1]])
    assert _mean(ggo.cam[0], GGO_BLOB) > 0.5
    assert not np.allclose(ggo.cam[1], cam)


def test_one_plane_graph_still_explains_ggo_of_a_two_class_model(
    volume: CtVolume, prediction: Prediction, tmp_path: Path
) -> None:
    model, old = _load(tmp_path / "old", channels=2, explain_channels=1)
    explanation = OnnxExplainer(model, old, device="cpu").explain(volume, prediction)
    assert explanation.slice_indices == (0, 1) and explanation.cam[0].max() == 1.0


def _explanation(
    two_class: tuple[ModelInfo, ExplainInfo], volume: CtVolume, prediction: Prediction
):  # type: ignore[no-untyped-def]
    model, info = two_class
    explainer = OnnxExplainer(model, info, device="cpu", target="consolidation")
    return explainer.explain(volume, prediction, slices="target")


def test_figure_shows_both_classes_with_a_legend_and_names_the_target(
    two_class: tuple[ModelInfo, ExplainInfo], volume: CtVolume, prediction: Prediction
) -> None:
    explanation = _explanation(two_class, volume, prediction)
    image = np.asarray(render_gradcam_png(volume, explanation, 0, **WINDOW))
    (x, y) = panel_origins(64, 64)[1]
    middle = image[y : y + 64, x : x + 64].astype(int)
    # Outlines in each class's own colour around its blob.
    assert (np.abs(middle - CONSOLIDATION_RGB).sum(axis=-1) == 0).any()
    assert (np.abs(middle - GGO_RGB).sum(axis=-1) == 0).any()
    assert not (np.abs(middle[GGO_BLOB] - CONSOLIDATION_RGB).sum(axis=-1) == 0).any()
    # The legend's swatches sit in the middle panel's title bar.
    title = image[LABEL_PX : 2 * LABEL_PX, x : x + 64].astype(int)
    for rgb in (GGO_RGB, CONSOLIDATION_RGB):
        assert (np.abs(title - rgb).sum(axis=-1) == 0).sum() >= 30
    # The kept figures draw the same picture (the GradCAM++ SC series).
    figures = GradcamFigures.from_explanation(explanation)
    again = np.asarray(render_gradcam_figure(volume, figures, 0, **WINDOW))
    np.testing.assert_array_equal(image, again)


def test_one_class_figure_has_no_legend(tmp_path: Path, volume: CtVolume) -> None:
    model, info = _load(tmp_path / "one")
    prediction = OnnxSegmenter(model, device="cpu").predict(volume)
    explanation = OnnxExplainer(model, info, device="cpu").explain(volume, prediction)
    assert explanation.labels is None and explanation.target == "ggo"
    image = np.asarray(render_gradcam_png(volume, explanation, 0, **WINDOW))
    (x, _) = panel_origins(64, 64)[1]
    title = image[LABEL_PX : 2 * LABEL_PX, x : x + 64].astype(int)
    assert not (np.abs(title - CONSOLIDATION_RGB).sum(axis=-1) == 0).any()


def test_npz_records_target_and_labels(
    two_class: tuple[ModelInfo, ExplainInfo],
    volume: CtVolume,
    prediction: Prediction,
    tmp_path: Path,
) -> None:
    explanation = _explanation(two_class, volume, prediction)
    path = write_gradcam_npz(tmp_path / "gradcam_consolidation.npz", explanation)
    with np.load(path, allow_pickle=False) as data:
        assert str(data["target"]) == "consolidation"
        assert data["labels"].dtype == np.uint8 and data["labels"].shape == (1, 64, 64)
        np.testing.assert_array_equal(data["labels"], explanation.labels)
        np.testing.assert_array_equal(data["mask"], data["labels"] == LABEL_CONSOLIDATION)
