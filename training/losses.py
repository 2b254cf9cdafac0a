"""The paper's five segmentation losses, on logits.

All losses take logits ``(N, 1, H, W)`` (channel 0 = GGO; extra channels are ignored) and
binary targets of the same shape, and compute in float32 (also under autocast). The soft
statistics are pooled over the whole batch (not averaged per slice), so slices without GGO
still count through their false positives and do not produce 0/0:

- ``TP = sum(p * g)``, ``FN = sum((1 - p) * g)``, ``FP = sum(p * (1 - g))`` with
  ``p = sigmoid(logits)``, ``g`` the target.
- Dice loss: ``1 - (2 TP + s) / (2 TP + FP + FN + s)``, smoothing ``s = 1`` (one pixel), so an
  empty target with an empty prediction gives 0 and an empty target with FP pixels gives
  ``FP / (FP + 1)``.
- BCE: mean binary cross-entropy over all pixels.
- Focal Tversky (Abraham & Khan, ISBI 2019): ``TI = (TP + s) / (TP + alpha FN + beta FP + s)``,
  loss ``(1 - TI) ** gamma``. Defaults: ``alpha = 0.7`` weights false NEGATIVES,
  ``beta = 0.3`` false POSITIVES (recall is stressed, PAPER.md), ``gamma = 0.75`` (their
  ``1 / gamma`` with ``gamma = 4/3``).
- ``bce-dice`` = BCE + Dice; ``focal-tversky-dice`` = Focal Tversky + Dice (the paper's best).

Several classes (``make_loss(..., channels=C)``): the same loss on each channel ``k`` against
target channel ``k`` (sigmoid per channel, counts pooled per channel), **summed** over the
channels. Each class keeps its own pooled ratio, so the smaller consolidation class is not
drowned by GGO pixels, and channel 0 stays an independent GGO probability (the model contract).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch convention)
from torch import Tensor

from ggo_cli.errors import InputError

from .config import FOCAL_EXPONENT, LOSSES, TVERSKY_ALPHA_FN, TVERSKY_BETA_FP

SMOOTH = 1.0
"""Additive smoothing of Dice and Tversky ratios, in pixels."""
_EPS = 1e-7

LossFn = Callable[[Tensor, Tensor], Tensor]


def _soft_counts(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Soft TP, FP, FN pooled over the batch, float32, from channel 0."""
    p = torch.sigmoid(logits[:, :1].float())
    g = target[:, :1].float()
    tp = (p * g).sum()
    fp = (p * (1.0 - g)).sum()
    fn = ((1.0 - p) * g).sum()
    return tp, fp, fn


def dice_loss(logits: Tensor, target: Tensor, *, smooth: float = SMOOTH) -> Tensor:
    """Soft Dice loss ``1 - (2TP + s) / (2TP + FP + FN + s)``.

    Args:
        logits: raw scores. Shape: ``(N, C, H, W)``; channel 0 is used.
        target: binary masks. Shape: ``(N, 1, H, W)`` (or ``C``).
        smooth: additive smoothing ``s``.

    Returns:
        Scalar loss in ``[0, 1)``.
    """
    tp, fp, fn = _soft_counts(logits, target)
    return 1.0 - (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy with logits over all pixels of channel 0.

    Shape: logits ``(N, C, H, W)``, target ``(N, 1, H, W)``. Returns a scalar.
    """
    return F.binary_cross_entropy_with_logits(logits[:, :1].float(), target[:, :1].float())


def focal_tversky_loss(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float = TVERSKY_ALPHA_FN,
    beta: float = TVERSKY_BETA_FP,
    gamma: float = FOCAL_EXPONENT,
    smooth: float = SMOOTH,
) -> Tensor:
    """Focal Tversky loss ``(1 - TI) ** gamma``, ``TI = (TP + s) / (TP + a FN + b FP + s)``.

    Args:
        logits: raw scores. Shape: ``(N, C, H, W)``; channel 0 is used.
        target: binary masks. Shape: ``(N, 1, H, W)``.
        alpha: weight of false negatives (missed GGO).
        beta: weight of false positives.
        gamma: exponent on ``1 - TI``; below 1 it keeps gradients large near convergence.
        smooth: additive smoothing ``s``.

    Returns:
        Scalar loss in ``[0, 1)``.
    """
    tp, fp, fn = _soft_counts(logits, target)
    tversky = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    # Clamp: d/dx x**0.75 is infinite at 0 (a perfect batch would give NaN gradients).
    return torch.clamp(1.0 - tversky, min=_EPS) ** gamma


def make_loss(
    name: str,
    *,
    alpha: float = TVERSKY_ALPHA_FN,
    beta: float = TVERSKY_BETA_FP,
    gamma: float = FOCAL_EXPONENT,
    channels: int = 1,
) -> LossFn:
    """Return the loss function called ``name``.

    Args:
        name: one of ``dice``, ``bce``, ``bce-dice``, ``focal-tversky``, ``focal-tversky-dice``.
        alpha: Focal Tversky weight of false negatives.
        beta: Focal Tversky weight of false positives.
        gamma: Focal Tversky exponent.
        channels: classes; the loss is summed over channels ``0 .. channels - 1``.

    Returns:
        ``loss(logits, target) -> scalar``.

    Raises:
        InputError: unknown name (the message lists the valid ones).
    """

    def focal(lg: Tensor, tg: Tensor) -> Tensor:
        return focal_tversky_loss(lg, tg, alpha=alpha, beta=beta, gamma=gamma)

    table: dict[str, LossFn] = {
        "dice": dice_loss,
        "bce": bce_loss,
        "bce-dice": lambda lg, tg: bce_loss(lg, tg) + dice_loss(lg, tg),
        "focal-tversky": focal,
        "focal-tversky-dice": lambda lg, tg: focal(lg, tg) + dice_loss(lg, tg),
    }
    if name not in table:
        raise InputError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    if channels == 1:
        return table[name]
    return per_channel(table[name], channels)


def per_channel(loss: LossFn, channels: int) -> LossFn:
    """Sum of ``loss`` over the first ``channels`` channels of logits and target.

    Shape: logits and target ``(N, >= channels, H, W)``. Returns a scalar.
    """

    def summed(logits: Tensor, target: Tensor) -> Tensor:
        parts = [loss(logits[:, k : k + 1], target[:, k : k + 1]) for k in range(channels)]
        return torch.stack(parts).sum()

    return summed
