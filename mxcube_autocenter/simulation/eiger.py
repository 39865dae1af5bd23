"""Synthetic DECTRIS EIGER2 collections: master and data files with Bragg spots.

The files have the layout of the EIGER2 FileWriter (NeXus NXmx plus DECTRIS'
``detectorSpecific`` group): ``<prefix>_master.h5`` holds the metadata and
external links to ``<prefix>_data_NNNNNN.h5`` files of up to
``images_per_file`` frames, each frame one bitshuffle-LZ4 compressed chunk.
A frame holds Poisson background falling off from the beam with a faint
solvent ring, exactly the requested number of Bragg spots, each a
pixel-integrated Gaussian stamp with Poisson noise, and optionally spots
from ice, which land on the ice rings. Bragg spots are drawn off the ice
rings, so that a spot finder that filters the rings finds them all.
docs/data-formats.md lists every dataset.

Coordinates are in pixels from the detector corner, as ``beam_center_x``:
the centre of pixel ``(row, column)`` is at ``(column + 0.5, row + 0.5)``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import cv2
import h5py
import hdf5plugin
import numpy as np
from scipy.special import erf

from mxcube_autocenter.labelling.spotfinder import (
    SpotFinderParams,
    d_star_sq_at_radius,
    ice_ring_spacings,
    on_ice_ring,
    resolution_radius,
)

# pixel_mask bits, as DECTRIS sets them.
GAP = 1  # bit 0: gap between modules, no sensor
DEAD = 2  # bit 1: dead pixel
HOT = 8  # bit 3: over-responding (hot) pixel

# Counts at and above which a pixel is saturated (countrate_correction_count_cutoff).
COUNT_CUTOFF = {16: 0xFFFE, 32: 1_000_000}

# Spots are drawn one per cell of a grid, away from the cell's edges, so that
# their stamps never overlap and each is a separate spot for the spot finder.
_CELL = 12
_STAMP_RADIUS = 4  # stamps are 9 x 9 pixels
_CELL_MARGIN = _STAMP_RADIUS
_SUBPIXEL = 4  # spot centres lie on a 1/4 pixel grid
_SIGMAS = np.linspace(0.6, 1.5, 10)  # spot widths, pixels (Gaussian sigma)
# Spot intensities follow Wilson statistics (exponential) above a floor that
# keeps the faintest spot findable over the background, counts.
_MIN_INTENSITY = 400.0
_MEAN_EXTRA_INTENSITY = 4000.0
_SOLVENT_RING_D = 3.7  # Angstrom: the water / solvent ring
_SOLVENT_RING_HALF_WIDTH_D = 0.3  # Angstrom


@dataclass(frozen=True)
class DetectorGeometry:
    """Size, module layout and experiment geometry of an EIGER detector.

    Attributes
    ----------
    name : str
    width, height : int
        Pixels along x (fast, columns) and y (slow, rows).
    module_width, module_height : int
        Pixels of one module.
    gap_x, gap_y : int
        Pixels between module columns and between module rows.
    beam_center_x, beam_center_y : float
        Direct beam, pixels from the detector corner.
    distance : float
        Sample to detector distance, mm.
    wavelength : float
        Angstrom.
    pixel_size : float
        mm (square pixels).
    sensor_material : str
    sensor_thickness : float
        mm.
    """

    name: str
    width: int
    height: int
    module_width: int
    module_height: int
    gap_x: int
    gap_y: int
    beam_center_x: float
    beam_center_y: float
    distance: float = 150.0
    wavelength: float = 0.9763
    pixel_size: float = 0.075
    sensor_material: str = "Si"
    sensor_thickness: float = 0.450

    def __post_init__(self):
        for size, module, gap, axis in (
            (self.width, self.module_width, self.gap_x, "x"),
            (self.height, self.module_height, self.gap_y, "y"),
        ):
            if (size + gap) % (module + gap):
                raise ValueError(
                    f"{self.name}: {size} pixels along {axis} is not a whole number of "
                    f"{module}-pixel modules with {gap}-pixel gaps"
                )

    def gap_mask(self) -> np.ndarray:
        """True on the pixels between modules, shape (height, width)."""
        in_gap_x = np.arange(self.width) % (self.module_width + self.gap_x) >= self.module_width
        in_gap_y = np.arange(self.height) % (self.module_height + self.gap_y) >= self.module_height
        return in_gap_y[:, None] | in_gap_x[None, :]


# EIGER2 modules are 1028 x 512 pixels, 12 pixels apart along x and 38 along y.
SMALL = DetectorGeometry(
    name="SMALL (2 x 2 modules of 250 x 238)",
    width=512, height=514, module_width=250, module_height=238, gap_x=12, gap_y=38,
    beam_center_x=256.0, beam_center_y=257.0, distance=60.0,
)  # fmt: skip
EIGER_4M = DetectorGeometry(
    name="EIGER2 X 4M",
    width=2068, height=2162, module_width=1028, module_height=512, gap_x=12, gap_y=38,
    beam_center_x=1034.0, beam_center_y=1081.0, distance=120.0,
)  # fmt: skip
EIGER_16M = DetectorGeometry(
    name="EIGER2 X 16M",
    width=4148, height=4362, module_width=1028, module_height=512, gap_x=12, gap_y=38,
    beam_center_x=2074.0, beam_center_y=2181.0, distance=150.0,
)  # fmt: skip


@dataclass(frozen=True)
class EigerCollection:
    """What ``write_eiger_collection`` wrote.

    Attributes
    ----------
    master_path : Path
    data_paths : tuple of Path
    nimages : int
    spot_positions : tuple of ndarray, shape (N_i, 2)
        True Bragg spot centres ``(x, y)`` of each frame, pixels from the
        detector corner.
    ice_spot_positions : tuple of ndarray, shape (M_i, 2)
        True centres of each frame's ice-ring spots.
    """

    master_path: Path
    data_paths: tuple
    nimages: int
    spot_positions: tuple
    ice_spot_positions: tuple


def background_model(geometry: DetectorGeometry) -> np.ndarray:
    """Mean background counts per pixel of one frame, shape (height, width).

    Air and solvent scatter falling off from the direct beam (1.5 counts at
    the beam, about 0.4 in the corners) plus a faint solvent ring at 3.7
    Angstrom (up to 0.8 counts more).
    """
    half_diagonal = np.hypot(geometry.width, geometry.height) / 2
    ring = resolution_radius(_SOLVENT_RING_D, geometry)
    ring_sigma = 0.5 * (
        resolution_radius(_SOLVENT_RING_D - _SOLVENT_RING_HALF_WIDTH_D, geometry)
        - resolution_radius(_SOLVENT_RING_D + _SOLVENT_RING_HALF_WIDTH_D, geometry)
    )
    dx = np.arange(geometry.width, dtype=np.float32) + 0.5 - geometry.beam_center_x
    dy = np.arange(geometry.height, dtype=np.float32) + 0.5 - geometry.beam_center_y
    r = np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2)
    falloff = 1.2 / (1 + (r / (0.35 * half_diagonal)) ** 2)
    return 0.3 + falloff + 0.8 * np.exp(-0.5 * ((r - ring) / ring_sigma) ** 2)


_MASK_SEED = 0  # seeds every simulated detector's dead and hot pixels


def simulated_pixel_mask(geometry: DetectorGeometry, rng: np.random.Generator) -> np.ndarray:
    """An EIGER ``pixel_mask``: module gaps, and a few dead and hot pixels.

    Returns
    -------
    ndarray of uint32, shape (height, width)
        0 for good pixels, else DECTRIS' bits: ``GAP``, ``DEAD``, ``HOT``.
    """
    mask = np.where(geometry.gap_mask(), np.uint32(GAP), np.uint32(0))
    n_bad = max(3, mask.size // 50_000)
    draws = rng.integers(0, mask.size, size=4 * n_bad)
    on_sensor = np.unique(draws[mask.flat[draws] == 0])
    bad = rng.permutation(on_sensor)[: 2 * n_bad]
    mask.flat[bad[:n_bad]] = DEAD
    mask.flat[bad[n_bad:]] = HOT
    return mask


@lru_cache(maxsize=1)
def _spot_stamps() -> tuple[np.ndarray, np.ndarray]:
    """Unit-sum spot profiles: (offsets, stamps[sigma, y phase, x phase, dy, dx])."""
    # Offsets of the spot centre from the centre of its pixel, one per phase.
    offsets = (np.arange(_SUBPIXEL) + 0.5) / _SUBPIXEL - 0.5
    edges = np.arange(-_STAMP_RADIUS, _STAMP_RADIUS + 2) - 0.5
    z = (edges[None, None, :] - offsets[None, :, None]) / _SIGMAS[:, None, None]
    # Pixel-integrated Gaussian along one axis, renormalised over the stamp.
    profile = np.diff(0.5 * (1 + erf(z / np.sqrt(2))), axis=-1)
    profile /= profile.sum(axis=-1, keepdims=True)
    stamps = profile[:, :, None, :, None] * profile[:, None, :, None, :]
    return offsets, stamps.astype(np.float32)


class _BackgroundSampler:
    """Poisson draws of a detector's background model, by table look-up.

    ``Generator.poisson`` costs ~35 ns a pixel; this costs a few. The model's
    means are rounded to ``_LEVELS`` levels; for each level a table maps a
    16-bit uniform draw to its count, and the few draws that fall in a table
    bucket holding a step of the CDF are resolved exactly with more bits.
    The counts are exact Poisson draws of the rounded means.
    """

    _LEVELS = 64
    _BUCKETS = 1 << 16
    _RESOLVE = 255  # table entry of a bucket holding a CDF step
    _MAX_COUNT = 64  # the CDF reaches 1 to double precision well before, for means of a few counts

    def __init__(self, mean: np.ndarray):
        levels = np.linspace(mean.min(), mean.max(), self._LEVELS)
        step = levels[1] - levels[0] if levels[-1] > levels[0] else 1.0
        self.level = np.rint((mean.ravel() - levels[0]) / step).astype(np.uint8)
        self.mean = levels.astype(np.float32)[self.level]
        self._offset = self.level.astype(np.int32) * self._BUCKETS
        k = np.arange(self._MAX_COUNT)
        # pmf(k) = pmf(k - 1) * mean / k, from pmf(0) = exp(-mean).
        ratios = np.where(k > 0, levels[:, None] / np.maximum(k, 1), 1.0)
        self._cdf = np.cumsum(np.exp(-levels[:, None]) * np.cumprod(ratios, axis=1), axis=1)
        edges = np.arange(self._BUCKETS + 1) / self._BUCKETS
        table = np.empty((self._LEVELS, self._BUCKETS), np.uint8)
        for level, cdf in enumerate(self._cdf):
            low = np.searchsorted(cdf, edges[:-1], side="right")
            high = np.searchsorted(cdf, edges[1:], side="left")
            table[level] = np.where(low == high, low, self._RESOLVE)
        self._table = table.ravel()

    def draw(self, rng: np.random.Generator, out: np.ndarray) -> None:
        """Write one Poisson draw per pixel into ``out`` (flat, any integer type)."""
        bucket = rng.integers(0, self._BUCKETS, size=self._offset.size, dtype=np.uint16)
        counts = np.take(self._table, self._offset + bucket)
        resolve = np.flatnonzero(counts == self._RESOLVE)
        u = (bucket[resolve] + rng.random(resolve.size)) / self._BUCKETS
        counts[resolve] = np.sum(u[:, None] >= self._cdf[self.level[resolve]], axis=1)
        out[:] = counts


@lru_cache(maxsize=3)
def _background_sampler(geometry: DetectorGeometry) -> _BackgroundSampler:
    return _BackgroundSampler(background_model(geometry))


class FrameSimulator:
    """Frames of one simulated collection: fixed background and pixel mask, new noise and spots.

    Parameters
    ----------
    geometry : DetectorGeometry
    seed : int
        Seeds the noise and the spots; the pixel mask is the detector's own,
        the same for every seed.
    bit_depth : {32, 16}
        Frames are uint32 or uint16, as the EIGER's ``bit_depth_image``.

    Attributes
    ----------
    pixel_mask : ndarray of uint32
    count_cutoff : int
        Counts at and above which a pixel is saturated.
    invalid : int
        Value of gap pixels (all bits set).
    capacity : int
        Most Bragg spots one frame can hold.
    ice_capacity : int
        Most ice-ring spots one frame can hold.
    """

    def __init__(self, geometry: DetectorGeometry = SMALL, *, seed: int = 0, bit_depth: int = 32):
        if bit_depth not in COUNT_CUTOFF:
            raise ValueError(f"bit_depth={bit_depth}: EIGER2 frames are 16 or 32 bits")
        self.geometry = geometry
        self.dtype = np.dtype(f"uint{bit_depth}")
        self.invalid = int(np.iinfo(self.dtype).max)
        self.count_cutoff = COUNT_CUTOFF[bit_depth]
        self._rng = np.random.default_rng(seed)
        # A detector's bad pixels are its own, the same in every collection: so is how many spots a frame holds.
        self.pixel_mask = simulated_pixel_mask(geometry, np.random.default_rng(_MASK_SEED))
        self._background = _background_sampler(geometry)
        flagged = np.flatnonzero(self.pixel_mask)
        flags = self.pixel_mask.flat[flagged]
        self._flagged = flagged
        # Gaps read as invalid, hot pixels as saturated, dead pixels as 0.
        self._flagged_values = np.select(
            [flags & GAP != 0, flags & HOT != 0], [self.invalid, self.count_cutoff], 0
        ).astype(self.dtype)
        usable = self._cells_free_of_masked_pixels()
        self._bragg_cells, self._ice_cells, self._ice_sites = self._split_by_ice_rings(usable)
        self.capacity = int(self._bragg_cells.size)
        self.ice_capacity = int(self._ice_cells.size)

    def _cells_free_of_masked_pixels(self) -> np.ndarray:
        """Flat indices of the grid cells where a spot stamp never touches a masked pixel."""
        g = self.geometry
        good = (self.pixel_mask == 0).astype(np.uint8)
        side = 2 * _STAMP_RADIUS + 1
        spot_free = cv2.erode(good, np.ones((side, side), np.uint8)).astype(bool)
        ny, nx = g.height // _CELL, g.width // _CELL
        cells = spot_free[: ny * _CELL, : nx * _CELL].reshape(ny, _CELL, nx, _CELL)
        inner = cells[:, _CELL_MARGIN : _CELL - _CELL_MARGIN, :, _CELL_MARGIN : _CELL - _CELL_MARGIN]
        return np.flatnonzero(inner.all(axis=(1, 3)))

    def _split_by_ice_rings(self, cells):
        """Cells for Bragg spots (clear of the ice rings), cells for ice spots, and the ice spots' sites.

        A cell's spot centre lies anywhere on its ``span x span`` grid of
        sub-pixel sites. Bragg cells keep every site off the rings (of the
        spot finder's default width), with a pixel to spare for the
        centroid's noise; ice cells have sites on a ring's middle half, where
        a spot finder's centroid still falls on the ring. ``sites`` lists
        ``(cell, sub_y, sub_x)`` rows sorted by cell.
        """
        g = self.geometry
        span = (_CELL - 2 * _CELL_MARGIN) * _SUBPIXEL
        cell_y, cell_x = np.divmod(cells, g.width // _CELL)
        corner = np.column_stack([cell_x, cell_y]) * _CELL + _CELL_MARGIN
        # The radii a cell's sites reach, a pixel more each way for the centroid's noise.
        low, high = corner - 1.0, corner + span / _SUBPIXEL + 1.0
        beam = np.array([g.beam_center_x, g.beam_center_y])
        r_min = np.hypot(*(np.clip(beam, low, high) - beam).T)
        r_max = np.hypot(*np.maximum(np.abs(low - beam), np.abs(high - beam)).T)
        s2_min, s2_max = d_star_sq_at_radius(r_min, g), d_star_sq_at_radius(r_max, g)
        half = 0.5 * SpotFinderParams().ice_ring_width
        rings = ice_ring_spacings(d_min=1.0 / np.sqrt(s2_max.max() + half)) ** -2.0
        near = np.any((s2_min[:, None] <= rings + half) & (s2_max[:, None] >= rings - half), axis=1)
        bragg = cells[~near]
        sub = (np.arange(span) + 0.5) / _SUBPIXEL
        site_y, site_x = np.meshgrid(np.arange(span), np.arange(span), indexing="ij")
        candidates = np.flatnonzero(near)
        xy = corner[candidates, None, :] + np.stack([sub[site_x], sub[site_y]], axis=-1).reshape(1, -1, 2)
        on_ring = on_ice_ring(xy.reshape(-1, 2), g, half).reshape(len(candidates), -1)
        which, site = np.nonzero(on_ring)
        sites = np.column_stack([cells[candidates][which], site_y.ravel()[site], site_x.ravel()[site]])
        return bragg, np.unique(sites[:, 0]), sites

    def frame(self, n_spots: int, n_ice_spots: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw one frame with exactly ``n_spots`` Bragg spots and ``n_ice_spots`` on the ice rings.

        Returns
        -------
        frame : ndarray, shape (height, width), of the simulator's dtype
        positions : ndarray of float, shape (n_spots, 2)
            Bragg spot centres ``(x, y)``, pixels from the detector corner.
        ice_positions : ndarray of float, shape (n_ice_spots, 2)
            Ice spot centres.
        """
        g = self.geometry
        if n_spots > self.capacity:
            raise ValueError(
                f"{n_spots} Bragg spots do not fit on one {g.name} frame (at most {self.capacity}): "
                "simulate a larger detector (EIGER_4M or EIGER_16M)"
            )
        if n_ice_spots > self.ice_capacity:
            raise ValueError(
                f"{n_ice_spots} ice spots do not fit on the ice rings of one {g.name} frame "
                f"(at most {self.ice_capacity})"
            )
        rng = self._rng
        counts = np.empty(g.width * g.height, self.dtype)
        self._background.draw(rng, counts)
        offsets, stamps = _spot_stamps()
        span = (_CELL - 2 * _CELL_MARGIN) * _SUBPIXEL
        bragg_cells = rng.choice(self._bragg_cells, size=n_spots, replace=False)
        sub_y, sub_x = rng.integers(0, span, size=(2, n_spots))
        ice_cells = rng.choice(self._ice_cells, size=n_ice_spots, replace=False)
        first = np.searchsorted(self._ice_sites[:, 0], ice_cells, side="left")
        last = np.searchsorted(self._ice_sites[:, 0], ice_cells, side="right")
        ice_sites = self._ice_sites[first + (rng.random(n_ice_spots) * (last - first)).astype(np.int64)]
        cells = np.concatenate([bragg_cells, ice_cells])
        sub_y, sub_x = np.concatenate([sub_y, ice_sites[:, 1]]), np.concatenate([sub_x, ice_sites[:, 2]])
        n_spots = cells.size
        cell_y, cell_x = np.divmod(cells, g.width // _CELL)
        row = cell_y * _CELL + _CELL_MARGIN + sub_y // _SUBPIXEL
        column = cell_x * _CELL + _CELL_MARGIN + sub_x // _SUBPIXEL
        phase_y, phase_x = sub_y % _SUBPIXEL, sub_x % _SUBPIXEL
        width_index = rng.integers(0, _SIGMAS.size, size=n_spots)
        intensity = _MIN_INTENSITY + rng.exponential(_MEAN_EXTRA_INTENSITY, size=n_spots)
        d = np.arange(-_STAMP_RADIUS, _STAMP_RADIUS + 1)
        pixels = (row[:, None, None] + d[None, :, None]) * g.width + (column[:, None, None] + d[None, None, :])
        spot_mean = intensity[:, None, None] * stamps[width_index, phase_y, phase_x]
        signal = rng.poisson(self._background.mean[pixels] + spot_mean)
        # Above the count-rate cutoff the detector reports the cutoff: saturated.
        counts[pixels] = np.minimum(signal, self.count_cutoff)
        counts[self._flagged] = self._flagged_values
        positions = np.column_stack([column + 0.5 + offsets[phase_x], row + 0.5 + offsets[phase_y]])
        n_bragg = bragg_cells.size
        return counts.reshape(g.height, g.width), positions[:n_bragg], positions[n_bragg:]


def write_eiger_collection(
    directory,
    prefix: str,
    reflection_counts,
    *,
    start_time: float,
    frame_time: float,
    count_time: float,
    geometry: DetectorGeometry = SMALL,
    images_per_file: int = 100,
    seed: int = 0,
    frame_start_times=None,
    bit_depth: int = 32,
    ice_spots=None,
) -> EigerCollection:
    """Write a collection's EIGER master and data files.

    Every file is written under a temporary ``.part`` name and renamed when
    all are complete, the master file last: a crash never leaves a master
    file, complete or not, without its data.

    Parameters
    ----------
    directory : path
        Created if missing.
    prefix : str
        Files are ``<prefix>_master.h5`` and ``<prefix>_data_000001.h5`` ...
    reflection_counts : sequence of int
        Bragg spots to draw on each frame; one frame per entry.
    start_time : float
        Collection start, unix time (s), stored as ``data_collection_date``.
    frame_time : float
        Frame period, s.
    count_time : float
        Exposure of each frame, s; at most ``frame_time``.
    geometry : DetectorGeometry
    images_per_file : int
        Frames per data file (the EIGER's ``nimages_per_file``).
    seed : int
        Seeds the noise and spots (the pixel mask is the detector's own).
    frame_start_times : sequence of float, optional
        Start of each frame by the detector's clock, unix time (s); stored as
        NXdetector ``start_time`` / ``stop_time``.
    bit_depth : {32, 16}
    ice_spots : sequence of int, optional
        Spots to draw on the ice rings of each frame (ice in the beam); none
        by default.

    Returns
    -------
    EigerCollection
    """
    counts = np.asarray(reflection_counts, dtype=np.int64)
    if counts.ndim != 1 or np.any(counts < 0):
        raise ValueError("reflection_counts must be a sequence of counts >= 0, one per frame")
    ice = np.zeros_like(counts) if ice_spots is None else np.asarray(ice_spots, dtype=np.int64)
    if ice.shape != counts.shape or np.any(ice < 0):
        raise ValueError(f"ice_spots must give a count >= 0 for each of the {counts.size} frames")
    if not 0 < count_time <= frame_time:
        raise ValueError(f"count_time={count_time} s, frame_time={frame_time} s: need 0 < count_time <= frame_time")
    if images_per_file < 1:
        raise ValueError(f"images_per_file={images_per_file}: need at least 1")
    if frame_start_times is not None:
        frame_start_times = np.asarray(frame_start_times, dtype=np.float64)
        if frame_start_times.shape != counts.shape:
            raise ValueError(
                f"{frame_start_times.size} frame_start_times for {counts.size} frames: give one per frame"
            )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    simulator = FrameSimulator(geometry, seed=seed, bit_depth=bit_depth)
    master_path = directory / f"{prefix}_master.h5"
    n_files = -(-counts.size // images_per_file)
    data_paths = tuple(directory / f"{prefix}_data_{k + 1:06d}.h5" for k in range(n_files))
    final_paths = (*data_paths, master_path)
    partial = {path: path.with_name(path.name + ".part") for path in final_paths}
    positions, ice_positions = [], []
    try:
        for k, path in enumerate(data_paths):
            first = k * images_per_file
            block = slice(first, first + images_per_file)
            bragg, on_rings = _write_data_file(partial[path], simulator, counts[block], ice[block], first)
            positions += bragg
            ice_positions += on_rings
        _write_master_file(
            partial[master_path], simulator, data_paths, counts.size,
            start_time=start_time, frame_time=frame_time, count_time=count_time,
            frame_start_times=frame_start_times,
        )  # fmt: skip
        for path in final_paths:
            os.replace(partial[path], path)
    except BaseException:
        for path in partial.values():
            path.unlink(missing_ok=True)
        raise
    return EigerCollection(master_path, data_paths, int(counts.size), tuple(positions), tuple(ice_positions))


def _group(parent, name: str, nx_class: str):
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _scalar(group, name: str, value, units: str | None = None):
    # Text as fixed-length ASCII, as the FileWriter stores it.
    dataset = group.create_dataset(name, data=np.bytes_(value) if isinstance(value, str) else value)
    if units is not None:
        dataset.attrs["units"] = np.bytes_(units)
    return dataset


def _iso8601(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, timezone.utc).isoformat(timespec="microseconds")


def _write_data_file(path: Path, simulator: FrameSimulator, counts: np.ndarray, ice: np.ndarray, first: int):
    g = simulator.geometry
    positions, ice_positions = [], []
    with h5py.File(path, "w") as f:
        data = _group(_group(f, "entry", "NXentry"), "data", "NXdata")
        frames = data.create_dataset(
            "data",
            shape=(counts.size, g.height, g.width),
            dtype=simulator.dtype,
            chunks=(1, g.height, g.width),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )
        frames.attrs["image_nr_low"] = np.int32(first + 1)
        frames.attrs["image_nr_high"] = np.int32(first + counts.size)
        for i, (n_spots, n_ice) in enumerate(zip(counts, ice)):
            frames[i], spots, ice_spots = simulator.frame(int(n_spots), int(n_ice))
            positions.append(spots)
            ice_positions.append(ice_spots)
    return positions, ice_positions


def _write_master_file(path, simulator, data_paths, nimages, *, start_time, frame_time, count_time, frame_start_times):
    g = simulator.geometry
    with h5py.File(path, "w") as f:
        entry = _group(f, "entry", "NXentry")
        data = _group(entry, "data", "NXdata")
        for k, data_path in enumerate(data_paths):
            # Relative names, as the FileWriter writes them: the files move together.
            data[f"data_{k + 1:06d}"] = h5py.ExternalLink(data_path.name, "/entry/data/data")
        instrument = _group(entry, "instrument", "NXinstrument")
        _scalar(_group(instrument, "beam", "NXbeam"), "incident_wavelength", g.wavelength, "angstrom")
        detector = _group(instrument, "detector", "NXdetector")
        _scalar(detector, "description", f"Dectris {g.name} (simulated)")
        _scalar(detector, "count_time", float(count_time), "s")
        _scalar(detector, "frame_time", float(frame_time), "s")
        _scalar(detector, "x_pixel_size", g.pixel_size / 1e3, "m")
        _scalar(detector, "y_pixel_size", g.pixel_size / 1e3, "m")
        _scalar(detector, "beam_center_x", g.beam_center_x, "pixel")
        _scalar(detector, "beam_center_y", g.beam_center_y, "pixel")
        _scalar(detector, "detector_distance", g.distance / 1e3, "m")
        _scalar(detector, "sensor_material", g.sensor_material)
        _scalar(detector, "sensor_thickness", g.sensor_thickness / 1e3, "m")
        _scalar(detector, "saturation_value", np.int64(simulator.count_cutoff))
        _scalar(detector, "bit_depth_image", np.int32(simulator.dtype.itemsize * 8))
        if frame_start_times is not None:
            # NXdetector: per-frame times relative to their "start" attribute.
            reference = round(float(frame_start_times[0]), 6) if nimages else float(start_time)
            for name, times in (("start_time", frame_start_times), ("stop_time", frame_start_times + count_time)):
                _scalar(detector, name, times - reference, "s").attrs["start"] = np.bytes_(_iso8601(reference))
        specific = _group(detector, "detectorSpecific", "NXcollection")
        _scalar(specific, "nimages", np.int64(nimages))
        _scalar(specific, "ntrigger", np.int64(1))
        _scalar(specific, "data_collection_date", _iso8601(start_time))
        _scalar(specific, "x_pixels_in_detector", np.int64(g.width))
        _scalar(specific, "y_pixels_in_detector", np.int64(g.height))
        _scalar(specific, "countrate_correction_count_cutoff", np.int64(simulator.count_cutoff))
        _scalar(specific, "compression", "bslz4")
        # gzip is built into HDF5: the mask reads even where bitshuffle is missing.
        specific.create_dataset("pixel_mask", data=simulator.pixel_mask, compression="gzip", compression_opts=4)


def benchmark(quick: bool) -> dict:
    """Milliseconds per frame to write a collection of SMALL and EIGER2 4M frames.

    Each figure is the whole ``write_eiger_collection`` call (simulator set-up,
    100 spots per frame, compression, files) divided by its frames.
    """
    figures = {}
    with tempfile.TemporaryDirectory() as directory:
        for key, geometry, n_frames in (("small", SMALL, 20 if quick else 200), ("4m", EIGER_4M, 3 if quick else 20)):
            start = time.perf_counter()
            write_eiger_collection(
                directory, key, [100] * n_frames,
                start_time=time.time(), frame_time=0.01, count_time=0.0099, geometry=geometry,
            )  # fmt: skip
            figures[f"eiger_write_ms_per_frame_{key}"] = 1e3 * (time.perf_counter() - start) / n_frames
    return figures
