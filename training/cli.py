"""``python -m training {pack,train,evaluate,export,export-explain,compare}``: the command line.

argparse (standard library) rather than Typer, so that the GPU machines, which have only torch,
numpy and tqdm, can run ``train`` from a packed ``.npz``. This module parses options, builds the
configuration, configures logging (stderr) and maps errors to exit codes; stdout carries only
each command's result (paths or JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ggo_cli.errors import EXIT_BUG, GgoError

from .config import (
    AMP_MODES,
    ARCHS,
    DEFAULT_SIZE,
    LOSSES,
    AugmentConfig,
    TrainConfig,
    parse_classes,
)
from .semisup_cli import add_semisup_options, cmd_train_semisup

log = logging.getLogger("training")

# Options whose argparse destination differs from the TrainConfig field.
_TRAIN_FIELDS = {
    "arch",
    "loss",
    "data",
    "out",
    "size",
    "label",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "patience",
    "plateau_patience",
    "plateau_factor",
    "min_lr",
    "pretrained",
    "device",
    "amp",
    "channels_last",
    "workers",
    "save_every",
    "split_file",
    "groups_file",
    "window_center",
    "window_width",
    "tversky_alpha",
    "tversky_beta",
    "focal_gamma",
    "compile",
    "classes",
}


def _configure_logging(verbosity: int, log_file: str | None) -> None:
    """The only place handlers are added: stderr (and an optional file)."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
    for name in ("training", "ggo_cli"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = False


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    p.add_argument("--log-file", help="also write the log to this file")


def _add_data_options(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    default = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--label",
        type=int,
        default=argparse.SUPPRESS if suppress else 1,
        help="mask value of GGO (1 for the shared PNGs, 255 for 0/255 BMPs; "
        "the segment number for DICOM-SEG)",
    )
    p.add_argument(
        "--window-center",
        type=float,
        default=default,
        help="lung window centre in HU for DICOM/NIfTI (default -600)",
    )
    p.add_argument(
        "--window-width", type=float, default=default, help="lung window width in HU (default 1500)"
    )


_CLASSES_HELP = "classes, one output channel each, GGO first: ggo (default) or ggo,consolidation"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Options of ``train`` and ``train-semisup`` (absent ones keep the config's defaults)."""
    s = argparse.SUPPRESS
    p.add_argument("--arch", choices=ARCHS, default=s, help="network (default resnet50-unet)")
    p.add_argument("--loss", choices=LOSSES, default=s, help="loss (default focal-tversky-dice)")
    p.add_argument("--data", default=s, help="folder or packed .npz")
    p.add_argument("--out", default=s, help="run folder (default runs/<arch>)")
    p.add_argument("--size", type=int, default=s, help="input size S (default 512)")
    p.add_argument("--epochs", type=int, default=s, help="maximum epochs (default 100)")
    p.add_argument("--batch-size", type=int, default=s, help="batch size (default 2)")
    p.add_argument("--lr", type=float, default=s, help="Adam learning rate (default 2e-4)")
    p.add_argument("--weight-decay", type=float, default=s)
    p.add_argument("--seed", type=int, default=s, help="seed of split, init, augmentation")
    p.add_argument("--patience", type=int, default=s, help="early stopping (default 30; 0 = off)")
    p.add_argument("--plateau-patience", type=int, default=s, help="ReduceLROnPlateau (10)")
    p.add_argument("--plateau-factor", type=float, default=s)
    p.add_argument("--min-lr", type=float, default=s)
    p.add_argument("--pretrained", default=s, help="torchvision state dict PATH or 'imagenet'")
    p.add_argument("--device", default=s, help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=s,
        help="autocast: auto = bf16 on CUDA, off on CPU; bf16 helps CPUs with AMX",
    )
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=s)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=s)
    p.add_argument("--workers", type=int, default=s, help="image decoding threads")
    p.add_argument("--save-every", type=int, default=s, help="write last.pt every N epochs")
    p.add_argument("--split-file", default=s, help="reuse this split.json")
    p.add_argument("--groups", dest="groups_file", default=s, help="CSV id,group")
    p.add_argument(
        "--alpha",
        dest="tversky_alpha",
        type=float,
        default=s,
        help="Focal Tversky false-negative weight (0.7)",
    )
    p.add_argument(
        "--beta",
        dest="tversky_beta",
        type=float,
        default=s,
        help="Focal Tversky false-positive weight (0.3)",
    )
    p.add_argument(
        "--gamma", dest="focal_gamma", type=float, default=s, help="Focal Tversky exponent (0.75)"
    )
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_data_options(p, suppress=True)
    p.add_argument("--classes", type=parse_classes, default=s, help=_CLASSES_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="write a data set to one .npz (for GPU machines)")
    _add_common(p)
    p.add_argument("--data", required=True, help="folder (images/ + labels/, DICOM + SEG)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="model grid size S")
    p.add_argument("--grid-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--workers", type=int, default=0, help="decoding threads")
    p.add_argument("--groups", dest="groups_file", help="CSV id,group (patient/study)")
    p.add_argument("--classes", type=parse_classes, default=("ggo",), help=_CLASSES_HELP)
    _add_data_options(p)

    p = sub.add_parser("train", help="train one network (paper protocol)")
    _add_common(p)
    _add_train_options(p)
    p.add_argument("--resume", help="continue from a last.pt")

    p = sub.add_parser(
        "train-semisup", help="student from a teacher's pseudo-labels of unlabelled slices"
    )
    _add_common(p)
    _add_train_options(p)
    add_semisup_options(p)

    p = sub.add_parser("evaluate", help="metrics of a model on labelled data")
    _add_common(p)
    p.add_argument("--model", required=True, help="model.onnx, a checkpoint or a run folder")
    p.add_argument("--data", required=True, help="folder or packed .npz")
    p.add_argument("--label", type=int, default=1, help="mask value of GGO")
    p.add_argument("--split", choices=("train", "val", "test"), help="evaluate one split only")
    p.add_argument("--split-file", help="the split.json defining --split")
    p.add_argument("--threshold", type=float, help="override the model's threshold")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--ci",
        action="store_true",
        help="add seeded bootstrap 95 %% intervals of the pooled Dice per class (dice_ci95)",
    )

    p = sub.add_parser("export", help="checkpoint -> ONNX model with metadata and card")
    _add_common(p)
    p.add_argument("--checkpoint", required=True, help="best.pt, best_fp16.pt or run folder")
    p.add_argument(
        "--out", required=True, help="model folder, e.g. exported_models/ggo-resnet50-unet"
    )
    p.add_argument("--data", help="data of the checkpoint's split (default: its recorded path)")
    p.add_argument("--fp16-weights", action="store_true", help="float16 initializers (half size)")
    p.add_argument("--name", help="model name (default ggo-<arch>)")
    p.add_argument("--version", default="1.0.0", help="model version")
    p.add_argument("--threshold", type=float, help="fixed threshold (default: chosen on val)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument(
        "--no-explain", action="store_true", help="do not write explain.onnx (GradCAM++ graph)"
    )

    p = sub.add_parser("export-explain", help="checkpoint + model.onnx -> explain.onnx")
    _add_common(p)
    p.add_argument("--checkpoint", required=True, help="the checkpoint model.onnx came from")
    p.add_argument("--model", required=True, help="the paired model.onnx")
    p.add_argument("--out", help="explain graph to write (default: explain.onnx beside --model)")
    p.add_argument("--data", help="labelled slices for the faithfulness measurement")
    p.add_argument("--fp16-weights", action="store_true", help="float16 initializers (half size)")
    p.add_argument("--layers", nargs="+", help="module paths (default: the architecture's list)")
    p.add_argument("--max-slices", type=int, help="faithfulness on at most N slices")

    p = sub.add_parser("quantize", help="model.onnx -> int8 recipe (int8_calibration.json)")
    _add_common(p)
    p.add_argument("--model", required=True, help="exported model.onnx (with model.json)")
    p.add_argument("--data", required=True, help="the labelled slices of the model's split")
    p.add_argument("--n-calibration", type=int, default=32, help="train slices to calibrate on")
    p.add_argument(
        "--calibration",
        choices=["Percentile", "MinMax", "Entropy"],
        default="Percentile",
        help="range estimate (Percentile: 99.999 %%)",
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs of the speed check")
    p.add_argument(
        "--reuse-ranges",
        action="store_true",
        help="take the activation ranges from the int8_calibration.json beside the model "
        "instead of calibrating again (for a change of the other settings)",
    )
    p.add_argument(
        "--upsampling",
        choices=["depth_to_space", "as_is"],
        default="depth_to_space",
        help="the 2 x 2 transposed convolutions as int8 1 x 1 Conv + DepthToSpace, or as they are",
    )
    p.add_argument(
        "--recipe",
        choices=["u8s8-vnni", "u8u8"],
        default="u8s8-vnni",
        help="which CPU class's recipe to make and measure (on this machine's CPU): u8s8-vnni "
        "for CPUs with VNNI, u8u8 for any CPU (AVX2-only included); with --reuse-ranges the "
        "file's other recipes are kept",
    )

    p = sub.add_parser(
        "reference-set",
        help="the reference slices beside a model for ggo-cli's numeric self-check of variants",
    )
    _add_common(p)
    p.add_argument("--model", required=True, help="exported model.onnx (with model.json)")
    p.add_argument("--data", required=True, help="the labelled slices of the model's split")
    p.add_argument("--ct", required=True, help="a real chest CT series folder (DICOM)")

    p = sub.add_parser("compare", help="the paper's Table 1 for several runs")
    _add_common(p)
    p.add_argument("--runs", nargs="+", required=True, help="run folders or exported models")
    p.add_argument("--data", help="the data (default: each run's recorded path)")
    p.add_argument("--out", help="write the Markdown table here")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    return parser


def _train_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """TrainConfig from defaults (or the resumed checkpoint's) and the given options."""
    given = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS}
    if "classes" in given:
        given.setdefault("out_channels", len(given["classes"]))
    resume = Path(args.resume) if getattr(args, "resume", None) else None
    if resume is not None:
        from .checkpoints import load_checkpoint

        base = TrainConfig.from_dict(dict(load_checkpoint(resume)["config"]))
    else:
        if "data" not in given:
            from ggo_cli.errors import InputError

            raise InputError("train needs --data (a folder or a packed .npz) or --resume")
        base = TrainConfig(data=str(given["data"]))
        if "out" not in given:
            given["out"] = str(Path("runs") / str(given.get("arch", base.arch)))
    if args.no_augment:
        given["augment"] = AugmentConfig(enabled=False)
    return replace(base, **given), resume


