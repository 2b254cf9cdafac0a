"""Augmentation: image and mask move together, seeded, intensities stay in range."""

from __future__ import annotations

import dataclasses

import torch

from training.augment import Augmenter, jitter_intensity, random_affine, warp
from training.config import AugmentConfig

SIZE = 64


def _l_shape() -> tuple[torch.Tensor, torch.Tensor]:
    """An off-centre L (no symmetry, so a flip or turn of one but not the other shows)."""
    mask = torch.zeros(8, 1, SIZE, SIZE)
    mask[:, :, 10:40, 12:20] = 1.0
    mask[:, :, 32:40, 12:44] = 1.0
    image = 0.15 + 0.7 * mask
    return image, mask


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = (a.bool() & b.bool()).sum().item()
    union = (a.bool() | b.bool()).sum().item()
    return inter / union


def test_transformed_shape_stays_aligned_with_its_mask() -> None:
    image, mask = _l_shape()
    cfg = AugmentConfig(intensity_p=0.0, flip_p=0.5)
    aug_image, aug_mask = Augmenter(cfg, torch.device("cpu"), seed=3)(image, mask)
    assert not torch.equal(aug_mask, mask)  # something happened
    assert set(aug_mask.unique().tolist()) <= {0.0, 1.0}  # re-binarised
    for i in range(image.shape[0]):
        assert _iou(aug_image[i] > 0.5, aug_mask[i]) > 0.9


def test_alignment_survives_intensity_jitter() -> None:
    image, mask = _l_shape()
    aug_image, aug_mask = Augmenter(AugmentConfig(intensity_p=1.0), torch.device("cpu"), seed=5)(
        image, mask
    )
    assert aug_image.min() >= 0.0 and aug_image.max() <= 1.0
    for i in range(image.shape[0]):
        inside = aug_image[i][aug_mask[i] > 0].mean()
        outside = aug_image[i][aug_mask[i] == 0].mean()
        assert inside > outside + 0.3


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    image, mask = _l_shape()
    cfg = AugmentConfig()
    a = Augmenter(cfg, torch.device("cpu"), seed=1)(image, mask)
    b = Augmenter(cfg, torch.device("cpu"), seed=1)(image, mask)
    c = Augmenter(cfg, torch.device("cpu"), seed=2)(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_zero_ranges_are_the_identity() -> None:
    image, mask = _l_shape()
    cfg = AugmentConfig(
        rotation_deg=0, shift=0, shear_deg=0, zoom=(1.0, 1.0), flip_p=0.0, intensity_p=0.0
    )
    out_image, out_mask = Augmenter(cfg, torch.device("cpu"), seed=0)(image, mask)
    torch.testing.assert_close(out_image, image, atol=1e-5, rtol=0)
    assert torch.equal(out_mask, mask)


def test_flip_mirrors_left_right() -> None:
    image, mask = _l_shape()
    cfg = AugmentConfig(rotation_deg=0, shift=0, shear_deg=0, zoom=(1.0, 1.0), flip_p=1.0)
    theta = random_affine(8, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    out_image, out_mask = warp(image, mask, theta)
    assert torch.equal(out_mask, mask.flip(-1))
    torch.testing.assert_close(out_image, image.flip(-1), atol=1e-5, rtol=0)


def test_ranges_are_respected() -> None:
    cfg = AugmentConfig(rotation_deg=15, shift=0.1, shear_deg=0, zoom=(1.0, 1.0), flip_p=0.0)
    theta = random_affine(4096, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert angles.abs().max() <= 15.0 + 1e-4 and angles.abs().max() > 14.0
    assert theta[:, :, 2].abs().max() <= 0.2 + 1e-6  # 10 % of a side = 0.2 normalised units


def test_disabled_augmentation_returns_the_batch() -> None:
    image, mask = _l_shape()
    cfg = dataclasses.replace(AugmentConfig(), enabled=False)
    out = Augmenter(cfg, torch.device("cpu"), seed=0)(image, mask)
    assert out[0] is image and out[1] is mask


def test_intensity_jitter_covers_the_display_to_dicom_window_change() -> None:
    # W1300/L-480 display values re-windowed to W1500/L-600: x' = 0.867 x + 0.147.
    cfg = AugmentConfig()
    assert cfg.contrast[0] <= 1300 / 1500 <= cfg.contrast[1]
    assert cfg.brightness[0] <= (1350 - 1130) / 1500 <= cfg.brightness[1]
    x = torch.rand(16, 1, 8, 8)
    out = jitter_intensity(x, cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
