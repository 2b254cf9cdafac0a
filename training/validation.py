"""One validation pass of a training run: the pooled loss and per-slice confusion counts per class.

Counts are taken at probability 0.5 (``logits > 0``) on the model grid, in batches of
:data:`VAL_BATCH` slices held on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .device import autocast
from .losses import LossFn
from .metrics import Confusion

VAL_BATCH = 16


@torch.no_grad()
def validation_pass(
    model: nn.Module,
    val_images: Tensor,
    val_masks: Tensor,
    loss_fn: LossFn,
    *,
    n_classes: int,
    size: int,
    amp: torch.dtype | None,
    channels_last: bool,
) -> tuple[float, list[list[Confusion]]]:
    """Validation loss (pooled) and per-slice confusion counts of every class.

    Args:
        model: the network (put in eval mode here).
        val_images: validation images [N, 1, S, S] on the device.
        val_masks: their one-hot masks [N, C, S, S] (float32), one channel per class.
        loss_fn: the run's loss.
        n_classes: the classes C (the model's first C output channels).
        size: the grid size S.
        amp: the autocast dtype (None: float32).
        channels_last: feed channels-last tensors.

    Returns:
        The pooled loss and, per class, each slice's :class:`Confusion`.
    """
    model.eval()
    logits_all, counts = [], []
    for start in range(0, val_images.shape[0], VAL_BATCH):
        images = val_images[start : start + VAL_BATCH]
        masks = val_masks[start : start + VAL_BATCH] > 0.5
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(images.device, amp):
            logits = model(images)[:, :n_classes].float()
        logits_all.append(logits)
        pred = logits > 0  # sigmoid(x) > 0.5
        tp = (pred & masks).sum((2, 3))
        fp = (pred & ~masks).sum((2, 3))
        fn = (~pred & masks).sum((2, 3))
        counts.append(torch.stack([tp, fp, fn], 2))  # (n, C, 3)
    loss = float(loss_fn(torch.cat(logits_all), val_masks))
    table = torch.cat(counts).cpu().tolist()
    pixels = size * size
    return loss, [
        [Confusion(tp, fp, fn, pixels - tp - fp - fn) for tp, fp, fn in (r[k] for r in table)]
        for k in range(n_classes)
    ]