def _cmd_pack(args: argparse.Namespace) -> dict[str, Any]:
    from .data import load_slices, pack
    from .multiclass import class_values

    several = len(args.classes) > 1
    slices = load_slices(
        Path(args.data),
        label=args.label,
        window_center=args.window_center if args.window_center is not None else -600.0,
        window_width=args.window_width if args.window_width is not None else 1500.0,
        workers=args.workers,
        groups_file=Path(args.groups_file) if args.groups_file else None,
        labels=class_values(args.classes, args.label) if several else None,
    )
    pack(
        slices,
        Path(args.out),
        size=args.size,
        label=args.label,
        grid_dtype=args.grid_dtype,
        classes=args.classes,
    )
    return {"out": str(args.out), "n_images": len(slices), "size": args.size}


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .loop import train

    config, resume = _train_config(args)
    started = time.perf_counter()
    result = train(config, resume=resume, progress=not args.no_progress)
    return result.summary(time.perf_counter() - started)


def _cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from .evaluate import evaluate_report

    return evaluate_report(
        Path(args.model),
        Path(args.data),
        label=args.label,
        split_name=args.split,
        split_file=Path(args.split_file) if args.split_file else None,
        threshold=args.threshold,
        device=args.device,
        intervals=args.ci,
    )


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from .export import export_checkpoint

    result = export_checkpoint(
        Path(args.checkpoint),
        Path(args.out),
        data=Path(args.data) if args.data else None,
        fp16_weights=args.fp16_weights,
        name=args.name,
        version=args.version,
        threshold=args.threshold,
    )
    summary: dict[str, Any] = {
        "model": str(result.model_path),
        "card": str(result.card_path),
        "threshold": result.threshold,
        "size_mb": round(result.size_bytes / 1e6, 2),
        "parity_max_abs": result.parity_max_abs,
        "fp16_mask_agreement": result.mask_agreement,
        "metrics": {k: v.to_dict() for k, v in result.metrics.items()},
    }
    explain_path = result.model_path.parent / "explain.onnx"
    if args.no_explain:
        if explain_path.exists():
            log.warning("%s is left as it was and no longer pairs with the new model", explain_path)
        return summary
    from .explain_export import export_explain

    explained = export_explain(
        Path(args.checkpoint),
        result.model_path,
        explain_path,
        fp16_weights=args.fp16_weights,
        data=Path(args.data) if args.data else None,
    )
    summary["explain"] = _explain_summary(explained)
    return summary


