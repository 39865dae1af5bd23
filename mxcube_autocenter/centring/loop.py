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

    lucid3 assumes the pin enters from the left and rejects a tip in the left
    fifth of the image's top and bottom fifths; for a pin on the right the
    image is mirrored first and the result mirrored back. lucid3 thresholds
    at fixed grey levels, so a dark frame is brightened for it first
    (:func:`_for_lucid`).

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        The frame (RGB, as lucid3 expects for arrays).
    pin_side : {"left", "right"}

    Returns
    -------
    (float, float) or None
        The loop tip in pixels, or None when lucid3 finds no loop (or the
        frame is under :data:`MIN_FRAME_SIDE_PX` on a side).
    """
    import lucid3

    if pin_side not in ("left", "right"):
        raise ValueError(f"pin_side must be 'left' or 'right', not {pin_side!r}")
    if min(rgb.shape[:2]) < MIN_FRAME_SIDE_PX:
        return None
    image = _for_lucid(rgb)
    image = np.ascontiguousarray(image[:, ::-1] if pin_side == "right" else image)
    info, x, y = lucid3.find_loop(image)
    if info != "Coord" or x < 0 or y < 0:
        return None
    if pin_side == "right":
        x = rgb.shape[1] - 1 - x
    return float(x), float(y)


# lucid3's filters raise on frames narrower than about 26 pixels (OpenCV's GaussianBlur and its own indexing);
# no loop can be told apart in so few pixels anyway.
MIN_FRAME_SIDE_PX = 32
LUCID_BACKLIGHT = 128.0  # grey level a dark frame's backlight is raised to for lucid3
LUCID_MAX_GAIN = 8.0  # so that a black frame's noise is not raised into structure


def _for_lucid(rgb) -> np.ndarray:
    """The frame brightened so that its backlight (95th percentile of grey) reaches :data:`LUCID_BACKLIGHT`.

    lucid3 cuts its contrast mask, Laplacian and histogram threshold at fixed
    grey levels (``ENHANCED_CONTRAST_MAX_THRESHOLD`` 25, a 0-255 histogram):
    on a frame with the backlight at a fifth of full scale (a dim lamp, a
    short exposure) it finds no loop or takes the pin for it. A brighter
    frame is passed unchanged, at most ``LUCID_MAX_GAIN`` is applied.
    """
    rgb = np.asarray(rgb)
    step = max(1, max(rgb.shape[:2]) // 256)
    grey = rgb[::step, ::step, :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    gain = min(LUCID_MAX_GAIN, LUCID_BACKLIGHT / max(float(np.percentile(grey, 95)), 1.0))
    if gain <= 1.0:
        return rgb
    return np.clip(rgb * np.float32(gain) + 0.5, 0, 255).astype(np.uint8)


# Fields of view of on-axis cameras, mm across: an MD3 sees about 0.2 mm at its highest zoom, 2.5 mm at its lowest.
FIELD_OF_VIEW_MM = (0.05, 20.0)


class ScaleError(ValueError):
    """A camera scale no on-axis camera has (a scale in pixels per um given for pixels per mm, a typo)."""


def check_scale(image_shape, pixels_per_mm) -> None:
    """Refuse a scale that makes the image narrower or wider than any on-axis camera's field of view.

    Parameters
    ----------
    image_shape : tuple
        ``(height, width, ...)`` of the image, pixels.
    pixels_per_mm : (float, float)
        Horizontal and vertical scale.

    Raises
    ------
    ScaleError
    """
    height, width = image_shape[:2]
    scale = tuple(float(v) for v in pixels_per_mm)
    if not all(np.isfinite(scale)) or min(scale) <= 0:
        raise ScaleError(f"pixels_per_mm {scale} is no scale: give pixels per mm, positive")
    across = (width / scale[0], height / scale[1])
    low, high = FIELD_OF_VIEW_MM
    if not all(low <= side <= high for side in across):
        # Too wide an image is a scale in pixels per um; too narrow, a typo.
        hint = "pixels per mm (not per um)" if max(across) > high else "pixels per mm: this one is far too large"
        raise ScaleError(f"pixels_per_mm {scale} makes this {width} x {height} pixel image {across[0]:.3g} x "
                         f"{across[1]:.3g} mm; an on-axis camera sees {low:g} to {high:g} mm across: the scale is "
                         f"{hint}")  # fmt: skip


def loop_tips(rgb, pixels_per_mm, pin_side: str = "left"):
    """lucid3's loop tip, and the tip to use: moved out along a faint loop (:func:`extend_tip`).

    Returns
    -------
    ((float, float), (float, float)) or (None, None)
        Pixels; None when lucid3 finds no loop.

    Raises
    ------
    ScaleError
        If ``pixels_per_mm`` is no on-axis camera's scale for this image (:func:`check_scale`).
    """
    check_scale(rgb.shape, pixels_per_mm)
    found = find_loop(rgb, pin_side)
    return found, None if found is None else extend_tip(rgb, found, pixels_per_mm, pin_side)


def consistent_tips(tips, pixels_per_mm, pin_side: str = "left", tolerance_um: float = 100.0) -> list:
    """The loop tips of views at several omegas, those that stopped short along the spindle moved out.

    The spindle is horizontal on screen, so the tip's x stays where it is
    as omega turns (its y does not). lucid3 stops on the stem in a view
    where the loop is faint or seen edge-on, sometimes in two views of
    three, and that view's region then misses the loop; a tip beyond the
    loop has not been seen. A tip more than ``tolerance_um`` short of the
    farthest one (from the pin) takes the farthest one's x; the others are
    kept as found, since a small shift of a region changes its heatmap's
    edges.

    Parameters
    ----------
    tips : sequence of (float, float)
        Loop tip of each view, pixels (x, y).
    pixels_per_mm : (float, float)
    pin_side : {"left", "right"}
        Where the pin enters the frame.
    tolerance_um : float
        Largest distance along the spindle from the farthest tip, um.

    Returns
    -------
    list of (float, float)
    """
    tips = [(float(x), float(y)) for x, y in tips]
    if not tips:
        return tips
    xs = [x for x, _ in tips]
    farthest = max(xs) if pin_side == "left" else min(xs)
    limit = tolerance_um * pixels_per_mm[0] / 1000.0
    return [(farthest, y) if abs(x - farthest) > limit else (x, y) for x, y in tips]


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


def sample_mask(frame, roi: Roi, tip, pixels_per_mm, pin_side="left", *, darkness=0.08, close_px=15, pin_um=120.0, scale=4) -> np.ndarray:
    """Where the sample is inside the region: the convex hull of the dark object at the loop tip.

    A crystal sits in the loop, so the beam should never be sent to the empty
    field around it, however a model responds to vignetting or flare there.
    Dark pixels are those ``darkness`` (fraction) below the local backlight,
    estimated by a grey-level closing wider than the loop's fibres; the
    component that reaches the loop tip, after closing gaps of ``close_px``,
    gives the hull.

    Parameters
    ----------
    frame : (H, W, 3) uint8 ndarray
    roi : Roi
    tip : (float, float)
        Loop tip found by lucid3, pixels.
    pixels_per_mm : (float, float)
    pin_side : {"left", "right"}
    pin_um : float
        Opaque structures at least this thick that come within this distance
        of the region's edge on the pin side, as part of a dark object that
        runs on past it, are the pin, and they and everything behind them
        are left out, um.

    Returns
    -------
    (roi.height, roi.width) bool ndarray
        True inside the sample; all True when no dark object is found, so the
        caller falls back to the whole region.
    """
    import cv2

    pixels_per_um = pixels_per_mm[1] / 1000.0  # the pin's thickness on screen is vertical
    full = np.ones((roi.height, roi.width), bool)
    found = _tip_component(frame, roi, tip, darkness, close_px, scale)
    if found is None:
        return full
    component, small, backlight = found
    # The metal pin is opaque and far thicker than loop fibres: an opening wider than ~120 um keeps it; it is
    # no place for the beam. A large, dark crystal survives the opening too, but only the pin runs on out of
    # the region on the pin side, to the goniometer: its opaque part comes within the opening's width of that
    # edge (not always to it: the pin's far end can be lit more brightly), and the thick dark object it belongs
    # to (the opening of the whole sample: the thin stem cut, the loop with its film on its own) reaches it.
    width = max(3, int(pin_um * pixels_per_um / scale)) | 1
    kernel = np.ones((width, width), np.uint8)
    opaque = (small < backlight * 0.6).astype(np.uint8) & component
    _, thick = cv2.connectedComponents(cv2.morphologyEx(opaque, cv2.MORPH_OPEN, kernel))
    _, bodies = cv2.connectedComponents(cv2.morphologyEx(component, cv2.MORPH_OPEN, kernel))
    near, edge = (np.s_[:, :width], np.s_[:, :2]) if pin_side == "left" else (np.s_[:, -width:], np.s_[:, -2:])
    reaching = np.isin(bodies, bodies[edge][bodies[edge] > 0])
    pin = np.isin(thick, thick[near][(thick[near] > 0) & reaching[near]])
    pin_cols = np.nonzero(pin.any(axis=0))[0]
    if pin_cols.size:
        # Keep only what lies between the loop tip and the face of the pin.
        if pin_side == "left":
            component[:, : pin_cols.max() + 2] = 0
        else:
            component[:, max(pin_cols.min() - 1, 0) :] = 0
    ys, xs = np.nonzero(component)
    if xs.size == 0:
        return full
    hull = cv2.convexHull(np.column_stack([xs, ys]).astype(np.int32) * scale)
    mask = np.zeros((roi.height, roi.width), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(bool)


def _tip_component(frame, roi: Roi, tip, darkness, close_px, scale):
    """The dark object at the loop tip inside ``roi``, on a grid ``scale`` times coarser.

    Returns ``(component uint8, grey float32, backlight float32)`` at the
    coarse scale, or None when no dark object touches the tip.
    """
    import cv2

    grey = cv2.cvtColor(frame[roi.y0 : roi.y1, roi.x0 : roi.x1], cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, None, fx=1 / scale, fy=1 / scale, interpolation=cv2.INTER_AREA).astype(np.float32)
    backlight = _backlight(small)
    dark = (small < backlight * (1 - darkness)).astype(np.uint8)
    c = max(3, close_px // scale) | 1
    dark = cv2.morphologyEx(dark, cv2.MORPH_CLOSE, np.ones((c, c), np.uint8))
    n, labels = cv2.connectedComponents(dark)
    if n < 2:
        return None
    tx = int(np.clip((tip[0] - roi.x0) / scale, 0, small.shape[1] - 1))
    ty = int(np.clip((tip[1] - roi.y0) / scale, 0, small.shape[0] - 1))
    near = labels[max(ty - c, 0) : ty + c + 1, max(tx - c, 0) : tx + c + 1]
    ids = near[near > 0]
    if ids.size == 0:
        return None
    return (labels == np.bincount(ids).argmax()).astype(np.uint8), small, backlight


def extend_tip(frame, tip, pixels_per_mm, pin_side="left", *, reach_um=800.0, height_um=600.0, tolerance_um=50.0,
               inset_um=25.0, darkness=0.08, close_px=15, scale=4):  # fmt: skip
    """The loop tip moved out to the far end of the dark object that lucid3's tip lies on.

    lucid3 stops at the stem when the loop is faint against the backlight
    (defocused, or a thin mesh loop), and then every view's region misses
    the loop. The loop is still darker than the backlight and joined to the
    stem, so the dark object at lucid3's tip reaches out to the loop's real
    tip. Found as :func:`sample_mask` finds the sample.

    Parameters
    ----------
    frame : (H, W, 3) uint8 ndarray
    tip : (float, float)
        Loop tip found by lucid3, pixels.
    pixels_per_mm : (float, float)
    pin_side : {"left", "right"}
    reach_um : float
        How far past lucid3's tip, away from the pin, the object is followed, um.
    height_um : float
        Height of the window searched, centred on the tip, um.
    tolerance_um : float
        An object ending less than this past lucid3's tip leaves the tip as found, um.
    inset_um : float
        The tip is put about this far inside the object's end, as lucid3 puts
        it inside the rim: the dark object ends beyond the fibre, by its
        half-width and blur, um.

    Returns
    -------
    (float, float)
        The tip, pixels: the object's pixel nearest ``inset_um`` inside its
        far end (level with the middle of its last columns), or ``tip``
        itself, also when the object runs on out of the searched window or
        the image.
    """
    px, py = pixels_per_mm[0] / 1000.0, pixels_per_mm[1] / 1000.0
    h, w = frame.shape[:2]
    back, ahead = 100.0 * px, reach_um * px  # a little behind the tip, so the object at it is whole
    x0, x1 = (tip[0] - back, tip[0] + ahead) if pin_side == "left" else (tip[0] - ahead, tip[0] + back)
    roi = Roi(_clip(x0, w), _clip(tip[1] - height_um * py / 2, h), _clip(x1, w), _clip(tip[1] + height_um * py / 2, h))
    if roi.width < 2 * scale or roi.height < 2 * scale:
        return tip
    found = _tip_component(frame, roi, tip, darkness, close_px, scale)
    if found is None:
        return tip
    component = found[0]
    cols = np.nonzero(component.any(axis=0))[0]
    end = cols.max() if pin_side == "left" else cols.min()
    if end == (component.shape[1] - 1 if pin_side == "left" else 0):
        return tip  # runs on out of the window or the image: where it ends is unknown
    x_end = roi.x0 + (end + 0.5) * scale
    if (x_end - tip[0] if pin_side == "left" else tip[0] - x_end) <= tolerance_um * px:
        return tip
    # Inset from the end, then onto the nearest pixel of the object itself, so that the
    # sample mask (which starts from the tip) finds the loop there.
    row = np.nonzero(component[:, max(end - 2, 0) : end + 3])[0].mean()
    col = end - inset_um * px / scale if pin_side == "left" else end + inset_um * px / scale
    ys, xs = np.nonzero(component)
    nearest = int(np.argmin((xs - col) ** 2 + (ys - row) ** 2))
    return float(roi.x0 + (xs[nearest] + 0.5) * scale), float(roi.y0 + (ys[nearest] + 0.5) * scale)


def pin_entry_side(rgb, *, darkness=0.4, min_share=0.005, scale=4):
    """The edge of the frame, ``"left"`` or ``"right"``, that the sample enters from, or None where it is unclear.

    The pin is opaque: over its thickness it darkens the frame's edge it
    comes in by, while the other edge shows the backlight. For telling a
    ``pin_side`` set the wrong way from an empty loop, never to steer a
    centring: a pin lit brightly at its far end darkens neither edge.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
    darkness : float
        Pixels below ``(1 - darkness)`` of the backlight are opaque.
    min_share : float
        Share of an edge's height that must be opaque to be the pin's.
    scale : int
        The frame is looked at ``scale`` times coarser.

    Returns
    -------
    {"left", "right"} or None
    """
    import cv2

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, None, fx=1 / scale, fy=1 / scale, interpolation=cv2.INTER_AREA).astype(np.float32)
    opaque = small < np.percentile(small, 95) * (1 - darkness)
    left, right = opaque[:, :2].mean(), opaque[:, -2:].mean()
    if max(left, right) < min_share or min(left, right) * 3 > max(left, right):
        return None
    return "left" if left > right else "right"


def _backlight(grey) -> np.ndarray:
    """The empty field under the sample: a smooth quadratic surface fitted to the bright pixels.

    Vignetting and hot spots vary slowly, while the sample is dark and sharp,
    so fitting the pixels brighter than the median, then refitting those
    close to the first fit, ignores the sample whatever its size.
    """
    h, w = grey.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x / max(w, 1), y / max(h, 1)
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(-1, 6)
    values = grey.reshape(-1)
    keep = values >= np.median(values)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        fit = design @ coef
        keep = values >= 0.95 * fit
    return np.maximum(fit, 1.0).reshape(h, w).astype(np.float32)
