"""explain.onnx of a two-class model: the target has one plane per channel (quick, tiny U-Net)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from ggo_cli.errors import ModelError
from training import checkpoints, loop
from training.config import AugmentConfig, TrainConfig
from training.data import load_slices, pack
from training.explain_checks import fp16_cam_inputs, gradient_errors
from training.explain_export import (
    GRADIENT_TOLERANCE,
    METADATA_KEY,
    SCORE,
    ExplainResult,
    export_explain,
    export_explain_proto,
)
from training.export import export_checkpoint
from training.faithfulness import model_grid_slices
from training.models import UNet

SIZE = 32
LAYERS = ("down.3", "dec.0", "dec.1", "dec.2", "dec.3")


def _tiny_unet(arch: str, **cfg: object) -> nn.Module:
    out_channels = cfg.get("out_channels", 1)
    assert isinstance(out_channels, int)
    return UNet(1, out_channels, widths=(2, 4, 8, 16, 32))


def _label_folder(root: Path, n: int = 6) -> Path:
    """Slices with a GGO blob (label 1, grey 120) and a consolidation blob (label 2, grey 220)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        image = (30 + 10 * rng.random((SIZE, SIZE))).astype(np.uint8)
        label = np.zeros((SIZE, SIZE), np.uint8)
        r, c = rng.integers(2, 10, size=2)
        label[r : r + 6, c : c + 6] = 1
        label[r + 12 : r + 18, c + 12 : c + 18] = 2
        image[label == 1] = 120
        image[label == 2] = 220
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(label).save(root / "labels" / f"s{i}.png")
    return root


@pytest.fixture(scope="module")
def two_class_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two-class")
    out = root / "d.npz"
    slices = load_slices(_label_folder(root / "d"), labels=(1, 2))
    pack(slices, out, size=SIZE, label=1, classes=("ggo", "consolidation"))
    return out


@pytest.fixture(scope="module")
def tiny_build() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_model", _tiny_unet)
        mp.setattr(checkpoints, "build_model", _tiny_unet)
        yield


@pytest.fixture(scope="module")
def explained(
    tiny_build: None, two_class_npz: Path, tmp_path_factory: pytest.TempPathFactory
) -> ExplainResult:
    """A 1-epoch two-class run exported, then its explain graph (float16 weights, with data)."""
    root = tmp_path_factory.mktemp("explained")
    config = TrainConfig(
        arch="unet",
        data=str(two_class_npz),
        out=str(root / "run"),
        size=SIZE,
        epochs=1,
        batch_size=4,
        device="cpu",
        classes=("ggo", "consolidation"),
        out_channels=2,
        augment=AugmentConfig(enabled=False),
    )
    run = loop.train(config, progress=False)
    exported = export_checkpoint(run.best_path, root / "model", data=two_class_npz)
    return export_explain(
        run.best_path,
        exported.model_path,
        exported.model_path.with_name("explain.onnx"),
        fp16_weights=True,
        data=two_class_npz,
    )


def test_two_class_explain_graph_takes_one_target_plane_per_channel(
    explained: ExplainResult,
) -> None:
    proto = onnx.load(str(explained.path))
    image, target = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in target.type.tensor_type.shape.dim]
    assert (target.name, dims) == ("target", ["N", 2, SIZE, SIZE])
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim][1] == 1
    (entry,) = [p for p in proto.metadata_props if p.key == METADATA_KEY]
    meta = json.loads(entry.value)
    assert meta["score"] == SCORE == "sum(sigmoid(logits) * target)"
    assert meta["faithfulness"]["measured"] and meta["faithfulness"]["target"] == "ggo"
    assert meta["default_layer"] == meta["faithfulness"]["best_layer"] in LAYERS
    assert meta["gradient_check"]["max_relative_error"] <= GRADIENT_TOLERANCE
    assert set(explained.fp16_cam_diff) == set(LAYERS)


def test_the_gradient_check_covers_channel_1(tiny_build: None) -> None:
    # The graph of one model checked against a model whose channel-1 head differs: channel 0
    # agrees, so only the check of the consolidation plane can catch it.
    torch.manual_seed(0)
    model = _tiny_unet("unet", out_channels=2).eval()
    other = copy.deepcopy(model)
    head = other.head
    assert isinstance(head, nn.Conv2d)
    with torch.no_grad():
        head.weight[1] *= -1.0
    blob = export_explain_proto(model, LAYERS, SIZE, channels=2).SerializeToString()
    assert max(gradient_errors(blob, model, LAYERS, SIZE, channels=2).values()) <= 1e-4
    assert max(gradient_errors(blob, other, LAYERS, SIZE, channels=2).values()) > 0.1
    with pytest.raises(ModelError, match="output channels"):
        export_explain_proto(model, LAYERS, SIZE, channels=1)


def test_fp16_check_targets_each_class_in_its_plane(two_class_npz: Path) -> None:
    grid = model_grid_slices(two_class_npz, SIZE, labels=(1, 2))
    assert set(np.unique(grid.masks)) == {0, 1, 2}
    for channel in (0, 1):
        _, targets = fp16_cam_inputs(grid, SIZE, channel, 2)
        assert targets.shape == (2, 2, SIZE, SIZE)
        assert set(np.unique(targets[:, channel])) == {0.0, 1.0}  # a 0/1 mask, not the label
        assert not targets[:, 1 - channel].any()