def _explain_summary(result: Any) -> dict[str, Any]:
    return {
        "explain": str(result.path),
        "size_mb": round(result.size_bytes / 1e6, 2),
        "layers": list(result.layers),
        "default_layer": result.default_layer,
        "max_gradient_error": max(result.gradient_errors.values()),
        "fp16_max_abs_cam_diff": result.fp16_cam_diff,
        "faithfulness": result.faithfulness.get("per_layer", {}),
    }


def _cmd_export_explain(args: argparse.Namespace) -> dict[str, Any]:
    from .explain_export import EXPLAIN_NAME, export_explain

    model = Path(args.model)
    result = export_explain(
        Path(args.checkpoint),
        model,
        Path(args.out) if args.out else model.parent / EXPLAIN_NAME,
        fp16_weights=args.fp16_weights,
        data=Path(args.data) if args.data else None,
        layers=args.layers,
        max_slices=args.max_slices,
    )
    return _explain_summary(result)


def _cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from .quantize import RECIPES, make_int8_recipe

    settings = json.loads(json.dumps(RECIPES[args.recipe]["settings"]))
    settings["calibrate_method"] = args.calibration
    if args.calibration != "Percentile":
        settings["extra_options"].pop("CalibPercentile", None)
    settings["upsampling"] = args.upsampling
    result = make_int8_recipe(
        Path(args.model),
        Path(args.data),
        n_calibration=args.n_calibration,
        settings=settings,
        runs=args.runs,
        reuse_ranges=args.reuse_ranges,
        recipe=args.recipe,
    )
    validation = result.recipe["validation"]
    summary: dict[str, Any] = {
        "recipe": args.recipe,
        "int8_recipe": str(result.spec_path),
        "pooled_dice_fp32": validation["test_fp32"]["dice"],
        "pooled_dice_int8": validation["test_int8"]["dice"],
        "pooled_dice_change": validation["pooled_dice_change"],
    }
    for name, figures in validation.get("classes", {}).items():  # consolidation, ...
        summary[f"{name}_pooled_dice_fp32"] = figures["test_fp32"]["dice"]
        summary[f"{name}_pooled_dice_int8"] = figures["test_int8"]["dice"]
        summary[f"{name}_pooled_dice_change"] = figures["pooled_dice_change"]
    summary["cpu_speedup"] = validation["speed_cpu"]["speedup"]
    summary["int8_graph_sha256"] = result.recipe["int8_graph_sha256"]
    return summary


