"""Lung masks from density alone: volumes, laterality, dense lesions, GGO per lung."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from ggo_cli.analysis.lungs import LungMasks, segment_lungs
from ggo_cli.analysis.masks import keep_inside_lungs
from ggo_cli.analysis.measurements import lung_measurements
from ggo_cli.config import SelectionRules
from ggo_cli.dicom.discovery import discover_series
from ggo_cli.dicom.volume import load_volume
from ggo_cli.domain import CtVolume, Prediction, SeriesInfo
from ggo_cli.errors import UnsupportedSeriesError
from ggo_cli.synthetic.anatomy import LUNG_APEX, LUNG_BASE
from ggo_cli.synthetic.phantom import Phantom, make_chest_phantom
from tests.dicom_factory import make_ct_series
from tests.phantoms import make_cube_phantom
from tests.shared_data import DCMQI_CT, require_shared

# A whole adult chest at a coarse grid (36 x 36 cm field of view, 30 cm long): fast to segment.
SHAPE = (40, 256, 256)
SPACING_MM = (7.5, 1.4, 1.4)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CONSOLIDATION_HU = 40.0
VOLUME_TOLERANCE = 0.03


def _volume(hu: npt.ArrayLike, spacing_mm: tuple[float, float, float], *,
            orientation: tuple[float, ...] = AXIAL) -> CtVolume:
    """A CtVolume of an array in patient order, with the headers lung laterality needs."""
    array = np.asarray(hu, dtype=np.float32)
    headers = []
    for k in range(array.shape[0]):
        ds = Dataset()
        ds.ImageOrientationPatient = list(orientation)
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


def _mm_grid(phantom: Phantom) -> tuple[npt.NDArray[np.float64], ...]:
    """Voxel-centre coordinates (z, y, x) in mm about the volume centre, broadcastable."""
    return tuple(
        ((np.arange(n) - (n - 1) / 2.0) * s).reshape([-1 if i == j else 1 for j in range(3)])
        for i, (n, s) in enumerate(zip(phantom.hu.shape, phantom.spacing_mm, strict=True)))


def _lung_height_mm(phantom: Phantom, fraction: float) -> float:
    """z in mm at a fraction of the phantom's lung height (0 base, 1 apex; see anatomy.py)."""
    length = phantom.hu.shape[0] * phantom.spacing_mm[0]
    return float((fraction * (LUNG_APEX - LUNG_BASE) + LUNG_BASE - 0.5) * length)


@pytest.fixture(scope="module")
def chest() -> Phantom:
    """A noisy chest phantom with GGO."""
    return make_chest_phantom(SHAPE, SPACING_MM, seed=3)


@pytest.fixture(scope="module")
def chest_lungs(chest: Phantom) -> LungMasks:
    """The lungs segmented from ``chest``."""
    return segment_lungs(_volume(chest.hu, chest.spacing_mm))


@pytest.mark.parametrize(("shape", "spacing_mm", "seed"), [
    (SHAPE, SPACING_MM, 3),
    ((60, 512, 512), (5.0, 0.7, 0.7), 0),  # the demo's default grid
], ids=["coarse", "demo-grid"])
def test_chest_phantom_lung_volumes_are_within_3_percent_of_the_truth(
        shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], seed: int) -> None:
    phantom = make_chest_phantom(shape, spacing_mm, seed=seed)
    lungs = segment_lungs(_volume(phantom.hu, phantom.spacing_mm))
    for found, truth in ((lungs.right, phantom.lung_right_mask),
                         (lungs.left, phantom.lung_left_mask)):
        assert np.count_nonzero(found) == pytest.approx(np.count_nonzero(truth),
                                                        rel=VOLUME_TOLERANCE)
        assert _dice(found, truth) > 0.97
    assert not np.any(lungs.right & lungs.left)


def test_cube_phantom_lungs_are_found_exactly() -> None:
    # One block of lung density: the merged pair is cut at the column that halves it.
    phantom = make_cube_phantom((20, 128, 128), (5.0, 1.4, 1.4))
    lungs = segment_lungs(_volume(phantom.hu, phantom.spacing_mm))
    np.testing.assert_array_equal(lungs.right, phantom.lung_right_mask)
    np.testing.assert_array_equal(lungs.left, phantom.lung_left_mask)


