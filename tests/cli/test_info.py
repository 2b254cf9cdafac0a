"""``ggo-cli info``'s report (ggo_cli.cli.info)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ggo_cli.cli.info import int8_status
from ggo_cli.onnx.model_info import load_model_info
from tests.onnx.test_precision import _conv_model_with_recipe
from tests.onnx.test_variant_check import BAD_RANGES


def test_info_settles_a_recipe_once_for_auto_and_for_forced_int8(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ggo_cli.onnx.variant_check")
    info = load_model_info(_conv_model_with_recipe(tmp_path, range_factor=BAD_RANGES))
    status = int8_status(info)
    assert status is not None and status["used_on_cpu"] is False
    assert status["self_check"]["passed"] is False and not status["self_check"]["cached"]
    assert "int8 (test) variant failed its self-check" in status["if_forced"]["error"]
    # The forced segmenter reuses the verdict the automatic one settled: measured once, and
    # never read back from the cache folder.
    assert caplog.text.count("checking the int8 variant against float32") == 1
    assert "verdict read from" not in caplog.text
