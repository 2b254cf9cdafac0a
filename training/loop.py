"""The training protocol of the paper, made fast on one GPU.

Adam (lr 2e-4), ReduceLROnPlateau on the validation loss, early stopping on the validation
pooled Dice (patience 30; 0 disables), the best weights by validation Dice, ``last.pt`` for
``--resume``, a seeded 64/16/20 split in ``split.json``, per-epoch metrics in ``metrics.csv``.

Speed: the whole data set lives on the device as one tensor and batches are augmented there
(:mod:`training.augment`), so no DataLoader or worker processes are involved; CUDA runs use
bf16 autocast (fp16 with loss scaling where bf16 is missing), channels-last tensors and cuDNN
autotuning (fast, not bit-reproducible). The best weights are kept in host memory and written
every ``save_every`` epochs and at the end, not at every improvement.

Imports only torch, numpy, tqdm and the pure-numpy ggo_cli modules (GPU machines may lack PIL,
pydicom and SimpleITK; train there from a packed ``.npz``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import random
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ggo_cli.errors import DeviceError, InputError

from .augment import Augmenter
from .checkpoints import (
    BEST_FP16_NAME,
    BEST_NAME,
    LAST_NAME,
    cpu_state,
    git_commit,
    load_checkpoint,
    save_checkpoint,
    to_fp16_state,
    unwrap,
)
from .config import TrainConfig
from .data import GridData, data_classes, load_grid
from .losses import make_loss
from .metrics import Confusion, summarize
from .models import build_model, load_pretrained_encoder
from .multiclass import class_values, one_hot
from .splits import Split, check_split_ids, load_split, make_split, save_split

log = logging.getLogger(__name__)

SPLIT_NAME = "split.json"
METRICS_NAME = "metrics.csv"
VAL_BATCH = 16
_IMPROVEMENT = 1e-6


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


def select_device(name: str = "auto") -> torch.device:
    """The one device-selection function: ``auto`` (CUDA if present), ``cpu``, ``cuda[:N]``.

    Raises:
        DeviceError: CUDA asked for but unavailable, or a bad device name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPUs visible")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``--amp`` mode on a device (None: full float32)."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # CPU: opt in with --amp bf16 (about 3x faster on CPUs with AMX)


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """An autocast context, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive index batches of a permutation (the last may be smaller)."""
    for start in range(0, order.numel(), batch_size):
        yield order[start : start + batch_size]


@dataclass(slots=True)
class _State:
    """Mutable progress of a run (restored on resume)."""

    epoch: int = 0
    best_val_dice: float = -1.0
    best_epoch: int = 0
    wait: int = 0
    history: list[EpochRecord] | None = None
    best_state: dict[str, Tensor] | None = None
    best_written: int = -1


