"""The SEG read-back's own reading (seg_frames): per-frame references from the items' bytes,
undefined lengths, pixel frames read from the file a range at a time."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.masks import keep_inside_lungs, model_masks, segment_planes
from ggo_cli.domain import CtVolume, Prediction
from ggo_cli.errors import OutputError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.writers import seg_verify
from ggo_cli.writers.dicom_seg import verify_seg, write_seg
from ggo_cli.writers.seg_frames import frame_references
from tests.writers.ct_data import blob_masks


def _seg_with_lungs(
    tmp_path: Path, volume: CtVolume, model: ModelInfo
) -> tuple[Path, Prediction, LungMasks]:
    """A 3-segment SEG (GGO, right and left lung) of ``volume`` and what it was made of."""
    planes, lungs = segment_planes(volume.hu.shape, 1)
    masks = model_masks(planes, 1)
    masks[...] = blob_masks(volume)
    half = volume.hu.shape[2] // 2
    lungs.right[:, 8:-8, 8:half] = True
    lungs.left[:, 8:-8, half:-8] = True
    prediction = keep_inside_lungs(Prediction(masks=masks, threshold=0.5), lungs)
    path = write_seg(volume, prediction, model, tmp_path / "lungs.seg.dcm", lungs=lungs)
    return path, prediction, lungs


def test_frame_references_from_bytes_equal_pydicoms_reading(
    tmp_path: Path, lung_volume: CtVolume, model: ModelInfo
) -> None:
    """Each frame's segment number and source UID read from the items' bytes equal what
    pydicom parses from the same file."""
    path, _, _ = _seg_with_lungs(tmp_path, lung_volume, model)
    seg = pydicom.dcmread(path)
    want = [
        (
            [int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)],
            [str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)],
        )
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    with path.open("rb") as file:
        got = list(frame_references(pydicom.dcmread(path), file))
    assert got == want
    assert {numbers[0] for numbers, _ in got} == {1, 2, 3}


@pytest.mark.parametrize("undefined", ["items", "sequences"])
def test_verify_reads_undefined_lengths(
    tmp_path: Path, lung_volume: CtVolume, model: ModelInfo, undefined: str
) -> None:
    """A SEG whose per-frame items (or every sequence) have undefined lengths, as other
    writers may write them, reads back the same: passes, and a changed pixel is found."""
    path, prediction, lungs = _seg_with_lungs(tmp_path, lung_volume, model)
    seg = pydicom.dcmread(path)

    def mark(dataset: pydicom.Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                elem.is_undefined_length = undefined == "sequences"
                for item in elem.value:
                    item.is_undefined_length_sequence_item = True
                    mark(item)

    mark(seg)
    rewritten = tmp_path / f"undefined-{undefined}.seg.dcm"
    seg.save_as(rewritten)
    assert rewritten.read_bytes() != path.read_bytes()
    verify_seg(rewritten, lung_volume, prediction, model=model, lungs=lungs)
    masks = prediction.masks.copy()
    masks[lung_volume.hu.shape[0] // 2, 100, 100, 0] ^= True
    with pytest.raises(OutputError, match="1 pixels differ"):
        verify_seg(rewritten, lung_volume, Prediction(masks=masks, threshold=0.5), lungs=lungs)


def test_verify_reads_deferred_pixel_data_from_the_file(
    tmp_path: Path, lung_volume: CtVolume, model: ModelInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pixel data and the per-frame items deferred (as for a long series), the
    read-back reads them from the file, slab by slab, and still finds one changed pixel."""
    path, prediction, lungs = _seg_with_lungs(tmp_path, lung_volume, model)
    monkeypatch.setattr(seg_verify, "VERIFY_DEFER_BYTES", 64)
    monkeypatch.setattr(seg_verify, "VERIFY_SLAB_SLICES", 7)
    seg = pydicom.dcmread(path, defer_size=64)
    assert seg.get_item(0x7FE00010, keep_deferred=True).value is None  # deferred: read by offset
    assert seg.get_item(0x52009230, keep_deferred=True).value is None
    verify_seg(path, lung_volume, prediction, model=model, lungs=lungs)
    masks = prediction.masks.copy()
    masks[-1, 3, 3, 0] ^= True  # the last slab
    with pytest.raises(OutputError, match="1 pixels differ"):
        verify_seg(path, lung_volume, Prediction(masks=masks, threshold=0.5), lungs=lungs)
    truncated = tmp_path / "short.seg.dcm"
    truncated.write_bytes(path.read_bytes()[:-40000])
    with pytest.raises(OutputError, match="short of its frames|ends before its pixel frames"):
        verify_seg(truncated, lung_volume, prediction, lungs=lungs)
