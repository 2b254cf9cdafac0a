"""Two classes (GGO + consolidation) and semi-supervised training: quick CPU tests on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from ggo_cli.errors import InputError
from ggo_cli.onnx.model_info import load_model_info, stamp_metadata
from training import checkpoints, loop
from training.cli import main
from training.config import AugmentConfig, TrainConfig, parse_classes
from training.data import load_slices, pack, read_packed_slices, to_grid
from training.losses import dice_loss, focal_tversky_loss, make_loss
from training.models import UNet
from training.multiclass import (
    CONSOLIDATION_SCT,
    bootstrap_dice,
    class_report,
    one_hot,
    segment_metadata,
)
from training.semisup import SemiSupConfig, check_no_leak, pseudo_labels, train_semisup
from training.splits import Split, load_split

SIZE = 32
GAIN = 20.0


def _label_folder(
    root: Path, n: int = 6, seed: int = 0, shape: tuple[int, int] = (40, 48)
) -> Path:
    """Slices with a GGO blob (label 1, grey 120) and a consolidation blob (label 2, grey 220)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        image = (30 + 10 * rng.random(shape)).astype(np.uint8)
        label = np.zeros(shape, np.uint8)
        r, c = rng.integers(2, 10, size=2)
        label[r : r + 6, c : c + 6] = 1
        label[r + 12 : r + 18, c + 12 : c + 18] = 2
        image[label == 1] = 120
        image[label == 2] = 220
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(label).save(root / "labels" / f"s{i}.png")
    return root


def test_two_class_targets_from_label_values_1_and_2(tmp_path: Path) -> None:
    data = _label_folder(tmp_path / "d", n=1)
    truth = np.asarray(Image.open(data / "labels" / "s0.png"))
    (s,) = load_slices(data, labels=(1, 2))
    assert s.mask.dtype == np.uint8
    targets = one_hot(s.mask[None], 2)[0]
    assert np.array_equal(targets[0], truth == 1)  # channel 0 = GGO
    assert np.array_equal(targets[1], truth == 2)  # channel 1 = consolidation
    (ggo_only,) = load_slices(data)  # the one-class default ignores consolidation
    assert ggo_only.mask.dtype == bool and np.array_equal(ggo_only.mask, truth == 1)


def test_pack_keeps_class_maps_and_the_grid_keeps_both_classes(tmp_path: Path) -> None:
    slices = load_slices(_label_folder(tmp_path / "d", n=2), labels=(1, 2))
    out = tmp_path / "p.npz"
    grid = pack(slices, out, size=SIZE, label=1, classes=("ggo", "consolidation"))
    assert set(np.unique(grid.masks)) == {0, 1, 2}
    back = read_packed_slices(out)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(slices, back, strict=True))
    assert np.array_equal(to_grid(back, SIZE).masks, grid.masks)


def test_classes_option_must_start_with_ggo() -> None:
    assert parse_classes("ggo, consolidation") == ("ggo", "consolidation")
    for bad in ("consolidation,ggo", "ggo,ggo", "ggo,fibrosis"):
        with pytest.raises(InputError):
            parse_classes(bad)
    with pytest.raises(InputError):
        TrainConfig(classes=("ggo", "consolidation"), out_channels=1)


def test_loss_is_the_sum_of_the_per_channel_losses() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 2, 8, 8) > 0.6).float()
    loss = make_loss("focal-tversky-dice", channels=2)(logits, target)
    by_hand = sum(
        focal_tversky_loss(logits[:, k : k + 1], target[:, k : k + 1])
        + dice_loss(logits[:, k : k + 1], target[:, k : k + 1])
        for k in range(2)
    )
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)
    # channel 1 counts: a perfect consolidation channel lowers the loss, GGO unchanged
    better = logits.clone()
    better[:, 1] = 20 * (2 * target[:, 1] - 1)
    assert float(make_loss("dice", channels=2)(better, target)) < float(
        make_loss("dice", channels=2)(logits, target)
    )
    assert float(make_loss("dice")(better, target)) == float(make_loss("dice")(logits, target))


