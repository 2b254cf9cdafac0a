"""Pixel metrics: pooled versus mean over slices, and the empty cases."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import Confusion, confusion, summarize


def test_confusion_counts() -> None:
    pred = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    gt = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)
    assert confusion(pred, gt) == Confusion(tp=2, fp=1, fn=1, tn=2)


def test_confusion_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match="differs from target shape"):
        confusion(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_pooled_and_mean_dice_differ_as_defined() -> None:
    big = Confusion(tp=90, fp=10, fn=0, tn=900)  # Dice 180 / 190
    small = Confusion(tp=0, fp=0, fn=10, tn=990)  # Dice 0
    m = summarize([big, small])
    assert m.dice == pytest.approx(180 / 200)
    assert m.dice_mean == pytest.approx((180 / 190 + 0) / 2)
    assert m.precision == pytest.approx(90 / 100)
    assert m.recall == pytest.approx(90 / 100)
    assert m.accuracy == pytest.approx(1980 / 2000)
    assert m.n_images == 2


def test_empty_ground_truth_and_prediction_score_one() -> None:
    empty = Confusion(tn=100)
    assert (empty.dice, empty.precision, empty.recall, empty.accuracy) == (1.0, 1.0, 1.0, 1.0)
    false_alarm = Confusion(fp=5, tn=95)
    assert false_alarm.dice == 0.0
    assert false_alarm.recall == 1.0  # nothing to miss
    assert false_alarm.precision == 0.0


def test_json_keys_are_the_evaluate_contract() -> None:
    keys = set(summarize([Confusion(tp=1, tn=1)]).to_dict())
    assert keys == {"dice", "dice_mean", "precision", "recall", "accuracy", "n_images"}
