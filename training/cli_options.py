"""The options of ``python -m training``: every subcommand and its arguments, added to one parser.

Kept apart from :mod:`training.cli`, which runs the commands; imports only argparse and the light
configuration modules (no torch), so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

from .config import AMP_MODES, ARCHS, DEFAULT_SIZE, LOSSES, parse_classes
from .semisup_cli import add_semisup_options


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


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add every subcommand of ``python -m training`` and its options to ``parser``."""
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
