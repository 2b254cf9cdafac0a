"""The five losses against values worked out by hand on 2 x 2 masks."""

from __future__ import annotations

import math

import pytest
import torch

from ggo_cli.errors import InputError
from training.losses import bce_loss, dice_loss, focal_tversky_loss, make_loss

HALF = torch.zeros(1, 1, 2, 2)  # logits 0: p = 0.5 everywhere
TARGET = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
EMPTY = torch.zeros(1, 1, 2, 2)


def test_dice_at_half_probability() -> None:
    # TP = 1, FP = 1, FN = 1: 1 - (2 + 1) / (2 + 1 + 1 + 1) = 0.4
    assert float(dice_loss(HALF, TARGET)) == pytest.approx(0.4)


def test_bce_at_half_probability_is_log_2() -> None:
    assert float(bce_loss(HALF, TARGET)) == pytest.approx(math.log(2))


def test_focal_tversky_at_half_probability() -> None:
    # TI = (1 + 1) / (1 + 0.7 * 1 + 0.3 * 1 + 1) = 2/3; loss = (1/3) ** 0.75
    assert float(focal_tversky_loss(HALF, TARGET)) == pytest.approx((1 / 3) ** 0.75)


def test_combined_losses_are_sums() -> None:
    assert float(make_loss("bce-dice")(HALF, TARGET)) == pytest.approx(math.log(2) + 0.4)
    assert float(make_loss("focal-tversky-dice")(HALF, TARGET)) == pytest.approx(
        (1 / 3) ** 0.75 + 0.4
    )


def test_empty_mask_with_uncertain_prediction() -> None:
    # TP = 0, FP = 2, FN = 0: Dice 1 - 1 / 3; Tversky 1 / (0.3 * 2 + 1) = 0.625
    assert float(dice_loss(HALF, EMPTY)) == pytest.approx(2 / 3)
    assert float(focal_tversky_loss(HALF, EMPTY)) == pytest.approx(0.375**0.75)


@pytest.mark.parametrize("name", ["dice", "bce", "bce-dice", "focal-tversky", "focal-tversky-dice"])
def test_empty_mask_with_empty_prediction_costs_nothing_and_has_finite_gradients(name: str) -> None:
    logits = torch.full((1, 1, 2, 2), -50.0, requires_grad=True)
    loss = make_loss(name)(logits, EMPTY)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-4)
    assert torch.isfinite(logits.grad).all()


def test_alpha_weights_false_negatives_more_than_false_positives() -> None:
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    misses_one = torch.tensor([[[[50.0, -50.0], [-50.0, -50.0]]]])  # TP 1, FN 1
    adds_one = torch.tensor([[[[50.0, 50.0], [50.0, -50.0]]]])  # TP 2, FP 1
    # FN: TI = 2 / (1 + 0.7 + 1); FP: TI = 3 / (2 + 0.3 + 1)
    assert float(focal_tversky_loss(misses_one, target)) == pytest.approx(
        (1 - 2 / 2.7) ** 0.75, rel=1e-5
    )
    assert float(focal_tversky_loss(adds_one, target)) == pytest.approx(
        (1 - 3 / 3.3) ** 0.75, rel=1e-5
    )
    assert float(focal_tversky_loss(misses_one, target)) > float(
        focal_tversky_loss(adds_one, target)
    )


def test_alpha_beta_gamma_are_configurable() -> None:
    loss = make_loss("focal-tversky", alpha=0.5, beta=0.5, gamma=1.0)
    # TI = (1 + 1) / (1 + 0.5 + 0.5 + 1) = 2/3; gamma 1: loss 1/3
    assert float(loss(HALF, TARGET)) == pytest.approx(1 / 3)


def test_losses_are_float32_under_low_precision_logits() -> None:
    assert dice_loss(HALF.bfloat16(), TARGET).dtype == torch.float32


def test_unknown_loss_lists_the_valid_names() -> None:
    with pytest.raises(InputError, match="dice, bce, bce-dice, focal-tversky, focal-tversky-dice"):
        make_loss("lovasz")