class Trainer:
    """One training run; :meth:`run` does everything.

    Args:
        config: the run configuration.
        resume: a ``last.pt`` to continue from.
        progress: show a tqdm bar on stderr.
    """

    def __init__(self, config: TrainConfig, *, resume: Path | None = None, progress: bool = True):
        self.config = config
        self.run_dir = Path(config.out)
        self.progress = progress
        self.device = select_device(config.device)
        self.amp = autocast_dtype(config.amp, self.device)
        self.channels_last = (
            config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        )
        seed_everything(config.seed)
        checkpoint = load_checkpoint(resume) if resume is not None else None
        grid = load_training_grid(config)
        self.split = self._split(grid, checkpoint)
        save_split(self.split, self.run_dir / SPLIT_NAME)
        self._to_device(grid)
        self.model = self._model()
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer,
            mode="min",
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=config.min_lr,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp == torch.float16 and self.device.type == "cuda"
        )
        self.loss_fn = make_loss(
            config.loss,
            alpha=config.tversky_alpha,
            beta=config.tversky_beta,
            gamma=config.focal_gamma,
            channels=len(config.classes),
        )
        self.augmenter = Augmenter(config.augment, self.device, seed=config.seed + 1)
        self.shuffle = torch.Generator()
        self.shuffle.manual_seed(config.seed + 2)
        self.state = _State(history=[])
        self.val_class_dice: list[float] = []
        self.commit = git_commit()
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self._rewrite_csv()  # a fresh run starts a fresh metrics.csv

    # ------------------------------------------------------------------ setup

    def _split(self, grid: GridData, checkpoint: Mapping[str, Any] | None) -> Split:
        """The split: from the checkpoint, from --split-file, or a new seeded one."""
        if checkpoint is not None:
            split = Split.from_dict(dict(checkpoint["split"]))
        elif self.config.split_file:
            split = load_split(Path(self.config.split_file))
        else:
            split = make_split(grid.ids, grid.groups, seed=self.config.seed)
        check_split_ids(split, grid.ids)
        if not split.train or not split.val:
            raise InputError("training needs non-empty train and validation splits")
        log.info(
            "split: %d train, %d val, %d test slices (seed %d, grouped %s)",
            len(split.train),
            len(split.val),
            len(split.test),
            split.seed,
            split.grouped,
        )
        return split

    def _to_device(self, grid: GridData) -> None:
        """Put train and validation slices on the device as float32 tensors."""
        index = {sid: i for i, sid in enumerate(grid.ids)}

        def stack(ids: tuple[str, ...]) -> tuple[Tensor, Tensor]:
            rows = [index[i] for i in ids]
            images = torch.from_numpy(np.ascontiguousarray(grid.images[rows]))[:, None]
            masks = torch.from_numpy(one_hot(grid.masks[rows], len(self.config.classes)))
            return images.to(self.device), masks.to(self.device, torch.float32)

        self.train_images, self.train_masks = stack(self.split.train)
        self.val_images, self.val_masks = stack(self.split.val)
        if not bool(self.train_masks.any()):
            raise InputError(
                f"no training mask contains label {self.config.label}; check --label "
                "(1 for the shared palette PNGs, 255 for 0/255 BMP masks)"
            )

    def _model(self) -> nn.Module:
        """Build the network (optionally pretrained), on the device."""
        model = build_model(self.config.arch, out_channels=self.config.out_channels)
        if self.config.pretrained:
            load_pretrained_encoder(model, self.config.arch, self.config.pretrained)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        if self.config.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        """Continue from a ``last.pt``."""
        if "optimizer_state" not in ckpt:
            raise InputError("--resume needs a last.pt (best checkpoints hold no optimizer state)")
        unwrap(self.model).load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        self.scaler.load_state_dict(ckpt["scaler_state"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        self.shuffle.set_state(rng["shuffle"])
        with contextlib.suppress(RuntimeError):  # a checkpoint from another device type
            self.augmenter.load_state(rng["augment"].to(self.augmenter.state().device))
        history = [EpochRecord(**row) for row in ckpt["history"]]
        best = ckpt.get("best_state")
        self.state = _State(
            epoch=int(ckpt["epoch"]),
            best_val_dice=float(ckpt["best_val_dice"]),
            best_epoch=int(ckpt["best_epoch"]),
            wait=int(ckpt["epochs_without_improvement"]),
            history=history,
            best_state=dict(best) if best is not None else None,
        )
        self._rewrite_csv()
        log.info("resumed at epoch %d (best Dice %.4f)", self.state.epoch, self.state.best_val_dice)

    # ------------------------------------------------------------------ epochs

    def _train_epoch(self) -> float:
        """One pass over the shuffled training set; returns the mean loss."""
        self.model.train()
        order = torch.randperm(self.train_images.shape[0], generator=self.shuffle).to(self.device)
        total = torch.zeros((), device=self.device)
        for idx in _batches(order, self.config.batch_size):
            images, masks = self.augmenter(self.train_images[idx], self.train_masks[idx])
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                logits = self.model(images)
            loss = self.loss_fn(logits, masks)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total += loss.detach() * idx.numel()
        return float(total) / self.train_images.shape[0]

    @torch.no_grad()
    def _validate(self) -> tuple[float, list[Confusion]]:
        """Validation loss (pooled) and per-slice GGO confusion counts at probability 0.5.

        With several classes, ``self.val_class_dice`` holds each class's pooled Dice and the
        model is selected on their mean (:meth:`_selection_dice`).
        """
        n_classes = len(self.config.classes)
        self.model.eval()
        logits_all, counts = [], []
        for start in range(0, self.val_images.shape[0], VAL_BATCH):
            images = self.val_images[start : start + VAL_BATCH]
            masks = self.val_masks[start : start + VAL_BATCH] > 0.5
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                logits = self.model(images)[:, :n_classes].float()
            logits_all.append(logits)
            pred = logits > 0  # sigmoid(x) > 0.5
            tp = (pred & masks).sum((2, 3))
            fp = (pred & ~masks).sum((2, 3))
            fn = (~pred & masks).sum((2, 3))
            counts.append(torch.stack([tp, fp, fn], 2))  # (n, C, 3)
        loss = float(self.loss_fn(torch.cat(logits_all), self.val_masks))
        table = torch.cat(counts).cpu().tolist()
        pixels = self.config.size * self.config.size
        per_class = [
            [Confusion(tp, fp, fn, pixels - tp - fp - fn) for tp, fp, fn in (r[k] for r in table)]
            for k in range(n_classes)
        ]
        self.val_class_dice = [summarize(c).dice for c in per_class]
        return loss, per_class[0]

    def _selection_dice(self, ggo_dice: float) -> float:
        """The validation figure that picks the best epoch: GGO Dice, or the classes' mean."""
        if len(self.config.classes) == 1:
            return ggo_dice
        return float(np.mean(self.val_class_dice))

    def run(self) -> TrainResult:
        """Train until ``epochs`` or early stopping; write checkpoints; return the result."""
        cfg, st = self.config, self.state
        history = st.history if st.history is not None else []
        stopped = False
        bar = tqdm(
            range(st.epoch + 1, cfg.epochs + 1),
            desc=f"{cfg.arch}",
            unit="epoch",
            disable=not self.progress or not sys.stderr.isatty(),
            file=sys.stderr,
        )
        for epoch in bar:
            started = time.perf_counter()
            lr = float(self.optimizer.param_groups[0]["lr"])
            train_loss = self._train_epoch()
            val_loss, counts = self._validate()
            self.scheduler.step(val_loss)
            val = summarize(counts)
            selection = self._selection_dice(val.dice)
            record = EpochRecord(
                epoch,
                lr,
                train_loss,
                val_loss,
                val.dice,
                val.dice_mean,
                val.precision,
                val.recall,
                time.perf_counter() - started,
            )
            history.append(record)
            self._append_csv(record)
            st.epoch = epoch
            if selection > st.best_val_dice + _IMPROVEMENT:
                st.best_val_dice, st.best_epoch, st.wait = selection, epoch, 0
                st.best_state = cpu_state(self.model)
            else:
                st.wait += 1
            bar.set_postfix(
                loss=f"{train_loss:.3f}", val_dice=f"{val.dice:.3f}", best=st.best_epoch
            )
            log.debug("epoch %d: %s", epoch, record)
            if cfg.patience and st.wait >= cfg.patience:
                log.info("early stop at epoch %d: no better val Dice for %d epochs", epoch, st.wait)
                stopped = True
                break
            if epoch % cfg.save_every == 0:
                if bar.disable:  # no bar (not a TTY): a line now and then instead
                    log.info(
                        "epoch %d/%d: loss %.4f, val Dice %.4f (best %.4f at %d)",
                        epoch,
                        cfg.epochs,
                        train_loss,
                        val.dice,
                        st.best_val_dice,
                        st.best_epoch,
                    )
                self._save()
        bar.close()
        self._save(final=True)
        log.info(
            "%s: best val Dice %.4f at epoch %d of %d",
            cfg.arch,
            st.best_val_dice,
            st.best_epoch,
            st.epoch,
        )
        return TrainResult(
            run_dir=self.run_dir,
            best_path=self.run_dir / BEST_NAME,
            best_fp16_path=self.run_dir / BEST_FP16_NAME,
            last_path=self.run_dir / LAST_NAME,
            best_epoch=st.best_epoch,
            best_val_dice=st.best_val_dice,
            epochs_run=st.epoch,
            stopped_early=stopped,
            history=tuple(history),
        )

    # ------------------------------------------------------------------ files

    def _common(self) -> dict[str, Any]:
        """Fields shared by every checkpoint file."""
        st = self.state
        return {
            "epoch": st.epoch,
            "best_epoch": st.best_epoch,
            "best_val_dice": st.best_val_dice,
            "epochs_without_improvement": st.wait,
            "history": [asdict(r) for r in st.history or []],
            "config": self.config.to_dict(),
            "split": self.split.to_dict(),
            "git_commit": self.commit,
            "threshold": None,
        }

    def _save(self, *, final: bool = False) -> None:
        """Write last.pt, and best.pt / best_fp16.pt when the best changed (or at the end)."""
        st = self.state
        save_checkpoint(
            self.run_dir / LAST_NAME,
            {
                **self._common(),
                "model_state": cpu_state(self.model),
                "optimizer_state": self.optimizer.state_dict(),
                "scheduler_state": self.scheduler.state_dict(),
                "scaler_state": self.scaler.state_dict(),
                "best_state": st.best_state,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "shuffle": self.shuffle.get_state(),
                    "augment": self.augmenter.state().cpu(),
                },
            },
        )
        if st.best_state is not None and (final or st.best_written != st.best_epoch):
            save_checkpoint(
                self.run_dir / BEST_NAME, {**self._common(), "model_state": st.best_state}
            )
            if final:
                save_checkpoint(
                    self.run_dir / BEST_FP16_NAME,
                    {**self._common(), "model_state": to_fp16_state(st.best_state)},
                )
            st.best_written = st.best_epoch

    def _append_csv(self, record: EpochRecord) -> None:
        """Append one row to metrics.csv (header on a new file)."""
        path = self.run_dir / METRICS_NAME
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow([f.name for f in fields(EpochRecord)])
            writer.writerow(_csv_row(record))

    def _rewrite_csv(self) -> None:
        """Rewrite metrics.csv from the checkpoint's history (on resume)."""
        path = self.run_dir / METRICS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([f.name for f in fields(EpochRecord)])
            for record in self.state.history or []:
                writer.writerow(_csv_row(record))


def load_training_grid(config: TrainConfig) -> GridData:
    """The labelled data of a run on the model grid, with one class map value per class.

    Raises:
        InputError: a packed file that lacks one of ``config.classes``.
    """
    path = Path(config.data)
    packed = data_classes(path) if path.exists() else None
    if packed is not None and tuple(packed[: len(config.classes)]) != config.classes:
        raise InputError(
            f"{path} was packed with classes {packed}, not {config.classes}; "
            "re-run `training pack --classes " + ",".join(config.classes) + "`"
        )
    several = len(config.classes) > 1
    return load_grid(
        path,
        size=config.size,
        label=config.label,
        window_center=config.window_center,
        window_width=config.window_width,
        workers=config.workers,
        groups_file=Path(config.groups_file) if config.groups_file else None,
        **({"labels": class_values(config.classes, config.label)} if several else {}),
    )


def _csv_row(record: EpochRecord) -> list[str]:
    """Format a record for the CSV (6 significant digits)."""
    return [f"{v:.6g}" if isinstance(v, float) else str(v) for v in asdict(record).values()]


def train(config: TrainConfig, *, resume: Path | None = None, progress: bool = True) -> TrainResult:
    """Run one training (see :class:`Trainer`).

    Args:
        config: the run configuration.
        resume: a ``last.pt`` to continue from.
        progress: show a tqdm bar.

    Returns:
        The result, with paths of the written checkpoints.

    Raises:
        InputError: bad data, split or options.
        DeviceError: the device is unusable.
    """
    return Trainer(config, resume=resume, progress=progress).run()
