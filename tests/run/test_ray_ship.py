"""``--ray-ship`` without a cluster: the actor class runs a shipped series in scratch folders and
the driver writes what it returns; the outputs equal a run on one host.

:class:`~ggo_cli.run.ray_actor.SeriesActor` is a plain class (Ray wraps it only in a run), so
these tests call it directly; the real cluster, with the driver's files out of the nodes'
sight, is ``tests/e2e/test_ray_cluster.py``.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.cli.build import build_run_config
from ggo_cli.config import SEG_NAME, SR_NAME
from ggo_cli.dicom.discovery import discover_series
from ggo_cli.domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.run.ray_actor import SeriesActor
from ggo_cli.run.ray_plan import ActorSlot
from ggo_cli.run.ray_ship import (
    ShippedFile,
    ShippedSeries,
    pack_model,
    pack_series,
    unpack_series,
    write_returned,
)
from tests.dicom_factory import make_ct_series
from tests.phantoms import make_cube_phantom

SLOT = ActorSlot("node-a", "node-a.example", "cpu", 1, 0.0, 1)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The actor takes over the root logger as in a Ray worker; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ggo_level = logging.getLogger("ggo_cli").level
    with warnings.catch_warnings():
        yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("ggo_cli").setLevel(ggo_level)
    logging.captureWarnings(False)


def _series_folder(out: Path) -> Path:
    (seg,) = out.rglob(SEG_NAME)
    return seg.parent


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_shipped_series_gives_the_outputs_of_one_host(
    tmp_path: Path, band_model_path: Path, root_logging: None
) -> None:
    phantom = make_cube_phantom((24, 64, 64), (2.5, 0.7, 0.7), cube_voxels=(6, 9, 9))
    make_ct_series(tmp_path / "in", phantom=phantom, folder="good")
    broken = make_ct_series(tmp_path / "in", phantom=phantom, folder="broken", seed=2)
    raw = broken.paths[5].read_bytes()
    broken.paths[5].write_bytes(raw[: len(raw) - 500])  # pixel data cut short
    args = ["-m", str(band_model_path), "--no-progress", "--no-lung-mask", "--settle", "0"]
    one = CliRunner().invoke(app, ["segment", str(tmp_path / "in"), "-o",
                                   str(tmp_path / "one"), *args])
    assert one.exit_code == 7, one.output
    with (tmp_path / "one" / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        failed_one = next(row for row in csv.DictReader(fh) if row["status"] == "failed")

    cfg = build_run_config([tmp_path / "in"], tmp_path / "ship", model=band_model_path,
                           device="cpu", lung_mask=False, settle=0)
    model = load_model_info(band_model_path)
    actor = SeriesActor(cfg, model, None, SLOT, logging.INFO, shipped_model=pack_model(model))
    found = {s.series_instance_uid: s for s in discover_series([tmp_path / "in"]).series}
    bad = pack_series(found.pop(failed_one["series_instance_uid"]))
    assert isinstance(bad, ShippedSeries)
    failed = actor.process_shipped(bad).outcome
    assert failed.status is SeriesStatus.FAILED and failed.seg_path is None
    tag = re.search(r"\(file #[0-9a-f]{6}\)", failed_one["message"])
    assert tag is not None and tag.group(0) in failed.message  # the same file named the same way
    (series,) = found.values()
    shipped = pack_series(series)
    assert isinstance(shipped, ShippedSeries)
    result = actor.process_shipped(shipped)
    assert result.outcome.status is SeriesStatus.OK, result.outcome.message
    assert result.outcome.series == series  # the driver's paths, not the actor's copy
    assert result.outcome.seg_path is not None and not result.outcome.seg_path.is_absolute()
    assert result.device == "cpu" and result.hostname == "node-a.example"
    assert not (tmp_path / "ship").exists()  # the actor wrote nothing at the driver's path

    outcome = write_returned(cfg, result.outcome, result.files)
    mine, theirs = _series_folder(tmp_path / "ship"), _series_folder(tmp_path / "one")
    assert outcome.seg_path == mine / SEG_NAME
    assert _files(mine) == _files(theirs)
    assert mine.relative_to(tmp_path / "ship") == theirs.relative_to(tmp_path / "one")
    seg, ref = hd.seg.segread(mine / SEG_NAME), hd.seg.segread(theirs / SEG_NAME)
    assert seg.SOPInstanceUID == ref.SOPInstanceUID
    np.testing.assert_array_equal(seg.pixel_array, ref.pixel_array)
    assert (mine / SR_NAME).read_bytes()[128:132] == b"DICM"
    assert not list((tmp_path / "ship").rglob("*.tmp"))
    scratch = actor._sessions.model.path.parent  # the shipped model's copy on the "node"
    assert scratch.is_dir() and scratch != band_model_path.parent
    actor.close()  # the driver asks at the end of the run
    assert not scratch.exists()


def test_the_driver_removes_the_objects_the_options_no_longer_ask_for(tmp_path: Path) -> None:
    cfg = build_run_config([tmp_path], tmp_path / "out", model=_model(tmp_path), device="cpu")
    folder = tmp_path / "out" / "1.2.3" / "1.2.3.4"
    for name in (SR_NAME, "sc/montage.dcm", "sc/slice_0002.dcm", "overlay.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"old")
    series = _tiny_series(tmp_path)
    returned = (ShippedFile("1.2.3/1.2.3.4/sc/montage.dcm", b"new sc"),
                ShippedFile("1.2.3/1.2.3.4/" + SEG_NAME, b"new seg"))
    outcome = SeriesOutcome(series, SeriesStatus.OK, seg_path=Path("1.2.3/1.2.3.4") / SEG_NAME)
    done = write_returned(cfg, outcome, returned)
    assert done.seg_path == folder / SEG_NAME
    assert (folder / SEG_NAME).read_bytes() == b"new seg"
    assert (folder / "sc/montage.dcm").read_bytes() == b"new sc"
    assert not (folder / SR_NAME).exists()  # no SR returned: --no-sr
    assert not (folder / "sc/slice_0002.dcm").exists()
    assert (folder / "overlay.png").read_bytes() == b"old"  # not a DICOM object: kept


@pytest.mark.parametrize("name", ["../escape.dcm", "/etc/passwd", "a/../../b", ""])
def test_a_shipped_file_cannot_leave_its_folder(tmp_path: Path, name: str) -> None:
    series = _tiny_series(tmp_path)
    with pytest.raises(ValueError, match="refusing a shipped file"):
        unpack_series(tmp_path / "scratch", ShippedSeries(series, (ShippedFile(name, b""),)))


def test_a_file_the_driver_cannot_read_fails_its_series_for_the_next_run(tmp_path: Path) -> None:
    series = replace(_tiny_series(tmp_path), files=(tmp_path / "gone.dcm",))
    outcome = pack_series(series)
    assert isinstance(outcome, SeriesOutcome)
    assert outcome.status is SeriesStatus.FAILED
    assert "cannot be read to ship it" in outcome.message
    assert "retried by the next run" in outcome.message


def _model(tmp_path: Path) -> Path:
    from tests.onnx_models import write_band_model

    return write_band_model(tmp_path / "band64.onnx", 64)


def _tiny_series(tmp_path: Path) -> SeriesInfo:
    """A discovered series of a tiny synthetic study (made once per test folder)."""
    folder = tmp_path / "tiny"
    if not folder.exists():
        make_ct_series(folder, (3, 32, 32))
    (series,) = discover_series([folder]).series
    return series
