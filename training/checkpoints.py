"""Checkpoint files: what a run saves, and how a model comes back from one.

A checkpoint is a ``torch.save``d dict readable with ``torch.load(weights_only=True)``:

- ``format`` (``ggo-training-checkpoint``), ``format_version``;
- ``model_state`` (float32, or float16 in ``best_fp16.pt``);
- ``optimizer_state``, ``scheduler_state``, ``scaler_state``, ``rng`` (``last.pt`` only: what
  ``--resume`` needs);
- ``epoch`` (last finished, 1-based), ``best_epoch``, ``best_val_dice``,
  ``epochs_without_improvement``, ``history`` (one dict per epoch);
- ``config`` (:meth:`TrainConfig.to_dict`), ``split`` (:meth:`Split.to_dict`), ``git_commit``,
  ``torch_version``, ``threshold`` (None until chosen on the validation split).
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ggo_cli.errors import InputError, OutputError

from .config import TrainConfig
from .models import build_model

log = logging.getLogger(__name__)

FORMAT = "ggo-training-checkpoint"
FORMAT_VERSION = 1
BEST_NAME = "best.pt"
BEST_FP16_NAME = "best_fp16.pt"
LAST_NAME = "last.pt"
_FP16_MAX = 65504.0
_CHECKPOINT_NAMES = (BEST_NAME, BEST_FP16_NAME, LAST_NAME)


def git_commit(repo: Path | None = None) -> str:
    """Return the checkout's commit (``+dirty`` when files changed), or ``unknown``.

    Args:
        repo: a folder inside the checkout (default: this package's).
    """
    where = repo or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a ``torch.compile`` wrapper."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of a model's state dict (safe to keep while training goes on)."""
    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in unwrap(model).state_dict().items()
    }


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically (temp file, then rename).

    Args:
        path: destination ``.pt``.
        payload: the checkpoint fields (see the module docstring); ``format`` is added.

    Raises:
        OutputError: the file cannot be written.
    """
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
    }
    data.update(payload)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {path}: {exc}") from exc


def to_fp16_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast floating tensors to float16 where they fit (others, e.g. huge BN variances, stay).

    Args:
        state: a float32 state dict.

    Returns:
        The state dict with float16 tensors (integer buffers unchanged).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        fits = value.is_floating_point() and value.numel() > 0
        fits = fits and float(value.abs().max()) < _FP16_MAX
        out[key] = value.to(torch.float16) if fits else value
    return out


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint (CPU tensors).

    Args:
        path: a ``.pt`` file, or a run folder (its ``best.pt``, else ``best_fp16.pt``, else
            ``last.pt``).

    Returns:
        The checkpoint dict.

    Raises:
        InputError: missing, unreadable or not a ggo training checkpoint.
    """
    path = resolve_checkpoint(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path} is not a ggo training checkpoint (written by `training train`)")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer training package; update the checkout")
    return data


def resolve_checkpoint(path: Path) -> Path:
    """Map a run folder to its preferred checkpoint file.

    Raises:
        InputError: nothing usable there.
    """
    if path.is_dir():
        for name in _CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise InputError(f"run folder {path} holds none of {', '.join(_CHECKPOINT_NAMES)}")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    return path


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], device: torch.device | str = "cpu"
) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the float32 model of a checkpoint, in eval mode.

    Args:
        checkpoint: from :func:`load_checkpoint`.
        device: where to put the model.

    Returns:
        The model and its training configuration.

    Raises:
        InputError: the weights do not match the recorded architecture.
    """
    config = TrainConfig.from_dict(dict(checkpoint["config"]))
    model = build_model(config.arch, out_channels=config.out_channels)
    state = {
        k: v.float() if v.is_floating_point() else v for k, v in checkpoint["model_state"].items()
    }
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"checkpoint weights do not fit a {config.arch}: {exc}") from exc
    return model.to(device).eval(), config
