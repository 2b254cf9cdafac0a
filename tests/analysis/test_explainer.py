"""GradCAM++ on ONNX Runtime: the explain contract, equation 19, grids, the explainer, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from pydicom.dataset import Dataset

from ggo_cli.analysis.explain_target import model_grid_target, select_slices
from ggo_cli.analysis.explainer import OnnxExplainer
from ggo_cli.analysis.gradcam_maths import cam_to_source, gradcam_plus_plus, normalise_per_slice
from ggo_cli.analysis.preprocessing import preprocess_hu
from ggo_cli.analysis.segmenter import OnnxSegmenter
from ggo_cli.domain import CtVolume, Prediction, SeriesInfo
from ggo_cli.errors import InputError, ModelError
from ggo_cli.onnx.explain_graph import (
    ExplainInfo,
    default_explain_path,
    layer_subgraph,
    load_explain_info,
)
from ggo_cli.onnx.model_info import ModelInfo, load_model_info
from tests.onnx_models import (
    conv_explain_model,
    conv_explain_weights,
    hu_to_unit,
    stamp_explain_metadata,
    write_conv_explain_pair,
)

REPO = Path(__file__).resolve().parents[2]
AIR_HU, BLOB_HU = -1000.0, -500.0
FloatArray = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelInfo, ExplainInfo]:
    """The 64 x 64 conv model (stride 1) and its validated explain graph."""
    model_path, explain_path = write_conv_explain_pair(tmp_path_factory.mktemp("pair"))
    model = load_model_info(model_path)
    return model, load_explain_info(explain_path, model)


@pytest.fixture(scope="module")
def pair_stride2(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelInfo, ExplainInfo]:
    """The conv model with a stride-2 layer (32 x 32 maps at 64 x 64 input)."""
    model_path, explain_path = write_conv_explain_pair(tmp_path_factory.mktemp("s2"), stride=2)
    model = load_model_info(model_path)
    return model, load_explain_info(explain_path, model)


def _volume(hu: FloatArray) -> CtVolume:
    datasets = []
    for i in range(hu.shape[0]):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.4.{i + 1}"
        datasets.append(ds)
    return CtVolume(SeriesInfo("1.2.3", "1.2.3.4", (), "x"), hu, tuple(datasets), 2.0, (0.5, 0.5))


def _blob_volume(n: int, rows: int, cols: int, blobs: dict[int, tuple[slice, slice]]) -> CtVolume:
    hu = np.full((n, rows, cols), AIR_HU, dtype=np.float32)
    for index, (r, c) in blobs.items():
        hu[index, r, c] = BLOB_HU
    return _volume(hu)


def _numpy_graph(
    image: FloatArray, target: FloatArray, stride: int
) -> dict[str, npt.NDArray[np.float64]]:
    """The conv explain graph in float64 numpy (see tests.onnx_models.conv_explain_model)."""
    w = conv_explain_weights()
    x = np.pad(image[:, 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    size = image.shape[-1]
    windows = [x[:, i : i + size, j : j + size] for i in range(3) for j in range(3)]
    box = np.sum(windows, axis=0)[:, ::stride, ::stride]
    pre = np.stack([w["w1"][k, 0, 0, 0] * box + w["b1"][k] for k in range(2)], axis=1)
    a = np.maximum(pre, 0.0)
    z = (w["v"].astype(np.float64) * a).sum(axis=1, keepdims=True) + w["b"][0]
    logits = z.repeat(stride, axis=2).repeat(stride, axis=3)
    s = 1.0 / (1.0 + np.exp(-logits))
    q = s * (1.0 - s) * target
    n = q.shape[0]
    dz = q.reshape(n, 1, size // stride, stride, size // stride, stride).sum(axis=(3, 5))
    return {
        "logits": logits,
        "activations.conv": a,
        "gradients.conv": w["v"] * dz,
        "activations.head": z,
        "gradients.head": dz,
    }


def _equation_19(a: npt.NDArray[np.float64], g: npt.NDArray[np.float64]) -> FloatArray:
    """Chattopadhyay et al. 2018, eq. 19, written out directly in float64."""
    sum_a = a.sum(axis=(2, 3), keepdims=True)
    denominator = 2 * g**2 + sum_a * g**3
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where((g != 0) & (denominator != 0), g**2 / denominator, 0.0)
    weights = (np.maximum(g, 0) * alpha).sum(axis=(2, 3))
    cam: FloatArray = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0.0).astype(
        np.float32
    )
    return cam


@pytest.mark.parametrize("stride", [1, 2])
def test_explain_graph_outputs_match_numpy(stride: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(stride)
    hu = rng.choice([AIR_HU, -800.0, -700.0, BLOB_HU], size=(3, 64, 64)).astype(np.float32)
    image = preprocess_hu(hu, size=64)
    target = (rng.random((3, 1, 64, 64)) < 0.3).astype(np.float32)
    proto = conv_explain_model(64, stride=stride)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"image": image, "target": target}), strict=True))
    want = _numpy_graph(image, target, stride)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.abs(got["gradients.conv"]).max() > 0


@pytest.mark.parametrize("layer", ["conv", "head"])
def test_layer_subgraph_computes_the_same_outputs_with_fewer_nodes(
    tmp_path: Path, layer: str
) -> None:
    import onnxruntime as ort

    _, explain_path = write_conv_explain_pair(tmp_path, stride=2)
    rng = np.random.default_rng(3)
    image = rng.random((2, 1, 64, 64), dtype=np.float32)
    target = (rng.random((2, 1, 64, 64)) < 0.3).astype(np.float32)
    feeds = {"image": image, "target": target}
    outputs = [f"activations.{layer}", f"gradients.{layer}"]
    full = ort.InferenceSession(str(explain_path), providers=["CPUExecutionProvider"])
    sub_bytes = layer_subgraph(explain_path, layer)
    sub = ort.InferenceSession(sub_bytes, providers=["CPUExecutionProvider"])
    assert [o.name for o in sub.get_outputs()] == outputs
    for got, want in zip(sub.run(outputs, feeds), full.run(outputs, feeds), strict=True):
        np.testing.assert_array_equal(got, want)
    pruned = onnx.load_from_string(sub_bytes)
    whole = onnx.load(str(explain_path))
    if layer == "head":  # its gradient needs no backward pass through the conv layer
        assert len(pruned.graph.node) < len(whole.graph.node)
    assert {p.key for p in pruned.metadata_props} == {p.key for p in whole.metadata_props}


def test_gradcam_plus_plus_is_equation_19_including_zero_gradients() -> None:
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(3, 5, 7, 6)), 0).astype(np.float32)
    g = rng.normal(scale=0.05, size=a.shape).astype(np.float32)
    g[rng.random(g.shape) < 0.3] = 0.0
    g[1, 2] = 0.0  # a whole channel without gradient
    sum_a = float(a[0, 1].astype(np.float64).sum())
    g[0, 1, 0, 0] = -2.0 / sum_a  # denominator 2 g^2 + sum(A) g^3 == 0 here
    cam = gradcam_plus_plus(a, g)
    assert cam.dtype == np.float32 and cam.shape == (3, 7, 6)
    np.testing.assert_allclose(
        cam, _equation_19(a.astype(np.float64), g.astype(np.float64)), rtol=1e-4, atol=1e-7
    )
    assert np.all(cam >= 0)


def test_all_zero_gradients_give_a_zero_cam() -> None:
    a = np.ones((2, 3, 4, 4), dtype=np.float32)
    assert not gradcam_plus_plus(a, np.zeros_like(a)).any()


def test_tiny_gradients_keep_their_weights_in_float32() -> None:
    # g^2 underflows float32 at 1e-24 (0 / 0); alpha = 1 / (2 + sum(A) g) does not.
    rng = np.random.default_rng(1)
    a = rng.random((1, 4, 8, 8)).astype(np.float32)
    g = (rng.random(a.shape) * 1e-24).astype(np.float32)
    with np.errstate(invalid="ignore"):
        naive = g**2 / (2 * g**2 + a.sum(axis=(2, 3), keepdims=True) * g**3)
    assert not np.isfinite(naive).any()  # 0 / 0 everywhere in float32
    cam = gradcam_plus_plus(a, g)
    want = _equation_19(a.astype(np.float64), g.astype(np.float64))
    assert cam.max() > 0
    np.testing.assert_allclose(normalise_per_slice(cam), normalise_per_slice(want), atol=1e-5)


def test_eps_variant_matches_pytorch_grad_cam_formula() -> None:
    # pytorch-grad-cam GradCAMPlusPlus.get_cam_weights, transcribed.
    rng = np.random.default_rng(2)
    a = np.maximum(rng.normal(size=(2, 4, 5, 5)), 0).astype(np.float32)
    g = rng.normal(scale=0.1, size=a.shape).astype(np.float32)
    g2, g3 = g**2, g**3
    aij = g2 / (2 * g2 + a.sum(axis=(2, 3))[:, :, None, None] * g3 + 1e-6)
    aij = np.where(g != 0, aij, 0)
    weights = (np.maximum(g, 0) * aij).sum(axis=(2, 3))
    want = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    np.testing.assert_allclose(gradcam_plus_plus(a, g, eps=1e-6), want, rtol=1e-4, atol=1e-7)


def test_gradcam_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="share a"):
        gradcam_plus_plus(np.zeros((1, 2, 3, 3), np.float32), np.zeros((1, 2, 3, 4), np.float32))


def test_cam_to_source_normalises_each_slice_and_zeroes_constant_ones() -> None:
    rng = np.random.default_rng(3)
    cam = rng.random((3, 16, 16)).astype(np.float32) * 1e-6
    cam[1] = 0.25
    out = cam_to_source(cam, size=64, rows=96, cols=80)
    assert out.shape == (3, 96, 80) and out.dtype == np.float32
    for i in (0, 2):
        assert out[i].min() == 0.0 and out[i].max() == pytest.approx(1.0)
    assert not out[1].any()


def test_normalising_before_upsampling_changes_nothing() -> None:
    # Resampling weights are convex, and min-max ignores a positive affine map.
    rng = np.random.default_rng(4)
    cam = rng.random((2, 8, 8)).astype(np.float32)
    coarse = normalise_per_slice(cam)
    np.testing.assert_allclose(
        cam_to_source(cam, size=64, rows=70, cols=64),
        cam_to_source(3.0 * coarse + 7.0, size=64, rows=70, cols=64),
        atol=2e-5,
    )


def test_cam_at_model_resolution_on_a_model_sized_slice_is_only_normalised() -> None:
    cam = np.random.default_rng(5).random((1, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(
        cam_to_source(cam, size=64, rows=64, cols=64), normalise_per_slice(cam), atol=1e-6
    )


def test_a_blob_moves_with_its_position_through_the_grids() -> None:
    # A point CAM at layer (2, 12) of 16 x 16 lands near source row 2.5*4*(96/64) on 96 x 80.
    cam = np.zeros((1, 16, 16), dtype=np.float32)
    cam[0, 2, 12] = 1.0
    out = cam_to_source(cam, size=64, rows=96, cols=80)
    r, c = np.unravel_index(int(out[0].argmax()), out[0].shape)
    assert abs(r - 2.5 * 4 * 1.5) <= 2 and abs(c - (12.5 * 4 * 1.5 - 8)) <= 2


def test_target_is_the_predicted_ggo_on_a_model_sized_grid() -> None:
    ggo = np.random.default_rng(6).random((2, 64, 64)) < 0.2
    target = model_grid_target(ggo, 64)
    assert target.shape == (2, 1, 64, 64)
    np.testing.assert_array_equal(target[:, 0].astype(bool), ggo)


def test_slice_selection() -> None:
    ggo = np.zeros((4, 8, 8), dtype=bool)
    ggo[[1, 3], 2, 2] = True
    assert select_slices(ggo, "ggo") == (1, 3)
    assert select_slices(ggo, "ALL") == (0, 1, 2, 3)
    assert select_slices(ggo, [3, 0, 3]) == (0, 3)
    with pytest.raises(InputError, match="outside the volume"):
        select_slices(ggo, [4])
    with pytest.raises(InputError, match="invalid slice selection"):
        select_slices(ggo, "some")


# --- Contract validation ----------------------------------------------------------------------


def test_valid_pair_loads(pair: tuple[ModelInfo, ExplainInfo]) -> None:
    model, info = pair
    assert info.layers == ("conv", "head") and info.default_layer == "conv"
    assert info.model_sha256 == model.recorded_sha256
    assert default_explain_path(model.path) == info.path


def test_missing_explain_graph_says_how_to_make_it(
    pair: tuple[ModelInfo, ExplainInfo], tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="not found.*python -m training export-explain"):
        load_explain_info(tmp_path / "explain.onnx", pair[0])


def _write_explain(
    path: Path, proto: onnx.ModelProto, model: ModelInfo, **overrides: object
) -> Path:
    meta: dict[str, object] = {
        "model_sha256": model.recorded_sha256,
        "layers": ["conv", "head"],
        "default_layer": "conv",
        "score": "sum(sigmoid(logits[:, 0]) * target)",
        "faithfulness": {},
    }
    meta.update(overrides)
    stamp_explain_metadata(proto, meta)
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_sha256": "ab" * 32}, r"model_sha256 abababababab\.\.\. does not match the model"),
        ({"default_layer": "decoder"}, r"default_layer 'decoder' is not among layers"),
        ({"layers": ["conv", "conv"]}, r"non-empty list of unique names"),
        ({"layers": ["conv", "head", "decoder.2"]}, r"missing \['activations.decoder.2'"),
        ({"layers": ["head", "conv"]}, r"outputs must be .*metadata layers order"),
        ({"sha256": "0" * 64}, r"graph sha256 .* does not match the recorded 000000000000"),
    ],
)
def test_contract_violations_are_model_errors(
    pair: tuple[ModelInfo, ExplainInfo], tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    path = _write_explain(tmp_path / "explain.onnx", conv_explain_model(64), pair[0], **overrides)
    with pytest.raises(ModelError, match=message):
        load_explain_info(path, pair[0])


def test_missing_gradient_output_is_a_model_error(
    pair: tuple[ModelInfo, ExplainInfo], tmp_path: Path
) -> None:
    proto = conv_explain_model(64)
    kept = [o for o in proto.graph.output if o.name != "gradients.head"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    path = _write_explain(tmp_path / "explain.onnx", proto, pair[0])
    with pytest.raises(ModelError, match=r"missing \['gradients.head'\]"):
        load_explain_info(path, pair[0])


def test_missing_metadata_and_keys_are_model_errors(
    pair: tuple[ModelInfo, ExplainInfo], tmp_path: Path
) -> None:
    path = tmp_path / "explain.onnx"
    onnx.save(conv_explain_model(64), str(path))
    with pytest.raises(ModelError, match="no 'ggo_cli_explain' metadata.*export-explain"):
        load_explain_info(path, pair[0])
    proto = conv_explain_model(64)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "ggo_cli_explain", json.dumps({"layers": ["conv"]})
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match=r"lacks required keys \['model_sha256'"):
        load_explain_info(path, pair[0])


def test_wrong_input_size_is_a_model_error(
    pair: tuple[ModelInfo, ExplainInfo], tmp_path: Path
) -> None:
    path = _write_explain(tmp_path / "explain.onnx", conv_explain_model(32), pair[0])
    with pytest.raises(ModelError, match=r"spatial size \[32, 32\] does not match"):
        load_explain_info(path, pair[0])


# --- The explainer ----------------------------------------------------------------------------


def _inside_outside(cam: FloatArray, mask: npt.NDArray[np.uint8]) -> tuple[float, float]:
    inside = mask.astype(bool)
    return float(cam[inside].mean()), float(cam[~inside].mean())


def test_cam_is_higher_inside_the_predicted_ggo(pair: tuple[ModelInfo, ExplainInfo]) -> None:
    model, info = pair
    volume = _blob_volume(3, 64, 64, {0: (slice(10, 26), slice(30, 50)), 2: (slice(40, 56),) * 2})
    prediction = OnnxSegmenter(model, device="cpu").predict(volume)
    done: list[int] = []
    explanation = OnnxExplainer(model, info, device="cpu", batch_size=1).explain(
        volume, prediction, on_slices=done.append
    )
    assert explanation.slice_indices == (0, 2) and sum(done) == 2
    assert explanation.sop_instance_uids == ("1.2.3.4.1", "1.2.3.4.3")
    assert explanation.cam.shape == (2, 64, 64) and explanation.cam.dtype == np.float32
    assert explanation.mask.dtype == np.uint8 and explanation.layer == "conv"
    np.testing.assert_array_equal(explanation.mask, prediction.ggo[[0, 2]])
    assert explanation.cam.min() == 0.0 and explanation.cam.max() == 1.0
    for k in range(2):
        inside, outside = _inside_outside(explanation.cam[k], explanation.mask[k])
        assert inside >= 2 * outside and inside > 0.3


def test_all_slices_give_zero_maps_where_nothing_is_predicted(
    pair: tuple[ModelInfo, ExplainInfo],
) -> None:
    model, info = pair
    volume = _blob_volume(3, 64, 64, {1: (slice(20, 40), slice(20, 40))})
    prediction = OnnxSegmenter(model, device="cpu").predict(volume)
    explanation = OnnxExplainer(model, info, device="cpu").explain(volume, prediction, slices="all")
    assert explanation.slice_indices == (0, 1, 2)
    assert not explanation.cam[[0, 2]].any() and explanation.cam[1].max() == 1.0
    assert explanation.mask[[0, 2]].sum() == 0


def test_no_ggo_gives_an_empty_explanation(pair: tuple[ModelInfo, ExplainInfo]) -> None:
    model, info = pair
    volume = _blob_volume(2, 64, 64, {})
    prediction = Prediction(np.zeros((2, 64, 64, 1), dtype=bool), 0.5)
    explanation = OnnxExplainer(model, info, device="cpu").explain(volume, prediction)
    assert explanation.slice_indices == () and explanation.cam.shape == (0, 64, 64)


def test_resized_grid_keeps_the_cam_on_the_blob(
    pair_stride2: tuple[ModelInfo, ExplainInfo],
) -> None:
    model, info = pair_stride2
    volume = _blob_volume(1, 96, 80, {0: (slice(30, 60), slice(10, 34))})
    prediction = OnnxSegmenter(model, device="cpu").predict(volume)
    explanation = OnnxExplainer(model, info, device="cpu").explain(volume, prediction)
    inside, outside = _inside_outside(explanation.cam[0], explanation.mask[0])
    assert explanation.cam.shape == (1, 96, 80)
    assert inside >= 2 * outside
    peak = np.unravel_index(int(explanation.cam[0].argmax()), (96, 80))
    assert 26 <= peak[0] <= 64 and 6 <= peak[1] <= 38


def test_compute_cam_is_gradcam_of_the_graph_outputs(
    pair_stride2: tuple[ModelInfo, ExplainInfo],
) -> None:
    model, info = pair_stride2
    rng = np.random.default_rng(7)
    hu = rng.choice([AIR_HU, -700.0, BLOB_HU], size=(3, 64, 64)).astype(np.float32)
    image = preprocess_hu(hu, size=64)
    target = (rng.random((3, 1, 64, 64)) < 0.4).astype(np.float32)
    want = _numpy_graph(image, target, 2)
    explainer = OnnxExplainer(model, info, device="cpu", batch_size=2, layer="head")
    np.testing.assert_allclose(
        explainer.compute_cam(image, target),
        _equation_19(want["activations.head"], want["gradients.head"]),
        rtol=1e-3,
        atol=1e-9,
    )


def test_unknown_layer_is_an_input_error(pair: tuple[ModelInfo, ExplainInfo]) -> None:
    with pytest.raises(InputError, match="unknown --layer 'decoder'; choose one of conv, head"):
        OnnxExplainer(*pair, device="cpu", layer="decoder")


def test_out_of_memory_halves_the_explain_batch(
    pair: tuple[ModelInfo, ExplainInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    explainer = OnnxExplainer(*pair, device="cpu", batch_size=8)
    real_run = explainer.session.run
    sizes: list[int] = []

    def run(names: list[str], feeds: dict[str, FloatArray]) -> list[FloatArray]:
        sizes.append(feeds["image"].shape[0])
        if feeds["image"].shape[0] > 2:
            raise RuntimeError("CUDA failure 2: out of memory ; GPU=0")
        return list(real_run(names, feeds))

    class FakeSession:
        def __getattr__(self, name: str) -> object:
            return run if name == "run" else getattr(explainer.session, name)

    monkeypatch.setattr(explainer, "session", FakeSession())
    monkeypatch.setattr(explainer, "on_cuda", True)
    image = np.full((9, 1, 64, 64), hu_to_unit(BLOB_HU), dtype=np.float32)
    cam = explainer.compute_cam(image, np.ones_like(image))
    assert cam.shape == (9, 64, 64) and explainer.batch_size == 2
    assert sizes[:3] == [8, 4, 2]


def test_explain_runs_with_torch_unimportable(tmp_path: Path) -> None:
    model_path, _ = write_conv_explain_pair(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from pathlib import Path
        import numpy as np
        from pydicom.dataset import Dataset
        from ggo_cli.domain import CtVolume, SeriesInfo
        from ggo_cli.analysis.explainer import OnnxExplainer
        from ggo_cli.onnx.explain_graph import default_explain_path, load_explain_info
        from ggo_cli.analysis.segmenter import OnnxSegmenter
        from ggo_cli.onnx.model_info import load_model_info
        from ggo_cli.writers.gradcam_png import write_gradcam_npz, write_gradcam_pngs

        hu = np.full((2, 64, 64), -1000.0, dtype=np.float32)
        hu[1, 20:40, 20:40] = -500.0
        datasets = []
        for i in range(2):
            ds = Dataset()
            ds.SOPInstanceUID = f"1.2.{{i}}"
            datasets.append(ds)
        volume = CtVolume(SeriesInfo("1", "2", (), "x"), hu, tuple(datasets), 1.0, (1.0, 1.0))
        model = load_model_info(Path({str(model_path)!r}))
        info = load_explain_info(default_explain_path(model.path), model)
        prediction = OnnxSegmenter(model, device="cpu").predict(volume)
        explanation = OnnxExplainer(model, info, device="cpu").explain(volume, prediction)
        out = Path({str(tmp_path)!r})
        write_gradcam_npz(out / "gradcam.npz", explanation)
        pngs = write_gradcam_pngs(volume, explanation, out / "gradcam",
                                  window_center_hu=-600.0, window_width_hu=1500.0)
        assert sys.modules["torch"] is None
        print(explanation.slice_indices, [p.name for p in pngs])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1,) ['slice_0002.png']"
    assert (tmp_path / "gradcam.npz").is_file()
