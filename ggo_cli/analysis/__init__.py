"""Image analysis: preprocessing (shared with training), segmenter, lungs, masks,
measurements, quality flags, explainer."""
