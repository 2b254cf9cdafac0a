"""Memory of a run: the next series is decoded ahead only when memory holds both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ggo_cli.run import memory, stages
from tests.nightly_runs import csv_rows, cube_studies, segment


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record when each series' decode starts and when its write ends, in order."""
    events: list[tuple[str, str]] = []
    prepare, write = stages.prepare_series, stages.write_series

    def recording_prepare(series: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(("decode", series.series_instance_uid))
        return prepare(series, *args, **kwargs)

    def recording_write(cfg: Any, done: Any, segmenter: Any) -> Any:
        try:
            return write(cfg, done, segmenter)
        finally:
            events.append(("written", done.series.series_instance_uid))

    monkeypatch.setattr(stages, "prepare_series", recording_prepare)
    monkeypatch.setattr(stages, "write_series", recording_write)
    return events


def test_without_room_each_series_is_decoded_after_the_last_is_written(
    tmp_path: Path,
    band_model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, _ = cube_studies(tmp_path, n=3)
    result = segment(root, "-o", tmp_path / "ahead", "-m", band_model_path)
    assert result.exit_code == 0, result.output
    events = _record(monkeypatch)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 20)  # 1 MiB left
    caplog.set_level("INFO", logger="ggo_cli.run.memory")
    result = segment(root, "-o", tmp_path / "one", "-m", band_model_path)
    assert result.exit_code == 0, result.output
    # One series in memory at a time: decode, write, decode, write, ...
    assert [kind for kind, _ in events] == ["decode", "written"] * 3
    assert [uid for _, uid in events[::2]] == [uid for _, uid in events[1::2]]
    assert "is decoded after this one is written" in caplog.text
    keys = ("series_instance_uid", "status", "ggo_voxels", "ggo_volume_ml")
    assert [{k: r[k] for k in keys} for r in csv_rows(tmp_path / "one")] == [
        {k: r[k] for k in keys} for r in csv_rows(tmp_path / "ahead")
    ]


def test_with_room_the_next_series_is_decoded_ahead(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = cube_studies(tmp_path, n=2)
    events = _record(monkeypatch)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 64 << 30)
    result = segment(root, "-o", tmp_path / "out", "-m", band_model_path)
    assert result.exit_code == 0, result.output
    # The second decode was asked for before the first series was segmented, so it starts
    # before the first write ends (the prefetch thread is idle by then).
    kinds = [kind for kind, _ in events]
    assert kinds.index("decode", 1) < kinds.index("written")


def test_series_bytes_follow_the_measured_figure() -> None:
    # 1000 x 512 x 512 at 6 bytes a voxel (5.3 measured): 1.46 GiB.
    assert memory.series_bytes(1000) == 1000 * 512 * 512 * 6
    assert round(memory.series_bytes(1000) / 2**30, 2) == 1.46
