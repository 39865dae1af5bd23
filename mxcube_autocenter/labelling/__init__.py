"""Labelling camera frames with the reflection counts of the detector frames taken at the same time."""
