"""The lung mask's coarse grid: pooling, cell HU, expansion, dilation and painting back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ggo_cli.analysis import lung_coarse as coarse

THRESHOLD = np.float32(-320.0)


def _cell_blocks(shape: tuple[int, ...], factors: list[int]) -> (
    itertools.product[tuple[int, ...]]
):
    """Every cell index of the coarse grid."""
    return itertools.product(*(range(n) for n in coarse.cell_shape(shape, factors)))


def _block(index: tuple[int, ...], factors: list[int]) -> tuple[slice, ...]:
    """The source voxels of one cell (clipped by numpy at the volume's end)."""
    return tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors, strict=True))


@pytest.mark.parametrize("factors", [[2, 2, 2], [1, 2, 3], [3, 1, 2]])
def test_air_counts_and_cell_hu_match_each_cells_voxels(factors: list[int]) -> None:
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 100, size=(coarse.CELL_SLABS * factors[0] + 5, 13, 11),
                      dtype=np.int16)
    counts = coarse.air_counts(hu, THRESHOLD, factors)
    assert counts.shape == coarse.cell_shape(hu.shape, factors)
    for index in _cell_blocks(hu.shape, factors):
        voxels = hu[_block(index, factors)]
        assert counts[index] == np.count_nonzero(voxels < THRESHOLD)  # edge cells: voxels inside
    rows, cols = slice(1, 5), slice(0, counts.shape[2])
    for k in (0, counts.shape[0] - 1):
        means = coarse.cell_hu(hu, k, factors, rows, cols)
        assert means.shape == (4, counts.shape[2])
        for j, i in np.ndindex(means.shape):
            voxels = hu[_block((k, rows.start + j, i), factors)]
            assert means[j, i] == pytest.approx(float(voxels.mean()))


@pytest.mark.parametrize("factors", [[1, 1, 1], [2, 2, 2], [1, 3, 4], [2, 1, 3]])
def test_expanded_cells_cover_their_voxels(factors: list[int]) -> None:
    cells = np.random.default_rng(2).integers(0, 5, size=(3, 4, 5), dtype=np.uint8)
    expected = cells
    for axis, f in enumerate(factors):
        expected = np.repeat(expected, f, axis=axis)
    np.testing.assert_array_equal(coarse.expand_cells(cells, factors), expected)


def test_cell_dilation_is_the_3x3x3_cube() -> None:
    mask = np.random.default_rng(3).random((6, 7, 8)) < 0.05
    padded = np.pad(mask, 1)
    expected = np.zeros_like(mask)
    for dz, dy, dx in itertools.product(range(3), repeat=3):
        expected |= padded[dz : dz + 6, dy : dy + 7, dx : dx + 8]
    np.testing.assert_array_equal(coarse.dilate_cells(mask), expected)


def test_painted_lungs_take_whole_cells_inside_and_air_voxels_at_their_edge() -> None:
    factors = [1, 2, 2]
    # A block lung of 6 x 6 x 6 cells inside 12 x 12 x 12 cells; a cell added by the
    # refinement on its face; the other lung far away.
    shape = (12, 24, 24)
    hu = np.full(shape, 40, dtype=np.int16)
    hu[3:9, 6:18, 6:18] = -850  # the lung's cells ...
    hu[3:9, 18, 6:18] = -850  # ... and one row of air voxels in the next cells
    hu[5, 8, 8] = 40  # a vessel voxel inside the lung
    hu[3, 6, 6] = 40  # tissue in a cell on the lung's edge
    hu[4:8, 8:16, 22:24] = -850  # the other lung: one cell thick, all of it its edge
    lung = np.zeros((12, 12, 12), dtype=np.bool_)
    lung[3:9, 3:9, 3:9] = True
    refined = lung.copy()
    refined[5, 2, 5] = True  # added by the closing: dense, next to the lung
    other = np.zeros_like(lung)
    other[4:8, 4:8, 11] = True
    allowed = np.ones_like(lung)
    code = coarse.cell_codes((lung, other), (refined, other), allowed)
    box = (slice(0, 12), slice(0, 12), slice(0, 12))
    low = np.zeros(shape, dtype=np.bool_)
    high = np.zeros(shape, dtype=np.bool_)
    coarse.paint(low, high, hu, THRESHOLD, factors, box, code)
    assert low[5, 8, 8]  # an inner cell is lung whole: the vessel voxel too
    assert not low[3, 6, 6]  # in an edge cell the threshold decides
    assert low[5, 4:6, 10:12].all()  # the refinement's cell, whole
    assert low[3:9, 18, 6:18].all()  # air voxels in the cells next to the lung
    assert not low[3:9, 19, 6:18].any()  # their dense voxels are not
    assert not low[:, :, 20:].any()  # nor anything near the other lung
    assert np.count_nonzero(low) == 6 * 12 * 12 - 1 + 6 * 12 + 4  # cells, air rim, added cell
    assert high[4:8, 8:16, 22:24].all()
    assert np.count_nonzero(high) == 4 * 8 * 2
