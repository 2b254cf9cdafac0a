"""The lung mask on the coarse grid agrees with the exact method on the source grid.

Issue 18: steps 2 to 5 of :func:`ggo_cli.analysis.lungs.segment_lungs` run on cells up to
``COARSE_CELL_MM`` and are painted back with the threshold deciding each lung's edge; a
``segment_lungs(..., exact=True)`` call keeps every step on the source grid as the
reference. Agreement: each lung's Dice >= 0.99 and volume within 1 % of the exact method's,
on the shared real series and on phantoms whose grid the cells pool, and phantom volumes
still within 3 % of their truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from ggo_cli.analysis.lung_coarse import coarse_factors
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


def _agree(found: npt.NDArray[np.bool_], reference: npt.NDArray[np.bool_]) -> bool:
    """Whether a lung is within the issue's agreement with its reference."""
    return bool(_dice(found, reference) >= MIN_DICE and abs(
        np.count_nonzero(found) / np.count_nonzero(reference) - 1.0) <= VOLUME_AGREEMENT)


def _assert_agree(coarse: LungMasks, exact: LungMasks) -> None:
    """Each lung's Dice and volume within the issue's agreement."""
    for found, reference in ((coarse.right, exact.right), (coarse.left, exact.left)):
        assert np.count_nonzero(reference) > 0
        assert _dice(found, reference) >= MIN_DICE
        assert np.count_nonzero(found) == pytest.approx(np.count_nonzero(reference),
                                                        rel=VOLUME_AGREEMENT)
    assert not np.any(coarse.right & coarse.left)


def test_real_series_lungs_agree_with_the_exact_method(real_ct_dir: Path) -> None:
    # 8 mm slices of 0.65 mm pixels: cells of 1 x 3 x 3 voxels.
    volume = load_volume(discover_series([real_ct_dir]).eligible[0])
    spacing = (volume.slice_spacing_mm, *volume.pixel_spacing_mm)
    assert coarse_factors(spacing) == [1, 3, 3]
    exact = segment_lungs(volume, exact=True)
    _assert_agree(segment_lungs(volume), exact)
    # The criterion catches a lung a voxel short all round in its slices (shifted boundary).
    for lung in (exact.right, exact.left):
        eroded = lung.copy()
        eroded[:, 1:-1, 1:-1] &= lung[:, :-2, 1:-1] & lung[:, 2:, 1:-1]
        eroded[:, 1:-1, 1:-1] &= lung[:, 1:-1, :-2] & lung[:, 1:-1, 2:]
        assert not _agree(eroded, lung)


@pytest.mark.parametrize(("shape", "spacing_mm", "factors"), [
    ((60, 512, 512), (5.0, 0.7, 0.7), [1, 3, 3]),  # the demo's grid
    ((150, 192, 192), (0.8, 1.9, 1.9), [2, 1, 1]),  # thin slices of coarse pixels
    ((160, 384, 384), (0.8, 0.7, 0.7), [2, 3, 3]),  # thin slices, as the benchmark's
], ids=["demo-grid", "thin-slices", "thin-everything"])
def test_phantom_lungs_agree_with_the_exact_method_and_the_truth(
        shape: tuple[int, int, int], spacing_mm: tuple[float, float, float],
        factors: list[int]) -> None:
    assert coarse_factors(spacing_mm) == factors
    phantom = make_chest_phantom(shape, spacing_mm, seed=2)
    volume = _volume(phantom.hu, phantom.spacing_mm)
    coarse = segment_lungs(volume)
    _assert_agree(coarse, segment_lungs(volume, exact=True))
    for found, truth in ((coarse.right, phantom.lung_right_mask),
                         (coarse.left, phantom.lung_left_mask)):
        assert np.count_nonzero(found) == pytest.approx(np.count_nonzero(truth),
                                                        rel=VOLUME_TOLERANCE)
