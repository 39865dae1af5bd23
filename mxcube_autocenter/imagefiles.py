"""Reading image files as RGB and writing RGB images to PNG files, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from mxcube_autocenter.outputs import write_whole


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an RGB image (or a grey one) to a PNG file.

    The file is whole or as it was before; a failure says why, where
    ``cv2.imwrite`` only returns False.

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
    encoded, data = cv2.imencode(".png", image)
    if not encoded:
        raise OSError(f"cannot write {path}: the image ({rgb.shape}, {rgb.dtype}) cannot be encoded as PNG")
    try:
        # Whole or not at all: a PNG rewritten in place and cut short (a full disk) would be a broken image.
        write_whole(path, lambda partial: Path(partial).write_bytes(data.tobytes()))
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path} ({err.strerror or err}): check that the directory exists, is "
                                 "writable and has free space") from err  # fmt: skip
    return path


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file (JPEG, PNG, TIFF, ...; colour, grey or palette, 8 or 16 bits) as RGB uint8.

    EXIF orientation is applied and an alpha channel dropped. A 16-bit image
    is scaled to 8 bits by :func:`scale_to_8_bits`.

    Raises
    ------
    OSError
        If the file cannot be read as an image, is a JPEG cut short, or its
        pixels are not 8- or 16-bit integers.
    """
    try:
        data = Path(path).read_bytes()  # once: decoded and checked for a cut-short JPEG from the same bytes
    except OSError as err:
        raise OSError(f"cannot read {path} ({err.strerror or err}): check that it exists and is a readable file") from err
    if _jpeg_cut_short(data):
        # libjpeg decodes what there is and fills the rest grey, with only a warning on stderr: the loop and
        # the heatmap would be found in half an image.
        raise OSError(f"cannot read {path}: the JPEG file ends before its image does (an interrupted copy or "
                      "download?): copy it again")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data else None
    if image is None:
        raise OSError(f"cannot read {path} as an image (JPEG, PNG, ...): check that it exists and is a whole image file")
    if image.dtype == np.uint16:
        image = scale_to_8_bits(image)
    elif image.dtype != np.uint8:
        raise OSError(f"cannot read {path}: its pixels are {image.dtype}; save it with 8- or 16-bit integer pixels")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _jpeg_cut_short(data: bytes) -> bool:
    """Whether a file's bytes are a JPEG without the end-of-image marker after its last scan's start.

    Inside a scan's coded data an 0xFF byte is always followed by 0x00 or a
    restart marker, so the end marker found after the scan's start is its own.
    """
    return data.startswith(b"\xff\xd8") and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def pixel_bits(image: np.ndarray) -> int:
    """The smallest camera bit depth (8, 10, 12, 14 or 16) that holds the brightest pixel of a 16-bit image."""
    return next(b for b in (8, 10, 12, 14, 16) if int(image.max()) < 2**b)


def scale_to_8_bits(image: np.ndarray, bits: int | None = None) -> np.ndarray:
    """A 16-bit image as uint8, scaled by the bits its pixels use.

    The scale is that of the camera's bit depth, by default the smallest that
    holds the brightest pixel (:func:`pixel_bits`): cameras send 10-, 12- or
    14-bit pixels in 16 bits without shifting them up, and keeping only the
    top 8 of the 16 bits (as OpenCV does) leaves a 12-bit frame 16 levels at
    most, in which no loop is found.

    Parameters
    ----------
    image : ndarray of uint16
    bits : int, optional
        The camera's bit depth, when known (frames of one recording share it).

    Returns
    -------
    ndarray of uint8, of the same height and width
    """
    bits = pixel_bits(image) if bits is None else bits
    return cv2.convertScaleAbs(image, alpha=255.0 / (2**bits - 1))
