"""The GradCAM++ Secondary Capture writer: the kept maps draw the PNG's figure exactly, in a
fraction of the memory; one instance per explained slice; its own deterministic series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_array_equal

from ggo_cli.analysis.explainer import Explanation
from ggo_cli.analysis.measurements import measure_ggo
from ggo_cli.domain import CtVolume, Prediction
from ggo_cli.errors import InputError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.writers.dicom_sc import write_sc
from ggo_cli.writers.gradcam_png import GradcamFigures, render_gradcam_figure, render_gradcam_png
from ggo_cli.writers.gradcam_sc import (
    GRADCAM_SC_SERIES_DESCRIPTION,
    GRADCAM_SC_SERIES_NUMBER,
    write_gradcam_sc,
)
from ggo_cli.writers.sc_render import burn_in_text, sc_text_lines
from tests.dicom_factory import make_ct_series
from tests.writers.ct_data import load_ct_volume

EXPLAINED = (1, 2, 4)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> CtVolume:
    """A 6-slice synthetic chest CT."""
    series = make_ct_series(tmp_path_factory.mktemp("ct"), (6, 48, 40))
    return load_ct_volume(series.paths[0].parent)


def explanation_of(volume: CtVolume, indices: tuple[int, ...] = EXPLAINED,
                   layer: str = "conv") -> Explanation:
    """Maps with values on the colour table's rounding edges (``(i + 0.5) / 255``), a box mask."""
    rows, cols = volume.hu.shape[1:]
    rng = np.random.default_rng(7)
    cam = rng.random((len(indices), rows, cols), dtype=np.float32)
    cam[:, 0, :] = (np.arange(cols, dtype=np.float32) % 255 + 0.5) / 255.0
    mask = np.zeros((len(indices), rows, cols), dtype=np.uint8)
    mask[:, 10:20, 5:15] = 1
    uids = tuple(volume.sop_instance_uids[i] for i in indices)
    return Explanation(slice_indices=indices, sop_instance_uids=uids, cam=cam, mask=mask,
                       layer=layer)


def _write(volume: CtVolume, figures: GradcamFigures, model: ModelInfo, folder: Path,
           **options: object) -> list[Path]:
    ggo = np.zeros(volume.hu.shape, dtype=bool)
    return write_gradcam_sc(
        volume, figures, model, folder, threshold=0.5,
        measurement=measure_ggo(ggo, volume.voxel_volume_ml), **options,  # type: ignore[arg-type]
    )


def test_kept_figures_draw_the_png_exactly_in_a_fraction_of_the_memory(
    volume: CtVolume, model: ModelInfo
) -> None:
    """The uint8 colour indices and mask bits redraw each figure pixel for pixel, and take
    less than a third of the float maps' memory."""
    explanation = explanation_of(volume)
    figures = GradcamFigures.from_explanation(explanation)
    window = {"window_center_hu": model.window_center_hu,
              "window_width_hu": model.window_width_hu}
    for position in range(len(EXPLAINED)):
        assert_array_equal(figures.mask(position), explanation.mask[position].astype(bool))
        assert_array_equal(
            np.asarray(render_gradcam_figure(volume, figures, position, **window)),
            np.asarray(render_gradcam_png(volume, explanation, position, **window)),
        )
    kept = figures.cam_index.nbytes + figures.mask_bits.nbytes
    assert kept < (explanation.cam.nbytes + explanation.mask.nbytes) / 3


