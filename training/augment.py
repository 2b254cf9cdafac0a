"""Batch augmentation in torch, on the training device (no CPU round trip, no workers).

Geometry as the paper (Keras ``ImageDataGenerator`` style): rotation, width/height shift,
shear, per-axis zoom, horizontal flip, 'reflect' fill. One random affine matrix per sample is
applied to image and mask alike with ``affine_grid``/``grid_sample`` (reflection padding for
both, so the mask follows the reflected content); the mask is resampled bilinearly and
re-binarised at 0.5.

Intensity jitter (not in the paper): the shared training images are display JPGs (about
W1300/L-480) while inference sees DICOM windowed at W1500/L-600; a change of window is the
affine map ``x' = c x + b`` on ``[0, 1]`` values, so contrast ``c`` and offset ``b`` are drawn,
then a gamma, and the result is clipped to ``[0, 1]``.

All randomness comes from one ``torch.Generator`` on the device, so runs repeat exactly for a
seed (on one device type).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch convention)
from torch import Tensor

from .config import AugmentConfig


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> Tensor:
    """``n`` samples of U(low, high), float32."""
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _log_uniform(
    n: int, low: float, high: float, gen: torch.Generator, device: torch.device
) -> Tensor:
    """``n`` samples whose logarithm is uniform between ``log(low)`` and ``log(high)``."""
    return torch.exp(_uniform(n, math.log(low), math.log(high), gen, device))


def random_affine(n: int, cfg: AugmentConfig, gen: torch.Generator, device: torch.device) -> Tensor:
    """Draw ``n`` affine matrices in ``affine_grid``'s normalised coordinates.

    The matrix maps output coordinates to input coordinates: ``A = R(rot) Sh(shear) Z(zx, zy)
    Flip`` and translation ``2 * shift`` (coordinates span 2 units per image side).

    Args:
        n: number of samples.
        cfg: augmentation ranges.
        gen: random generator on ``device``.
        device: where to build the matrices.

    Returns:
        float32 matrices. Shape: ``(n, 2, 3)``.
    """
    rot = torch.deg2rad(_uniform(n, -cfg.rotation_deg, cfg.rotation_deg, gen, device))
    shear = torch.deg2rad(_uniform(n, -cfg.shear_deg, cfg.shear_deg, gen, device))
    zx = _uniform(n, cfg.zoom[0], cfg.zoom[1], gen, device)
    zy = _uniform(n, cfg.zoom[0], cfg.zoom[1], gen, device)
    flip = torch.where(torch.rand(n, generator=gen, device=device) < cfg.flip_p, -1.0, 1.0)
    tx = 2.0 * _uniform(n, -cfg.shift, cfg.shift, gen, device)
    ty = 2.0 * _uniform(n, -cfg.shift, cfg.shift, gen, device)
    cos, sin, tan = torch.cos(rot), torch.sin(rot), torch.tan(shear)
    # R @ Sh @ Z @ Flip with Sh = [[1, tan], [0, 1]], Z = diag(zx, zy), Flip = diag(flip, 1).
    a00 = cos * zx * flip
    a01 = (cos * tan - sin) * zy
    a10 = sin * zx * flip
    a11 = (sin * tan + cos) * zy
    row0 = torch.stack([a00, a01, tx], dim=1)
    row1 = torch.stack([a10, a11, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def warp(images: Tensor, masks: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Apply per-sample affine matrices to images and masks (reflect fill).

    Args:
        images: float images. Shape: ``(N, 1, S, S)``.
        masks: 0/1 float masks. Shape: ``(N, 1, S, S)``.
        theta: output-to-input matrices. Shape: ``(N, 2, 3)``.

    Returns:
        The warped images (bilinear) and re-binarised masks. Shapes: as the inputs.
    """
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out_img = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    out_mask = F.grid_sample(
        masks, grid.to(masks.dtype), mode="bilinear", padding_mode="reflection", align_corners=False
    )
    return out_img, (out_mask > 0.5).to(masks.dtype)


def jitter_intensity(images: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Random window (contrast, offset) and gamma per sample, clipped to ``[0, 1]``.

    Args:
        images: values in ``[0, 1]``. Shape: ``(N, 1, S, S)``.
        cfg: jitter ranges and probability.
        gen: random generator on the images' device.

    Returns:
        Jittered images. Shape: as ``images``.
    """
    n, device = images.shape[0], images.device
    apply = (torch.rand(n, generator=gen, device=device) < cfg.intensity_p).float()
    contrast = _log_uniform(n, cfg.contrast[0], cfg.contrast[1], gen, device)
    offset = _uniform(n, cfg.brightness[0], cfg.brightness[1], gen, device)
    gamma = _log_uniform(n, cfg.gamma[0], cfg.gamma[1], gen, device)
    # Samples not drawn for jitter get the identity (c = 1, b = 0, gamma = 1).
    contrast = 1.0 + apply * (contrast - 1.0)
    offset = apply * offset
    gamma = 1.0 + apply * (gamma - 1.0)
    view = (n, 1, 1, 1)
    out = torch.clamp(images * contrast.view(view) + offset.view(view), 0.0, 1.0)
    return out.pow(gamma.view(view))


class Augmenter:
    """Seeded batch augmenter living on one device.

    Args:
        cfg: augmentation ranges.
        device: where batches live.
        seed: seed of the augmenter's own generator.
    """

    def __init__(self, cfg: AugmentConfig, device: torch.device, seed: int) -> None:
        self.cfg = cfg
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Augment one batch.

        Args:
            images: float32 in ``[0, 1]``. Shape: ``(N, 1, S, S)``.
            masks: 0/1 float32. Shape: ``(N, 1, S, S)``.

        Returns:
            Augmented images and masks, same shapes.
        """
        if not self.cfg.enabled:
            return images, masks
        theta = random_affine(images.shape[0], self.cfg, self.generator, images.device)
        images, masks = warp(images, masks, theta)
        return jitter_intensity(images, self.cfg, self.generator), masks

    def state(self) -> Tensor:
        """The generator state, for checkpoints."""
        return self.generator.get_state()

    def load_state(self, state: Tensor) -> None:
        """Restore a generator state from a checkpoint."""
        self.generator.set_state(state)
