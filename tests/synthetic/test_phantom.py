"""The synthetic chest phantom (its DICOM writer and transcoder: test_ct_writer.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ggo_cli.synthetic.anatomy import AIR_HU, CORTICAL_BONE_HU, FAT_HU, LUNG_HU
from ggo_cli.synthetic.phantom import GGO_HU_RANGE, GgoLesion, Phantom, make_chest_phantom
from tests.phantoms import make_cube_phantom
from tests.synthetic.chest_grid import SHAPE, SMALL_SHAPE, SMALL_SPACING_MM, SPACING_MM


@pytest.fixture(scope="module")
def clean_chest() -> Phantom:
    """The same chest without noise (exact tissue values)."""
    return make_chest_phantom(SHAPE, SPACING_MM, seed=7, noise_sd_hu=0.0)


def test_same_seed_gives_identical_phantoms_and_another_seed_does_not() -> None:
    a = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, seed=3)
    b = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, seed=3)
    c = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, seed=4)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.ggo_mask, b.ggo_mask)
    assert a.lesions == b.lesions
    assert not np.array_equal(a.hu, c.hu)


def test_phantom_arrays_are_read_only_and_shaped(chest: Phantom) -> None:
    for array in (chest.hu, chest.ggo_mask, chest.lung_right_mask, chest.lung_left_mask):
        assert array.shape == SHAPE
        assert not array.flags.writeable
    assert chest.hu.dtype == np.int16
    assert chest.spacing_mm == SPACING_MM


def test_noise_free_phantom_holds_the_expected_tissues(clean_chest: Phantom) -> None:
    values = set(np.unique(clean_chest.hu).tolist())
    for tissue_hu in (AIR_HU, FAT_HU, CORTICAL_BONE_HU):
        assert tissue_hu in values
    assert clean_chest.hu.min() >= -1024
    assert clean_chest.hu.max() <= int(CORTICAL_BONE_HU)


def test_hu_ranges_of_air_lung_and_noise(chest: Phantom) -> None:
    corner = chest.hu[:, :8, :8].astype(float)
    assert abs(np.median(corner) - AIR_HU) < 5
    assert 14 < corner.std() < 22  # Gaussian noise of about 18 HU
    parenchyma = chest.hu[chest.lung_mask & ~chest.ggo_mask]
    assert abs(np.median(parenchyma) - LUNG_HU) < 40
    assert (chest.hu > 500).sum() > 100  # ribs and spine


def test_lungs_lie_inside_the_body_on_their_own_sides(chest: Phantom) -> None:
    right, left = chest.lung_right_mask, chest.lung_left_mask
    assert right.any() and left.any() and not (right & left).any()
    cols = np.arange(SHAPE[2])
    assert (right * cols).sum() / right.sum() < SHAPE[2] / 2 < (left * cols).sum() / left.sum()
    assert chest.lung_right_volume_ml > chest.lung_left_volume_ml  # the heart sits left
    for k in range(SHAPE[0]):
        lung = chest.lung_mask[k]
        if not lung.any():
            continue
        body_rows, body_cols = np.nonzero(chest.hu[k] > -300)
        rows, cols_k = np.nonzero(lung)
        assert body_rows.min() < rows.min() and rows.max() < body_rows.max()
        assert body_cols.min() < cols_k.min() and cols_k.max() < body_cols.max()


def test_lungs_are_smaller_at_apex_and_base(chest: Phantom) -> None:
    area = chest.lung_mask.sum(axis=(1, 2))
    peak = int(np.argmax(area))
    assert 0 < peak < SHAPE[0] - 1
    assert area[0] < area[peak] / 2 and area[-1] < area[peak] / 2
    lung_slices = np.flatnonzero(area)
    assert area[lung_slices[-1]] < area[peak] / 3  # the apex narrows


def test_vessels_branch_inside_the_lungs(clean_chest: Phantom) -> None:
    lung = clean_chest.lung_mask
    vessel = lung & (clean_chest.hu > -200)
    assert 0.005 < vessel.sum() / lung.sum() < 0.2
    # Vessels reach several slices, not just the hilum.
    assert (vessel.sum(axis=(1, 2)) > 0).sum() >= SHAPE[0] // 3


def test_ggo_volume_is_mask_voxels_times_voxel_volume(chest: Phantom) -> None:
    voxel_ml = SPACING_MM[0] * SPACING_MM[1] * SPACING_MM[2] / 1000.0
    assert chest.voxel_volume_ml == pytest.approx(voxel_ml, rel=1e-12)
    assert chest.ggo_mask.sum() > 0
    assert chest.ggo_volume_ml == pytest.approx(chest.ggo_mask.sum() * voxel_ml, rel=1e-12)
    assert not (chest.ggo_mask & ~chest.lung_mask).any()
    assert chest.lung_right_volume_ml == pytest.approx(chest.lung_right_mask.sum() * voxel_ml)


def test_ggo_mask_is_exactly_where_density_was_raised(clean_chest: Phantom) -> None:
    without = make_chest_phantom(SHAPE, SPACING_MM, seed=7, noise_sd_hu=0.0, ggo_lesions=[])
    again = make_chest_phantom(SHAPE, SPACING_MM, seed=7, noise_sd_hu=0.0,
                               ggo_lesions=clean_chest.lesions)
    np.testing.assert_array_equal(again.ggo_mask, clean_chest.ggo_mask)
    raised = again.hu > without.hu
    np.testing.assert_array_equal(raised, again.ggo_mask)
    assert (again.hu >= without.hu).all()


def test_ggo_is_hazy_and_leaves_vessels_visible(clean_chest: Phantom) -> None:
    ggo = clean_chest.hu[clean_chest.ggo_mask].astype(float)
    edge_hu = LUNG_HU + 0.5 * (GGO_HU_RANGE[0] - LUNG_HU) - 60  # half the rise, minus gradient
    assert edge_hu < ggo.min()
    assert np.percentile(ggo, 80) <= GGO_HU_RANGE[1] + 1  # the rest: vessel fringes (< half)
    assert GGO_HU_RANGE[0] - 120 < np.median(ggo) < GGO_HU_RANGE[1]
    # Voxels at least half vessel keep vessel density and stay out of the mask.
    assert (clean_chest.lung_mask & (clean_chest.hu > -150)).any()
    assert not (clean_chest.ggo_mask & (clean_chest.hu > -150)).any()


def test_ggo_free_phantom_has_empty_mask() -> None:
    phantom = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, ggo_lesions=0)
    assert not phantom.ggo_mask.any()
    assert phantom.ggo_volume_ml == 0.0
    assert phantom.lesions == ()


def test_explicit_lesion_lands_at_its_centre_in_the_lung(clean_chest: Phantom) -> None:
    parenchyma = np.argwhere(clean_chest.lung_right_mask & (clean_chest.hu < -800))
    k, r, c = (int(v) for v in parenchyma[len(parenchyma) // 2])
    lesion = GgoLesion((k, r, c), radii_mm=(15.0, 12.0, 12.0), hu=-500.0)
    phantom = make_chest_phantom(SHAPE, SPACING_MM, seed=7, ggo_lesions=[lesion], noise_sd_hu=0)
    assert phantom.ggo_mask[k, r, c]
    assert -500 <= phantom.hu[k, r, c] < -450  # the plateau (a faint vessel fringe at most)
    assert phantom.lesions == (lesion,)


def test_cube_phantom_volume_is_exact() -> None:
    phantom = make_cube_phantom((12, 64, 64), (2.5, 0.7, 0.7), cube_voxels=(4, 8, 8))
    assert phantom.ggo_mask.sum() == 4 * 8 * 8
    assert phantom.ggo_volume_ml == pytest.approx(256 * 2.5 * 0.7 * 0.7 / 1000, abs=1e-12)
    assert not (phantom.ggo_mask & ~phantom.lung_right_mask).any()
    assert set(np.unique(phantom.hu[phantom.ggo_mask]).tolist()) == {-500}
    with pytest.raises(ValueError, match="does not fit"):
        make_cube_phantom((4, 16, 16), (1.0, 1.0, 1.0), cube_voxels=(8, 8, 8))


def test_phantom_rejects_bad_shape_and_lesions_lighter_than_lung() -> None:
    with pytest.raises(ValueError, match="3 positive values"):
        make_chest_phantom((0, 64, 64), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="must exceed -800.0 HU"):
        make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM,
                           ggo_lesions=[GgoLesion((1, 16, 8), (5.0, 5.0, 5.0), hu=-900.0)])


@pytest.mark.slow
def test_full_size_phantom_takes_under_two_seconds() -> None:
    start = time.perf_counter()
    phantom = make_chest_phantom()
    assert time.perf_counter() - start < 2.0
    assert phantom.hu.shape == (60, 512, 512)
    assert phantom.ggo_volume_ml > 1.0
