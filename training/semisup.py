"""Semi-supervised training from unlabelled slices: a teacher's pseudo-labels for a noisy student.

Method (one round of self-training with a noisy student):

1. **Teacher**: a supervised run on the labelled split (``python -m training train``), the
   baseline the student is measured against.
2. **Pseudo-labels**: the teacher, in eval mode and without augmentation, predicts every
   unlabelled slice on the model grid; ``sigmoid > --pseudo-threshold`` per channel gives hard
   labels (Lee, "Pseudo-Label", ICML 2013 workshop; Semi-Inf-Net made pseudo-labels of these
   same 1600 COVID-SemiSeg slices with its own teacher: Fan et al., "Inf-Net", IEEE TMI 39(8),
   2020). Ours come from our own teacher, never from Inf-Net's files.
3. **Student**: the same network, initialised from the teacher (``--student-init teacher``) or
   from scratch, trained with the paper's protocol on batches of labelled slices plus as many
   pseudo-labelled ones; both halves are augmented (the student sees noised inputs whose labels
   came from clean ones: Xie et al., "Self-training with Noisy Student", CVPR 2020). Loss:
   ``L(labelled) + w * L(pseudo)``, each pooled over its own half (``--pseudo-weight w``).
   Validation, early stopping and model selection use the labelled validation split only.

Leakage: the unlabelled slices never enter a split (validation and test hold labelled slices
only, the teacher's split, checked equal), their ids must not collide with labelled ids, and the
student must use exactly the teacher's split (a teacher that saw a student's validation or test
slice would leak them through its pseudo-labels).

Unlabelled data: a folder of 8-bit display images (``*.jpg|png``, ``pixel / 255`` like the
labelled JPGs), grouped into volumes by the file-name prefix before the last ``_``
(``<volume>_<slice>.jpg``); or ``DIR/images/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from ggo_cli.analysis.preprocessing import to_model_grid
from ggo_cli.errors import InputError

from .checkpoints import load_checkpoint, model_from_checkpoint, unwrap
from .config import TrainConfig
from .data import IMAGE_SUFFIXES
from .loop import Trainer, TrainResult, autocast
from .splits import Split, save_split

log = logging.getLogger(__name__)

UNLABELED_NAME = "unlabeled.json"
PSEUDO_BATCH = 16
_U8_MAX = 255.0


@dataclass(frozen=True, slots=True)
class SemiSupConfig:
    """Settings of the semi-supervised part (stored in the student's checkpoints).

    Attributes:
        teacher: the teacher's run folder or checkpoint.
        unlabeled: folder of unlabelled display images.
        pseudo_threshold: probability above which a pseudo-label pixel is positive.
        pseudo_weight: weight ``w`` of the pseudo-labelled half of the loss.
        student_init: ``teacher`` (fine-tune the teacher's weights) or ``scratch``.
        unlabeled_batch: pseudo-labelled slices per step (0: as many as labelled ones).
        max_unlabeled: use at most this many unlabelled slices, evenly spaced (0: all).
    """

    teacher: str
    unlabeled: str
    pseudo_threshold: float = 0.5
    pseudo_weight: float = 0.5
    student_init: Literal["teacher", "scratch"] = "teacher"
    unlabeled_batch: int = 0
    max_unlabeled: int = 0

    def __post_init__(self) -> None:
        """Reject impossible values."""
        if not 0.0 < self.pseudo_threshold < 1.0:
            raise InputError(f"--pseudo-threshold must be in (0, 1), got {self.pseudo_threshold}")
        if self.pseudo_weight < 0 or self.unlabeled_batch < 0 or self.max_unlabeled < 0:
            raise InputError("--pseudo-weight, --unlabeled-batch, --max-unlabeled must be >= 0")
        if self.student_init not in ("teacher", "scratch"):
            raise InputError(f"--student-init must be teacher or scratch, not {self.student_init}")


@dataclass(frozen=True, slots=True)
class UnlabeledGrid:
    """Unlabelled slices on the model grid.

    Attributes:
        images: float32 in ``[0, 1]``. Shape: ``(n, S, S)``.
        ids: file stems.
        groups: volume of each slice (file-name prefix).
    """

    images: npt.NDArray[np.float32]
    ids: tuple[str, ...]
    groups: tuple[str, ...]


def volume_of(stem: str) -> str:
    """The volume a slice belongs to: the stem up to its last ``_`` (``a_b_12`` -> ``a_b``)."""
    head, sep, _ = stem.rpartition("_")
    return head if sep else stem


def _read_grey(path: Path) -> npt.NDArray[np.uint8]:
    """8-bit grey pixels of a picture (Pillow; torchvision's decoder where Pillow is missing)."""
    try:
        from PIL import Image
    except ImportError:  # GPU machines may lack Pillow but have torchvision
        from torchvision.io import ImageReadMode, decode_image

        data = torch.from_numpy(np.frombuffer(path.read_bytes(), dtype=np.uint8).copy())
        grey: npt.NDArray[np.uint8] = decode_image(data, mode=ImageReadMode.GRAY)[0].numpy()
        return grey
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read unlabelled image {path.name}: {exc}") from exc


def load_unlabeled(folder: Path, size: int, *, max_slices: int = 0) -> UnlabeledGrid:
    """Load unlabelled display images and bring them to the model grid as inference does.

    Args:
        folder: the images, directly or in ``folder/images``.
        size: model grid size S.
        max_slices: keep at most this many, evenly spaced over the sorted list (0: all).

    Returns:
        The slices on the grid.

    Raises:
        InputError: no images there.
    """
    root = folder / "images" if (folder / "images").is_dir() else folder
    if not root.is_dir():
        raise InputError(f"unlabelled folder not found: {folder}")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    if 0 < max_slices < len(paths):
        keep = np.linspace(0, len(paths) - 1, max_slices).round().astype(int)
        paths = [paths[i] for i in sorted(set(keep.tolist()))]
    images = np.empty((len(paths), size, size), dtype=np.float32)
    for i, path in enumerate(paths):
        images[i] = to_model_grid(_read_grey(path).astype(np.float32) / np.float32(_U8_MAX), size)
    ids = tuple(p.stem for p in paths)
    groups = tuple(volume_of(i) for i in ids)
    log.info("unlabelled: %d slices from %d volumes in %s", len(ids), len(set(groups)), root)
    return UnlabeledGrid(images=images, ids=ids, groups=groups)


def check_no_leak(split: Split, unlabeled_ids: Sequence[str], teacher_split: Split) -> None:
    """Refuse unlabelled ids that collide with labelled ones, and a teacher of another split.

    Raises:
        InputError: an unlabelled id is also a labelled id, or the splits differ.
    """
    labelled = set(split.train) | set(split.val) | set(split.test)
    clash = sorted(labelled & set(unlabeled_ids))
    if clash:
        raise InputError(f"unlabelled slices share ids with labelled ones: {clash[:3]}")
    if split.to_dict() != teacher_split.to_dict():
        raise InputError(
            "the student's split differs from the teacher's; train the student with the "
            "teacher's split.json (--split-file), or its pseudo-labels leak validation/test"
        )


@torch.no_grad()
def pseudo_labels(
    model: nn.Module,
    images: Tensor,
    *,
    threshold: float,
    n_classes: int,
    batch: int = PSEUDO_BATCH,
    amp: torch.dtype | None = None,
) -> Tensor:
    """Hard pseudo-labels of a teacher: ``sigmoid(logits) > threshold`` per channel.

    Args:
        model: the teacher (put in eval mode here).
        images: unlabelled slices on the model grid. Shape: ``(n, 1, S, S)``.
        threshold: probability threshold.
        n_classes: channels to keep.
        batch: slices per forward pass.
        amp: autocast dtype (None: float32).

    Returns:
        uint8 0/1 labels. Shape: ``(n, n_classes, S, S)``, on the images' device.
    """
    model.eval()
    parts = []
    for start in range(0, images.shape[0], batch):
        with autocast(images.device, amp):
            logits = model(images[start : start + batch])[:, :n_classes].float()
        parts.append((torch.sigmoid(logits) > threshold).to(torch.uint8))
    return torch.cat(parts)


class SemiSupervisedTrainer(Trainer):
    """The student's run: :class:`~training.loop.Trainer` with pseudo-labelled batches added.

    Args:
        config: the student's training configuration (its split must be the teacher's).
        semi: the semi-supervised settings.
        progress: show a tqdm bar.
    """

    def __init__(self, config: TrainConfig, semi: SemiSupConfig, *, progress: bool = True):
        teacher_ckpt = load_checkpoint(Path(semi.teacher))
        teacher_cfg = TrainConfig.from_dict(dict(teacher_ckpt["config"]))
        if teacher_cfg.classes != config.classes or teacher_cfg.arch != config.arch:
            raise InputError(
                f"teacher is a {teacher_cfg.arch} for {teacher_cfg.classes}; the student is a "
                f"{config.arch} for {config.classes}"
            )
        super().__init__(config, progress=progress)
        self.semi = semi
        teacher_split = Split.from_dict(dict(teacher_ckpt["split"]))
        grid = load_unlabeled(Path(semi.unlabeled), config.size, max_slices=semi.max_unlabeled)
        check_no_leak(self.split, grid.ids, teacher_split)
        teacher, _ = model_from_checkpoint(teacher_ckpt, self.device)
        if semi.student_init == "teacher":
            unwrap(self.model).load_state_dict(teacher.state_dict())
        self.unlabeled_images = torch.from_numpy(grid.images)[:, None].to(self.device)
        self.pseudo = pseudo_labels(
            teacher,
            self.unlabeled_images,
            threshold=semi.pseudo_threshold,
            n_classes=len(config.classes),
            amp=self.amp,
        )
        del teacher
        self.unlabeled_ids = grid.ids
        self.unlabeled_order = torch.Generator()
        self.unlabeled_order.manual_seed(config.seed + 3)
        self._queue: list[int] = []
        positive = self.pseudo.float().mean((0, 2, 3)).cpu().tolist()
        self.summary: dict[str, Any] = {
            "method": "teacher pseudo-labels + noisy student (Lee 2013; Fan et al. 2020; "
            "Xie et al. 2020)",
            **asdict(semi),
            "teacher": Path(semi.teacher).name,  # names only: no machine paths in the card
            "unlabeled": Path(semi.unlabeled).name,
            "teacher_git_commit": teacher_ckpt.get("git_commit", "unknown"),
            "n_unlabeled": len(grid.ids),
            "volumes": sorted(set(grid.groups)),
            "pseudo_positive_fraction": dict(zip(config.classes, positive, strict=True)),
            "in_validation_or_test": 0,
        }
        (self.run_dir / UNLABELED_NAME).write_text(
            json.dumps({**self.summary, "ids": list(grid.ids)}, indent=2) + "\n", encoding="utf-8"
        )
        log.info(
            "pseudo-labels of %d slices; positive fraction per class %s",
            len(grid.ids),
            ", ".join(f"{c} {p:.4f}" for c, p in zip(config.classes, positive, strict=True)),
        )

    def _next_unlabeled(self, n: int) -> Tensor:
        """The next ``n`` unlabelled indices of a reshuffled cycle over all of them."""
        while len(self._queue) < n:
            perm = torch.randperm(self.unlabeled_images.shape[0], generator=self.unlabeled_order)
            self._queue += perm.tolist()
        taken, self._queue = self._queue[:n], self._queue[n:]
        return torch.tensor(taken, device=self.device)

    def _train_epoch(self) -> float:
        """One pass over the labelled slices, each batch joined by pseudo-labelled slices."""
        self.model.train()
        order = torch.randperm(self.train_images.shape[0], generator=self.shuffle).to(self.device)
        total = torch.zeros((), device=self.device)
        for start in range(0, order.numel(), self.config.batch_size):
            idx = order[start : start + self.config.batch_size]
            n = idx.numel()
            uidx = self._next_unlabeled(self.semi.unlabeled_batch or n)
            images = torch.cat([self.train_images[idx], self.unlabeled_images[uidx]])
            masks = torch.cat([self.train_masks[idx], self.pseudo[uidx].float()])
            images, masks = self.augmenter(images, masks)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                logits = self.model(images)
            loss = self.loss_fn(logits[:n], masks[:n]) + self.semi.pseudo_weight * self.loss_fn(
                logits[n:], masks[n:]
            )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total += loss.detach() * n
        return float(total) / self.train_images.shape[0]

    def _common(self) -> dict[str, Any]:
        """Checkpoint fields, with the semi-supervised settings and pseudo-label statistics."""
        return {**super()._common(), "semi_supervised": getattr(self, "summary", None)}


def train_semisup(
    config: TrainConfig, semi: SemiSupConfig, *, progress: bool = True
) -> TrainResult:
    """Train a student from a teacher's pseudo-labels (see the module docstring).

    Args:
        config: the student's configuration (``split_file``: the teacher's split.json).
        semi: the semi-supervised settings.
        progress: show a tqdm bar.

    Returns:
        The student's run result.

    Raises:
        InputError: bad data, a teacher of another split, classes or architecture.
    """
    if config.split_file is None:
        teacher_split = Split.from_dict(dict(load_checkpoint(Path(semi.teacher))["split"]))
        path = Path(config.out) / "teacher_split.json"
        save_split(teacher_split, path)
        config = replace(config, split_file=str(path))
    return SemiSupervisedTrainer(config, semi, progress=progress).run()
