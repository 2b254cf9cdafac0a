"""The variant self-check compares every output channel of a model (issue 20)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ggo_cli.config import DeviceKind
from ggo_cli.onnx.model_info import ModelInfo, load_model_info
from ggo_cli.onnx.reference_slices import REFERENCE_SET_NAME, write_reference_set
from ggo_cli.onnx.runtime import DeviceRequest
from ggo_cli.onnx.variant_check import check_variant
from ggo_cli.onnx.variant_verdict import (
    MAX_GGO_CHANGE,
    MIN_POOLED_DICE,
    MIN_SLICE_DICE,
    MIN_SLICE_PIXELS,
    ChannelFigures,
    VariantCheck,
    compare_channels,
    compare_masks,
)
from ggo_cli.onnx.verdict_cache import machine_identity
from tests.onnx_models import hu_to_unit, write_band_model, write_two_channel_model

SIZE = 64
NAMES = ["mixed", "ggo-only", "consolidation"]


def _reference_images() -> np.ndarray:
    """Three model-grid slices: air, a GGO block at -500 HU, a consolidation block whose left
    half is -50 HU and right half +50 HU (both inside the two-band model's consolidation
    band, only the right half inside a band shifted to 0..100 HU)."""
    images = np.full((len(NAMES), SIZE, SIZE), hu_to_unit(-950.0))
    images[0, 4:28, 4:60] = hu_to_unit(-500.0)
    images[0, 36:60, 4:32] = hu_to_unit(-50.0)
    images[0, 36:60, 32:60] = hu_to_unit(50.0)
    images[1, 8:56, 8:56] = hu_to_unit(-500.0)
    images[2, 10:50, 10:30] = hu_to_unit(-50.0)
    images[2, 10:50, 30:50] = hu_to_unit(50.0)
    return images


def _model(folder: Path) -> ModelInfo:
    """The two-channel model with the reference slices beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_two_channel_model(folder / "model.onnx", SIZE)
    write_reference_set(folder / REFERENCE_SET_NAME, _reference_images(), NAMES)
    return load_model_info(path)


def _check(model: ModelInfo, variant_bytes: bytes) -> VariantCheck:
    return check_variant(
        model, variant_bytes, variant="int8", recipe="test",
        request=DeviceRequest(DeviceKind.CPU), on_cuda=False,
    )


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "variant-checks").glob("*.json"))


def test_a_variant_that_agrees_on_both_channels_passes(
    tmp_path: Path, variant_check_cache: Path
) -> None:
    model = _model(tmp_path / "m")
    verdict = _check(model, model.path.read_bytes())
    assert verdict.ran and verdict.passed, verdict.reason
    figures = verdict.figures
    assert figures is not None and figures.ggo_pixels_fp32 > 0 and figures.dice == 1.0
    (consolidation,) = figures.channels
    assert consolidation.channel == 1 and consolidation.label == "Consolidation"
    assert consolidation.compared and consolidation.pixels_fp32 == 24 * 56 + 40 * 40
    assert consolidation.dice == 1.0 and consolidation.change == 0.0
    assert "Consolidation pixels +0.00%" in verdict.reason
    # the cache key names the channels: no verdict written by the GGO-only check is reused
    (entry,) = _entries(variant_check_cache)
    key = json.loads(entry.read_text())["key"]
    assert key["channels"] == ["GGO", "Consolidation"]
    old_key = {k: v for k, v in key.items() if k != "channels"}
    assert entry.name != f"{_digest(old_key)[:32]}.json"
    assert entry.name == f"{_digest(key)[:32]}.json"


def test_a_variant_that_disagrees_on_consolidation_only_fails_naming_it(
    tmp_path: Path,
) -> None:
    model = _model(tmp_path / "m")
    shifted = write_two_channel_model(
        tmp_path / "shifted.onnx", SIZE, consolidation_band_hu=(0.0, 100.0)
    )
    verdict = _check(model, shifted.read_bytes())
    assert verdict.ran and not verdict.passed
    figures = verdict.figures
    assert figures is not None and figures.dice == 1.0 and figures.ggo_change == 0.0
    (consolidation,) = figures.channels
    # the +50 HU halves are kept, the -50 HU halves lost: Dice 2/3, half the pixels
    assert consolidation.dice == pytest.approx(2 / 3, abs=0.01)
    assert consolidation.change == pytest.approx(-0.5, abs=0.01)
    assert consolidation.worst_slice in NAMES[::2]
    assert not any(reason.startswith("GGO") for reason in figures.failures())
    assert "Consolidation pixels -50.0% (limit ±2%)" in verdict.reason
    assert "Consolidation: mask Dice 0.66" in verdict.reason
    assert f"(limit {MIN_POOLED_DICE})" in verdict.reason
    assert "Consolidation: Dice 0.6" in verdict.reason and f"(limit {MIN_SLICE_DICE})" in (
        verdict.reason
    )


