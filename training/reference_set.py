"""The reference slices beside a model, for ggo-cli's numeric self-check of its variants.

``python -m training reference-set --model exported_models/ggo-resnet50-unet/model.onnx --data
../shared/data/covid-semiseg-train --ct ../shared/data/ct-dicom/lung-pet-ct-dx-a0002/dicom``
writes ``reference_slices.npz`` (10 model-grid inputs, 8-bit, about 1 MB) and records their
choice and licences in ``model.json``. Three kinds of input, because a variant can fail on one
and not another (on an AVX2-only CPU the saturating U8S8 int8 recipe moved the COVID slices'
GGO by 0.6 % but erased the phantom's):

- 5 held-out COVID-SemiSeg *test* slices with GGO (research and non-commercial use only, as is
  the model trained on their siblings);
- 3 slices of the demo's synthetic chest phantom (``ggo-cli demo``: seed 0, 48 slices; made
  by this project) with the most GGO;
- 2 slices of a real chest CT in HU (TCIA Lung-PET-CT-Dx, CC BY 4.0), mid-lung, no GGO, where
  the model's few false calls are the fragile kind.

Which slices: the ones that separated good from saturating variants in the recipe study
(docs/benchmarks.md, "int8 on every CPU class").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ggo_cli.analysis.preprocessing import preprocess_hu
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.onnx.reference_slices import REFERENCE_SET_NAME, write_reference_set
from ggo_cli.synthetic.phantom import make_chest_phantom

from . import data as training_data

COVID_TEST_IDS = ("3", "25", "27", "30", "45")
PHANTOM_SHAPE = (48, 512, 512)
PHANTOM_SEED = 0
PHANTOM_SLICES = 3
CT_SLICE_INDICES = (10, 20)
"""Slices of the real CT, in order along the slice normal (the shared 30-slice series)."""


def _ct_slices(folder: Path, indices: tuple[int, ...]) -> list[np.ndarray]:
    """HU of the chosen slices of the one eligible CT series in a folder, loaded as
    ``ggo-cli segment`` loads it (sorted along the slice normal)."""
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.dicom.volume import load_volume

    eligible = [s for s in discover_series([folder]).series if s.eligible]
    if len(eligible) != 1:
        raise ValueError(f"need one eligible CT series in {folder}, found {len(eligible)}")
    hu = load_volume(eligible[0]).hu
    return [np.asarray(hu[i], dtype=np.float64) for i in indices]


def make_reference_set(model_path: Path, data: Path, ct_folder: Path) -> tuple[Path, list[str]]:
    """Write ``reference_slices.npz`` beside a model and record it in its card.

    Args:
        model_path: the exported model (its card ``model.json`` beside it).
        data: the COVID-SemiSeg labelled slices (``images/``, ``labels/``).
        ct_folder: a real chest CT series folder.

    Returns:
        The file written and the slice names.
    """
    from .export import CARD_NAME, _write_text, write_sums

    info = load_model_info(model_path)
    size = info.input_size
    window = {"center_hu": info.window_center_hu, "width_hu": info.window_width_hu}
    slices = {s.id: s for s in training_data.load_slices(data, label=1)}
    covid = training_data.to_grid([slices[i] for i in COVID_TEST_IDS], size).images
    images = [covid[i] for i in range(len(COVID_TEST_IDS))]
    names = [f"covid-semiseg-{i}" for i in COVID_TEST_IDS]
    phantom = make_chest_phantom(shape=PHANTOM_SHAPE, seed=PHANTOM_SEED)
    ggo_per_slice = np.asarray(phantom.ggo_mask).sum(axis=(1, 2))
    for k in sorted(np.argsort(-ggo_per_slice, kind="stable")[:PHANTOM_SLICES].tolist()):
        hu = np.round(np.asarray(phantom.hu[k]))[None]
        images.append(preprocess_hu(hu, size=size, **window)[0, 0])
        names.append(f"demo-phantom-{k}")
    for index, hu in zip(CT_SLICE_INDICES, _ct_slices(ct_folder, CT_SLICE_INDICES), strict=True):
        images.append(preprocess_hu(np.round(hu)[None], size=size, **window)[0, 0])
        names.append(f"lung-pet-ct-dx-a0002-{index}")
    folder = model_path.parent
    path = write_reference_set(folder / REFERENCE_SET_NAME, np.stack(images), names)
    card_path = folder / CARD_NAME
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["reference_slices"] = {
        "file": REFERENCE_SET_NAME,
        "use": "ggo-cli checks a model variant (int8 on the CPU, fp16 on CUDA) against float32 "
        "on these inputs on each machine before using it (ggo_cli.onnx.variant_check)",
        "format": "npz: images uint8 [n, S, S] (model input x 255, on the model grid), names",
        "slices": names,
        "sources": [
            {
                "slices": [n for n in names if n.startswith("covid-semiseg-")],
                "what": "COVID-SemiSeg test-split slices with GGO (8-bit display images)",
                "licence": "research and non-commercial use only (Inf-Net / MedSeg)",
                "citation": "Fan D.-P. et al., IEEE TMI 39(8), 2020",
            },
            {
                "slices": [n for n in names if n.startswith("demo-phantom-")],
                "what": f"ggo-cli's synthetic chest phantom (seed {PHANTOM_SEED}, "
                f"{PHANTOM_SHAPE[0]} slices), the slices with most GGO, lung window",
                "licence": "made by this project (MIT)",
            },
            {
                "slices": [n for n in names if n.startswith("lung-pet-ct-dx-")],
                "what": "real chest CT, HU through the lung window (no GGO)",
                "licence": "CC BY 4.0",
                "citation": "TCIA Lung-PET-CT-Dx, subject Lung_Dx-A0002, "
                "doi:10.7937/TCIA.2020.NNC2-0461",
            },
        ],
    }
    _write_text(card_path, json.dumps(card, indent=2) + "\n")
    write_sums(folder)
    return path, names