def test_one_instance_per_explained_slice_in_series_9904(
    tmp_path: Path, volume: CtVolume, model: ModelInfo
) -> None:
    """Files gradcam_NNNN.dcm (1-based slice numbers), instances 1..k of one series; each
    image is the figure under the text band and references its CT slice."""
    explanation = explanation_of(volume)
    figures = GradcamFigures.from_explanation(explanation)
    paths = _write(volume, figures, model, tmp_path / "sc_gradcam")
    assert [p.name for p in paths] == ["gradcam_0002.dcm", "gradcam_0003.dcm",
                                       "gradcam_0005.dcm"]
    datasets = [pydicom.dcmread(p) for p in paths]
    assert [int(ds.InstanceNumber) for ds in datasets] == [1, 2, 3]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    lines = sc_text_lines(measure_ggo(np.zeros(volume.hu.shape, dtype=bool),
                                      volume.voxel_volume_ml), None,
                          model_name=model.name, model_version=model.version,
                          software_version=str(datasets[0].SoftwareVersions))
    for position, (index, ds) in enumerate(zip(EXPLAINED, datasets, strict=True)):
        assert (int(ds.SeriesNumber), ds.SeriesDescription) == (
            GRADCAM_SC_SERIES_NUMBER, GRADCAM_SC_SERIES_DESCRIPTION)
        figure = render_gradcam_png(volume, explanation, position,
                                    window_center_hu=model.window_center_hu,
                                    window_width_hu=model.window_width_hu)
        assert_array_equal(ds.pixel_array, burn_in_text(figure, lines))
        (source,) = ds.SourceImageSequence
        assert source.ReferencedSOPInstanceUID == volume.sop_instance_uids[index]
        assert "GradCAM++ map of layer conv" in ds.DerivationDescription


def test_series_uid_is_deterministic_and_follows_the_explanation(
    tmp_path: Path, volume: CtVolume, model: ModelInfo
) -> None:
    """The same maps give the same UIDs; another layer or slice selection another series;
    never the overlay SC's series."""

    def series_uid(explanation: Explanation, folder: str) -> str:
        figures = GradcamFigures.from_explanation(explanation)
        (first, *_) = _write(volume, figures, model, tmp_path / folder)
        return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)

    first = series_uid(explanation_of(volume), "a")
    assert series_uid(explanation_of(volume), "b") == first
    assert series_uid(explanation_of(volume, layer="head"), "c") != first
    assert series_uid(explanation_of(volume, indices=(1, 2)), "d") != first
    ggo = np.zeros((*volume.hu.shape, 1), dtype=bool)
    (montage,) = write_sc(volume, Prediction(masks=ggo, threshold=0.5), model, tmp_path / "sc",
                          measurement=measure_ggo(ggo[..., 0], volume.voxel_volume_ml))
    assert pydicom.dcmread(montage, stop_before_pixels=True).SeriesInstanceUID != first


def test_no_explained_slice_writes_nothing(
    tmp_path: Path, volume: CtVolume, model: ModelInfo
) -> None:
    """An explanation of no slice writes no file and makes no folder."""
    figures = GradcamFigures.from_explanation(explanation_of(volume, indices=()))
    assert _write(volume, figures, model, tmp_path / "sc_gradcam") == []
    assert not (tmp_path / "sc_gradcam").exists()


def test_maps_of_another_grid_or_bad_options_fail_before_any_file(
    tmp_path: Path, volume: CtVolume, model: ModelInfo
) -> None:
    """Maps that do not fit the volume raise ValueError, a bad series number InputError,
    both before the folder exists."""
    figures = GradcamFigures.from_explanation(explanation_of(volume))
    wrong = GradcamFigures(figures.slice_indices, figures.cam_index[:, :-1],
                           figures.mask_bits, figures.layer)
    with pytest.raises(ValueError, match="do not match 3 slices of 48 x 40"):
        _write(volume, wrong, model, tmp_path / "sc_gradcam")
    outside = GradcamFigures((1, 2, 9), figures.cam_index, figures.mask_bits, figures.layer)
    with pytest.raises(ValueError, match="fall outside the volume's 6 slices"):
        _write(volume, outside, model, tmp_path / "sc_gradcam")
    with pytest.raises(InputError, match="SC series number must be an integer from 1"):
        _write(volume, figures, model, tmp_path / "sc_gradcam", series_number=0)
    assert not (tmp_path / "sc_gradcam").exists()