def test_a_one_channel_models_cache_key_is_the_one_before_issue_20(
    tmp_path: Path, variant_check_cache: Path
) -> None:
    """The digest is computed here as the code before issue 20 computed it: a deployed
    machine's cached verdict for a one-channel model is still found."""
    folder = tmp_path / "m"
    folder.mkdir()
    path = write_band_model(folder / "model.onnx", SIZE)
    write_reference_set(folder / REFERENCE_SET_NAME, _reference_images(), NAMES)
    model = load_model_info(path)
    variant_bytes = path.read_bytes()
    verdict = _check(model, variant_bytes)
    assert verdict.passed and verdict.figures is not None and verdict.figures.channels == ()
    assert "channels" not in verdict.to_dict()["figures"]
    assert verdict.reason.startswith("GGO pixels +0.00% against float32, mask Dice 1.000")
    old_key = {
        "format": 1,
        "tolerances": [MAX_GGO_CHANGE, MIN_POOLED_DICE, MIN_SLICE_DICE, MIN_SLICE_PIXELS],
        "machine": machine_identity(False, 0),
        "model_sha256": model.file_sha256,
        "variant": "int8",
        "variant_sha256": hashlib.sha256(variant_bytes).hexdigest(),
        "reference_sha256": hashlib.sha256(
            (folder / REFERENCE_SET_NAME).read_bytes()
        ).hexdigest(),
        "cuda_options": {},
    }
    (entry,) = _entries(variant_check_cache)
    assert entry.name == f"{_digest(old_key)[:32]}.json"
    assert json.loads(entry.read_text())["key"] == old_key


def _digest(key: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _masks(counts: list[list[int]], size: int = 40) -> np.ndarray:
    """Masks ``(n, C, size, size)`` with the first ``counts[i][k]`` pixels of slice i,
    channel k set."""
    n, c = len(counts), len(counts[0])
    masks = np.zeros((n, c, size * size), dtype=bool)
    for i, row in enumerate(counts):
        for k, count in enumerate(row):
            masks[i, k, :count] = True
    return masks.reshape(n, c, size, size)


def test_a_sparse_channel_enters_no_test_but_a_vanished_one_fails() -> None:
    names, labels = ("a", "b"), ("GGO", "Consolidation")
    ref = _masks([[900, 60], [800, 40]])
    sparse = compare_channels(ref, _masks([[900, 10], [800, 200]]), names, labels)
    (channel,) = sparse.channels
    assert not channel.compared and channel.failures() == [] and sparse.failures() == []
    assert (channel.pixels_fp32, channel.pixels_variant) == (100, 210)
    assert "Consolidation: too few pixels to compare (100 float32, 210 variant)" in (
        sparse.summary()
    )
    grown = compare_channels(ref, _masks([[900, 60], [800, 600]]), names, labels)
    assert grown.channels[0].compared
    broken = grown.failures()
    assert broken[0].startswith("Consolidation pixels +") and any(
        b.startswith("Consolidation: Dice") and "on slice b" in b for b in broken
    )
    # in a two-channel model GGO's Dice failures carry its label too
    ggo_off = compare_channels(ref, _masks([[900, 60], [400, 40]]), names, labels)
    assert ggo_off.failures()[:2] == [
        "GGO pixels -23.5% (limit ±2%)", f"GGO: mask Dice {ggo_off.dice:.3f} (limit 0.95)"
    ]
    # a one-channel model's figures are compare_masks', wording included
    one = compare_channels(ref[:, :1], _masks([[900, 0], [400, 0]])[:, :1], names, ("GGO",))
    assert one == compare_masks(ref[:, 0], _masks([[900, 0], [400, 0]])[:, 0], names)
    assert one.failures()[1].startswith("mask Dice")
    with pytest.raises(ValueError, match="C labels"):
        compare_channels(ref, ref, names, ("GGO",))


def test_a_two_channel_verdict_round_trips_with_its_channel_figures() -> None:
    """to_dict/from_dict (the cache, the manifest) keep the further channels' figures, also
    through JSON, and a record written before issue 20 (no ``channels``) still reads."""
    figures = compare_channels(
        _masks([[900, 700], [500, 0]]), _masks([[900, 650], [450, 0]]), ("x", "y"),
        ("GGO", "Consolidation"),
    )
    # seconds as measured (NaN, the default, equals itself only as the same object)
    figures = replace(figures, fp32_s_per_slice=0.5, variant_s_per_slice=0.25)
    verdict = VariantCheck(
        "fp16", "", ran=True, passed=False, reason="; ".join(figures.failures()),
        figures=figures, machine={"cpu": "test"}, checked_at="2026-01-01T00:00:00Z",
        seconds=2.0,
    )
    record = verdict.to_dict()
    assert record["figures"]["channels"][0]["label"] == "Consolidation"
    again = VariantCheck.from_dict(json.loads(json.dumps(record)))
    assert again == verdict
    assert again.figures is not None
    assert again.figures.channels == (
        ChannelFigures(1, "Consolidation", 700, 650, 650 / 700 - 1, 2 * 650 / 1350,
                       2 * 650 / 1350, "x"),
    )
    old = json.loads(json.dumps(record))
    del old["figures"]["channels"]
    ggo_only = compare_masks(_masks([[900], [500]])[:, 0], _masks([[900], [450]])[:, 0],
                             ("x", "y"))
    assert VariantCheck.from_dict(old).figures == replace(
        ggo_only, fp32_s_per_slice=0.5, variant_s_per_slice=0.25
    )
