"""Tests of the output writers (DICOM-SEG, CSV, PNG)."""
