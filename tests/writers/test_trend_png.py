"""The trend picture: its plotted values, deterministic bytes, no identifiers, atomic writes."""

from __future__ import annotations

import datetime as dt
import io
import os
import stat
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ggo_cli.domain import TrendPoint
from ggo_cli.errors import OutputError
from ggo_cli.fsutil import OutputTree
from ggo_cli.writers.trend_png import (
    FIGURE_SIZE_IN,
    TREND_DPI,
    TREND_NAME,
    date_number,
    remove_trend_png,
    render_trend_png,
    trend_figure,
    write_trend_png,
)

POINTS = (
    TrendPoint(dt.date(2024, 1, 2), Decimal("1.2345"), "1.2.1"),
    TrendPoint(dt.date(2024, 3, 1), Decimal("4.5000"), "1.2.2"),
    TrendPoint(dt.date(2024, 6, 30), Decimal("9.0001"), "1.2.3"),
)


def test_the_figure_plots_one_point_per_study_at_its_date_and_percentage() -> None:
    figure = trend_figure(POINTS)
    (axes,) = figure.axes
    (line,) = axes.lines
    assert list(line.get_xdata()) == [date_number(p.study_date) for p in POINTS]
    assert list(line.get_ydata()) == [1.2345, 4.5, 9.0001]
    assert date_number(dt.date(1970, 1, 2)) == 1.0
    figure.canvas.draw()  # the x axis reads the numbers as dates
    labels = {t.get_text() for t in axes.xaxis.get_ticklabels()}
    assert {"2024", "Mar", "Jun"} <= labels


def test_the_png_is_deterministic_and_its_text_names_no_one() -> None:
    data = render_trend_png(POINTS)
    assert render_trend_png(POINTS) == data
    image = Image.open(io.BytesIO(data))
    assert image.size == (FIGURE_SIZE_IN[0] * TREND_DPI, FIGURE_SIZE_IN[1] * TREND_DPI)
    assert set(image.text) == {"Title", "Description"}  # no Software version, no time
    assert image.text["Description"] == (
        "2024-01-02 1.2345%; 2024-03-01 4.5000%; 2024-06-30 9.0001%"
    )
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels != 255).any(axis=2).mean() > 0.02  # something is drawn


def test_a_trend_needs_two_studies() -> None:
    with pytest.raises(ValueError, match="at least 2 studies, got 1"):
        trend_figure(POINTS[:1])


def test_write_is_atomic_owner_only_and_remove_takes_a_stale_picture_away(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    tree = OutputTree(out)
    folder = out / "1.2" / "1.2.3"
    path = write_trend_png(POINTS, folder, tree=tree)
    assert path == folder / TREND_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == [TREND_NAME]  # no temporary file left
    assert remove_trend_png(folder, tree=tree)
    assert not path.exists()
    assert not remove_trend_png(folder, tree=tree)
    assert not remove_trend_png(out / "1.2" / "missing", tree=tree)
    assert not (out / "1.2" / "missing").exists()  # nothing created to remove nothing


def test_remove_refuses_a_linked_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / TREND_NAME).write_bytes(b"not ours")
    out.mkdir()
    (out / "1.2").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="symbolic link"):
        remove_trend_png(out / "1.2", tree=OutputTree(out))
    assert (elsewhere / TREND_NAME).read_bytes() == b"not ours"


def test_matplotlib_is_imported_only_to_draw_and_keeps_its_cache_in_ggo_clis(
    tmp_path: Path,
) -> None:
    """A run imports matplotlib only when it draws a picture, and matplotlib's font cache then
    goes below ggo-cli's cache folder, not to ~/.cache/matplotlib or ~/.matplotlib."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import datetime as dt, sys
        from decimal import Decimal
        import ggo_cli.run.runner
        from ggo_cli.domain import TrendPoint
        assert "matplotlib" not in sys.modules, "imported by a run that draws nothing"
        from ggo_cli.writers.trend_png import render_trend_png
        png = render_trend_png([TrendPoint(dt.date(2024, 1, 2), Decimal("1.0"), "1.2.1"),
                                TrendPoint(dt.date(2024, 3, 1), Decimal("2.0"), "1.2.2")])
        assert png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "GGO_CACHE_DIR")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                     if p.is_file())
    assert written, "matplotlib wrote no cache at all: the test checks nothing"
    assert all(p.startswith("cache/ggo-cli/matplotlib/") for p in written), written
