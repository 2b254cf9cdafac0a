"""The phantom grids shared by the phantom and CT-writer tests."""

from __future__ import annotations

# A whole chest at a coarse grid: 36 x 30 cm field of view, 30 cm long, fast to draw.
SHAPE = (24, 128, 128)
SPACING_MM = (12.5, 2.8, 2.8)
SMALL_SHAPE = (4, 32, 32)
SMALL_SPACING_MM = (2.5, 5.0, 5.0)
