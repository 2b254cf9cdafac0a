"""GradCAM++ writers: gradcam.npz contents and the three-panel slice PNGs, decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from ggo_cli.analysis.explainer import Explanation
from ggo_cli.domain import CtVolume, SeriesInfo
from ggo_cli.writers.cam_colours import JET_LUT, colourise
from ggo_cli.writers.gradcam_png import (
    COLOURBAR_LABEL_PX,
    COLOURBAR_PX,
    GAP_PX,
    panel_origins,
    write_gradcam_npz,
    write_gradcam_pngs,
)
from ggo_cli.writers.overlay_png import LABEL_PX

ROWS, COLS = 40, 56
WINDOW = {"window_center_hu": -600.0, "window_width_hu": 1500.0}


def _volume(n: int = 12) -> CtVolume:
    hu = np.full((n, ROWS, COLS), -1000.0, dtype=np.float32)
    hu[:, 10:30, 10:46] = -850.0
    datasets = []
    for i in range(n):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1.{i + 1}"
        datasets.append(ds)
    return CtVolume(SeriesInfo("1.2", "1.2.3", (), "x"), hu, tuple(datasets), 1.0, (0.7, 0.7))


def _explanation(volume: CtVolume, indices: tuple[int, ...]) -> Explanation:
    k = len(indices)
    mask = np.zeros((k, ROWS, COLS), dtype=np.uint8)
    mask[:, 15:25, 20:30] = 1
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    bump = np.exp(-((yy - 20.0) ** 2 + (xx - 25.0) ** 2) / 40.0).astype(np.float32)
    cam = np.repeat(((bump - bump.min()) / (bump.max() - bump.min()))[None], k, axis=0)
    return Explanation(
        slice_indices=indices,
        sop_instance_uids=tuple(volume.sop_instance_uids[i] for i in indices),
        cam=cam.astype(np.float32),
        mask=mask,
        layer="decoder.2",
    )


def _panel(image: npt.NDArray[np.uint8], which: int) -> npt.NDArray[np.uint8]:
    x, y = panel_origins(ROWS, COLS)[which]
    width = COLOURBAR_PX if which == 3 else COLS
    return image[y : y + ROWS, x : x + width]


def test_npz_holds_the_documented_keys_types_and_shapes(tmp_path: Path) -> None:
    volume = _volume()
    explanation = _explanation(volume, (3, 7))
    path = write_gradcam_npz(tmp_path / "gradcam.npz", explanation)
    assert path == tmp_path / "gradcam.npz"
    assert [p.name for p in tmp_path.iterdir()] == ["gradcam.npz"]  # no temporary file left
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {
            "cam", "mask", "sop_instance_uids", "slice_indices", "layer", "target"
        }
        assert str(data["target"]) == "ggo"
        assert data["cam"].dtype == np.float32 and data["cam"].shape == (2, ROWS, COLS)
        assert data["mask"].dtype == np.uint8 and data["mask"].shape == (2, ROWS, COLS)
        assert data["sop_instance_uids"].dtype.kind == "U"
        assert data["sop_instance_uids"].tolist() == list(explanation.sop_instance_uids)
        assert data["slice_indices"].tolist() == [3, 7]
        assert str(data["layer"]) == "decoder.2"
        np.testing.assert_array_equal(data["cam"], explanation.cam)
        np.testing.assert_array_equal(data["mask"], explanation.mask)


def test_empty_explanation_writes_empty_arrays(tmp_path: Path) -> None:
    explanation = _explanation(_volume(), ())
    with np.load(write_gradcam_npz(tmp_path / "g.npz", explanation), allow_pickle=False) as data:
        assert data["cam"].shape == (0, ROWS, COLS) and data["sop_instance_uids"].shape == (0,)


def test_pngs_have_three_panels_a_colour_bar_and_one_based_names(tmp_path: Path) -> None:
    volume = _volume()
    explanation = _explanation(volume, (0, 9))
    paths = write_gradcam_pngs(volume, explanation, tmp_path / "gradcam", **WINDOW)
    assert [p.name for p in paths] == ["slice_0001.png", "slice_0010.png"]
    assert sorted(p.name for p in (tmp_path / "gradcam").iterdir()) == [p.name for p in paths]
    image = np.asarray(Image.open(paths[1]).convert("RGB"))
    width = 4 * GAP_PX + 3 * COLS + COLOURBAR_PX + COLOURBAR_LABEL_PX
    assert image.shape == (2 * LABEL_PX + ROWS + GAP_PX, width, 3)

    ct = _panel(image, 0).astype(int)
    assert (ct[..., 0] == ct[..., 1]).all() and (ct[..., 1] == ct[..., 2]).all()  # grey
    assert ct[20, 20, 0] > ct[2, 2, 0]  # -850 HU brighter than air in the lung window

    seg = _panel(image, 1).astype(int)
    inside = explanation.mask[1].astype(bool)
    assert (seg[inside][:, 0] > seg[inside][:, 1] + 40).all()  # red where the mask is
    assert (seg[~inside][:, 0] == seg[~inside][:, 1]).all()  # grey elsewhere

    cam = _panel(image, 2).astype(int)
    hot, cold = cam[20, 25], cam[1, 1]
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40  # red at 1, blue at 0

    bar = _panel(image, 3).astype(int)
    assert bar[0, :, 0].min() > bar[0, :, 2].max()  # top of the bar: red (1)
    assert bar[-1, :, 2].min() > bar[-1, :, 0].max()  # bottom: blue (0)


def test_no_slices_write_no_pngs_and_no_folder(tmp_path: Path) -> None:
    volume = _volume()
    assert write_gradcam_pngs(volume, _explanation(volume, ()), tmp_path / "g", **WINDOW) == []
    assert not (tmp_path / "g").exists()


def test_mismatched_explanation_is_rejected(tmp_path: Path) -> None:
    volume = _volume(4)
    with pytest.raises(ValueError, match="outside the volume's 4 slices"):
        write_gradcam_pngs(volume, _explanation(_volume(), (9,)), tmp_path, **WINDOW)
    small = CtVolume(volume.series, volume.hu[:, :20], volume.datasets, 1.0, (0.7, 0.7))
    with pytest.raises(ValueError, match="do not match"):
        write_gradcam_pngs(small, _explanation(volume, (1,)), tmp_path, **WINDOW)


def test_colour_map_runs_from_dark_blue_to_dark_red() -> None:
    assert JET_LUT.shape == (256, 3) and JET_LUT.dtype == np.uint8
    np.testing.assert_array_equal(
        colourise(np.array([0.0, 1.0], dtype=np.float32)), [[0, 0, 128], [128, 0, 0]]
    )
    mid = colourise(np.array([0.5], dtype=np.float32))[0]
    assert mid[1] > 200  # green-yellow in the middle
