"""The training protocol on CPU: loss goes down, files are written, resume continues exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ggo_cli.errors import DeviceError
from training.checkpoints import load_checkpoint
from training.cli import main
from training.loop import TrainResult, autocast_dtype, select_device


def test_two_epochs_lower_the_training_loss(tiny_run: TrainResult) -> None:
    first, second = tiny_run.history
    assert second.train_loss < first.train_loss


def test_run_writes_checkpoints_split_and_metrics(tiny_run: TrainResult) -> None:
    run = tiny_run.run_dir
    for name in ("best.pt", "best_fp16.pt", "last.pt", "split.json", "metrics.csv"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"lr", "train_loss", "val_loss", "val_dice", "val_dice_mean"} <= set(rows[0])
    split = json.loads((run / "split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (6, 2, 2)
    best = load_checkpoint(run / "best.pt")
    assert best["config"]["arch"] == "resnet50-unet" and best["split"] == split
    assert best["git_commit"] and best["epoch"] == 2 and "optimizer_state" not in best
    last = load_checkpoint(run / "last.pt")
    assert {"optimizer_state", "scheduler_state", "rng"} <= set(last)
    fp16 = load_checkpoint(run / "best_fp16.pt")
    assert fp16["model_state"]["head.weight"].dtype == torch.float16
    assert (run / "best_fp16.pt").stat().st_size < 0.6 * (run / "best.pt").stat().st_size


def test_cli_train_without_data_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--arch", "unet", "-q"]) == 2
    assert capsys.readouterr().out == ""


def test_cli_bad_size_exits_2(tiny_npz: Path, tmp_path: Path) -> None:
    assert (
        main(["train", "--data", str(tiny_npz), "--size", "50", "--out", str(tmp_path), "-q"]) == 2
    )


def test_select_device() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
            select_device("cuda")


def test_autocast_defaults() -> None:
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype("off", torch.device("cuda")) is None