def test_right_lung_is_the_patients_right_at_low_columns(chest: Phantom,
                                                         chest_lungs: LungMasks) -> None:
    assert _dice(chest_lungs.right, chest.lung_right_mask) > 0.97
    assert _dice(chest_lungs.left, chest.lung_left_mask) > 0.97


def test_trachea_and_main_bronchi_are_not_lung(chest: Phantom, chest_lungs: LungMasks) -> None:
    z, y, x = _mm_grid(chest)
    air_outside_lungs = (chest.hu < -900) & ~chest.lung_mask & (np.abs(x) < 30.0) & np.broadcast_to(
        z > _lung_height_mm(chest, 0.6), chest.hu.shape)
    assert np.count_nonzero(air_outside_lungs) > 100  # the phantom's airway lumen
    assert not np.any(chest_lungs.both & air_outside_lungs)


def test_dense_lesions_on_the_chest_wall_stay_inside_their_lung() -> None:
    phantom = make_chest_phantom(SHAPE, SPACING_MM, seed=1)
    z, y, x = _mm_grid(phantom)
    half_x = phantom.hu.shape[2] * phantom.spacing_mm[2] / 2.0
    half_y = phantom.hu.shape[1] * phantom.spacing_mm[1] / 2.0
    level = np.abs(z - _lung_height_mm(phantom, 0.5)) <= 15.0
    # 3 x 4 x 3.5 cm on the lateral wall of the right lung; 5 x 3.5 x 3 cm on the posterior
    # wall of the left lung: consolidation at +40 HU, far above the -320 HU lung threshold.
    lateral = level & (np.abs(y) <= 20.0) & (x < -0.70 * half_x + 35.0) & phantom.lung_right_mask
    posterior = (level & (np.abs(x - 0.39 * half_x) <= 25.0) & (y > 0.41 * half_y - 35.0)
                 & phantom.lung_left_mask)
    hu = np.array(phantom.hu, dtype=np.float32)
    hu[lateral | posterior] = CONSOLIDATION_HU
    lungs = segment_lungs(_volume(hu, phantom.spacing_mm))
    assert np.count_nonzero(lateral & lungs.right) >= 0.9 * np.count_nonzero(lateral)
    assert np.count_nonzero(posterior & lungs.left) >= 0.9 * np.count_nonzero(posterior)
    for found, truth in ((lungs.right, phantom.lung_right_mask),
                         (lungs.left, phantom.lung_left_mask)):
        assert np.count_nonzero(found) == pytest.approx(np.count_nonzero(truth),
                                                        rel=VOLUME_TOLERANCE)


@pytest.mark.parametrize("thickness_mm", [3.0, 20.0])
def test_lungs_merged_at_the_anterior_junction_are_split(thickness_mm: float) -> None:
    phantom = make_chest_phantom(SHAPE, SPACING_MM, seed=3)
    z, y, x = _mm_grid(phantom)
    half_x = phantom.hu.shape[2] * phantom.spacing_mm[2] / 2.0
    half_y = phantom.hu.shape[1] * phantom.spacing_mm[1] / 2.0
    bridge = ((np.abs(z - _lung_height_mm(phantom, 0.6)) <= 12.0)
              & (np.abs(y + 0.28 * half_y) <= thickness_mm / 2.0) & (np.abs(x) < 0.3 * half_x))
    hu = np.array(phantom.hu, dtype=np.float32)
    hu[bridge & ~phantom.lung_mask] = -850.0  # aerated lung across the mediastinum
    lungs = segment_lungs(_volume(hu, phantom.spacing_mm))
    assert _dice(lungs.right, phantom.lung_right_mask) > 0.97
    assert _dice(lungs.left, phantom.lung_left_mask) > 0.97


@pytest.mark.parametrize(("flip_rows", "flip_columns"), [
    (True, False), (False, True), (True, True)], ids=["row-cosine-x", "column-cosine-y", "both"])