def _cmd_reference_set(args: argparse.Namespace) -> dict[str, Any]:
    from .reference_set import make_reference_set

    path, names = make_reference_set(Path(args.model), Path(args.data), Path(args.ct))
    return {"reference_set": str(path), "slices": names}


def _cmd_compare(args: argparse.Namespace) -> dict[str, Any] | str:
    from .compare import compare_runs, render_markdown, results_json

    results = compare_runs(
        [Path(r) for r in args.runs],
        data=Path(args.data) if args.data else None,
        device=args.device,
    )
    markdown = render_markdown(results)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown, encoding="utf-8")
    if args.json:
        return {"runs": results_json(results)}
    return markdown


_COMMANDS = {
    "pack": _cmd_pack,
    "train": _cmd_train,
    "train-semisup": lambda args: cmd_train_semisup(args, _TRAIN_FIELDS),
    "evaluate": _cmd_evaluate,
    "export": _cmd_export,
    "export-explain": _cmd_export_explain,
    "quantize": _cmd_quantize,
    "reference-set": _cmd_reference_set,
    "compare": _cmd_compare,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code (STYLE.md section 5).

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, the error's exit code for expected failures, 1 for bugs.
    """
    args = build_parser().parse_args(argv)
    _configure_logging(-1 if args.quiet else args.verbose, args.log_file)
    try:
        result = _COMMANDS[args.command](args)
    except GgoError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # the boundary: anything else is a bug
        if args.debug:
            log.exception("unexpected error")
        else:
            log.error(
                "unexpected error: %s: %s (rerun with --debug for the traceback)",
                type(exc).__name__,
                exc,
            )
        return EXIT_BUG
    if isinstance(result, str):
        sys.stdout.write(result)
    elif args.command == "evaluate" and not args.json:
        sys.stdout.write(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
            )
            + "\n"
        )
    else:
        sys.stdout.write(
            json.dumps(result, indent=None if args.command == "evaluate" else 2) + "\n"
        )
    return 0
