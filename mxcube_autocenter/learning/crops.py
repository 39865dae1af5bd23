"""Crop geometry and normalisation of the model input (numpy and OpenCV only).

A model sees a square crop of the on-axis camera image centred on the point
whose reflection count it predicts (the beam when training). The crop's
side is fixed in micrometres, so at every zoom the model sees the same piece
of the sample; it is converted to pixels with the image's ``pixels_per_mm``
and resized to the model's input size (128 x 128 by default).

Normalisation is per region, never per crop
-------------------------------------------
At centring time the model is evaluated on a dense grid of overlapping crops
around the loop. If every crop were normalised with its own statistics, the
same pixel would take a different value in each crop and no convolution work
could be shared. So the statistics are computed once over a *region* (the
stored crop of a dataset row when training; the region of interest around
the loop when centring), and every crop of the region is normalised with
them: ``x' = (x - offset[c]) / scale[c]`` per colour channel ``c``. This is a
per-pixel affine map, so it commutes with resizing and with cropping: the
region can be resized and normalised once and the crops read out of it
(:func:`mxcube_autocenter.centring.heatmap.prepare_region`).

Methods (:data:`NORMALISATIONS`):

``"backlight"`` (default)
    ``offset = scale = P95`` of each channel over the region: the backlight
    level (an on-axis view is back-lit, so the brightest pixels are the empty
    field). ``x' = x / backlight - 1``: the empty field is 0, an opaque object
    -1, whatever the lamp brightness, the camera gain or the tint. Robust to
    what the region contains as long as at least 5 % of it is backlight
    (always true of a region around a loop); a region that is all film reads
    the film as backlight, which is at most ~30 % off.
``"standardise"``
    ``offset`` = mean, ``scale`` = standard deviation of each channel over
    the region (the thesis' per-image z-score). Removes brightness and
    contrast too, but depends on the region's content: the same crystal
    reads differently next to the dark pin than in an empty field.
``"none"``
    ``x' = x / 127.5 - 1``: no brightness correction (for comparisons).

Statistics are computed on a subsampled grid of the region (at most about
256 x 256 pixels), which changes them by well under 1 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

COLOUR_MODES = ("rgb", "grey")
NORMALISATIONS = ("backlight", "standardise", "none")
DEFAULT_INPUT_SIZE = 128
DEFAULT_CROP_UM = 240.0
BACKLIGHT_PERCENTILE = 95.0
_STATS_SAMPLES = 256  # statistics on at most ~256 x 256 pixels of a region


@dataclass(frozen=True)
class CropSpec:
    """What a model's input is.

    Attributes
    ----------
    crop_um : float
        Side of the square crop on the sample, micrometres.
    input_size : int
        Side of the model input, pixels.
    colour : {"rgb", "grey"}
    normalisation : {"backlight", "standardise", "none"}
        See the module documentation.
    """

    crop_um: float = DEFAULT_CROP_UM
    input_size: int = DEFAULT_INPUT_SIZE
    colour: str = "rgb"
    normalisation: str = "backlight"

    def __post_init__(self):
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"colour must be one of {COLOUR_MODES}, not {self.colour!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {self.normalisation!r}")
        if not self.crop_um > 0:
            raise ValueError(f"crop_um must be positive, not {self.crop_um!r}")
        if int(self.input_size) != self.input_size or self.input_size < 8:
            raise ValueError(f"input_size must be an integer >= 8, not {self.input_size!r}")

    @property
    def channels(self) -> int:
        return 3 if self.colour == "rgb" else 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (int(self.input_size), int(self.input_size), self.channels)

    def to_config(self) -> dict:
        return {**asdict(self), "crop_um": float(self.crop_um), "input_size": int(self.input_size)}

    @classmethod
    def from_config(cls, config: dict) -> "CropSpec":
        return cls(
            crop_um=float(config["crop_um"]),
            input_size=int(config["input_size"]),
            colour=str(config["colour"]),
            normalisation=str(config["normalisation"]),
        )


def per_axis(value) -> tuple[float, float]:
    """``(x, y)`` of a number or a pair: a scale or size that may differ between the axes (non-square pixels)."""
    vx, vy = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,))
    return float(vx), float(vy)


def crop_side_px(crop_um: float, pixels_per_mm) -> tuple[float, float]:
    """Width and height in image pixels of a crop of ``crop_um`` micrometres.

    Parameters
    ----------
    crop_um : float
    pixels_per_mm : float or (float, float)
        Horizontal and vertical image scale.
    """
    ppx, ppy = per_axis(pixels_per_mm)
    if ppx <= 0 or ppy <= 0:
        raise ValueError(f"pixels_per_mm must be positive, not {pixels_per_mm!r}")
    return crop_um * 1e-3 * ppx, crop_um * 1e-3 * ppy


def centred_window(centre_xy, size_px) -> tuple[int, int, int, int]:
    """The whole-pixel window ``(x0, y0, width, height)`` that :func:`crop_centred` cuts out.

    Its size is ``size_px`` rounded (at least 1 pixel) and its centre lies
    within half a pixel of ``centre_xy``; ``x0, y0`` may be negative or the
    window may reach past the image (those parts are padded).
    """
    w = max(1, int(round(size_px[0])))
    h = max(1, int(round(size_px[1])))
    return int(np.floor(centre_xy[0] - w / 2 + 0.5)), int(np.floor(centre_xy[1] - h / 2 + 0.5)), w, h


def crop_centred(image, centre_xy, size_px) -> np.ndarray:
    """The window of ``size_px = (width, height)`` pixels centred on ``centre_xy``.

    The window is rounded to whole pixels (its centre to within half a pixel
    of ``centre_xy``); parts outside the image repeat the edge pixels
    (``cv2.BORDER_REPLICATE``), so a crop near the frame border keeps its
    size and its centre.
    """
    image = np.asarray(image)
    x0, y0, w, h = centred_window(centre_xy, size_px)
    H, W = image.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        raise ValueError(f"crop centred on {tuple(centre_xy)} of size {w}x{h} lies outside the {W}x{H} image")
    window = image[ya:yb, xa:xb]
    pad = (ya - y0, y0 + h - yb, xa - x0, x0 + w - xb)
    if any(pad):
        window = cv2.copyMakeBorder(window, *pad, cv2.BORDER_REPLICATE)
        if image.ndim == 3 and window.ndim == 2:
            window = window[..., None]
    return window


def to_colour(image, colour: str) -> np.ndarray:
    """An RGB image (H, W, 3) in the given colour mode: (H, W, 3) or (H, W, 1)."""
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour must be one of {COLOUR_MODES}, not {colour!r}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if colour == "rgb":
        if image.shape[-1] != 3:
            raise ValueError(f"an RGB image has 3 channels, not {image.shape[-1]}")
        return image
    if image.shape[-1] == 1:
        return image
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)[..., None]


def resample(image, origin, scale, size) -> np.ndarray:
    """The window of ``image`` from ``origin`` (pixels), scaled by ``scale``, as an image of ``size`` (w, h).

    Bilinear, also when shrinking: every model input (crops for training,
    regions for dense training and for the centring's heatmaps) is sampled
    this one way, so that a model sees at centring what it was trained on.
    (``cv2.warpAffine`` has no area averaging: it takes ``INTER_AREA`` for
    ``INTER_LINEAR``.) Pixels outside the image repeat its edge, so the
    window may overhang the image without special cases.

    Parameters
    ----------
    image : (H, W) or (H, W, C) array
    origin : (float, float)
        Image position of the output's pixel (0, 0), pixels.
    scale : float or (float, float)
        Output pixels per image pixel (x, y).
    size : (int, int)
        Output width and height, pixels.

    Returns
    -------
    ndarray, shape (size[1], size[0]) or (size[1], size[0], C), the image's dtype
    """
    image = np.asarray(image)
    sx, sy = per_axis(scale)
    x0, y0 = origin
    matrix = np.array([[sx, 0, -x0 * sx], [0, sy, -y0 * sy]], dtype=np.float64)
    out = cv2.warpAffine(np.ascontiguousarray(image), matrix, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    if image.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def region_stats(region, method: str = "backlight") -> np.ndarray:
    """Normalisation statistics of a region: ``(2, C)`` float32, offsets then scales.

    Parameters
    ----------
    region : (H, W, C) array
        The region (RGB or grey), uint8 or float.
    method : str
        One of :data:`NORMALISATIONS` (see the module documentation).
    """
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {method!r}")
    region = np.asarray(region)
    if region.ndim == 2:
        region = region[..., None]
    channels = region.shape[-1]
    if method == "none":
        return np.full((2, channels), 127.5, dtype=np.float32)
    step = max(1, int(np.ceil(max(region.shape[:2]) / _STATS_SAMPLES)))
    pixels = region[::step, ::step].reshape(-1, channels).astype(np.float32)
    if method == "backlight":
        level = np.maximum(np.percentile(pixels, BACKLIGHT_PERCENTILE, axis=0), 1.0)
        return np.stack([level, level]).astype(np.float32)
    mean = pixels.mean(axis=0)
    std = np.maximum(pixels.std(axis=0), 1.0)
    return np.stack([mean, std]).astype(np.float32)


def apply_stats(image, stats) -> np.ndarray:
    """``(image - offset) / scale`` per channel, float32."""
    stats = np.asarray(stats, dtype=np.float32)
    return (np.asarray(image, dtype=np.float32) - stats[0]) / stats[1]


def normalise(region, method: str = "backlight") -> np.ndarray:
    """A region normalised with its own statistics, float32."""
    return apply_stats(region, region_stats(region, method))


def region_normaliser(spec: CropSpec):
    """``normalise(region)``: ``spec``'s colour mode and normalisation, applied once to a whole region."""

    def normalise_region(region):
        return normalise(to_colour(region, spec.colour), spec.normalisation)

    return normalise_region


def crop_middle(input_size: int) -> float:
    """Model pixel coordinate of a crop's point (the beam): its middle, ``(input_size - 1) / 2``.

    Pixel centres lie at integers, so this is the one point every flip and
    quarter turn of the crop (:mod:`.augment`) keeps, and an augmented crop
    keeps its label's point.
    """
    return (input_size - 1) / 2


def crop_uint8(image, centre_xy, pixels_per_mm, spec: CropSpec) -> np.ndarray:
    """The crop of ``spec`` around ``centre_xy``, resized and in ``spec``'s colour mode, uint8 (S, S, C).

    ``centre_xy`` lands on the crop's middle (:func:`crop_middle`).
    """
    side = crop_side_px(spec.crop_um, pixels_per_mm)
    n = spec.input_size
    # Output pixel u samples origin + u side / n.
    origin = (centre_xy[0] - crop_middle(n) * side[0] / n, centre_xy[1] - crop_middle(n) * side[1] / n)
    return to_colour(resample(image, origin, (n / side[0], n / side[1]), (n, n)), spec.colour)


def model_input(image, centre_xy, pixels_per_mm, spec: CropSpec, region=None) -> np.ndarray:
    """The model input for the point ``centre_xy`` of an RGB image, float32 (S, S, C).

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        RGB camera image (a dataset's stored crop, or a frame).
    centre_xy : (float, float)
        The point (the beam), pixels.
    pixels_per_mm : (float, float)
    spec : CropSpec
    region : (H', W', 3) array, optional
        Where the normalisation statistics come from; the whole ``image`` by
        default.
    """
    stats = region_stats(to_colour(image if region is None else region, spec.colour), spec.normalisation)
    return apply_stats(crop_uint8(image, centre_xy, pixels_per_mm, spec), stats)
