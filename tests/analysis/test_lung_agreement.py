"""The lung mask's coarse-grid closing agrees with the exact closing on the source grid.

Issue 18: the closing of step 5 runs on a grid of cells up to ``COARSE_CELL_MM`` (a
``segment_lungs(..., exact=True)`` call keeps today's closing on the source grid as the
reference). Agreement: each lung's Dice >= 0.99 and volume within 1 % of the exact method's,
on the shared real series and on phantoms whose grid the coarse closing pools, and phantom
volumes still within 3 % of their truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from ggo_cli.analysis import morphology as morph
from ggo_cli.analysis.lung_refine import CLOSING_RADIUS_MM, close_ball
from ggo_cli.analysis.lungs import LungMasks, segment_lungs
from ggo_cli.dicom.discovery import discover_series
from ggo_cli.dicom.volume import load_volume
from ggo_cli.domain import CtVolume, SeriesInfo
from ggo_cli.synthetic.phantom import make_chest_phantom

MIN_DICE = 0.99
VOLUME_AGREEMENT = 0.01
VOLUME_TOLERANCE = 0.03  # against the phantom's truth, as in test_lungs.py


def _volume(hu: npt.ArrayLike, spacing_mm: tuple[float, float, float]) -> CtVolume:
    """A CtVolume of an axial array in patient order, with the headers laterality needs."""
    array = np.asarray(hu, dtype=np.float32)
    headers = []
    for k in range(array.shape[0]):
        ds = Dataset()
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing_mm[0]]
        headers.append(ds)
    series = SeriesInfo(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", files=(),
                        location="synthetic")
    return CtVolume(series=series, hu=array, datasets=tuple(headers),
                    slice_spacing_mm=spacing_mm[0], pixel_spacing_mm=spacing_mm[1:])


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Dice overlap of two masks."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(a & b)) / max(total, 1)


def _assert_agree(coarse: LungMasks, exact: LungMasks) -> None:
    """Each lung's Dice and volume within the issue's agreement."""
    for found, reference in ((coarse.right, exact.right), (coarse.left, exact.left)):
        assert np.count_nonzero(reference) > 0
        assert _dice(found, reference) >= MIN_DICE
        assert np.count_nonzero(found) == pytest.approx(np.count_nonzero(reference),
                                                        rel=VOLUME_AGREEMENT)
    assert not np.any(coarse.right & coarse.left)


def test_real_series_lungs_agree_with_the_exact_closing(real_ct_dir: Path) -> None:
    # 8 mm slices of 0.65 mm pixels: the closing pools 2 x 2 pixels, never slices.
    volume = load_volume(discover_series([real_ct_dir]).eligible[0])
    _assert_agree(segment_lungs(volume), segment_lungs(volume, exact=True))


@pytest.mark.parametrize(("shape", "spacing_mm"), [
    ((60, 512, 512), (5.0, 0.7, 0.7)),  # the demo's grid: 2 x 2 pixels a cell
    ((150, 192, 192), (0.8, 1.9, 1.9)),  # thin slices: 2 slices a cell
], ids=["demo-grid", "thin-slices"])
def test_phantom_lungs_agree_with_the_exact_closing_and_the_truth(
        shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> None:
    phantom = make_chest_phantom(shape, spacing_mm, seed=2)
    volume = _volume(phantom.hu, phantom.spacing_mm)
    coarse = segment_lungs(volume)
    _assert_agree(coarse, segment_lungs(volume, exact=True))
    for found, truth in ((coarse.right, phantom.lung_right_mask),
                         (coarse.left, phantom.lung_left_mask)):
        assert np.count_nonzero(found) == pytest.approx(np.count_nonzero(truth),
                                                        rel=VOLUME_TOLERANCE)


def _notched_block(spacing: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    """A block with a 6 mm notch in one face and 20 mm of background around it."""
    size_mm, notch_mm, margin_mm = 60.0, 6.0, 20.0
    shape = tuple(int(round((size_mm + 2 * margin_mm) / s)) for s in spacing)
    centres = [(np.arange(n) + 0.5) * s - margin_mm - size_mm / 2 for n, s in
               zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*centres, indexing="ij", sparse=True)
    block = (np.abs(z) <= size_mm / 2) & (np.abs(y) <= size_mm / 2) & (np.abs(x) <= size_mm / 2)
    notch = (np.abs(z) <= notch_mm / 2) & (np.abs(x) <= notch_mm / 2) & (y > 0)
    return np.asarray(block & ~notch)


def test_coarse_closing_fills_a_notch_and_adds_almost_nothing_the_exact_one_does_not() -> None:
    spacing = (0.8, 0.7, 0.7)
    block = _notched_block(spacing)
    exact = close_ball(block, spacing, exact=True) | block
    coarse = close_ball(block, spacing) | block
    # The 6 x 6 x 30 mm notch is narrower than the ball: the exact closing fills it.
    notch_voxels = 6.0 * 6.0 * 30.0 / float(np.prod(spacing))
    assert 2 * CLOSING_RADIUS_MM > 6.0
    assert np.count_nonzero(exact & ~block) > 0.9 * notch_voxels
    assert np.count_nonzero(coarse & ~block) > 0.9 * notch_voxels
    # Conservative but for rounding: where the cells' ball ends off a voxel centre (5 of
    # 2650 voxels here), never a layer over the block's faces.
    assert np.count_nonzero(coarse & ~exact) <= 0.01 * np.count_nonzero(exact & ~block)


def test_pooled_cells_hold_only_whole_voxels_and_expand_back_onto_the_grid() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9, 10)) < 0.8
    factors = [2, 3, 1]
    cells = morph.pool_all(mask, factors)
    assert cells.shape == (4, 3, 10)
    for index in np.ndindex(cells.shape):
        block = mask[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors,
                                                                      strict=True))]
        # cells past the array's end count as False
        whole = block.shape == tuple(factors)
        assert cells[index] == (whole and bool(block.all()))
    painted = morph.expand(cells, factors, mask.shape)
    assert painted.shape == mask.shape
    assert not np.any(painted & ~mask)
    np.testing.assert_array_equal(painted[::2, ::3][:3, :3], cells[:3, :3])
