"""The training command's options and devices on CPU (training runs and resume:
tests/e2e/training/test_loop_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ggo_cli.errors import DeviceError
from training.cli import main
from training.loop import autocast_dtype, select_device


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
