"""Ray is an optional extra: neither ``ggo-cli --help`` nor a run without ``--ray`` imports it.

Each check runs in a fresh interpreter, since another test of the session may have imported
Ray already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run_python(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter from the checkout; returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_help_does_not_import_ray(tmp_path: Path) -> None:
    """``ggo-cli --help`` and ``segment --help`` load the CLI without Ray (and show --ray)."""
    out = _run_python(
        """
        import sys
        from typer.testing import CliRunner
        from ggo_cli.cli.app import app

        for args in (["--help"], ["segment", "--help"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
            if args[0] == "segment":
                assert "--ray" in result.output, result.output
        print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
        """,
        tmp_path,
    )
    assert out.strip() == "[]"


def test_a_run_without_ray_does_not_import_it(tmp_path: Path) -> None:
    """A whole ``segment`` run without ``--ray`` finishes (exit 0) without importing Ray."""
    out = _run_python(
        """
        import sys
        from pathlib import Path
        from typer.testing import CliRunner
        from ggo_cli.cli.app import app
        from tests.dicom_factory import make_ct_series
        from tests.onnx_models import write_band_model
        from tests.phantoms import make_cube_phantom

        tmp = Path(sys.argv[1])
        model = write_band_model(tmp / "band.onnx", 64)
        make_ct_series(tmp / "in", phantom=make_cube_phantom((12, 48, 48), (2.5, 0.7, 0.7)))
        result = CliRunner().invoke(
            app,
            ["segment", str(tmp / "in"), "-o", str(tmp / "out"), "-m", str(model),
             "--no-progress", "--no-lung-mask"],
        )
        assert result.exit_code == 0, result.output
        assert (tmp / "out" / "ggo_volumes.csv").is_file()
        print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
        """,
        tmp_path,
    )
    assert out.strip().splitlines()[-1] == "[]"
