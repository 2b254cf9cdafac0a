"""``python -m training train-semisup``: options and command (see :mod:`training.semisup`).

Kept apart from ``cli.py``; torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import AugmentConfig, TrainConfig


def add_semisup_options(p: argparse.ArgumentParser) -> None:
    """The options of ``train-semisup`` beyond those of ``train``."""
    p.add_argument(
        "--teacher",
        required=True,
        help="the supervised run (folder or best.pt) whose pseudo-labels the student learns; "
        "its configuration and split are the student's defaults",
    )
    p.add_argument(
        "--unlabeled",
        required=True,
        help="folder of unlabelled display images <volume>_<slice>.jpg (or DIR/images)",
    )
    p.add_argument("--pseudo-threshold", type=float, default=0.5, help="sigmoid > this (0.5)")
    p.add_argument(
        "--pseudo-weight", type=float, default=0.5, help="weight of the pseudo-labelled loss"
    )
    p.add_argument("--student-init", choices=("teacher", "scratch"), default="teacher")
    p.add_argument(
        "--unlabeled-batch",
        type=int,
        default=0,
        help="pseudo-labelled slices per step (default: the labelled batch size)",
    )
    p.add_argument(
        "--max-unlabeled", type=int, default=0, help="at most N unlabelled slices (0: all)"
    )


def cmd_train_semisup(args: argparse.Namespace, train_fields: Collection[str]) -> dict[str, Any]:
    """Run ``train-semisup``: the teacher's configuration, overridden by the given options.

    Args:
        args: parsed options.
        train_fields: the option names that are :class:`TrainConfig` fields.

    Returns:
        The command's JSON result.
    """
    from .checkpoints import load_checkpoint
    from .semisup import SemiSupConfig, train_semisup

    teacher = load_checkpoint(Path(args.teacher))
    base = TrainConfig.from_dict(dict(teacher["config"]))
    given = {k: v for k, v in vars(args).items() if k in train_fields}
    given.setdefault("out", str(Path(base.out).with_name(Path(base.out).name + "-semisup")))
    given.setdefault("split_file", None)  # the teacher's split (train_semisup writes it)
    if args.no_augment:
        given["augment"] = AugmentConfig(enabled=False)
    config = replace(base, **given)
    semi = SemiSupConfig(
        teacher=str(args.teacher),
        unlabeled=str(args.unlabeled),
        pseudo_threshold=args.pseudo_threshold,
        pseudo_weight=args.pseudo_weight,
        student_init=args.student_init,
        unlabeled_batch=args.unlabeled_batch,
        max_unlabeled=args.max_unlabeled,
    )
    started = time.perf_counter()
    result = train_semisup(config, semi, progress=not args.no_progress)
    return result.summary(time.perf_counter() - started)
