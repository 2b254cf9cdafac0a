"""The training fixtures (tests/training/conftest.py) for the end-to-end training tests here:
training runs, the ONNX export and the explain-graph export, each tens of seconds on a CPU."""

from __future__ import annotations

from tests.training.conftest import (  # noqa: F401 (fixtures, found by name)
    exported_model,
    tiny_npz,
    tiny_run,
    tiny_slices,
)
