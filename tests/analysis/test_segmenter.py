"""ONNX Runtime inference: exact masks from the band model, devices, batching, OOM retry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from ggo_cli.analysis.segmenter import OnnxSegmenter, parse_device
from ggo_cli.domain import CtVolume, SeriesInfo
from ggo_cli.errors import DeviceError, InputError
from ggo_cli.onnx.model_info import load_model_info


def _volume(hu: npt.NDArray[np.float32]) -> CtVolume:
    series = SeriesInfo("1.2.3", "1.2.3.4", (), "x")
    return CtVolume(series, hu, (), 2.0, (0.5, 0.5))


def _band_truth(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    return (hu > -750) & (hu < -300)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_band_model_marks_exactly_the_band(band_model_path: Path, batch_size: int) -> None:
    rng = np.random.default_rng(1)
    hu = rng.choice([-1000.0, -850.0, -500.0, -400.0, 40.0], size=(7, 64, 64)).astype(np.float32)
    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu", batch_size=batch_size)
    prediction = seg.predict(_volume(hu))
    assert prediction.masks.shape == (7, 64, 64, 1)
    np.testing.assert_array_equal(prediction.ggo, _band_truth(hu))
    assert seg.providers == ["CPUExecutionProvider"]


def test_resized_grid_maps_back_onto_source_pixels(band_model_path: Path) -> None:
    # 96 x 80 slices through a 64 x 64 model: a 30 x 24 block must come back in place.
    hu = np.full((2, 96, 80), -1000.0, dtype=np.float32)
    hu[:, 30:60, 20:44] = -500.0
    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu")
    mask = seg.predict(_volume(hu)).ggo
    truth = hu > -750
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95
    assert not mask[:, :25].any() and not mask[:, 65:].any()


def test_threshold_override_changes_the_mask(band_model_path: Path) -> None:
    # The band model's probability at -700 HU is sigmoid(50 * (0.433 - 0.4)) = 0.84.
    hu = np.full((1, 64, 64), -700.0, dtype=np.float32)
    model = load_model_info(band_model_path)
    assert OnnxSegmenter(model, device="cpu").predict(_volume(hu)).ggo.all()
    assert not OnnxSegmenter(model, device="cpu", threshold=0.9).predict(_volume(hu)).ggo.any()


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cpu:1", ""])
def test_invalid_device_is_an_input_error(value: str) -> None:
    with pytest.raises(InputError, match="invalid --device"):
        parse_device(value)


def test_cuda_parses_its_index() -> None:
    assert parse_device("CUDA:2").index == 2
    assert parse_device("auto").kind == "auto"


def test_explicit_cuda_without_gpu_is_an_error(band_model_path: Path) -> None:
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="requested but"):
        OnnxSegmenter(load_model_info(band_model_path), device="cuda")


def test_auto_without_gpu_runs_on_cpu(band_model_path: Path) -> None:
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("a GPU is present")
    seg = OnnxSegmenter(load_model_info(band_model_path), device="auto")
    assert seg.device_label == "cpu" and seg.batch_size == 1  # float32 on the CPU


def test_out_of_memory_halves_the_batch_and_finishes(
    band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu", batch_size=8)
    calls: list[int] = []

    def fake_cuda(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        calls.append(batch.shape[0])
        if batch.shape[0] > 2:
            raise RuntimeError("CUDA failure 2: out of memory ; GPU=0")
        return seg._run_cpu(batch)

    monkeypatch.setattr(seg, "on_cuda", True)
    monkeypatch.setattr(seg, "_run_cuda", fake_cuda)
    hu = np.full((9, 64, 64), -500.0, dtype=np.float32)
    assert seg.predict(_volume(hu)).ggo.all()
    assert seg.batch_size == 2
    assert calls[:3] == [8, 4, 2]


def test_non_memory_failure_is_a_model_error(
    band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ggo_cli.errors import ModelError

    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu")

    def broken(batch: npt.NDArray[np.float32], **_: object) -> npt.NDArray[np.float32]:
        raise RuntimeError("Non-zero status code returned while running Conv node")

    monkeypatch.setattr(seg, "_run_cpu", broken)
    with pytest.raises(ModelError, match="inference failed: Non-zero status"):
        seg.predict(_volume(np.zeros((2, 64, 64), dtype=np.float32)))


def test_the_cpu_arena_is_released_after_the_last_batch_only(
    band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ONNX Runtime keeps its activations (0.2 GB a float32 slice of the shipped model) unless
    # a run asks for the arena to shrink: asked once per series, on its last batch.
    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu", batch_size=2)
    run_cpu, released = seg._run_cpu, []

    def recording(batch: npt.NDArray[np.float32], *, release_arena: bool = False) -> Any:
        released.append(release_arena)
        return run_cpu(batch, release_arena=release_arena)

    monkeypatch.setattr(seg, "_run_cpu", recording)
    hu = np.full((5, 64, 64), -500.0, dtype=np.float32)
    assert seg.predict(_volume(hu)).ggo.all()
    assert released == [False, False, True]
    assert seg.predict(_volume(hu[:1])).ggo.all()
    assert released[-1:] == [True]


def test_predict_fills_the_given_planes_and_int16_hu_gives_the_same_masks(
    band_model_path: Path,
) -> None:
    from ggo_cli.analysis.masks import model_masks, segment_planes

    rng = np.random.default_rng(5)
    hu16 = rng.choice([-1000, -850, -500, -400, 40], size=(5, 64, 64)).astype(np.int16)
    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu", batch_size=2)
    planes, lungs = segment_planes(hu16.shape, 1)
    lungs.right[:] = True  # the lung planes stay as they are
    out = model_masks(planes, 1)
    prediction = seg.predict(_volume(hu16), out=out)  # type: ignore[arg-type]
    assert prediction.masks is out and np.shares_memory(planes, prediction.masks)
    np.testing.assert_array_equal(planes[0], _band_truth(hu16.astype(np.float32)))
    np.testing.assert_array_equal(
        planes[0], seg.predict(_volume(hu16.astype(np.float32))).ggo
    )
    assert lungs.right.all() and not lungs.left.any()
    with pytest.raises(ValueError, match="out must be bool"):
        seg.predict(_volume(hu16), out=np.zeros((5, 64, 64, 2), dtype=bool))  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.84])
def test_deciding_on_logits_matches_the_sigmoid_threshold(
    band_model_path: Path, threshold: float
) -> None:
    from ggo_cli.analysis.masks import threshold_probabilities
    from ggo_cli.analysis.preprocessing import preprocess_hu, sigmoid

    rng = np.random.default_rng(7)
    hu = rng.uniform(-1000, 100, size=(6, 64, 64)).astype(np.float32)  # model grid: no resize
    model = load_model_info(band_model_path)
    seg = OnnxSegmenter(model, device="cpu", threshold=threshold)
    got = seg.predict(_volume(hu)).ggo
    logits = seg.predict_logits(
        preprocess_hu(
            hu,
            size=model.input_size,
            center_hu=model.window_center_hu,
            width_hu=model.window_width_hu,
        )
    )
    want = threshold_probabilities(sigmoid(logits), threshold)[:, 0]
    assert 0 < got.sum() < got.size  # the threshold cuts through these values
    # equal but where float32 rounding of the sigmoid lands on the threshold itself
    assert (got != want).sum() <= 2


@pytest.mark.parametrize("batch_size", [2, 16])
def test_window_in_the_graph_gives_the_masks_of_host_windowing(
    band_model_path: Path, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The windowed graph (int16 HU in, masks out; the CUDA path, here on the CPU's IO
    binding) decides every voxel as host windowing + model + logit threshold does, at the
    window's clip ends too; float32 HU and resized grids keep the host path."""
    from ggo_cli.analysis import preprocessing

    rng = np.random.default_rng(11)
    hu16 = rng.integers(-1400, 400, size=(5, 64, 64)).astype(np.int16)
    hu16[0, :4] = [[-2048], [-1350], [150], [3071]]  # below, at and above the window's ends
    model = load_model_info(band_model_path)
    calls: list[int] = []
    for threshold in (0.5, 0.84):
        plain = OnnxSegmenter(model, device="cpu", batch_size=batch_size, threshold=threshold)
        assert not plain.window_in_graph  # CPU default: host windowing
        want = plain.predict(_volume(hu16)).masks  # type: ignore[arg-type]
        graph = OnnxSegmenter(
            model, device="cpu", batch_size=batch_size, threshold=threshold, window_in_graph=True
        )
        monkeypatch.setattr(
            preprocessing, "window_hu", lambda *a, **k: calls.append(1)  # never called here
        )
        got = graph.predict(_volume(hu16)).masks  # type: ignore[arg-type]
        monkeypatch.undo()
        assert calls == []
        assert graph._windowed is not None and "windowed" in graph._bound
        np.testing.assert_array_equal(got, want)
        assert 0 < got.sum() < got.size
    # float32 HU: the host path on the plain session, same masks
    host = graph.predict(_volume(hu16.astype(np.float32))).masks
    np.testing.assert_array_equal(host, got)


