"""Post-processing of model output on the source grid."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def threshold_probabilities(
    probabilities: npt.NDArray[np.float32], threshold: float
) -> npt.NDArray[np.bool_]:
    """Binarise probabilities: a pixel is positive when its probability exceeds the threshold.

    Args:
        probabilities: values in ``[0, 1]``, any shape.
        threshold: the model's (or the user's) probability threshold.

    Returns:
        Boolean mask. Shape: as ``probabilities``.
    """
    return np.greater(probabilities, np.float32(threshold))
