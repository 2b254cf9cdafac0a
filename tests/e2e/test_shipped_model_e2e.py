"""The shipped model end to end in a child process: ``explain`` on real COVID-19 CT with torch
unimportable (moved from tests/onnx/test_shipped_model.py)."""

from __future__ import annotations

from pathlib import Path


def test_explain_on_real_covid_ct_without_torch(covid_ct_dir: Path, tmp_path: Path) -> None:
    """Issue 4's acceptance: PNGs and gradcam.npz, and the CAM concentrates on the GGO."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    out = tmp_path / "out"
    script = "import sys; sys.modules['torch'] = None\nfrom ggo_cli.cli.app import app\napp()\n"
    # --no-lung-mask: these display images are cropped at the chest wall, so no closed body
    # surrounds the lungs and the density lung mask (made for whole CT sections) finds none.
    args = ["explain", str(covid_ct_dir), "-o", str(out), "--settle", "0", "--no-progress"]
    args.append("--no-lung-mask")
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (npz_path,) = out.rglob("gradcam.npz")
    with np.load(npz_path) as npz:
        cam, mask, uids = npz["cam"], npz["mask"].astype(bool), npz["sop_instance_uids"]
    assert cam.dtype == np.float32 and cam.shape[1:] == (512, 512)
    assert mask.shape == cam.shape and len(uids) == len(cam) >= 8  # GGO on most test slices
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert mask.reshape(len(mask), -1).any(axis=1).all()  # default: slices with GGO only
    pngs = sorted((npz_path.parent / "gradcam").glob("slice_*.png"))
    assert len(pngs) == len(cam)
    assert Image.open(pngs[0]).size[0] > 3 * 512  # three panels side by side
    inside, outside = float(cam[mask].mean()), float(cam[~mask].mean())
    assert inside >= 2.0 * outside, (inside, outside)
