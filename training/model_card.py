"""The ``ggo_cli`` metadata of an exported model and its ``model.json`` model card.

Used by :func:`training.export.export_checkpoint` (steps 5 and 6 of its module docstring): the
metadata object of the model contract (stamped by :func:`ggo_cli.onnx.model_info.stamp_metadata`)
and the card built from it, with the training data's name, source, licence and citation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ggo_cli.errors import ModelError

from .checkpoints import git_commit
from .config import ARCH_DISPLAY_NAMES, TrainConfig
from .metrics import SegMetrics
from .multiclass import class_values, segment_metadata
from .onnx_export import OPSET

SHARED_TRAINING_DATA: dict[str, str] = {
    "name": "COVID-SemiSeg training slices (MedSeg COVID-19 CT segmentation dataset)",
    "source": (
        "Inf-Net (github.com/DengPingFan/Inf-Net, commit fb3a03b5), "
        "Dataset/TrainingSet/MultiClassInfection-Train; 8-bit display images, GGO = label 1"
    ),
    "licence": "research and non-commercial use only (Inf-Net / MedSeg)",
    "citation": (
        "Fan D.-P. et al., Inf-Net: Automatic COVID-19 Lung Infection Segmentation from CT "
        "Images, IEEE TMI 39(8), 2020; MedSeg COVID-19 CT segmentation dataset "
        "(medicalsegmentation.com/covid19)"
    ),
}


UNLABELED_TRAINING_DATA: dict[str, str] = {
    "name": "COVID-SemiSeg unlabelled slices (1600 slices of 20 COVID-19 CT volumes)",
    "source": (
        "Inf-Net (github.com/DengPingFan/Inf-Net, commit fb3a03b5), "
        "Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs (images only; pseudo-labels "
        "made by our own teacher)"
    ),
    "licence": (
        "research and non-commercial use only (COVID-SemiSeg; Radiopaedia cases CC BY-NC-SA 3.0)"
    ),
    "citation": (
        "Fan D.-P. et al., IEEE TMI 39(8), 2020; Ma J. et al., COVID-19 CT Lung and Infection "
        "Segmentation Dataset, Zenodo 2020"
    ),
}

def build_metadata(
    *,
    config: TrainConfig,
    checkpoint: Mapping[str, Any],
    name: str,
    version: str,
    threshold: float,
    metrics: Mapping[str, SegMetrics],
    val_search: Mapping[float, float],
    training_data: Mapping[str, str],
    fp16: bool,
    class_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``ggo_cli`` metadata object of the model contract (without sha256).

    Args:
        config: the training configuration.
        checkpoint: the checkpoint (split, git commit, epochs).
        name: model name.
        version: model version.
        threshold: probability threshold.
        metrics: per-split metrics.
        val_search: validation pooled Dice per searched threshold.
        training_data: name, source, licence, citation of the data.
        fp16: whether weights are stored as float16.
        class_metrics: class -> split -> metrics with bootstrap intervals.

    Returns:
        The metadata dict.
    """
    if config.out_channels != len(config.classes):
        raise ModelError(
            f"the model has {config.out_channels} output channels for classes {config.classes}; "
            "export needs one channel per class"
        )
    semi = checkpoint.get("semi_supervised")
    return {
        "name": name,
        "version": version,
        "architecture": config.arch,
        "architecture_display": ARCH_DISPLAY_NAMES[config.arch],
        "input_size": config.size,
        "window_center": config.window_center,
        "window_width": config.window_width,
        "threshold": threshold,
        "threshold_rule": "probability > threshold, chosen on the validation split",
        "segments": segment_metadata(config.classes),
        "classes": list(config.classes),
        "training_data": {
            **training_data,
            "label": config.label,
            "class_labels": dict(
                zip(config.classes, class_values(config.classes, config.label), strict=True)
            ),
            "split": checkpoint["split"],
            **({"unlabeled": {**UNLABELED_TRAINING_DATA, **semi}} if semi else {}),
        },
        "metrics": {
            "definition": (
                "pixel level at each slice's own resolution; dice/precision/recall/accuracy "
                "pooled over the split, dice_mean = mean per-slice Dice (empty vs empty = 1)"
            ),
            **{k: v.to_dict() for k, v in metrics.items()},
            "per_class": dict(class_metrics or {}),
            "interval": (
                "dice_ci95: 2.5 and 97.5 percentiles of the pooled Dice over 2000 bootstrap "
                "resamples of the split's slices (numpy default_rng seed 0)"
            ),
            "val_threshold_search": {f"{t:.2f}": d for t, d in val_search.items()},
        },
        "training": {
            "loss": config.loss,
            "epochs_run": int(checkpoint.get("epoch", 0)),
            "best_epoch": int(checkpoint.get("best_epoch", 0)),
            "best_val_dice_model_grid": float(checkpoint.get("best_val_dice", 0.0)),
            "batch_size": config.batch_size,
            "lr": config.lr,
            "seed": config.seed,
            "pretrained": config.pretrained,
        },
        "weights": "float16 initializers cast to float32" if fp16 else "float32",
        "opset": OPSET,
        "git_commit": checkpoint.get("git_commit", "unknown"),
        "export_git_commit": git_commit(),
    }


def model_card(meta: Mapping[str, Any], file_sha256: str) -> dict[str, Any]:
    """The ``model.json`` model card (intended use, data licence, metrics, limitations)."""
    return {
        "name": meta["name"],
        "version": meta["version"],
        "architecture": meta["architecture_display"],
        "intended_use": (
            "Research: segmentation of "
            + " and ".join(s["label"].lower() for s in meta["segments"])
            + " on axial chest CT slices (lung window, 2-D per slice; one sigmoid channel per "
            "class, channel 0 ground-glass opacity), for volumetry and method comparison."
        ),
        "not_intended_for": (
            "Clinical diagnosis or treatment decisions; it is not a medical device. Not for "
            "commercial use: the training data are licensed for research and non-commercial "
            "use only."
        ),
        "training_data": meta["training_data"],
        "input": {
            "name": "image",
            "shape": ["N", 1, meta["input_size"], meta["input_size"]],
            "window_center_hu": meta["window_center"],
            "window_width_hu": meta["window_width"],
        },
        "output": {
            "name": "logits",
            "channels": [s["label"] for s in meta["segments"]],
            "threshold": meta["threshold"],
        },
        "metrics": meta["metrics"],
        "limitations": [
            "Trained on few slices (COVID-19 pneumonia, mostly one data source); performance "
            "on other diseases, scanners, kernels and slice thicknesses is unknown.",
            "Training images were 8-bit display renderings (window about W1300/L-480), not "
            "Hounsfield units; intensity augmentation bridges to the W1500/L-600 inference "
            "window, but results on real DICOM must be checked locally.",
            "Slice-wise 2-D model: no 3-D context; GGO versus consolidation boundaries are "
            "uncertain at the pixel level.",
            "Test-split metrics come from a handful of slices; their uncertainty is large.",
        ],
        "git_commit": meta["git_commit"],
        "sha256_graph": meta["sha256"],
        "sha256_file": file_sha256,
    }

