"""DICOM input: the header-only walk and selection rules, budgets, slice decoding, HU volumes."""
