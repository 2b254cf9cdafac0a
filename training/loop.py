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
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ggo_cli.errors import InputError

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
from .data import GridData
from .device import autocast, autocast_dtype, place_model, seed_everything, select_device
from .losses import make_loss
from .metrics import Confusion, summarize
from .models import build_model, load_pretrained_encoder
from .run_data import choose_split, device_slices, index_batches, load_training_grid
from .run_records import (
    METRICS_NAME,
    EpochRecord,
    RunProgress,
    TrainResult,
    append_metrics_row,
    write_metrics,
)
from .splits import Split, save_split
from .validation import VAL_BATCH, validation_pass

__all__ = [
    "METRICS_NAME",
    "SPLIT_NAME",
    "VAL_BATCH",
    "EpochRecord",
    "TrainResult",
    "Trainer",
    "autocast",
    "autocast_dtype",
    "load_training_grid",
    "seed_everything",
    "select_device",
    "train",
]

log = logging.getLogger(__name__)

SPLIT_NAME = "split.json"
_IMPROVEMENT = 1e-6


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
        self.state = RunProgress(history=[])
        self.val_class_dice: list[float] = []
        self.commit = git_commit()
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            write_metrics(self.run_dir / METRICS_NAME, [])  # a fresh run starts a fresh metrics.csv

    # ------------------------------------------------------------------ setup

    def _split(self, grid: GridData, checkpoint: Mapping[str, Any] | None) -> Split:
        """The split: from the checkpoint, from --split-file, or a new seeded one."""
        split = choose_split(self.config, grid, checkpoint)
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
        n_classes = len(self.config.classes)
        self.train_images, self.train_masks = device_slices(
            grid, self.split.train, n_classes, self.device
        )
        self.val_images, self.val_masks = device_slices(
            grid, self.split.val, n_classes, self.device
        )
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
        return place_model(
            model, self.device, channels_last=self.channels_last, compiled=self.config.compile
        )

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
        self.state = RunProgress(
            epoch=int(ckpt["epoch"]),
            best_val_dice=float(ckpt["best_val_dice"]),
            best_epoch=int(ckpt["best_epoch"]),
            wait=int(ckpt["epochs_without_improvement"]),
            history=history,
            best_state=dict(best) if best is not None else None,
        )
        write_metrics(self.run_dir / METRICS_NAME, history)
        log.info("resumed at epoch %d (best Dice %.4f)", self.state.epoch, self.state.best_val_dice)

    # ------------------------------------------------------------------ epochs

    def _train_epoch(self) -> float:
        """One pass over the shuffled training set; returns the mean loss."""
        self.model.train()
        order = torch.randperm(self.train_images.shape[0], generator=self.shuffle).to(self.device)
        total = torch.zeros((), device=self.device)
        for idx in index_batches(order, self.config.batch_size):
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
        loss, per_class = validation_pass(
            self.model,
            self.val_images,
            self.val_masks,
            self.loss_fn,
            n_classes=len(self.config.classes),
            size=self.config.size,
            amp=self.amp,
            channels_last=self.channels_last,
        )
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
            append_metrics_row(self.run_dir / METRICS_NAME, record)
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
