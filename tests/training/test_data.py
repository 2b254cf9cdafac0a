"""Data layouts, packing, and the seeded split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ggo_cli.analysis.preprocessing import to_model_grid
from ggo_cli.errors import InputError
from tests.shared_data import COVID_SLICES_DIR, DCMQI_DIR, require_shared
from tests.training.conftest import synthetic_slices
from training.data import load_grid, load_slices, pack, read_packed_slices
from training.splits import Split, load_split, make_split, save_split


def _write_pair(root: Path, stem: str, image: np.ndarray, labels: np.ndarray, *, ext: str) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    if ext == ".png":
        lab = Image.fromarray(labels, mode="P")
        lab.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        lab.save(root / "labels" / f"{stem}.png")
    else:
        Image.fromarray(labels).save(root / "labels" / f"{stem}{ext}")


def test_palette_png_labels_pick_the_requested_class(tmp_path: Path) -> None:
    labels = np.zeros((20, 30), np.uint8)
    labels[2:5, 3:9] = 1  # GGO
    labels[10:12, 10:20] = 2  # consolidation
    image = np.full((20, 30), 200, np.uint8)
    _write_pair(tmp_path, "7", image, labels, ext=".png")
    (s,) = load_slices(tmp_path, label=1)
    assert s.id == "7" and s.mask.sum() == 18 and s.image.dtype == np.uint8
    assert s.image_float().max() == pytest.approx(200 / 255)
    (c,) = load_slices(tmp_path, label=2)
    assert c.mask.sum() == 20


def test_bmp_masks_with_label_255(tmp_path: Path) -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    _write_pair(tmp_path, "a", np.zeros((16, 16), np.uint8), mask, ext=".bmp")
    (s,) = load_slices(tmp_path, label=255)
    assert s.mask.sum() == 16


def test_ids_sort_naturally(tmp_path: Path) -> None:
    for stem in ("10", "2", "1"):
        _write_pair(
            tmp_path, stem, np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), ext=".png"
        )
    assert [s.id for s in load_slices(tmp_path)] == ["1", "2", "10"]


def test_image_without_mask_is_an_error(tmp_path: Path) -> None:
    _write_pair(tmp_path, "1", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), ext=".png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "2.jpg")
    with pytest.raises(InputError, match="have no mask"):
        load_slices(tmp_path)


def test_mask_of_another_size_is_an_error(tmp_path: Path) -> None:
    _write_pair(tmp_path, "1", np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8), ext=".bmp")
    with pytest.raises(InputError, match="masks must match their image"):
        load_slices(tmp_path)


def test_unknown_layout_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("not data")
    with pytest.raises(InputError, match="neither images/ \\+ labels/ folders nor DICOM-SEG"):
        load_slices(tmp_path)


def test_nifti_pairs_are_windowed_and_put_in_lps_display_order(tmp_path: Path) -> None:
    import SimpleITK as sitk  # noqa: N813

    hu = np.full((2, 6, 8), -1000, np.int16)
    hu[:, 0, 0] = -600  # a marker in the first stored row and column
    lab = np.zeros_like(hu, dtype=np.uint8)
    lab[1, 0, 0] = 1
    for name, arr in (("images", hu), ("labels", lab)):
        img = sitk.GetImageFromArray(arr)
        img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored, as many NIfTI writers do
        (tmp_path / name).mkdir()
        sitk.WriteImage(img, str(tmp_path / name / "case1.nii.gz"))
    slices = load_slices(tmp_path, label=1)
    assert [s.id for s in slices] == ["case1:0000", "case1:0001"]
    assert slices[0].group == "case1"
    # LPS display order flips both in-plane axes of an RAS-stored volume.
    assert slices[1].mask[-1, -1] and slices[1].mask.sum() == 1
    assert slices[0].image[-1, -1] == pytest.approx(0.5)  # -600 HU is the window centre
    assert slices[0].image[0, 0] == pytest.approx((-1000 + 1350) / 1500)


def test_dicom_seg_pairs_load_with_the_lung_window() -> None:
    slices = load_slices(require_shared(DCMQI_DIR), label=1)  # the dcmqi example segments the liver
    assert len(slices) == 3
    assert all(s.image.shape == (512, 512) and s.mask.any() for s in slices)
    assert all(0.0 <= s.image.min() and s.image.max() <= 1.0 for s in slices)
    assert len({s.group for s in slices}) == 1 and slices[0].group.startswith("g")
    with pytest.raises(InputError, match="pass the GGO segment number"):
        load_slices(DCMQI_DIR, label=2)


def test_shared_training_folder_loads_all_50_slices() -> None:
    slices = load_slices(require_shared(COVID_SLICES_DIR), workers=2)
    assert len(slices) == 50
    assert sum(s.mask.any() for s in slices) >= 40


def test_pack_round_trip_keeps_grid_and_source(tmp_path: Path) -> None:
    slices = synthetic_slices(4)
    out = tmp_path / "d.npz"
    pack(slices, out, size=32, label=1, grid_dtype="float32")
    grid = load_grid(out, size=32)
    assert grid.images.shape == (4, 32, 32) and grid.images.dtype == np.float32
    assert grid.ids == ("0", "1", "2", "3")
    expected = to_model_grid(slices[1].image_float(), 32)
    np.testing.assert_array_equal(grid.images[1], expected)
    np.testing.assert_array_equal(
        grid.masks[1], to_model_grid(slices[1].mask.astype(np.float32), 32) > 0.5
    )
    back = read_packed_slices(out)
    assert all(
        np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        for a, b in zip(slices, back, strict=True)
    )
    # Another size is rebuilt from the source arrays.
    assert load_grid(out, size=64).images.shape == (4, 64, 64)


def test_float16_grid_is_within_a_sixteenth_of_an_8_bit_step(tmp_path: Path) -> None:
    slices = synthetic_slices(2)
    pack(slices, tmp_path / "d.npz", size=32, label=1)
    grid = load_grid(tmp_path / "d.npz", size=32)
    exact = to_model_grid(slices[0].image_float(), 32)
    assert np.abs(grid.images[0] - exact).max() <= 1 / 255 / 16


def test_split_is_64_16_20_and_seeded() -> None:
    ids = [str(i) for i in range(50)]
    split = make_split(ids, [None] * 50, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (32, 8, 10)
    assert set(split.train) | set(split.val) | set(split.test) == set(ids)
    assert make_split(ids, [None] * 50, seed=0) == split
    assert make_split(ids, [None] * 50, seed=1) != split


def test_grouped_split_keeps_groups_together() -> None:
    ids = [str(i) for i in range(40)]
    groups = [f"p{i // 4}" for i in range(40)]
    split = make_split(ids, groups, seed=3)
    assert split.grouped
    where = {i: name for name in ("train", "val", "test") for i in split.ids(name)}
    for g in set(groups):
        assert len({where[i] for i, gg in zip(ids, groups, strict=True) if gg == g}) == 1


def test_split_file_round_trip(tmp_path: Path) -> None:
    split = make_split(["a", "b", "c", "d", "e"], [None] * 5, seed=0)
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == split
    assert json.loads((tmp_path / "split.json").read_text())["seed"] == 0
    assert Split.from_dict(split.to_dict()) == split


def test_groups_file_sets_groups(tmp_path: Path) -> None:
    slices = synthetic_slices(3)
    folder = tmp_path / "data"
    for s in slices:
        _write_pair(folder, s.id, s.image, s.mask.astype(np.uint8), ext=".png")
    csv = tmp_path / "groups.csv"
    csv.write_text("id,group\n0,p1\n1,p1\n2,p2\n")
    assert [s.group for s in load_slices(folder, groups_file=csv)] == ["p1", "p1", "p2"]
    csv.write_text("0,p1\n")
    with pytest.raises(InputError, match="has no group for 2 ids"):
        load_slices(folder, groups_file=csv)


def test_training_imports_stay_light() -> None:
    # The GPU machine has torch, numpy and tqdm only: the train path must not need more.
    code = (
        "import sys, training.cli, training.loop, training.export, training.evaluate, "
        "training.compare, training.models, training.augment\n"
        "heavy = [m for m in ('PIL', 'pydicom', 'highdicom', 'SimpleITK', 'onnx', "
        "'onnxruntime', 'ggo_cli.onnx.model_info') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
