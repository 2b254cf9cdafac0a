"""Build a demo output folder and capture its ``report.html`` in headless Chromium (the README's
picture, ``docs/images/report.png``).

The demo is synthetic (nothing identifying): one phantom patient with two studies on two dates
(more GGO in the second), a second patient's study, a series of too few slices (skipped) and a
series with a missing slice (failed). ``ggo-cli segment --explain`` runs over them with the
shipped model (or ``--model``), which also builds the page; the page is then opened from its
file and captured whole. Chromium is driven as in the browser test (:mod:`tests.e2e.cdp`) and
touches only file URLs. Takes a few minutes on a 2-core CPU (the shipped model at 512 x 512).

Usage::

    python scripts/report_screenshot.py [--out-image docs/images/report.png] [--model MODEL]
        [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's packages
    sys.path.insert(0, str(REPO))

from ggo_cli.synthetic.ct_writer import SeriesAttributes, write_ct_series  # noqa: E402
from ggo_cli.synthetic.phantom import make_chest_phantom  # noqa: E402

SLICES = 12
SIZE = 512
"""Slices and pixels per side of the demo series (the shipped model's input size)."""
SKIPPED_SLICES = 5
"""Below the default ``--min-slices`` (10): the series is skipped."""


def _attributes(patient: str, date: str, description: str) -> SeriesAttributes:
    return SeriesAttributes(
        patient_name="Demo^Phantom",
        patient_id=patient,
        study_date=date,
        series_description=description,
    )


def build_inputs(root: Path) -> Path:
    """Write the demo's CT series below ``root / "in"`` (see the module's description)."""
    inputs = root / "in"
    studies = (
        ("DEMO-A", "20240102", "Chest 1.0 B60f (first visit)", 1, 2),
        ("DEMO-A", "20240305", "Chest 1.0 B60f (follow-up)", 2, 5),
        ("DEMO-B", "20240210", "Chest 1.0 B60f", 3, 3),
    )
    for patient, date, description, seed, lesions in studies:
        phantom = make_chest_phantom(shape=(SLICES, SIZE, SIZE), seed=seed, ggo_lesions=lesions)
        write_ct_series(
            phantom,
            inputs / f"{patient}-{date}",
            attributes=_attributes(patient, date, description),
            seed=seed,
        )
    short = make_chest_phantom(shape=(SKIPPED_SLICES, SIZE, SIZE), seed=4, ggo_lesions=0)
    write_ct_series(
        short, inputs / "short", attributes=_attributes("DEMO-C", "20240211", "Scout"), seed=4
    )
    gap = make_chest_phantom(shape=(SLICES, SIZE, SIZE), seed=5, ggo_lesions=1)
    files = write_ct_series(
        gap, inputs / "gap", attributes=_attributes("DEMO-D", "20240212", "Chest 5.0"), seed=5
    )
    files[SLICES // 2].unlink()  # a missing slice: uneven spacing, the series fails
    return inputs


def run_demo(root: Path, model: Path | None) -> Path:
    """Segment the demo inputs into ``root / "out"`` (which builds ``report.html``)."""
    from typer.testing import CliRunner

    from ggo_cli.cli.app import app

    out = root / "out"
    args = ["segment", str(build_inputs(root)), "--out", str(out), "--explain"]
    args += ["--no-progress", "--settle", "0", "--sc", "none"]
    if model is not None:
        args += ["--model", str(model)]
    result = CliRunner().invoke(app, args)
    if result.exit_code not in (0, 7):  # 7: the failed series, as intended
        raise SystemExit(f"segment exited {result.exit_code}:\n{result.output}")
    if not (out / "report.html").is_file():
        raise SystemExit("segment built no report.html")
    return out


def capture(page: Path, image: Path, profile: Path) -> Path:
    """Open ``page`` in headless Chromium and save the whole page as ``image``."""
    from tests.e2e.cdp import CHROMIUM, HeadlessChromium

    binary = shutil.which(CHROMIUM)
    if binary is None:
        raise SystemExit(f"{CHROMIUM} not found: apt-get install chromium")
    with HeadlessChromium(binary, profile) as browser:
        browser.navigate(page.as_uri())
        browser.evaluate(
            "Promise.all(Array.from(document.images).map(i => { i.loading = 'eager';"
            " return i.decode().catch(() => null); }))"
        )
        if browser.errors():
            raise SystemExit(f"the page logged errors: {browser.errors()}")
        image.parent.mkdir(parents=True, exist_ok=True)
        return browser.screenshot(image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-image", type=Path, default=REPO / "docs/images/report.png")
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--work", type=Path, default=None, help="keep the demo folder here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ggo-report-") as temp:
        root = args.work or Path(temp)
        out = run_demo(root, args.model)
        shot = capture(out / "report.html", args.out_image, Path(temp) / "profile")
    print(shot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