def test_window_in_the_graph_on_the_shipped_model(real_ct_dir: Path) -> None:
    """Two real 512 x 512 slices through the shipped model (fp32): the windowed graph's masks
    equal the host path's."""
    from ggo_cli.config import default_model_path
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.dicom.volume import load_volume

    volume = load_volume(discover_series([real_ct_dir]).eligible[0])
    assert volume.hu.dtype == np.int16 and volume.hu.shape[1:] == (512, 512)
    middle = volume.hu.shape[0] // 2
    two = CtVolume(volume.series, volume.hu[middle : middle + 2], (), 2.0, (0.7, 0.7))
    model = load_model_info(default_model_path())
    host = OnnxSegmenter(model, device="cpu", precision="fp32").predict(two).masks
    graph = OnnxSegmenter(model, device="cpu", precision="fp32", window_in_graph=True)
    np.testing.assert_array_equal(graph.predict(two).masks, host)


def test_a_failing_windowed_graph_falls_back_to_host_windowing(
    band_model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ggo_cli.analysis import segmenter as inference
    from ggo_cli.errors import ModelError

    def broken(*args: object, **kwargs: object) -> bytes:
        raise ModelError("cannot parse the model to add the window: test")

    monkeypatch.setattr(inference, "windowed_model_bytes", broken)
    hu16 = np.random.default_rng(3).integers(-1200, 200, size=(3, 64, 64)).astype(np.int16)
    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu", window_in_graph=True)
    got = seg.predict(_volume(hu16)).ggo  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, _band_truth(hu16.astype(np.float32)))
    assert not seg.window_in_graph
    assert "windowing on the host instead" in caplog.text
