"""A patient's trend picture (``trend.png``): GGO percent of lung over the patient's studies.

One point per study (its representative series, :mod:`ggo_cli.run.followup`), study date on the
x axis, GGO percent of lung on the y axis, each point labelled with its value. Drawn with
matplotlib's Agg canvas on a :class:`~matplotlib.figure.Figure` of its own (no pyplot, no
global figure state), in matplotlib's default style, at a fixed size and DPI. The PNG holds no
identifier (no patient ID or name: dates are fine) and no time stamp or software version: its
only text chunks are ``Title`` and ``Description``, the plotted points as text, so the same
points give the same bytes with one matplotlib. Written atomically into the latest study's
representative series folder; :func:`remove_trend_png` takes a stale one away.

matplotlib is imported only when a picture is drawn, and its own cache (the font list it builds
on first use) goes below ggo-cli's cache folder (``MPLCONFIGDIR``, unless the user set it), so a
run writes nothing outside ``--out`` and that folder.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic_output import atomic_write_bytes
from ..config import TREND_NAME
from ..domain import TrendPoint
from ..errors import OutputError
from ..fsutil import OutputTree

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

MPLCONFIG_ENV = "MPLCONFIGDIR"
MPLCONFIG_FOLDER = "matplotlib"
"""matplotlib's configuration and cache folder, below ggo-cli's cache folder."""
TREND_DPI = 100
FIGURE_SIZE_IN = (6.4, 3.6)
"""640 x 360 pixels at :data:`TREND_DPI`."""
TITLE = "GGO percent of lung by study"
LINE_COLOR = "#c0392b"
MIN_POINTS = 2
DATE_EPOCH = dt.date(1970, 1, 1)
"""matplotlib's ``date.epoch`` in its default style (the x axis counts days from it)."""


def date_number(date: dt.date) -> float:
    """A date as matplotlib's date number: days since the default style's epoch, 1970-01-01."""
    return float((date - DATE_EPOCH).days)


def points_text(points: Sequence[TrendPoint]) -> str:
    """The plotted points as text (the PNG's ``Description``): ``YYYY-MM-DD 1.2345%; ...``."""
    return "; ".join(f"{p.study_date.isoformat()} {p.ggo_percent_of_lung}%" for p in points)


def _matplotlib() -> Any:
    """matplotlib, imported on first use with its cache in ggo-cli's cache folder."""
    from ..onnx.verdict_cache import cache_dir

    os.environ.setdefault(MPLCONFIG_ENV, str(cache_dir() / MPLCONFIG_FOLDER))
    import matplotlib.dates
    import matplotlib.style

    return matplotlib


def trend_figure(points: Sequence[TrendPoint]) -> Figure:
    """Draw the trend of GGO percent of lung over the studies.

    Args:
        points: one point per study, oldest first.

    Returns:
        The figure (one axes, one line whose data are the points' dates and percentages).

    Raises:
        ValueError: fewer than two points.
    """
    if len(points) < MIN_POINTS:
        raise ValueError(f"a trend needs at least {MIN_POINTS} studies, got {len(points)}")
    days = [date_number(p.study_date) for p in points]
    percents = [float(p.ggo_percent_of_lung) for p in points]
    matplotlib = _matplotlib()
    mdates = matplotlib.dates
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):  # the user's matplotlibrc plays no part
        figure = Figure(figsize=FIGURE_SIZE_IN, dpi=TREND_DPI, layout="constrained")
        axes = figure.add_subplot()
        axes.plot(days, percents, marker="o", color=LINE_COLOR, linewidth=1.5)
        for day, percent in zip(days, percents, strict=True):
            axes.annotate(
                f"{percent:.2f} %",
                (day, percent),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
        locator = mdates.AutoDateLocator(minticks=2, maxticks=8)
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        top = max(percents)
        axes.set_ylim(0.0, top * 1.2 if top > 0 else 1.0)
        axes.margins(x=0.08)
        axes.set_xlabel("Study date")
        axes.set_ylabel("GGO, % of lung")
        axes.set_title(TITLE, fontsize=10)
        axes.grid(True, alpha=0.3)
    return figure


def render_trend_png(points: Sequence[TrendPoint]) -> bytes:
    """The trend picture as PNG bytes: no software version, no time stamp, no identifier."""
    figure = trend_figure(points)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(  # type: ignore[no-untyped-call]
        buffer,
        metadata={"Software": None, "Title": TITLE, "Description": points_text(points)},
    )
    return buffer.getvalue()


def write_trend_png(points: Sequence[TrendPoint], folder: Path, *, tree: OutputTree) -> Path:
    """Write ``trend.png`` into a series folder, atomically.

    Args:
        points: one point per study, oldest first (at least two).
        folder: the latest study's representative series folder.
        tree: the output folder (links refused, its file mode).

    Returns:
        The PNG's path.

    Raises:
        OutputError: the file cannot be written.
        ValueError: fewer than two points.
    """
    path = folder / TREND_NAME
    atomic_write_bytes(path, render_trend_png(points), tree=tree)
    log.debug("trend picture of %d studies written to %s", len(points), path)
    return path


def remove_trend_png(folder: Path, *, tree: OutputTree) -> bool:
    """Remove a series folder's ``trend.png`` (a stale one); a missing folder or file is fine.

    The folders down to ``folder`` are checked for links first, so nothing outside the output
    folder is touched; removing is one ``unlink`` (never a partial file).

    Returns:
        Whether a file was removed.

    Raises:
        OutputError: a folder is a link (fatal), or the file cannot be removed.
    """
    path = folder / TREND_NAME
    try:
        os.lstat(folder)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError(f"cannot inspect {folder}: {exc}") from exc
    tree.folder(folder)
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError(f"cannot remove the stale {path}: {exc}") from exc
    log.debug("removed the stale trend picture %s", path)
    return True
