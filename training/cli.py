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

from .cli_options import add_subcommands
from .config import AugmentConfig, TrainConfig
from .semisup_cli import cmd_train_semisup

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    add_subcommands(parser)
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
