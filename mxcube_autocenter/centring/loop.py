"""Finding the loop with lucid3 and the region of interest around it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Roi:
    """A rectangle on the camera image, pixels: ``x0 <= x < x1``, ``y0 <= y < y1``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def find_loop(rgb, pin_side: str = "left"):
    """The loop tip on a camera frame, found by lucid3.

    lucid3 assumes the pin enters from the left and rejects detections in the
    left fifth of the image; for a pin on the right the image is mirrored
    first and the result mirrored back.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        The frame (RGB, as lucid3 expects for arrays).
    pin_side : {"left", "right"}

    Returns
    -------
    (float, float) or None
        The loop tip in pixels, or None when lucid3 finds no loop.
    """
    import lucid3

    if pin_side not in ("left", "right"):
        raise ValueError(f"pin_side must be 'left' or 'right', not {pin_side!r}")
    image = np.ascontiguousarray(rgb[:, ::-1] if pin_side == "right" else rgb)
    info, x, y = lucid3.find_loop(image)
    if info != "Coord" or x < 0 or y < 0:
        return None
    if pin_side == "right":
        x = rgb.shape[1] - 1 - x
    return float(x), float(y)


def loop_roi(tip, image_shape, pixels_per_mm, *, width_um=700.0, height_um=600.0, beyond_tip_um=60.0, pin_side="left") -> Roi:
    """The region searched for crystals: the whole loop behind its tip.

    The rectangle reaches ``beyond_tip_um`` past the tip (lucid3's tip is
    often a little inside the rim) and ``width_um`` back towards the pin, so
    a loop of up to that size is covered, not only its tip; it is centred
    vertically on the tip and clipped to the image.

    Parameters
    ----------
    tip : (float, float)
        Loop tip, pixels.
    image_shape : tuple
        ``(height, width, ...)`` of the frame.
    pixels_per_mm : (float, float)
    width_um, height_um, beyond_tip_um : float
        Sizes in micrometres.
    pin_side : {"left", "right"}
    """
    px, py = pixels_per_mm[0] / 1000.0, pixels_per_mm[1] / 1000.0
    x, y = tip
    if pin_side == "left":
        x1, x0 = x + beyond_tip_um * px, x + (beyond_tip_um - width_um) * px
    else:
        x0, x1 = x - beyond_tip_um * px, x - (beyond_tip_um - width_um) * px
    y0, y1 = y - height_um * py / 2, y + height_um * py / 2
    h, w = image_shape[:2]
    return Roi(_clip(x0, w), _clip(y0, h), _clip(x1, w), _clip(y1, h))


def _clip(value, high) -> int:
    return int(round(min(max(value, 0), high)))
