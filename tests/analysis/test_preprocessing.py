"""Lung window, letterbox resize and its inverse (shared with training)."""

from __future__ import annotations

import numpy as np
import pytest

from ggo_cli.analysis.preprocessing import (
    GridMapping,
    bilinear_matrix,
    preprocess_hu,
    sigmoid,
    to_model_grid,
    to_source_grid,
    window_hu,
)


def test_window_maps_edges_to_zero_and_one() -> None:
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    out = window_hu(hu, center_hu=-600, width_hu=1500)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def test_window_rejects_non_positive_width() -> None:
    with pytest.raises(ValueError, match="window width must be positive"):
        window_hu(np.zeros(3), width_hu=0)


def test_bilinear_matrix_rows_sum_to_one_and_identity_at_same_size() -> None:
    m = bilinear_matrix(7, 13)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(bilinear_matrix(9, 9), np.eye(9, dtype=np.float32))


def test_bilinear_matches_half_pixel_reference() -> None:
    # Half-pixel convention: output pixel i samples input at (i + 0.5) * n_in / n_out - 0.5.
    signal = np.arange(4, dtype=np.float32)
    up = bilinear_matrix(4, 8) @ signal
    np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0], atol=1e-6)


def test_identity_grid_returns_input_unchanged() -> None:
    images = np.random.default_rng(0).random((2, 64, 64), dtype=np.float32)
    assert to_model_grid(images, 64) is images
    assert to_source_grid(images, 64, 64) is images


def test_non_square_round_trip_keeps_a_square_in_place() -> None:
    rows, cols, size = 40, 70, 64
    image = np.zeros((1, rows, cols), dtype=np.float32)
    image[0, 10:30, 20:45] = 1.0
    model_grid = to_model_grid(image, size)
    assert model_grid.shape == (1, size, size)
    back = to_source_grid(model_grid, rows, cols)
    assert back.shape == (1, rows, cols)
    mask = back[0] > 0.5
    assert (mask == (image[0] > 0.5)).mean() > 0.98
    # The letterbox pads rows (the short side) above and below: the top model rows are empty.
    mapping = GridMapping(rows, cols, size)
    assert mapping.row_offset == 15 and mapping.col_offset == 0
    assert model_grid[0, :5].max() == 0.0


def test_preprocess_shapes_batch_for_the_model() -> None:
    hu = np.full((3, 32, 32), -600.0, dtype=np.float32)
    batch = preprocess_hu(hu, size=64)
    assert batch.shape == (3, 1, 64, 64)
    np.testing.assert_allclose(batch, 0.5, atol=1e-6)


def test_sigmoid_is_stable_at_extremes() -> None:
    out = sigmoid(np.array([-1e4, 0.0, 1e4], dtype=np.float32))
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0], atol=1e-7)