def test_pseudo_labels_are_the_thresholded_teacher_probabilities() -> None:
    teacher = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        teacher.weight[:] = torch.tensor([10.0, 10.0]).view(2, 1, 1, 1)
        teacher.bias[:] = torch.tensor([-5.0, -8.0])  # p > 0.5 at x > 0.5, resp. x > 0.8
    images = torch.linspace(0, 1, 2 * 16 * 16).view(2, 1, 16, 16)
    labels = pseudo_labels(teacher, images, threshold=0.5, n_classes=2, batch=1)
    assert labels.dtype == torch.uint8 and labels.shape == (2, 2, 16, 16)
    assert torch.equal(labels[:, 0], (images[:, 0] * 10 - 5 > 0).to(torch.uint8))
    assert torch.equal(labels[:, 1], (images[:, 0] * 10 - 8 > 0).to(torch.uint8))
    strict = pseudo_labels(teacher, images, threshold=0.9, n_classes=1)
    assert strict.shape[1] == 1 and int(strict.sum()) < int(labels[:, 0].sum())


def test_unlabelled_ids_and_foreign_splits_are_refused() -> None:
    split = Split(train=("a", "b"), val=("c",), test=("d",), seed=0, grouped=False)
    check_no_leak(split, ["u_1", "u_2"], split)
    with pytest.raises(InputError, match="share ids"):
        check_no_leak(split, ["u_1", "c"], split)
    other = Split(train=("a", "c"), val=("b",), test=("d",), seed=1, grouped=False)
    with pytest.raises(InputError, match="teacher's"):
        check_no_leak(split, ["u_1"], other)


def _tiny_unet(arch: str, **cfg: object) -> nn.Module:
    out_channels = cfg.get("out_channels", 1)
    assert isinstance(out_channels, int)
    return UNet(1, out_channels, widths=(2, 4, 8, 16, 32))


def test_semi_supervised_run_keeps_unlabelled_out_of_validation_and_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "build_model", _tiny_unet)
    monkeypatch.setattr(checkpoints, "build_model", _tiny_unet)
    npz = tmp_path / "d.npz"
    pack(
        load_slices(_label_folder(tmp_path / "d", n=10), labels=(1, 2)),
        npz,
        size=SIZE,
        label=1,
        classes=("ggo", "consolidation"),
    )
    unlabeled = tmp_path / "u"
    unlabeled.mkdir()
    for v in range(2):
        for z in range(3):
            grey = np.full((20, 30), 40 + 60 * z, np.uint8)
            Image.fromarray(grey).save(unlabeled / f"vol{v}_{z}.jpg")
    base = TrainConfig(
        data=str(npz),
        out=str(tmp_path / "teacher"),
        size=SIZE,
        epochs=1,
        batch_size=4,
        device="cpu",
        classes=("ggo", "consolidation"),
        out_channels=2,
        augment=AugmentConfig(enabled=False),
    )
    teacher = loop.train(base, progress=False)
    student_cfg = TrainConfig.from_dict({**base.to_dict(), "out": str(tmp_path / "student")})
    semi = SemiSupConfig(teacher=str(teacher.run_dir), unlabeled=str(unlabeled))
    student = train_semisup(student_cfg, semi, progress=False)
    split = load_split(student.run_dir / "split.json")
    assert split.to_dict() == load_split(teacher.run_dir / "split.json").to_dict()
    named = set(split.train) | set(split.val) | set(split.test)
    record = json.loads((student.run_dir / "unlabeled.json").read_text())
    assert record["n_unlabeled"] == 6 and record["volumes"] == ["vol0", "vol1"]
    assert not named & set(record["ids"])
    ckpt = checkpoints.load_checkpoint(student.best_path)
    assert ckpt["config"]["classes"] == ("ggo", "consolidation")
    assert ckpt["semi_supervised"]["pseudo_threshold"] == 0.5


