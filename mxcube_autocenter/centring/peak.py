"""Choosing where to put the beam from a heatmap."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mxcube_autocenter.centring.heatmap import Heatmap


@dataclass(frozen=True)
class Peak:
    """The best grid point of a heatmap.

    Attributes
    ----------
    x, y : float
        Screen position, pixels.
    score : float
        Smoothed heatmap value there (the model's prediction, e.g. a
        reflection count once inverse-transformed).
    row, col : int
        Grid indices.
    """

    x: float
    y: float
    score: float
    row: int
    col: int


def smooth(values, sigma_cells=1.0) -> np.ndarray:
    """Light Gaussian smoothing of a heatmap, so that one noisy cell does not win.

    Cells that hold no number (NaN, or infinite: an overflowed prediction) take the lowest finite value: no crystal.
    """
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    floor = values[finite].min() if finite.any() else 0.0
    values = np.where(finite, values, floor)
    if sigma_cells <= 0:
        return values
    k = 2 * int(np.ceil(3 * sigma_cells)) + 1
    return cv2.GaussianBlur(values, (k, k), sigma_cells, borderType=cv2.BORDER_REPLICATE)


def find_peak(heatmap: Heatmap, sigma_cells=1.0, mask=None) -> Peak:
    """The maximum of the lightly smoothed heatmap.

    Parameters
    ----------
    heatmap : Heatmap
    sigma_cells : float
        Smoothing, grid cells.
    mask : (H, W) bool ndarray, optional
        Grid points allowed to win (e.g. inside the region of interest).
    """
    smoothed = smooth(heatmap.values, sigma_cells)
    if mask is not None:
        smoothed = np.where(mask, smoothed, -np.inf)
    row, col = np.unravel_index(int(np.argmax(smoothed)), smoothed.shape)
    return Peak(
        x=float(heatmap.xs[col]), y=float(heatmap.ys[row]), score=float(smoothed[row, col]), row=int(row), col=int(col)
    )
