"""The DIALS dispersion spot finder, for one detector frame at a time.

DIALS (``dials.find_spots`` with ``spotfinder.threshold.algorithm=dispersion``)
calls a pixel strong when the valid pixels of the box around it are
over-dispersed for a Poisson background (index of dispersion above 1) and the
pixel itself stands out above their mean; spots are the 4-connected groups of
strong pixels with a plausible number of pixels. This module does the same
test with OpenCV box filters, strip by strip so that the temporaries stay in
the CPU cache, and labels the sparse strong pixels as a graph rather than
as a full image: an EIGER2 16M frame takes a fraction of a second on one core.

Coordinates are in pixels from the detector corner, as EIGER's
``beam_center_x``/``beam_center_y`` and DIALS' ``xyzobs.px.value``: pixel
``(row, column)`` spans ``[column, column + 1) x [row, row + 1)`` and its
centre is at ``(column + 0.5, row + 0.5)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Pixels in one strip of rows: its float32 temporaries (1 MB each) stay in cache.
_STRIP_PIXELS = 1 << 18


class BeamGeometry(Protocol):
    """What resolution limits need to know; ``DetectorGeometry`` and ``EigerSeries`` have it.

    Attributes
    ----------
    beam_center_x, beam_center_y : float
        Direct beam position, pixels from the detector corner.
    pixel_size : float
        mm.
    distance : float
        Sample to detector distance, mm.
    wavelength : float
        Angstrom.
    """

    beam_center_x: float
    beam_center_y: float
    pixel_size: float
    distance: float
    wavelength: float


@dataclass(frozen=True)
class SpotFinderParams:
    """Parameters of the dispersion spot finder, with DIALS' defaults.

    Attributes
    ----------
    gain : float
        Detector gain, counts per photon (1 for a photon-counting EIGER).
    kernel_size : (int, int)
        Half sizes ``(kx, ky)`` of the local box: ``(2 kx + 1) x (2 ky + 1)``
        pixels, ``kx`` along x (columns).
    sigma_background : float
        A box is background unless its index of dispersion (variance / mean)
        exceeds ``gain * (1 + sigma_background * sqrt(2 / (n - 1)))``, with
        ``n`` valid pixels in the box.
    sigma_strong : float
        A pixel is strong only above ``mean + sigma_strong * sqrt(gain * mean)``.
    min_local : int
        Fewest valid pixels in a box for its centre to be tested; 0 or less
        means the whole box.
    global_threshold : float
        A pixel is strong only above this many counts.
    min_spot_size, max_spot_size : int
        Spots with fewer, or more, pixels are dropped; ``max_spot_size=None``
        keeps spots of any size. 3 is DIALS' choice for pixel-array detectors.
    max_separation : float, optional
        Spots whose brightest pixel (its centre; the first in row order on a
        tie) lies more than this many pixels from their centroid are dropped,
        as DIALS' ``filter.max_separation`` (2 by default there too): merged
        neighbours, streaks, rings of pixels around a saturated core.
        None keeps them.
    d_min, d_max : float, optional
        Resolution limits, Angstrom: pixels outside the shell are invalid
        (neither tested nor used for the statistics of their neighbours).
        They need the detector geometry.
    ice_rings : bool
        Drop spots whose centroid lies on an ice ring (DIALS'
        ``filter.ice_rings.filter``, off by default there too): ice in the
        beam diffracts there, and a count that labels a crystal's diffraction
        must not include it. Needs the detector geometry.
    ice_ring_width : float
        Full width of each ice ring in ``1/d^2``, 1/Angstrom^2 (DIALS' 0.002).
    """

    gain: float = 1.0
    kernel_size: tuple[int, int] = (3, 3)
    sigma_background: float = 6.0
    sigma_strong: float = 3.0
    min_local: int = 2
    global_threshold: float = 0.0
    min_spot_size: int = 3
    max_spot_size: int | None = 1000
    max_separation: float | None = 2.0
    d_min: float | None = None
    d_max: float | None = None
    ice_rings: bool = False
    ice_ring_width: float = 0.002

    def __post_init__(self):
        kx, ky = self.kernel_size
        if kx < 1 or ky < 1:
            raise ValueError(f"kernel_size={self.kernel_size}: both half sizes must be at least 1")
        if self.min_local == 1 or self.min_local > self.box_pixels:
            raise ValueError(
                f"min_local={self.min_local}: use 2 to {self.box_pixels} (the box), or 0 for the whole box"
            )
        if self.gain <= 0 or self.sigma_background < 0 or self.sigma_strong < 0:
            raise ValueError("gain must be positive and sigma_background, sigma_strong not negative")
        if self.min_spot_size < 1 or (self.max_spot_size is not None and self.max_spot_size < self.min_spot_size):
            raise ValueError(
                f"spot sizes {self.min_spot_size}..{self.max_spot_size}: need 1 <= min_spot_size <= max_spot_size"
            )
        if self.max_separation is not None and not self.max_separation >= 0:
            raise ValueError(f"max_separation={self.max_separation} pixels: must be 0 or more, or None")
        if self.d_min is not None and self.d_max is not None and self.d_min >= self.d_max:
            raise ValueError(f"d_min={self.d_min} A must be below d_max={self.d_max} A")
        if self.ice_ring_width <= 0:
            raise ValueError(f"ice_ring_width={self.ice_ring_width} 1/A^2: must be positive (DIALS uses 0.002)")

    @property
    def box_pixels(self) -> int:
        """Pixels in the local box."""
        kx, ky = self.kernel_size
        return (2 * kx + 1) * (2 * ky + 1)

    @property
    def min_count(self) -> int:
        """Fewest valid pixels a box needs, with DIALS' meaning of ``min_local <= 0``."""
        return self.box_pixels if self.min_local <= 0 else self.min_local


@dataclass(frozen=True)
class SpotList:
    """Spots found on one frame, sorted by row then column.

    Attributes
    ----------
    centroids : ndarray of float, shape (N, 2)
        Count-weighted centroids ``(x, y)`` of the strong pixels, pixels from
        the detector corner.
    sizes : ndarray of int, shape (N,)
        Strong pixels in each spot.
    intensities : ndarray of float, shape (N,)
        Total counts of each spot's strong pixels (not background-subtracted,
        as ``intensity.sum.value`` in DIALS' strong spot list).
    """

    centroids: np.ndarray
    sizes: np.ndarray
    intensities: np.ndarray

    @property
    def count(self) -> int:
        """Number of spots: the frame's reflection count."""
        return int(self.sizes.size)


def resolution_radius(d: float, geometry: BeamGeometry) -> float:
    """Distance from the direct beam at which reflections of spacing ``d`` land.

    Parameters
    ----------
    d : float
        Lattice spacing, Angstrom.
    geometry : BeamGeometry

    Returns
    -------
    float
        Radius on a flat detector normal to the beam, pixels; ``inf`` where
        the scattering angle 2 theta reaches 90 degrees.
    """
    sin_theta = geometry.wavelength / (2.0 * d)
    if sin_theta >= np.sqrt(0.5):
        return float("inf")
    return float(geometry.distance * np.tan(2.0 * np.arcsin(sin_theta)) / geometry.pixel_size)


# Hexagonal ice Ih (P6_3/mmc), the cell DIALS' ice-ring filter uses, Angstrom.
ICE_CELL_A, ICE_CELL_C = 4.498, 7.338


def ice_ring_spacings(d_min: float = 1.0) -> np.ndarray:
    """Lattice spacings of the ice rings down to ``d_min``, Angstrom, largest first.

    The reflections of hexagonal ice allowed by its space group (P6_3/mmc:
    ``00l`` and ``hh-2hl`` need even ``l``), as DIALS lists them for its
    ice-ring filter.
    """
    h_max = int(np.ceil(ICE_CELL_A / d_min)) + 1
    l_max = int(np.ceil(ICE_CELL_C / d_min))
    h, k, l = np.mgrid[-h_max : h_max + 1, -h_max : h_max + 1, 0 : l_max + 1].reshape(3, -1)
    inv_d2 = 4.0 / 3.0 * (h * h + h * k + k * k) / ICE_CELL_A**2 + l * l / ICE_CELL_C**2
    # hh-2hl and its symmetry mates have h = k, k = -2h or h = -2k; 00l is among them.
    special = (h == k) | (k == -2 * h) | (h == -2 * k)
    allowed = (inv_d2 > 0) & (inv_d2 <= 1.0 / d_min**2) & ~(special & (l % 2 == 1))
    return 1.0 / np.sqrt(np.unique(np.round(inv_d2[allowed], 10)))


def d_star_sq(xy, geometry: BeamGeometry) -> np.ndarray:
    """Squared reciprocal spacing ``1/d^2`` at detector positions, 1/Angstrom^2.

    Parameters
    ----------
    xy : (N, 2) array_like
        ``(x, y)``, pixels from the detector corner.
    geometry : BeamGeometry
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return d_star_sq_at_radius(np.hypot(xy[:, 0] - geometry.beam_center_x, xy[:, 1] - geometry.beam_center_y), geometry)


def d_star_sq_at_radius(radius, geometry: BeamGeometry) -> np.ndarray:
    """Squared reciprocal spacing ``1/d^2``, 1/Angstrom^2, at distances from the direct beam, pixels.

    The inverse of :func:`resolution_radius`, as ``1/d^2``.
    """
    r_mm = geometry.pixel_size * np.asarray(radius, dtype=np.float64)
    sin_theta = np.sin(0.5 * np.arctan2(r_mm, geometry.distance))
    return (2.0 * sin_theta / geometry.wavelength) ** 2


def on_ice_ring(xy, geometry: BeamGeometry, width: float = 0.002) -> np.ndarray:
    """Whether each detector position lies on an ice ring.

    Parameters
    ----------
    xy : (N, 2) array_like
        ``(x, y)``, pixels from the detector corner.
    geometry : BeamGeometry
    width : float
        Full width of a ring in ``1/d^2``, 1/Angstrom^2.

    Returns
    -------
    (N,) ndarray of bool
    """
    s2 = d_star_sq(xy, geometry)
    if s2.size == 0 or s2.max() <= 0:
        return np.zeros(s2.size, bool)
    rings = ice_ring_spacings(d_min=1.0 / np.sqrt(s2.max() + width)) ** -2.0  # ascending
    if rings.size == 0:
        return np.zeros(s2.size, bool)
    above = np.searchsorted(rings, s2)
    upper, lower = rings[np.minimum(above, rings.size - 1)], rings[np.maximum(above - 1, 0)]
    return np.minimum(np.abs(s2 - upper), np.abs(s2 - lower)) <= 0.5 * width


def find_spots(
    frame: np.ndarray,
    valid: np.ndarray | None = None,
    params: SpotFinderParams = SpotFinderParams(),
    geometry: BeamGeometry | None = None,
    overloaded: np.ndarray | None = None,
) -> SpotList:
    """Find the Bragg spots of one frame with DIALS' dispersion threshold.

    A valid pixel with ``n >= min_local`` valid pixels in its box, of mean
    ``m`` and variance ``v``, is strong when

    - ``v / m > gain * (1 + sigma_background * sqrt(2 / (n - 1)))``,
    - its value exceeds ``m + sigma_strong * sqrt(gain * m)``, and
    - its value exceeds ``global_threshold``.

    Strong pixels sharing an edge form a spot, and so do the saturated ones
    (``overloaded``) among them; spots of saturated pixels alone, of fewer
    than ``min_spot_size`` or more than ``max_spot_size`` pixels, or whose
    brightest pixel (the centre of its saturated ones, where it has some)
    lies more than ``max_separation`` pixels from their centroid, are
    dropped.

    Parameters
    ----------
    frame : ndarray, shape (H, W)
        Counts, any integer or float type.
    valid : ndarray of bool, shape (H, W), optional
        False for pixels to ignore: masked, module gaps, saturated (see
        ``labelling.eiger.valid_pixels``). They are never strong and never
        enter the statistics of their neighbours. Default: all valid.
    params : SpotFinderParams
    geometry : BeamGeometry, optional
        Needed only for ``params.d_min`` / ``params.d_max`` and
        ``params.ice_rings``: a ``DetectorGeometry`` or the ``EigerSeries``
        the frame came from.
    overloaded : ndarray of bool, shape (H, W), optional
        Saturated pixels (``labelling.eiger.overloaded_pixels``; invalid in
        ``valid`` too): the core of a strong spot. Left out, the strong
        pixels around a core form a ring that 4-connectivity splits into 2
        to 4 spots, or one that ``max_separation`` drops. Default: none.

    Returns
    -------
    SpotList
    """
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"frame has shape {frame.shape}: give one 2D detector frame")
    if valid is not None:
        valid = np.ascontiguousarray(valid, dtype=bool)
        if valid.shape != frame.shape:
            raise ValueError(f"valid mask {valid.shape} and frame {frame.shape} differ in shape")
    if params.ice_rings and geometry is None:
        raise ValueError(
            "ice_rings=True needs the detector geometry: pass geometry= (the EigerSeries of the frame, "
            "or a DetectorGeometry), or ice_rings=False"
        )
    shell = _resolution_shell(params, geometry)
    strong = _strong_pixels(frame, valid, params, shell)
    cores = np.zeros(0, np.int64)
    if overloaded is not None:
        if overloaded.shape != frame.shape:
            raise ValueError(f"overloaded mask {overloaded.shape} and frame {frame.shape} differ in shape")
        cores = _in_shell(np.flatnonzero(overloaded), shell, frame.shape[1])
        strong = np.union1d(strong, cores)
    spots = _spots(frame, strong, params, cores)
    if params.ice_rings and spots.count:
        keep = ~on_ice_ring(spots.centroids, geometry, params.ice_ring_width)
        spots = SpotList(spots.centroids[keep], spots.sizes[keep], spots.intensities[keep])
    return spots


def count_reflections(
    frame: np.ndarray,
    valid: np.ndarray | None = None,
    params: SpotFinderParams = SpotFinderParams(),
    geometry: BeamGeometry | None = None,
    overloaded: np.ndarray | None = None,
) -> int:
    """Reflection count of one frame: the number of spots ``find_spots`` finds."""
    return find_spots(frame, valid, params, geometry, overloaded).count


def _resolution_shell(params, geometry):
    """(beam x, beam y, r_min^2, r_max^2) in pixels for the d_min/d_max limits, or None."""
    if params.d_min is None and params.d_max is None:
        return None
    if geometry is None:
        raise ValueError(
            "d_min/d_max need the detector geometry: pass geometry= (the EigerSeries of the frame, "
            "or a DetectorGeometry)"
        )
    r_min = 0.0 if params.d_max is None else resolution_radius(params.d_max, geometry)
    r_max = float("inf") if params.d_min is None else resolution_radius(params.d_min, geometry)
    return geometry.beam_center_x, geometry.beam_center_y, r_min**2, r_max**2


def _within_shell(rows, columns, shell) -> np.ndarray:
    """Whether pixels (their row and column indices, broadcast) lie within the resolution shell."""
    x0, y0, r2_min, r2_max = shell
    r2 = (rows + 0.5 - y0) ** 2 + (columns + 0.5 - x0) ** 2
    return (r2 >= r2_min) & (r2 <= r2_max)


def _in_shell(flat: np.ndarray, shell, width: int) -> np.ndarray:
    """The flat pixel indices ``flat`` that lie within the resolution shell (all of them without one)."""
    return flat if shell is None else flat[_within_shell(*np.divmod(flat, width), shell)]


def _valid_rows(valid, shell, row0, row1, width) -> np.ndarray:
    """The valid pixels of rows ``row0:row1`` as a uint8 (0/1) image."""
    rows = np.ones((row1 - row0, width), bool) if valid is None else valid[row0:row1]
    if shell is not None:
        rows = rows & _within_shell(np.arange(row0, row1)[:, None], np.arange(width)[None, :], shell)
    return rows.view(np.uint8)


def _strong_pixels(frame, valid, params, shell) -> np.ndarray:
    """Sorted flat indices of the strong pixels of ``frame``."""
    height, width = frame.shape
    kx, ky = params.kernel_size
    box = (2 * kx + 1, 2 * ky + 1)
    # Zero borders: boxes at the frame edge hold only the pixels inside, as in DIALS.
    box_sum = dict(ksize=box, normalize=False, borderType=cv2.BORDER_CONSTANT)
    strip = max(1, _STRIP_PIXELS // width)
    strong_scale = params.sigma_strong**2 * params.gain
    found = []
    for top in range(0, height, strip):
        bottom = min(height, top + strip)
        # Each strip reads ky rows beyond its edges, so its boxes are whole.
        row0, row1 = max(0, top - ky), min(height, bottom + ky)
        ok = _valid_rows(valid, shell, row0, row1, width)
        # Invalid pixels become 0, so they add nothing to the box sums ...
        image = np.multiply(frame[row0:row1], ok, dtype=np.float32)
        count = cv2.boxFilter(ok, cv2.CV_32F, **box_sum)
        total = cv2.boxFilter(image, cv2.CV_32F, **box_sum)
        inner = slice(top - row0, bottom - row0)
        n, s, value = count[inner], total[inner], image[inner]
        # ... and fail this test: n * value - s is then -s <= 0. It is the cheap
        # half of the test, value > mean + sigma_strong * sqrt(gain * mean),
        # multiplied by n; the dispersion half runs on its few survivors.
        excess = n * value
        excess -= s
        limit = s * n
        limit *= strong_scale
        np.sqrt(limit, out=limit)
        candidates = np.flatnonzero(excess > limit)
        if candidates.size == 0:
            continue
        squares = cv2.sqrBoxFilter(image, cv2.CV_32F, **box_sum)[inner]
        n_c = n.ravel()[candidates].astype(np.float64)
        tested = n_c >= params.min_count
        candidates, n_c = candidates[tested], n_c[tested]
        s_c = s.ravel()[candidates].astype(np.float64)
        q_c = squares.ravel()[candidates].astype(np.float64)
        # variance / mean > gain * (1 + sigma_b * sqrt(2 / (n - 1))), times n (n - 1) mean.
        dispersed = n_c * q_c - s_c * s_c > params.gain * s_c * (
            n_c - 1 + params.sigma_background * np.sqrt(2 * (n_c - 1))
        )
        bright = value.ravel()[candidates] > params.global_threshold
        found.append(top * width + candidates[dispersed & bright])
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _label_4_connected(flat: np.ndarray, width: int) -> np.ndarray:
    """Spot label of each strong pixel, given sorted flat indices; edge neighbours join."""
    n = flat.size
    first, second = [], []
    for step in (1, width):
        neighbour = flat + step
        at = np.minimum(np.searchsorted(flat, neighbour), n - 1)
        joined = flat[at] == neighbour
        if step == 1:
            joined &= neighbour % width != 0  # not the first pixel of the next row
        first.append(np.flatnonzero(joined))
        second.append(at[joined])
    first, second = np.concatenate(first), np.concatenate(second)
    graph = coo_matrix((np.ones(first.size, np.int8), (first, second)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _spots(frame, strong, params, cores) -> SpotList:
    """The spots of the sorted flat indices ``strong``; ``cores``, among them, are saturated."""
    if strong.size == 0:
        return SpotList(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0))
    width = frame.shape[1]
    labels = _label_4_connected(strong, width)
    sizes = np.bincount(labels)
    values = frame.flat[strong].astype(np.float64)
    rows, columns = np.divmod(strong, width)
    totals = np.bincount(labels, values)
    x = np.bincount(labels, values * (columns + 0.5)) / totals
    y = np.bincount(labels, values * (rows + 0.5)) / totals
    keep = sizes >= params.min_spot_size
    if params.max_spot_size is not None:
        keep &= sizes <= params.max_spot_size
    core = np.isin(strong, cores, assume_unique=True)
    n_core = np.bincount(labels[core], minlength=sizes.size)
    # A spot's saturated core lies in its strong tail; saturated pixels alone (an unmasked hot cluster, the
    # direct beam, a zinger) are no spot.
    keep &= (n_core == 0) | (sizes > n_core)
    if params.max_separation is not None:
        # DIALS' peak: the brightest pixel, the first in row order on a tie (strong is sorted, lexsort stable).
        order = np.lexsort((-values, labels))
        peak = order[np.flatnonzero(np.diff(labels[order], prepend=-1))]
        peak_x, peak_y = columns[peak] + 0.5, rows[peak] + 0.5
        # A saturated core's pixels all read the cutoff: its peak is their centre, not the first of them.
        if core.any():
            cored = n_core > 0
            peak_x[cored] = (np.bincount(labels[core], columns[core] + 0.5, sizes.size) / np.maximum(n_core, 1))[cored]
            peak_y[cored] = (np.bincount(labels[core], rows[core] + 0.5, sizes.size) / np.maximum(n_core, 1))[cored]
        keep &= np.hypot(peak_x - x, peak_y - y) <= params.max_separation
    order = np.lexsort((x[keep], y[keep]))
    return SpotList(
        centroids=np.column_stack([x[keep], y[keep]])[order],
        sizes=sizes[keep][order],
        intensities=totals[keep][order],
    )


def benchmark(quick: bool) -> dict:
    """Seconds to find the spots of one EIGER2 4M and one 16M frame, on one core.

    The frames come from the EIGER simulator (300 Bragg spots on Poisson
    background, module gaps and hot pixels masked); the time covers
    ``find_spots`` only, not reading or building the masks.
    """
    from mxcube_autocenter.labelling.eiger import overloaded_pixels, valid_pixels
    from mxcube_autocenter.simulation.eiger import EIGER_4M, EIGER_16M, FrameSimulator

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        figures = {}
        for key, geometry in (("4m", EIGER_4M), ("16m", EIGER_16M)):
            simulator = FrameSimulator(geometry, seed=1)
            frame, _, _ = simulator.frame(300)
            valid = valid_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)
            overloaded = overloaded_pixels(frame, simulator.pixel_mask, simulator.count_cutoff)
            find_spots(frame, valid, overloaded=overloaded)  # warm-up: first-touch of the strip buffers
            times = []
            for _ in range(1 if quick else 5):
                start = time.perf_counter()
                find_spots(frame, valid, overloaded=overloaded)
                times.append(time.perf_counter() - start)
            figures[f"spotfind_s_per_{key}_frame"] = float(np.median(times))
        return figures
    finally:
        cv2.setNumThreads(threads)