def test_laterality_follows_the_direction_cosines(tmp_path: Path, flip_rows: bool,
                                                  flip_columns: bool) -> None:
    phantom = make_chest_phantom((24, 128, 128), (12.5, 2.8, 2.8), seed=5)
    fs = make_ct_series(tmp_path, phantom=phantom, flip_rows=flip_rows,
                        flip_columns=flip_columns)
    (series,) = discover_series([fs.root]).eligible
    volume = load_volume(series)
    # The factory's loader order: stored pixels, slices ascending along the normal.
    stored = (slice(None), slice(None, None, -1 if flip_columns else 1),
              slice(None, None, -1 if flip_rows else 1))
    order = slice(None, None, -1 if flip_rows != flip_columns else 1)
    lungs = segment_lungs(volume)
    assert _dice(lungs.right, phantom.lung_right_mask[stored][order]) > 0.95
    assert _dice(lungs.left, phantom.lung_left_mask[stored][order]) > 0.95


def test_real_chest_ct_gives_two_plausible_lungs(real_ct_dir: Path) -> None:
    (series,) = discover_series([real_ct_dir]).eligible
    volume = load_volume(series)
    lungs = segment_lungs(volume)
    m = lung_measurements(lungs, np.zeros(volume.hu.shape, bool), volume.voxel_volume_ml)
    assert 1500.0 <= m.lung_volume_ml <= 8000.0
    assert min(m.left_lung_volume_ml, m.right_lung_volume_ml) >= m.lung_volume_ml / 4
    assert m.left_lung_volume_ml + m.right_lung_volume_ml == pytest.approx(m.lung_volume_ml)
    assert not np.any(lungs.right & lungs.left)
    # Aerated lung, apart from vessels and a tumour: no liver dome or mediastinum taken in.
    for lung in (lungs.right, lungs.left):
        assert np.count_nonzero(lung & (volume.hu >= -320.0)) <= 0.06 * np.count_nonzero(lung)
    # Row cosine [1, 0, 0]: the patient's right lies at the low column indices.
    cols = np.arange(volume.hu.shape[2])
    assert (np.count_nonzero(lungs.right, axis=(0, 1)) @ cols / np.count_nonzero(lungs.right)
            < np.count_nonzero(lungs.left, axis=(0, 1)) @ cols / np.count_nonzero(lungs.left))


def test_lung_bases_ringing_the_liver_dome_do_not_swallow_it() -> None:
    # Three real 1 mm slices through both bases: the lungs are thin crescents around the liver
    # and the stomach, which a slice-wise hole fill or a convex hull would take in.
    (series,) = discover_series(
        [require_shared(DCMQI_CT)], SelectionRules(min_slices=2)
    ).eligible
    volume = load_volume(series, SelectionRules(min_slices=2))
    lungs = segment_lungs(volume)
    m = lung_measurements(lungs, np.zeros(volume.hu.shape, bool), volume.voxel_volume_ml)
    assert min(m.left_lung_volume_ml, m.right_lung_volume_ml) >= 10.0
    dense = lungs.both & (volume.hu >= -320.0)
    assert np.count_nonzero(dense) <= 0.02 * np.count_nonzero(lungs.both)


def test_ggo_restricted_to_the_lungs_has_no_voxel_outside_them(chest: Phantom,
                                                               chest_lungs: LungMasks) -> None:
    ggo = chest.ggo_mask.copy()
    ggo[:, :10, :] = True  # false GGO in the air and the anterior chest wall
    kept = keep_inside_lungs(Prediction(masks=ggo[..., None], threshold=0.5), chest_lungs).ggo
    assert not np.any(kept & ~chest_lungs.both)
    assert np.count_nonzero(kept & chest.ggo_mask) >= 0.99 * np.count_nonzero(chest.ggo_mask)
    with pytest.raises(ValueError, match=r"masks \(2, 2, 2, 1\) do not match lung shapes"):
        keep_inside_lungs(Prediction(masks=np.zeros((2, 2, 2, 1), bool), threshold=0.5),
                          chest_lungs)


