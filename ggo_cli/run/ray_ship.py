"""``segment --ray ADDRESS --ray-ship``: files travel through Ray's object store, not a shared path.

Without ``--ray-ship`` every node reads the inputs and the model, and writes ``--out``, at the
driver's paths (a shared filesystem). With it the nodes need no path of the driver's:

* **The model** (with the files beside it that a session may read: the explain graph, the int8
  calibration spec, the reference slices) is put into the object store once per run
  (:func:`pack_model`); each actor writes it into a scratch folder of its node, kept while the
  actor lives (:func:`unpack_model`), and checks its SHA-256 as in the shared mode.
* **Each series** is read by the driver when it is handed to an actor (:func:`pack_series`: only
  the series in flight are in the object store at any time). The actor writes the files into a
  scratch folder of its own (:func:`unpack_series`), runs the series with an output folder in
  scratch, and returns every file written (:func:`collect_outputs`) with the outcome.
* **The driver writes the outputs** into ``--out`` (:func:`write_returned`), each file atomically
  with the output folder's modes, then removes the DICOM objects the options no longer ask for,
  exactly as a run on one host does (:func:`ggo_cli.run.outputs.remove_outdated`); only then is
  the outcome recorded. A driver killed in between leaves whole files and a state store that
  has not recorded the series, so the next run does it again.

Scratch folders are :func:`ggo_cli.scratch.scratch_folder`\\ s: a killed actor's are removed by
the next one on that node. This module imports no Ray.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from ..atomic_output import atomic_write_bytes
from ..config import SEG_NAME, RunConfig
from ..domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ..onnx.explain_graph import EXPLAIN_NAME, ExplainInfo
from ..onnx.int8_recipes import INT8_SPEC_NAME
from ..onnx.model_info import ModelInfo
from ..onnx.reference_slices import REFERENCE_SET_NAME
from .outcomes import RETRY_NOTE
from .outputs import remove_outdated
from .series_pool import lost_series

MODEL_SIBLINGS = (EXPLAIN_NAME, INT8_SPEC_NAME, REFERENCE_SET_NAME)
"""Files beside the model that a session may read; shipped with it when present."""


@dataclass(frozen=True, slots=True)
class ShippedFile:
    """One file through the object store.

    Attributes:
        name: its path relative to the folder it belongs in (``/``-separated, no ``..``).
        data: its bytes.
    """

    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ShippedSeries:
    """A series as the driver hands it to an actor: its header values and its files' bytes.

    Attributes:
        series: the series as discovered (the driver's paths; the actor's copy replaces them).
        files: its slices, in the series' order, named by their paths below the folder the
            series' files have in common.
    """

    series: SeriesInfo
    files: tuple[ShippedFile, ...]


@dataclass(frozen=True, slots=True)
class ShippedModel:
    """The model file and the files beside it, for every actor of a run.

    Attributes:
        model: the model file (named as on the driver).
        siblings: those of :data:`MODEL_SIBLINGS` present beside it.
    """

    model: ShippedFile
    siblings: tuple[ShippedFile, ...]


def pack_model(model: ModelInfo) -> ShippedModel:
    """Read the model file and its present siblings.

    Raises:
        OSError: a file cannot be read (the run's model was readable a moment ago).
    """
    siblings = tuple(
        ShippedFile(name, (model.path.parent / name).read_bytes())
        for name in MODEL_SIBLINGS
        if (model.path.parent / name).is_file()
    )
    return ShippedModel(ShippedFile(model.path.name, model.path.read_bytes()), siblings)


def unpack_model(
    folder: Path, shipped: ShippedModel, model: ModelInfo, explain: ExplainInfo | None
) -> tuple[ModelInfo, ExplainInfo | None]:
    """Write the shipped model files into ``folder``; the model (and explain graph) then
    point there."""
    for item in (shipped.model, *shipped.siblings):
        (folder / _safe_name(item.name)).write_bytes(item.data)
    local = replace(model, path=folder / _safe_name(shipped.model.name))
    if explain is not None:
        explain = replace(explain, path=folder / EXPLAIN_NAME)
    return local, explain


def pack_series(series: SeriesInfo) -> ShippedSeries | SeriesOutcome:
    """Read the files of ``series``; a file that cannot be read fails the series (the next run
    retries it).

    Each file keeps its path below the series' files' common folder, so the actor's messages
    name a slice as one host's do (``file #3f9a2c``: a digest of that path).
    """
    base = Path(os.path.commonpath([str(path.parent) for path in series.files]))
    files: list[ShippedFile] = []
    for path in series.files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return lost_series(
                series,
                f"a file of the series cannot be read to ship it to the cluster "
                f"({exc.strerror or type(exc).__name__})" + RETRY_NOTE,
            )
        files.append(ShippedFile(path.relative_to(base).as_posix(), data))
    return ShippedSeries(series, tuple(files))


def unpack_series(folder: Path, shipped: ShippedSeries) -> SeriesInfo:
    """Write the shipped slices into ``folder``; the series' files then point there (in the
    same order)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in shipped.files:
        path = folder / _safe_name(item.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)
        paths.append(path)
    return replace(shipped.series, files=tuple(paths))


def collect_outputs(
    out: Path, outcome: SeriesOutcome, series: SeriesInfo
) -> tuple[SeriesOutcome, tuple[ShippedFile, ...]]:
    """Every file the series wrote below ``out`` (the actor's scratch output folder), and its
    outcome with the driver's ``series`` and paths relative to ``out``."""
    files = []
    for folder, _, names in os.walk(out):
        for name in sorted(names):
            path = Path(folder) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                files.append(ShippedFile(path.relative_to(out).as_posix(), path.read_bytes()))
    files.sort(key=lambda item: item.name)
    relative = replace(
        outcome,
        series=series,
        seg_path=None if outcome.seg_path is None else outcome.seg_path.relative_to(out),
        png_paths=tuple(path.relative_to(out) for path in outcome.png_paths),
    )
    return relative, tuple(files)


def write_returned(
    cfg: RunConfig, outcome: SeriesOutcome, files: Sequence[ShippedFile]
) -> SeriesOutcome:
    """Write an actor's returned files into ``--out`` and give the outcome the driver's paths.

    Each file is written atomically, the SEG first. For a series that succeeded, the DICOM
    objects of its folder that the actor did not write (an SR or SC the options no longer ask
    for) are then removed, as a run on one host removes them.

    Raises:
        OutputError: a file cannot be written (the run stops, as in one process).
    """
    out = cfg.out_dir
    ordered = sorted(files, key=lambda item: (PurePosixPath(item.name).name != SEG_NAME,
                                             item.name))
    written = [
        atomic_write_bytes(out / _safe_name(item.name), item.data, tree=cfg.tree)
        for item in ordered
    ]
    seg_path = None if outcome.seg_path is None else out / outcome.seg_path
    if outcome.status is SeriesStatus.OK and seg_path is not None:
        remove_outdated(seg_path.parent, written)
    return replace(
        outcome,
        seg_path=seg_path,
        png_paths=tuple(out / path for path in outcome.png_paths),
    )


def _safe_name(name: str) -> Path:
    """``name`` as a relative path, refused when it could leave its folder."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or not pure.parts or any(p in ("", ".", "..") for p in pure.parts):
        raise ValueError(f"refusing a shipped file named {name!r}")
    return Path(*pure.parts)
