"""The records of a training run: one ``metrics.csv`` row per epoch and the finished run's result.

Also the run's mutable progress (what ``--resume`` restores). Writes ``metrics.csv`` (6 significant
digits, the header named after the record's fields).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

METRICS_NAME = "metrics.csv"


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """One row of ``metrics.csv``.

    Attributes:
        epoch: 1-based epoch number.
        lr: learning rate used in the epoch.
        train_loss: mean training loss (augmented batches).
        val_loss: validation loss (pooled over the validation set).
        val_dice: validation pooled Dice at probability 0.5 on the model grid.
        val_dice_mean: validation mean per-slice Dice.
        val_precision: validation pooled precision.
        val_recall: validation pooled recall.
        seconds: wall time of the epoch.
    """

    epoch: int
    lr: float
    train_loss: float
    val_loss: float
    val_dice: float
    val_dice_mean: float
    val_precision: float
    val_recall: float
    seconds: float


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: the run folder.
        best_path: best weights (float32).
        best_fp16_path: best weights as float16 (small enough to copy off a GPU machine).
        last_path: the resumable last checkpoint.
        best_epoch: epoch of the best validation Dice.
        best_val_dice: that Dice.
        epochs_run: last finished epoch.
        stopped_early: whether early stopping ended the run.
        history: all epoch records.
    """

    run_dir: Path
    best_path: Path
    best_fp16_path: Path
    last_path: Path
    best_epoch: int
    best_val_dice: float
    epochs_run: int
    stopped_early: bool
    history: tuple[EpochRecord, ...]

    def summary(self, seconds: float) -> dict[str, Any]:
        """The JSON summary a training command prints, with its wall ``seconds``."""
        return {
            "seconds": round(seconds, 1),
            "run_dir": str(self.run_dir),
            "best": str(self.best_path),
            "best_fp16": str(self.best_fp16_path),
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_val_dice,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
        }


@dataclass(slots=True)
class RunProgress:
    """Mutable progress of a run (restored on resume)."""

    epoch: int = 0
    best_val_dice: float = -1.0
    best_epoch: int = 0
    wait: int = 0
    history: list[EpochRecord] | None = None
    best_state: dict[str, Tensor] | None = None
    best_written: int = -1


def append_metrics_row(path: Path, record: EpochRecord) -> None:
    """Append one row to metrics.csv (header on a new file)."""
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow([f.name for f in fields(EpochRecord)])
        writer.writerow(_csv_row(record))


def write_metrics(path: Path, history: Sequence[EpochRecord]) -> None:
    """Rewrite metrics.csv from the checkpoint's history (on resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([f.name for f in fields(EpochRecord)])
        for record in history:
            writer.writerow(_csv_row(record))


def _csv_row(record: EpochRecord) -> list[str]:
    """Format a record for the CSV (6 significant digits)."""
    return [f"{v:.6g}" if isinstance(v, float) else str(v) for v in asdict(record).values()]
