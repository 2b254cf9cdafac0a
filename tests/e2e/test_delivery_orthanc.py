"""Delivery to a real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on loopback: a
synthetic CT series and its SEG, by C-STORE and by STOW-RS, checked through Orthanc's REST API;
duplicates stored once; a stopped Orthanc gives transient failures, a restarted one takes all."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, SegmentationStorage

from ggo_cli.delivery import (
    DimseDestination,
    DimseTimeouts,
    SendOutcome,
    SendResult,
    StowDestination,
    parse_destination,
    send_dimse,
    send_stow,
)
from ggo_cli.domain import Prediction
from ggo_cli.writers.dicom_seg import write_seg
from tests.dicom_factory import SERIES_FOLDER, make_ct_series
from tests.e2e.orthanc import CALLING_AE_TITLE, OrthancServer, running_orthanc
from tests.writers.ct_data import blob_masks, load_ct_volume, make_model

TIMEOUTS = DimseTimeouts(connect_s=5.0, acse_s=10.0, dimse_s=30.0, network_s=30.0)


@dataclass(frozen=True)
class Study:
    """A written CT series and its SEG, with what Orthanc must end up holding."""

    paths: tuple[Path, ...]
    expected: dict[str, str]
    """SOPInstanceUID -> SOPClassUID of every file."""


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Six synthetic CT slices and a SEG of a GGO box on them (the ggo-cli writer)."""
    root = tmp_path_factory.mktemp("delivery")
    series = make_ct_series(root, (6, 64, 64))
    volume = load_ct_volume(series.root / SERIES_FOLDER)
    prediction = Prediction(masks=blob_masks(volume), threshold=0.5)
    seg = write_seg(volume, prediction, make_model(), path=root / "ggo.seg.dcm",
                    software_version="9.9.9-test")
    paths = (*series.paths, seg)
    expected = dict.fromkeys(series.sop_instance_uids, str(CTImageStorage))
    expected[str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID)] = str(
        SegmentationStorage
    )
    return Study(paths=paths, expected=expected)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the module (each test empties it first)."""
    yield from running_orthanc(tmp_path_factory.mktemp("orthanc-shared") / "orthanc")


@pytest.fixture
def empty_orthanc(orthanc: OrthancServer) -> OrthancServer:
    """The module's Orthanc with no instance stored."""
    orthanc.clear()
    assert orthanc.instance_count() == 0
    return orthanc


def _dimse(server: OrthancServer, calling: str = CALLING_AE_TITLE) -> DimseDestination:
    dest = parse_destination(server.dicom_destination, calling_ae_title=calling, environ={})
    assert isinstance(dest, DimseDestination)
    return dest


def _stow(server: OrthancServer) -> StowDestination:
    dest = parse_destination(server.dicomweb_url, environ={})
    assert isinstance(dest, StowDestination)
    return dest


def _outcomes(results: list[SendResult]) -> set[SendOutcome]:
    return {result.outcome for result in results}


def test_c_store_puts_the_ct_and_its_seg_into_orthanc(
    empty_orthanc: OrthancServer, study: Study
) -> None:
    results = send_dimse(_dimse(empty_orthanc), study.paths, timeouts=TIMEOUTS)
    assert _outcomes(results) == {SendOutcome.STORED}, [r.reason for r in results]
    assert [r.sop_instance_uid for r in results] == list(study.expected)
    assert empty_orthanc.stored() == study.expected


def test_stow_rs_puts_the_ct_and_its_seg_into_orthanc(
    empty_orthanc: OrthancServer, study: Study
) -> None:
    results = send_stow(_stow(empty_orthanc), study.paths)
    assert _outcomes(results) == {SendOutcome.STORED}, [r.reason for r in results]
    assert empty_orthanc.stored() == study.expected


def test_the_same_files_sent_twice_by_both_protocols_are_stored_once(
    empty_orthanc: OrthancServer, study: Study
) -> None:
    for _ in range(2):
        assert _outcomes(send_dimse(_dimse(empty_orthanc), study.paths, timeouts=TIMEOUTS)) == {
            SendOutcome.STORED
        }
        assert _outcomes(send_stow(_stow(empty_orthanc), study.paths)) == {SendOutcome.STORED}
    assert empty_orthanc.instance_count() == len(study.expected)
    assert empty_orthanc.stored() == study.expected


def test_an_unknown_calling_ae_title_stores_nothing(
    empty_orthanc: OrthancServer, study: Study
) -> None:
    """The test Orthanc accepts C-STORE only from the known AE at 127.0.0.1."""
    results = send_dimse(_dimse(empty_orthanc, calling="STRANGER"), study.paths[:2],
                         timeouts=TIMEOUTS)
    assert _outcomes(results) == {SendOutcome.TRANSIENT}
    assert "association rejected" in results[0].reason
    assert "STRANGER" in results[0].reason
    assert empty_orthanc.instance_count() == 0


def test_stopped_orthanc_gives_transient_failures_then_a_restart_takes_everything(
    tmp_path: Path, study: Study
) -> None:
    server = OrthancServer(tmp_path / "orthanc")
    try:
        server.start()
        server.stop()
        down_dimse = send_dimse(_dimse(server), study.paths, timeouts=TIMEOUTS)
        down_stow = send_stow(_stow(server), study.paths)
        assert _outcomes(down_dimse) == _outcomes(down_stow) == {SendOutcome.TRANSIENT}
        assert [r.sop_instance_uid for r in down_stow] == list(study.expected)

        server.start()
        assert server.instance_count() == 0
        assert _outcomes(send_dimse(_dimse(server), study.paths, timeouts=TIMEOUTS)) == {
            SendOutcome.STORED
        }
        assert _outcomes(send_stow(_stow(server), study.paths)) == {SendOutcome.STORED}
        assert server.stored() == study.expected
        assert server.instance_count() == len(study.expected)

        # Stored instances survive a restart (same storage folder), and resending adds none.
        server.stop()
        server.start()
        assert _outcomes(send_stow(_stow(server), study.paths)) == {SendOutcome.STORED}
        assert server.stored() == study.expected
        assert server.instance_count() == len(study.expected)
    finally:
        server.remove()
