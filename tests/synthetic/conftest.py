"""The chest phantom shared by the phantom and CT-writer tests."""

from __future__ import annotations

import pytest

from ggo_cli.synthetic.phantom import Phantom, make_chest_phantom
from tests.synthetic.chest_grid import SHAPE, SPACING_MM


@pytest.fixture(scope="module")
def chest() -> Phantom:
    """The default chest phantom, with noise."""
    return make_chest_phantom(SHAPE, SPACING_MM, seed=7)
