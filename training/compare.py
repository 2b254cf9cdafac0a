"""The paper's Table 1 for our runs: rows train / validation / test, one column per network.

Each run is a training run folder (``best.pt`` or ``best_fp16.pt`` and its split) or an
exported model (folder with ``model.onnx``, or the file). Checkpoints get their threshold
chosen on the validation split exactly as ``export`` does; exported models keep the one in
their metadata. Every number is measured at each slice's own resolution, pooled over the split
(Dice / Precision / Recall / Accuracy), with the mean per-slice Dice alongside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggo_cli.errors import InputError

from .config import ARCH_DISPLAY_NAMES
from .data import SourceSlice, load_slices
from .evaluate import (
    OnnxPredictor,
    Predictor,
    SplitEvaluation,
    TorchPredictor,
    evaluate_splits,
    predictor_classes,
)
from .multiclass import bootstrap_dice, class_values, per_class_metrics
from .splits import SPLIT_NAMES, Split

log = logging.getLogger(__name__)

ROW_NAMES = {"train": "train", "val": "validation", "test": "test"}


@dataclass(frozen=True, slots=True)
class RunEvaluation:
    """One column of the table.

    Attributes:
        name: column title (the network's name).
        source: the run folder or model file.
        evaluation: threshold and per-split metrics.
        split: the split the run used.
    """

    name: str
    source: Path
    evaluation: SplitEvaluation
    split: Split


def _open_run(run: Path, device: str) -> tuple[Predictor, str, Split, Path | None, int, bool]:
    """Predictor, architecture, split, recorded data path, label, and whether it is ONNX."""
    onnx_path = run / "model.onnx" if run.is_dir() else run
    if onnx_path.suffix == ".onnx" and onnx_path.is_file():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        predictor = OnnxPredictor.from_file(
            onnx_path, providers if device.startswith("cuda") else providers[1:]
        )
        meta: dict[str, Any] = dict(predictor.metadata)
        data = meta.get("training_data", {})
        split = Split.from_dict(dict(data.get("split", {})))
        return predictor, str(meta["architecture"]), split, None, int(data.get("label", 1)), True
    torch_predictor = TorchPredictor(run, device)
    cfg = torch_predictor.config
    split = Split.from_dict(dict(torch_predictor.checkpoint["split"]))
    return torch_predictor, cfg.arch, split, Path(cfg.data) if cfg.data else None, cfg.label, False


def compare_runs(
    runs: Sequence[Path], *, data: Path | None = None, device: str = "cpu"
) -> list[RunEvaluation]:
    """Evaluate several runs on their splits.

    Args:
        runs: run folders, checkpoints or exported models.
        data: the data set (default: each checkpoint's recorded data path).
        device: ``cpu`` or ``cuda[:N]``.

    Returns:
        One evaluation per run, in the given order.

    Raises:
        InputError: no data for a run, or a split naming slices the data lacks.
    """
    cache: dict[tuple[Path, int, float, float, tuple[str, ...]], list[SourceSlice]] = {}
    results: list[RunEvaluation] = []
    splits_seen: set[str] = set()
    for run in runs:
        predictor, arch, split, recorded, label, is_onnx = _open_run(run, device)
        data_path = data or recorded
        if data_path is None or not data_path.exists():
            raise InputError(f"no data for run {run}; pass --data (the folder or .npz it used)")
        classes = predictor_classes(predictor)
        key = (data_path, label, predictor.window_center, predictor.window_width, classes)
        if key not in cache:
            cache[key] = load_slices(
                data_path,
                label=label,
                window_center=predictor.window_center,
                window_width=predictor.window_width,
                labels=class_values(classes, label) if len(classes) > 1 else None,
            )
        evaluation = evaluate_splits(
            predictor, cache[key], split, threshold=predictor.threshold if is_onnx else None
        )
        log.info(
            "%s: threshold %.2f, test Dice %.4f",
            run,
            evaluation.threshold,
            evaluation.metrics["test"].dice,
        )
        splits_seen.add(repr(split.to_dict()["test"]))
        name = ARCH_DISPLAY_NAMES.get(arch, arch)
        if any(r.name == name for r in results):
            name = f"{name} ({run.name})"
        results.append(RunEvaluation(name=name, source=run, evaluation=evaluation, split=split))
    if len(splits_seen) > 1:
        log.warning("the runs use different test splits: the columns are not comparable")
    return results


def render_markdown(results: Sequence[RunEvaluation]) -> str:
    """Table 1 layout (Dice / Precision / Recall / Accuracy) plus a details table.

    Args:
        results: from :func:`compare_runs`.

    Returns:
        Markdown text.
    """
    head = "| split | " + " | ".join(r.name for r in results) + " |"
    rule = "|---|" + "---|" * len(results)
    lines = [
        "Pixel-level Dice / Precision / Recall / Accuracy, pooled over each split "
        "(each slice at its own resolution).",
        "",
        head,
        rule,
    ]
    for split in SPLIT_NAMES:
        cells = []
        for r in results:
            m = r.evaluation.metrics[split]
            cells.append(f"{m.dice:.2f} / {m.precision:.2f} / {m.recall:.2f} / {m.accuracy:.2f}")
        lines.append(f"| {ROW_NAMES[split]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Details: pooled Dice, mean per-slice Dice, slices, threshold (chosen on validation).",
        "",
    ]
    lines += [head, rule]
    for split in SPLIT_NAMES:
        cells = []
        for r in results:
            m = r.evaluation.metrics[split]
            t = r.evaluation.threshold
            cells.append(f"{m.dice:.3f} / {m.dice_mean:.3f} / n={m.n_images} / t={t:.2f}")
        lines.append(f"| {ROW_NAMES[split]} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _class_tables(results, head, rule)) + "\n"


def _class_tables(results: Sequence[RunEvaluation], head: str, rule: str) -> list[str]:
    """Table 1 once per class, with the pooled Dice's bootstrap 95 % interval (multi-class runs).

    A run without a class (a GGO-only model) shows ``-`` in that class's table.
    """
    classes: list[str] = []
    for r in results:
        classes += [c for c in r.evaluation.classes if c not in classes]
    if classes == ["ggo"]:
        return []
    lines: list[str] = []
    for k, name in enumerate(classes):
        lines += [
            "",
            f"Class {name} (channel {k}): Dice [95 % CI] / Precision / Recall / Accuracy, "
            "pooled; interval: bootstrap over the split's slices (2000 resamples, seed 0).",
            "",
            head,
            rule,
        ]
        for split in SPLIT_NAMES:
            cells = []
            for r in results:
                counts = (r.evaluation.class_counts or {}).get(split)
                if name not in r.evaluation.classes or counts is None:
                    cells.append("-")
                    continue
                per_slice = counts[r.evaluation.classes.index(name)]
                m = r.evaluation.class_metrics(split)[name]
                low, high = bootstrap_dice(per_slice)
                cells.append(
                    f"{m.dice:.2f} [{low:.2f}, {high:.2f}] / {m.precision:.2f} / "
                    f"{m.recall:.2f} / {m.accuracy:.2f}"
                )
            lines.append(f"| {ROW_NAMES[split]} | " + " | ".join(cells) + " |")
    return lines


def results_json(results: Sequence[RunEvaluation]) -> list[dict[str, Any]]:
    """JSON-ready form of the comparison."""
    return [
        {
            "name": r.name,
            "source": str(r.source),
            "threshold": r.evaluation.threshold,
            "metrics": {k: v.to_dict() for k, v in r.evaluation.metrics.items()},
            "per_class": per_class_metrics(r.evaluation.classes, r.evaluation.class_counts or {}),
            "val_threshold_search": {f"{t:.2f}": d for t, d in r.evaluation.val_search.items()},
        }
        for r in results
    ]
