"""Seeded train / validation / test split (64 / 16 / 20 % as in the paper), saved as JSON.

When slices carry a group (patient or study), whole groups are assigned to one split, so no
patient contributes to both training and test; otherwise every slice is its own group.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ggo_cli.errors import InputError

from .config import SPLIT_FRACTIONS

SplitName = Literal["train", "val", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "val", "test")
MIN_SLICES = 3


def _natural_key(text: str) -> list[Any]:
    """Sort key with numbers compared numerically."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


@dataclass(frozen=True, slots=True)
class Split:
    """Which slice ids belong to which split.

    Attributes:
        train: training ids.
        val: validation ids (model selection, threshold).
        test: test ids (reported once).
        seed: the seed that drew it.
        grouped: whether whole groups were kept together.
        fractions: the target train / val / test fractions.
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int
    grouped: bool
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS

    def ids(self, name: str) -> tuple[str, ...]:
        """Return the ids of split ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLIT_NAMES:
            raise InputError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        result: tuple[str, ...] = getattr(self, name)
        return result

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in split.json, checkpoints and model metadata)."""
        return {
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "seed": self.seed,
            "grouped": self.grouped,
            "fractions": list(self.fractions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Split:
        """Inverse of :meth:`to_dict`.

        Raises:
            InputError: missing keys.
        """
        try:
            return cls(
                train=tuple(data["train"]),
                val=tuple(data["val"]),
                test=tuple(data["test"]),
                seed=int(data.get("seed", -1)),
                grouped=bool(data.get("grouped", False)),
                fractions=tuple(data.get("fractions", SPLIT_FRACTIONS)),
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"split data lacks train/val/test id lists: {exc}") from exc


def make_split(
    ids: Sequence[str],
    groups: Sequence[str | None],
    *,
    seed: int,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
) -> Split:
    """Draw a seeded split, keeping groups together.

    Groups are shuffled, then test is filled to ``round(n * f_test)`` slices, validation to
    ``round(n * f_val)``, the rest is training (exact counts when there are no groups).

    Args:
        ids: slice ids (unique).
        groups: one group per id, or None for an ungrouped slice.
        seed: random seed.
        fractions: train / val / test fractions (summing to 1).

    Returns:
        The split; each list sorted naturally.

    Raises:
        InputError: fewer than 3 slices, duplicate ids or bad fractions.
    """
    if len(ids) < MIN_SLICES:
        raise InputError(f"need at least {MIN_SLICES} slices to split, got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise InputError("slice ids are not unique; rename the duplicate files")
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise InputError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    members: dict[str, list[str]] = {}
    for sid, group in zip(ids, groups, strict=True):
        members.setdefault(group if group else f"\0{sid}", []).append(sid)
    keys = sorted(members, key=_natural_key)
    order = np.random.default_rng(seed).permutation(len(keys))
    n = len(ids)
    want_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
    want_val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for index in order:
        group_ids = members[keys[index]]
        if len(parts["test"]) < want_test:
            parts["test"] += group_ids
        elif len(parts["val"]) < want_val:
            parts["val"] += group_ids
        else:
            parts["train"] += group_ids
    if not parts["train"]:
        raise InputError("the split left no training slices; add data or groups")
    return Split(
        train=tuple(sorted(parts["train"], key=_natural_key)),
        val=tuple(sorted(parts["val"], key=_natural_key)),
        test=tuple(sorted(parts["test"], key=_natural_key)),
        seed=seed,
        grouped=any(g for g in groups),
        fractions=fractions,
    )


def save_split(split: Split, path: Path) -> None:
    """Write ``split.json`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(split.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_split(path: Path) -> Split:
    """Read a ``split.json``.

    Raises:
        InputError: missing or malformed file.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read split file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"split file {path} must hold a JSON object")
    return Split.from_dict(data)


def check_split_ids(split: Split, available: Sequence[str]) -> None:
    """Raise :class:`InputError` if the split names ids that the data lacks."""
    have = set(available)
    missing = [i for name in SPLIT_NAMES for i in split.ids(name) if i not in have]
    if missing:
        raise InputError(
            f"the split names {len(missing)} slices not in the data (e.g. {missing[:3]}); "
            "use the data the split was drawn from, or drop --split-file to draw a new one"
        )