def test_a_volume_without_air_has_empty_lungs() -> None:
    lungs = segment_lungs(_volume(np.full((4, 32, 32), 40.0), (5.0, 1.0, 1.0)))
    assert not lungs.right.any() and not lungs.left.any()


def test_non_axial_series_and_missing_orientation_are_rejected() -> None:
    hu = np.full((4, 32, 32), -1000.0)
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    with pytest.raises(UnsupportedSeriesError, match="is not axial"):
        segment_lungs(_volume(hu, (5.0, 1.0, 1.0), orientation=sagittal))
    volume = _volume(hu, (5.0, 1.0, 1.0))
    for ds in volume.datasets:
        del ds.ImageOrientationPatient
    with pytest.raises(UnsupportedSeriesError, match="no ImageOrientationPatient"):
        segment_lungs(volume)


@pytest.mark.parametrize("slab", [1, 7, 64])
def test_slab_components_equal_one_3d_labelling(slab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import SimpleITK

    from ggo_cli.analysis import morphology

    monkeypatch.setattr(morphology, "SLAB_SLICES", slab)
    rng = np.random.default_rng(slab)
    mask = rng.random((90, 30, 30)) < 0.45  # near the percolation threshold: long components
    components = morphology.Components(lambda z: mask[z], mask.shape[0])
    full = SimpleITK.GetArrayFromImage(
        SimpleITK.ConnectedComponent(SimpleITK.GetImageFromArray(mask.view(np.uint8)), False)
    )
    sizes = np.bincount(full.ravel())[1:]
    assert list(components.sizes) == sorted(sizes.tolist(), reverse=True)
    for rank in range(3):
        chosen = components.mask(rank)
        labels = np.unique(full[chosen])
        assert labels.size == 1 and labels[0] > 0
        np.testing.assert_array_equal(chosen, full == labels[0])


def test_slab_components_touching_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    import SimpleITK

    from ggo_cli.analysis import morphology

    monkeypatch.setattr(morphology, "SLAB_SLICES", 5)
    rng = np.random.default_rng(9)
    mask = rng.random((40, 25, 25)) < 0.4
    seeds = mask & (rng.random(mask.shape) < 0.002)
    full = SimpleITK.GetArrayFromImage(
        SimpleITK.ConnectedComponent(SimpleITK.GetImageFromArray(mask.view(np.uint8)), False)
    )
    expected = np.isin(full, np.unique(full[seeds])) & mask
    got = morphology.Components(lambda z: mask[z], mask.shape[0]).touching(seeds)
    assert seeds.any() and got.any() and not got.all()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("lower", [True, False])
def test_hull_envelope_equals_the_plain_monotone_chain(lower: bool) -> None:
    """The envelope's whole-array pre-filter keeps exactly the vertices that Andrew's
    monotone chain finds on all the points (staircases, plateaus and collinear runs too)."""
    from ggo_cli.analysis.lung_refine import hull_envelope

    def chain(x: list[int], y: list[int]) -> tuple[list[float], list[float]]:
        sign = 1 if lower else -1
        hx: list[float] = []
        hy: list[float] = []
        for xi, yi in zip(x, y, strict=True):
            while len(hx) >= 2 and sign * (
                (hx[-1] - hx[-2]) * (yi - hy[-2]) - (hy[-1] - hy[-2]) * (xi - hx[-2])
            ) <= 0:
                hx.pop()
                hy.pop()
            hx.append(float(xi))
            hy.append(float(yi))
        return hx, hy

    rng = np.random.default_rng(4)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        x = np.sort(rng.choice(400, size=n, replace=False)).astype(np.int64)
        y = np.cumsum(rng.integers(-3, 4, size=n)).astype(np.int64) + 200
        if rng.random() < 0.3:
            y = 2 * x + 7  # one straight line
        assert hull_envelope(x, y, lower=lower) == chain(x.tolist(), y.tolist())


def test_body_holes_filled_in_each_slices_box_equal_a_whole_slice_fill() -> None:
    """The body's holes are filled within each slice's box: the same as on the whole slice,
    with the body touching the image's edge, a hole, and a bay open to the outside."""
    import SimpleITK as sitk

    from ggo_cli.analysis import lungs, morphology

    hu = np.full((3, 40, 50), -1000.0, dtype=np.float32)
    hu[0, 5:30, 8:40] = 40.0  # a body with a closed hole (filled) ...
    hu[0, 10:15, 12:20] = -1000.0
    hu[0, 18:30, 25:30] = -1000.0  # ... and a bay reaching its box's edge (stays open)
    hu[1, 0:40, 0:20] = 40.0  # touching three image edges, with a hole by the edge
    hu[1, 1:3, 5:9] = -1000.0
    hu[1, 10:20, 0:4] = -1000.0  # a notch open at the image's edge (stays open)
    hu[2, 10:30, 10:40] = 40.0  # a ring: its inside is a hole
    hu[2, 14:26, 14:36] = -1000.0
    hu[:, 20, 20] = 40.0  # one body through all slices
    body = lungs._body(np.less(hu, np.float32(-320.0)), cores=2)
    for k in range(hu.shape[0]):
        whole = np.greater_equal(hu[k], -320.0)
        filled = morphology.to_mask(sitk.BinaryFillhole(morphology.to_image(whole)))
        np.testing.assert_array_equal(body[k], filled, err_msg=f"slice {k}")
    assert body[0, 12, 15] and not body[0, 25, 27] and body[1, 2, 6] and not body[1, 15, 1]
    assert body[2, 20, 25]


def test_holes_filled_slice_by_slice_in_blocks_equal_a_2d_fill_of_each_slice() -> None:
    """Blocks of slices filled as one framed tall image: regions touching a slice's edge
    (also its first or last row, next to the neighbouring slice) stay open, per slice."""
    import SimpleITK as sitk

    from ggo_cli.analysis import lungs, morphology

    rng = np.random.default_rng(3)
    mask = rng.random((lungs.BODY_FILL_SLICES * 2 + 5, 30, 40)) < 0.6
    mask[:, 0, :] = rng.random((mask.shape[0], 40)) < 0.5  # gaps on the slices' edges
    expected = np.stack([morphology.to_mask(sitk.BinaryFillhole(morphology.to_image(s)))
                         for s in mask])
    filled = mask.copy()
    lungs._fill_slice_holes(filled, cores=2)
    assert np.count_nonzero(expected & ~mask) > 100
    np.testing.assert_array_equal(filled, expected)


@pytest.mark.parametrize("slab", [3, 64])
def test_3d_holes_filled_slab_by_slab_equal_simpleitks_fill(
        slab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import SimpleITK as sitk

    from ggo_cli.analysis import morphology

    monkeypatch.setattr(morphology, "SLAB_SLICES", slab)
    rng = np.random.default_rng(slab)
    mask = rng.random((20, 24, 28)) < 0.62  # holes everywhere, some open at the faces
    expected = morphology.to_mask(sitk.BinaryFillhole(morphology.to_image(mask)))
    assert np.count_nonzero(expected & ~mask) > 50
    np.testing.assert_array_equal(morphology.fill_holes(mask), expected)


def test_chest_wall_bites_of_a_block_equal_those_of_each_slice_alone() -> None:
    """The bites of a block's slices, labelled together, are each slice's own."""
    from ggo_cli.analysis.lung_refine import _bites

    rng = np.random.default_rng(5)
    rows, cols = np.ogrid[:60, :50]
    block = np.zeros((12, 60, 50), dtype=np.bool_)
    for k in range(1, 12):  # discs with random bites out of their rims; slice 0 empty
        radius = 18 + k % 4
        disc = (rows - 30) ** 2 + (cols - 25) ** 2 <= radius**2
        for _ in range(4):
            r, c = rng.integers(8, 52), rng.integers(6, 44)
            disc &= (rows - r) ** 2 + (cols - c) ** 2 > 25
        block[k] = disc
    together = _bites(block, (1.0, 0.7, 0.7), medial_sign=1.0)
    alone = np.concatenate([_bites(block[k : k + 1], (1.0, 0.7, 0.7), medial_sign=1.0)
                            for k in range(block.shape[0])])
    assert together.any()
    np.testing.assert_array_equal(together, alone)
