"""Optical crystal centring: loop finding, dense heatmaps, peak picking, the multi-angle procedure."""
