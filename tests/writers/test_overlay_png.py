"""Overlay PNGs: slice choice, tile layout, red exactly where GGO is, per-slice PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ggo_cli.domain import CtVolume
from ggo_cli.writers.overlay_png import (
    CAPTION_PX,
    GAP_PX,
    LABEL_PX,
    select_overlay_slices,
    write_overlay,
)
from ggo_cli.writers.slice_png import write_slice_pngs

CENTER_HU, WIDTH_HU = -600.0, 1500.0
RED_MARGIN = 60


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        rgb: np.ndarray = np.asarray(image.convert("RGB")).astype(np.int16)
    return rgb


def _red(rgb: np.ndarray) -> np.ndarray:
    """Pixels clearly red (GGO fill or outline), never grey, white or black."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red: np.ndarray = (r - g > RED_MARGIN) & (r - b > RED_MARGIN)
    return red


def _mask(volume: CtVolume, slices: dict[int, int]) -> np.ndarray:
    """GGO squares of the given side on the given slices."""
    ggo = np.zeros(volume.hu.shape, dtype=bool)
    rows, cols = volume.hu.shape[1:]
    for index, side in slices.items():
        ggo[index, rows // 3 : rows // 3 + side, cols // 4 : cols // 4 + side] = True
    return ggo


def _tile_origin(position: int, grid_cols: int, tile_w: int, tile_h: int) -> tuple[int, int]:
    """Top-left (row, col) of the image part of montage tile ``position``."""
    left = GAP_PX + (position % grid_cols) * (tile_w + GAP_PX)
    top = CAPTION_PX + (position // grid_cols) * (LABEL_PX + tile_h + GAP_PX) + LABEL_PX
    return top, left


def test_selects_slices_with_most_ggo_in_slice_order() -> None:
    """The top slices by GGO voxels are chosen, shown in increasing slice order."""
    ggo = np.zeros((12, 8, 8), dtype=bool)
    for index, count in {1: 3, 4: 9, 7: 5, 9: 1, 10: 5}.items():
        ggo[index].flat[:count] = True
    assert select_overlay_slices(ggo, max_tiles=3) == (4, 7, 10)
    assert select_overlay_slices(ggo, max_tiles=9) == (1, 4, 7, 9, 10)


def test_without_ggo_selects_evenly_spaced_slices() -> None:
    """A GGO-free series shows evenly spaced slices, first and last included."""
    ggo = np.zeros((30, 4, 4), dtype=bool)
    chosen = select_overlay_slices(ggo, max_tiles=9)
    assert len(chosen) == 9
    assert chosen[0] == 0 and chosen[-1] == 29
    assert select_overlay_slices(np.zeros((2, 4, 4), dtype=bool), max_tiles=9) == (0, 1)
    with pytest.raises(ValueError, match="max_tiles must be at least 1"):
        select_overlay_slices(ggo, max_tiles=0)


def test_full_resolution_tile_is_red_exactly_on_the_mask(
    tmp_path: Path, lung_volume: CtVolume
) -> None:
    """With one native-size tile, red pixels coincide with the mask, pixel for pixel."""
    ggo = _mask(lung_volume, {12: 60})
    ggo[12, 200:203, 300:310] = True  # an irregular extra patch
    path = write_overlay(
        lung_volume,
        ggo,
        tmp_path / "overlay.png",
        max_tiles=1,
        tile_px=512,
        window_center_hu=CENTER_HU,
        window_width_hu=WIDTH_HU,
    )
    rgb = _decode(path)
    rows, cols = ggo.shape[1:]
    assert rgb.shape == (CAPTION_PX + LABEL_PX + rows + GAP_PX, GAP_PX + cols + GAP_PX, 3)
    top, left = _tile_origin(0, 1, cols, rows)
    red = _red(rgb)
    np.testing.assert_array_equal(red[top : top + rows, left : left + cols], ggo[12])
    red[top : top + rows, left : left + cols] = False
    assert not red.any()  # no red in labels, caption or gaps


def test_montage_has_one_downscaled_tile_per_chosen_slice(
    tmp_path: Path, lung_volume: CtVolume
) -> None:
    """Eleven GGO slices give a 3 x 3 grid of 256 px tiles, red inside each blob only."""
    sizes = {i: 40 + 4 * i for i in range(5, 16)}
    ggo = _mask(lung_volume, sizes)
    chosen = select_overlay_slices(ggo, max_tiles=9)
    assert chosen == tuple(range(7, 16))
    path = write_overlay(
        lung_volume,
        ggo,
        tmp_path / "overlay.png",
        window_center_hu=CENTER_HU,
        window_width_hu=WIDTH_HU,
    )
    rgb = _decode(path)
    tile = 256
    grid = math.ceil(math.sqrt(len(chosen)))
    assert rgb.shape[:2] == (
        CAPTION_PX + grid * (LABEL_PX + tile + GAP_PX),
        GAP_PX + grid * (tile + GAP_PX),
    )
    red = _red(rgb)
    scale = tile / 512
    for position, index in enumerate(chosen):
        top, left = _tile_origin(position, grid, tile, tile)
        tile_red = red[top : top + tile, left : left + tile]
        r0, c0 = round(512 // 3 * scale), round(512 // 4 * scale)
        side = round(sizes[index] * scale)
        # the blob interior is red, everything away from it is not
        assert tile_red[r0 + 2 : r0 + side - 2, c0 + 2 : c0 + side - 2].all()
        outside = tile_red.copy()
        outside[r0 - 2 : r0 + side + 2, c0 - 2 : c0 + side + 2] = False
        assert not outside.any()


def test_ggo_free_series_gives_grey_montage_without_red(
    tmp_path: Path, lung_volume: CtVolume
) -> None:
    """No GGO: evenly spaced tiles, no red pixel anywhere."""
    ggo = np.zeros(lung_volume.hu.shape, dtype=bool)
    path = write_overlay(
        lung_volume,
        ggo,
        tmp_path / "overlay.png",
        window_center_hu=CENTER_HU,
        window_width_hu=WIDTH_HU,
    )
    rgb = _decode(path)
    assert rgb.shape[:2] == (CAPTION_PX + 3 * (LABEL_PX + 256 + GAP_PX), GAP_PX + 3 * 260)
    assert not _red(rgb).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png"]


def test_png_carries_no_patient_identifiers(tmp_path: Path, lung_volume: CtVolume) -> None:
    """No PatientName/PatientID in the PNG's bytes or text chunks."""
    path = write_overlay(
        lung_volume,
        _mask(lung_volume, {3: 30}),
        tmp_path / "overlay.png",
        window_center_hu=CENTER_HU,
        window_width_hu=WIDTH_HU,
    )
    data = path.read_bytes()
    source = lung_volume.datasets[0]
    for keyword in ("PatientName", "PatientID"):
        assert str(source[keyword].value).encode() not in data
    with Image.open(path) as image:
        assert not getattr(image, "text", {})


def test_slice_pngs_only_for_ggo_slices_with_one_based_names(
    tmp_path: Path, lung_volume: CtVolume
) -> None:
    """--png all: one full-resolution PNG per GGO slice, slice_NNNN.png with k 1-based."""
    ggo = _mask(lung_volume, {0: 20, 12: 50, 29: 10})
    paths = write_slice_pngs(
        lung_volume, ggo, tmp_path / "slices", window_center_hu=CENTER_HU, window_width_hu=WIDTH_HU
    )
    assert [p.name for p in paths] == ["slice_0001.png", "slice_0013.png", "slice_0030.png"]
    assert sorted(p.name for p in (tmp_path / "slices").iterdir()) == [p.name for p in paths]
    rgb = _decode(paths[1])
    rows, cols = ggo.shape[1:]
    assert rgb.shape == (LABEL_PX + rows, cols, 3)
    np.testing.assert_array_equal(_red(rgb)[LABEL_PX:], ggo[12])
    assert not _red(rgb)[:LABEL_PX].any()


def test_slice_pngs_none_when_no_ggo(tmp_path: Path, dcmqi_volume: CtVolume) -> None:
    """No GGO, no per-slice PNGs (and no folder)."""
    ggo = np.zeros(dcmqi_volume.hu.shape, dtype=bool)
    assert (
        write_slice_pngs(
            dcmqi_volume,
            ggo,
            tmp_path / "slices",
            window_center_hu=CENTER_HU,
            window_width_hu=WIDTH_HU,
        )
        == []
    )
    assert not (tmp_path / "slices").exists()


def test_mask_must_match_the_volume(tmp_path: Path, dcmqi_volume: CtVolume) -> None:
    """A mask of another shape is refused before anything is written."""
    with pytest.raises(ValueError, match="GGO mask must be bool"):
        write_overlay(
            dcmqi_volume,
            np.zeros((2, 4, 4), dtype=bool),
            tmp_path / "o.png",
            window_center_hu=CENTER_HU,
            window_width_hu=WIDTH_HU,
        )
    assert not (tmp_path / "o.png").exists()
