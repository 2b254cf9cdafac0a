"""The labelled data of a training run: its slices on the model grid, its split, its device tensors.

It also cuts an epoch's permutation of the training slices into index batches.

Imports only torch, numpy and the pure-numpy ggo_cli modules, like :mod:`training.loop`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ggo_cli.errors import InputError

from .config import TrainConfig
from .data import GridData, data_classes, load_grid
from .multiclass import class_values, one_hot
from .splits import Split, check_split_ids, load_split, make_split


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


def choose_split(
    config: TrainConfig, grid: GridData, checkpoint: Mapping[str, Any] | None
) -> Split:
    """The split: from the checkpoint, from --split-file, or a new seeded one.

    Raises:
        InputError: a split whose ids are not the data's, or an empty train or val part.
    """
    if checkpoint is not None:
        split = Split.from_dict(dict(checkpoint["split"]))
    elif config.split_file:
        split = load_split(Path(config.split_file))
    else:
        split = make_split(grid.ids, grid.groups, seed=config.seed)
    check_split_ids(split, grid.ids)
    if not split.train or not split.val:
        raise InputError("training needs non-empty train and validation splits")
    return split


def device_slices(
    grid: GridData, ids: tuple[str, ...], n_classes: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The slices ``ids`` on the device as float32 tensors: images [N, 1, S, S], masks one-hot."""
    index = {sid: i for i, sid in enumerate(grid.ids)}
    rows = [index[i] for i in ids]
    images = torch.from_numpy(np.ascontiguousarray(grid.images[rows]))[:, None]
    masks = torch.from_numpy(one_hot(grid.masks[rows], n_classes))
    return images.to(device), masks.to(device, torch.float32)


def index_batches(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive index batches of a permutation (the last may be smaller)."""
    for start in range(0, order.numel(), batch_size):
        yield order[start : start + batch_size]
