"""Training configuration: one frozen :class:`TrainConfig`, built once in ``cli.py``.

Defaults follow the paper (../shared/PAPER.md): Adam, learning rate 2e-4 with
ReduceLROnPlateau, batch size 2, up to 100 epochs, early stopping with patience 30, a seeded
64/16/20 split, Focal Tversky + Dice loss. Everything a checkpoint needs to rebuild the model
and repeat the run is in here, and is stored in every checkpoint as a plain dict.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ggo_cli.analysis.preprocessing import DEFAULT_WINDOW_CENTER_HU, DEFAULT_WINDOW_WIDTH_HU
from ggo_cli.errors import InputError

log = logging.getLogger(__name__)

Arch = Literal["unet", "resnet50-unet", "densenet121-unet"]
ARCHS: tuple[str, ...] = get_args(Arch)
ARCH_DISPLAY_NAMES: dict[str, str] = {
    "unet": "U-Net",
    "resnet50-unet": "ResNet-50U-Net",
    "densenet121-unet": "DenseNet-121U-Net",
}

LossName = Literal["dice", "bce", "bce-dice", "focal-tversky", "focal-tversky-dice"]
LOSSES: tuple[str, ...] = get_args(LossName)

CLASS_LABELS: dict[str, int] = {"ggo": 1, "consolidation": 2}
"""Known classes and their value in the shared palette PNGs (channels follow ``--classes``)."""

AmpMode = Literal["auto", "off", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = get_args(AmpMode)

SIZE_MULTIPLE = 32
"""Input sizes must be multiples of this (the encoders downsample by up to 16, U-Net by 16)."""

DEFAULT_SIZE = 512
DEFAULT_EPOCHS = 100
DEFAULT_BATCH_SIZE = 2
DEFAULT_LR = 2e-4
DEFAULT_PATIENCE = 30
DEFAULT_SEED = 0
SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
"""Train / validation / test fractions of the paper."""

# Focal Tversky defaults (Abraham & Khan, ISBI 2019): alpha weights false NEGATIVES, beta false
# POSITIVES, so alpha > beta favours recall (the paper stresses recall). Their loss is
# (1 - TI) ** (1 / gamma) with gamma = 4/3; we store the exponent itself, 1 / (4/3) = 0.75.
TVERSKY_ALPHA_FN = 0.7
TVERSKY_BETA_FP = 0.3
FOCAL_EXPONENT = 0.75


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    """Random augmentation ranges (paper: rotation, shift, shear, zoom, flip, reflect fill).

    Attributes:
        enabled: apply augmentation to training batches at all.
        rotation_deg: rotation drawn from ``[-rotation_deg, rotation_deg]`` degrees.
        shift: translation drawn from ``[-shift, shift]`` of the image side, per axis.
        shear_deg: shear angle drawn from ``[-shear_deg, shear_deg]`` degrees.
        zoom: ``(low, high)`` scale factors, drawn per axis as Keras' ``zoom_range`` does.
        flip_p: probability of a horizontal (left-right) flip.
        intensity_p: probability that a sample's intensities are jittered.
        contrast: ``(low, high)`` multiplicative contrast (log-uniform), i.e. window width ratio.
        brightness: ``(low, high)`` additive offset in ``[0, 1]`` units, i.e. window level shift.
        gamma: ``(low, high)`` gamma exponent (log-uniform).
    """

    enabled: bool = True
    rotation_deg: float = 15.0
    shift: float = 0.10
    shear_deg: float = 10.0
    zoom: tuple[float, float] = (0.8, 1.2)
    flip_p: float = 0.5
    intensity_p: float = 0.8
    # Display JPGs (about W1300/L-480) against inference's W1500/L-600 amount to a contrast of
    # 1300/1500 = 0.87 and an offset of +0.15: both ranges cover that mapping.
    contrast: tuple[float, float] = (0.8, 1.2)
    brightness: tuple[float, float] = (-0.1, 0.2)
    gamma: tuple[float, float] = (0.8, 1.25)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything one training run needs; stored in every checkpoint.

    Attributes:
        arch: network architecture.
        loss: loss function.
        data: the training data (folder, DICOM folder or packed ``.npz``).
        out: the run folder (checkpoints, split.json, metrics.csv).
        size: model input size S (square), a multiple of 32.
        label: label value that marks GGO in the masks (1 for the shared data, 255 for 0/255 BMPs,
            the segment number for DICOM-SEG).
        epochs: maximum number of epochs.
        batch_size: training batch size.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (L2).
        seed: seed for the split, initialisation and augmentation.
        patience: early-stopping patience in epochs without a better validation Dice.
        plateau_patience: ReduceLROnPlateau patience (on validation loss).
        plateau_factor: ReduceLROnPlateau factor.
        min_lr: ReduceLROnPlateau floor.
        pretrained: encoder weights: a torchvision state-dict path, ``imagenet``, or None.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        amp: autocast mode; ``auto`` is bf16 on CUDA (fp16 where bf16 is unsupported), off on CPU.
        channels_last: use channels-last memory format (None: on CUDA only).
        workers: threads that decode image files while loading a folder.
        save_every: write ``last.pt`` (and the best weights so far) every this many epochs.
        split_file: reuse this split.json instead of drawing a new split.
        groups_file: CSV ``id,group`` (patient or study) so that a group never straddles splits.
        window_center: lung window centre in HU for DICOM/NIfTI data (and the exported model).
        window_width: lung window width in HU.
        tversky_alpha: Focal Tversky weight of false negatives.
        tversky_beta: Focal Tversky weight of false positives.
        focal_gamma: Focal Tversky exponent applied to ``1 - TI``.
        out_channels: output channels (channel 0 is GGO); at least ``len(classes)``.
        classes: the segmented classes, one output channel each, GGO first (``ggo`` alone, or
            ``ggo, consolidation``); their mask values are :data:`CLASS_LABELS`.
        compile: wrap the model in ``torch.compile`` (CUDA; costs start-up time).
        augment: augmentation ranges.
    """

    arch: Arch = "resnet50-unet"
    loss: LossName = "focal-tversky-dice"
    data: str = ""
    out: str = "runs/run"
    size: int = DEFAULT_SIZE
    label: int = 1
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    weight_decay: float = 0.0
    seed: int = DEFAULT_SEED
    patience: int = DEFAULT_PATIENCE
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    pretrained: str | None = None
    device: str = "auto"
    amp: AmpMode = "auto"
    channels_last: bool | None = None
    workers: int = 0
    save_every: int = 10
    split_file: str | None = None
    groups_file: str | None = None
    window_center: float = DEFAULT_WINDOW_CENTER_HU
    window_width: float = DEFAULT_WINDOW_WIDTH_HU
    tversky_alpha: float = TVERSKY_ALPHA_FN
    tversky_beta: float = TVERSKY_BETA_FP
    focal_gamma: float = FOCAL_EXPONENT
    out_channels: int = 1
    classes: tuple[str, ...] = ("ggo",)
    compile: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        """Reject impossible values with a message that names the fix."""
        validate_choice("arch", self.arch, ARCHS)
        validate_choice("loss", self.loss, LOSSES)
        validate_choice("amp", self.amp, AMP_MODES)
        validate_size(self.size)
        for name in ("epochs", "batch_size", "save_every", "out_channels"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        validate_classes(self.classes)
        if self.out_channels < len(self.classes):
            raise InputError(
                f"out_channels {self.out_channels} < {len(self.classes)} classes {self.classes}"
            )
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.patience < 0 or self.workers < 0:
            raise InputError("--patience and --workers must not be negative")
        if self.window_width <= 0:
            raise InputError(f"window width must be positive, got {self.window_width} HU")

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as JSON-compatible plain data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a configuration stored by :meth:`to_dict`; unknown keys are ignored.

        Args:
            data: the stored dict (from a checkpoint).

        Returns:
            The configuration.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("ignoring unknown configuration keys %s", unknown)
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("classes"), list):
            values["classes"] = tuple(values["classes"])
        aug = values.get("augment")
        if isinstance(aug, dict):
            aug_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
            values["augment"] = AugmentConfig(
                **{  # type: ignore[arg-type]
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in aug.items()
                    if k in aug_fields
                }
            )
        return cls(**values)


def validate_choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise :class:`InputError` unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise InputError(f"--{option} {value!r} is not known; choose one of {', '.join(valid)}")


def validate_classes(classes: tuple[str, ...]) -> None:
    """Raise :class:`InputError` unless ``classes`` starts with ``ggo`` and names known classes."""
    if not classes or classes[0] != "ggo" or len(set(classes)) != len(classes):
        raise InputError(f"--classes must start with ggo and not repeat a class, got {classes}")
    for name in classes:
        validate_choice("classes", name, tuple(CLASS_LABELS))


def parse_classes(text: str) -> tuple[str, ...]:
    """``"ggo,consolidation"`` -> ``("ggo", "consolidation")``, checked."""
    classes = tuple(c.strip().lower() for c in text.split(",") if c.strip())
    validate_classes(classes)
    return classes


def validate_size(size: int) -> None:
    """Raise :class:`InputError` unless ``size`` is a positive multiple of 32."""
    if size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
        raise InputError(
            f"--size {size} is not a positive multiple of {SIZE_MULTIPLE}; "
            f"use e.g. 512 (the paper's) or 64 for quick tests"
        )