def _two_channel_model(path: Path) -> Path:
    """Channel 0: 20 (x - 0.3), channel 1: 20 (x - 0.7) (GGO grey 120, consolidation 220)."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, SIZE, SIZE])
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["image", "offsets"], ["centred"]),
            helper.make_node("Mul", ["centred", "gain"], ["logits"]),
        ],
        "two",
        [image],
        [logits],
        [
            helper.make_tensor("offsets", TensorProto.FLOAT, [1, 2, 1, 1], [0.3, 0.7]),
            helper.make_tensor("gain", TensorProto.FLOAT, [], [GAIN]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    stamp_metadata(
        proto,
        {
            "name": "two-class-test",
            "version": "0",
            "architecture": "threshold",
            "input_size": SIZE,
            "window_center": -600.0,
            "window_width": 1500.0,
            "threshold": 0.5,
            "segments": segment_metadata(("ggo", "consolidation")),
            "classes": ["ggo", "consolidation"],
            "training_data": {},
            "metrics": {},
        },
    )
    onnx.save(proto, str(path))
    return path


def test_two_class_export_metadata_passes_the_contract_reader(tmp_path: Path) -> None:
    info = load_model_info(_two_channel_model(tmp_path / "m.onnx"))
    assert info.n_channels == 2
    ggo, consolidation = info.segments
    assert (ggo.property_type.value, ggo.property_type.scheme_designator) == ("112120", "DCM")
    assert consolidation.property_type.value == CONSOLIDATION_SCT[0] == "9656002"
    assert consolidation.property_type.scheme_designator == "SCT"
    assert consolidation.property_category.value == "49755003"


def test_evaluate_json_has_the_consolidation_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _two_channel_model(tmp_path / "m.onnx")
    data = _label_folder(tmp_path / "d", n=3, shape=(SIZE, SIZE))  # no resize: exact counts
    args = ["evaluate", "--model", str(model), "--data", str(data), "--json", "--ci", "-q"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    for key in ("consolidation_dice", "consolidation_precision", "consolidation_recall"):
        assert got[key] == pytest.approx(1.0)  # grey 220 only exceeds 0.7: exact
    assert got["consolidation_dice_mean"] == pytest.approx(1.0)
    assert got["recall"] == pytest.approx(1.0) and got["precision"] < 1.0  # GGO also fires on 220
    low, high = got["dice_ci95"]
    assert low <= got["dice"] <= high


def test_bootstrap_interval_is_seeded_and_covers_the_pooled_dice() -> None:
    from training.metrics import Confusion, summarize

    counts = [Confusion(tp, 10, 5, 0) for tp in (0, 5, 20, 40, 80)]
    a, b = bootstrap_dice(counts), bootstrap_dice(counts)
    assert a == b and a[0] < summarize(counts).dice < a[1]
    assert bootstrap_dice(counts, seed=1) != a
    report = class_report(("ggo", "consolidation"), [counts, counts[:2]], intervals=True)
    assert report["n_images"] == 5 and "consolidation_n_images" not in report
    assert report["consolidation_dice"] == pytest.approx(summarize(counts[:2]).dice)


def test_one_class_readers_get_ggo_masks_from_a_two_class_file(tmp_path: Path) -> None:
    from training.data import load_grid

    slices = load_slices(_label_folder(tmp_path / "d", n=2), labels=(1, 2))
    out = tmp_path / "p.npz"
    pack(slices, out, size=SIZE, label=1, classes=("ggo", "consolidation"))
    for s, ggo in zip(slices, load_slices(out), strict=True):  # quantize, explain, reference set
        assert ggo.mask.dtype == bool and np.array_equal(ggo.mask, s.mask == 1)
    assert set(np.unique(load_grid(out, size=SIZE).masks)) == {0, 1}
    assert set(np.unique(load_grid(out, size=SIZE, labels=(1, 2)).masks)) == {0, 1, 2}
