"""Where a training run computes: the device, its autocast precision, the seeds, the model on it.

Imports only torch, numpy and the standard library (the GPU machines have little else).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from ggo_cli.errors import DeviceError


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


def place_model(
    model: nn.Module, device: torch.device, *, channels_last: bool, compiled: bool
) -> nn.Module:
    """The network on the device: channels-last if asked, cuDNN autotuning on CUDA, compiled.

    Args:
        model: the network.
        device: where it runs.
        channels_last: convert its weights to the channels-last memory format.
        compiled: wrap it in ``torch.compile``.

    Returns:
        The network to train (compiled: the wrapper).
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if compiled:
        model = torch.compile(model)  # type: ignore[assignment]
    return model
