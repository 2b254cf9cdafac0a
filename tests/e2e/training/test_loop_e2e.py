"""The training protocol end to end on CPU: loss goes down, files are written, a resumed run
equals an uninterrupted one, and the ``train`` command prints its result (moved from
tests/training/test_loop.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_config
from training.checkpoints import load_checkpoint
from training.cli import main
from training.config import AugmentConfig
from training.loop import TrainResult, train


def test_resume_continues_exactly_where_it_stopped(tiny_npz: Path, tmp_path: Path) -> None:
    common = {"arch": "densenet121-unet", "size": 32, "augment": AugmentConfig()}
    straight = train(tiny_config(tiny_npz, tmp_path / "a", epochs=2, **common), progress=False)
    train(tiny_config(tiny_npz, tmp_path / "b", epochs=1, **common), progress=False)
    resumed = train(
        tiny_config(tiny_npz, tmp_path / "b", epochs=2, **common),
        resume=tmp_path / "b" / "last.pt",
        progress=False,
    )
    assert resumed.epochs_run == 2 and len(resumed.history) == 2
    a = load_checkpoint(straight.last_path)["model_state"]
    b = load_checkpoint(resumed.last_path)["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    rows = list(csv.DictReader((tmp_path / "b" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_cli_train_prints_the_result_as_json(
    tiny_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            "--arch",
            "densenet121-unet",
            "--data",
            str(tiny_npz),
            "--out",
            str(out),
            "--size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--amp",
            "bf16",
            "--no-progress",
            "-q",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs_run"] == 1 and Path(result["best"]).is_file()


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
