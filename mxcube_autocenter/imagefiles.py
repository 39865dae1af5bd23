"""Writing RGB images to PNG files, with an error when the file cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB image (or a grey one) to a PNG file.

    ``cv2.imwrite`` only returns False on failure; this says so.

    Parameters
    ----------
    path : path
        The PNG file; its directory must exist.
    rgb : (height, width, 3) or (height, width) uint8 array
        The image, channels in RGB order.

    Returns
    -------
    Path

    Raises
    ------
    OSError
        If the file cannot be written (no such directory, no permission, a
        full disk, a name without the ``.png`` suffix).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OSError(f"cannot write {path}: a PNG file name must end in .png")
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}: check that the directory exists, is writable and has free space")
    return path
