"""Which detector frame was exposed when each camera frame was taken.

Camera frames carry wall-clock timestamps (unix s, taken when MXCuBE
received them) and the motor positions of that moment; detector frames
carry exposure windows by the detector's clock, which runs ahead of or
behind the wall clock by a constant offset (detector clock = camera clock +
offset). ``estimate_clock_offset`` finds that offset from the motion (omega
moves by a known range per detector frame), ``regular_windows`` removes the
time-stamping jitter of a detector running at a constant frame rate, and
``match_frames`` assigns each camera frame the detector frame whose exposure
window holds its time.

Camera frames are exposed a little before they are received (the camera's
latency, tens of ms); the motor positions are read on reception. The offset
found from the motion therefore relates reception times to the detector
clock, and the caller subtracts the latency from the camera times before
matching (``pipeline.label_recordings`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# Omega (or the place along a helical line) within this many detector frames of the scan's first or last image is
# not used for the offset: the goniometer rests there before and after the scan.
_MARGIN_FRAMES = 0.5
# Fewest moving camera frames for an offset from the motion.
_MIN_MOVING_FRAMES = 3
# A camera frame counts as taken during the scan only while omega turns at
# between these fractions of the scan's speed (``osc_range`` per frame period),
# in its direction: the goniometer may rest inside the scan's range before it
# (at the last centring angle, while the detector arms) and pass through it
# fast on its way to the start.
_SCAN_SPEED_RANGE = (0.2, 10.0)


class ClockOffset(float):
    """Detector clock minus camera clock, s, with how it was found.

    A float, usable wherever the offset is; its attributes tell how reliable it is.

    Attributes
    ----------
    method : str
        "omega": from the camera frames' omega during the scan; "helical
        line": from their places along a helical scan's line (no rotation).
    residuals_s : ndarray of float, shape (n_camera,)
        Per camera frame, ``camera time + offset`` minus the detector time at
        which omega (or the place along the line) had the frame's value, s;
        NaN for frames not used (at rest, outside the scan, unknown).
    """

    method: str
    residuals_s: np.ndarray

    def __new__(cls, offset_s: float, method: str, residuals_s: np.ndarray):
        self = super().__new__(cls, offset_s)
        self.method = method
        self.residuals_s = residuals_s
        return self

    def __reduce__(self):
        # float's own pickling would call __new__ with the value only.
        return ClockOffset, (float(self), self.method, self.residuals_s)

    @property
    def n_used(self) -> int:
        """Camera frames the offset was estimated from."""
        return int(np.count_nonzero(np.isfinite(self.residuals_s)))

    @property
    def residual_rms_s(self) -> float:
        """Root mean square of the finite residuals, s; NaN when there are none."""
        used = self.residuals_s[np.isfinite(self.residuals_s)]
        return float(np.sqrt(np.mean(used**2))) if used.size else float("nan")


class RegularWindows(NamedTuple):
    """Result of ``regular_windows``.

    Attributes
    ----------
    windows : ndarray of float, shape (n, 2)
        Exposure windows (start, end), unix s: on the fitted regular clock
        when ``regular``, else the recorded ones unchanged.
    jitter_s : float
        Root mean square deviation of the recorded starts from the fitted
        clock, s.
    regular : bool
        Whether every recorded start lies within ``max_deviation`` of the fit.
    """

    windows: np.ndarray
    jitter_s: float
    regular: bool


def frame_period(exposure_windows) -> float:
    """Median time between the starts of consecutive detector frames, s.

    Parameters
    ----------
    exposure_windows : array_like of float, shape (n, 2)
        (start, end) of each frame, s.

    Returns
    -------
    float
        The window length for a single frame.
    """
    windows = np.asarray(exposure_windows, dtype=np.float64).reshape(-1, 2)
    if len(windows) < 2:
        return float(windows[0, 1] - windows[0, 0]) if len(windows) else float("nan")
    return float(np.median(np.diff(windows[:, 0])))


def regular_windows(exposure_windows, *, max_deviation: float | None = None) -> RegularWindows:
    """Exposure windows on a constant frame clock fitted to the recorded starts.

    A detector triggered once per collection (the EIGER's internal series,
    as in rotational and helical scans) takes its frames at a constant
    period; per-frame time stamps scatter around that clock by the
    time-stamping jitter. A straight line through the starts (least squares,
    refitted once without outliers beyond 5 robust standard deviations)
    recovers the clock to a fraction of the jitter, so camera frames near a
    frame boundary are matched to the right side of it.

    Parameters
    ----------
    exposure_windows : array_like of float, shape (n, 2)
        Recorded (start, end) of each frame, unix s, in frame order.
    max_deviation : float, optional
        Largest deviation of a recorded start from the fit, s, for the
        frames to count as regular; default a quarter of the frame period.
        A larger one means frames were delayed or skipped: the recorded
        windows are returned unchanged.

    Returns
    -------
    RegularWindows
        Fitted windows keep the median recorded exposure time.
    """
    windows = np.asarray(exposure_windows, dtype=np.float64).reshape(-1, 2)
    n = len(windows)
    if n < 3:
        return RegularWindows(windows, 0.0, True)
    index = np.arange(n, dtype=np.float64)
    # Relative to the first start: unix times would cost the fit its precision.
    origin = windows[0, 0]
    starts = windows[:, 0] - origin
    keep = np.ones(n, bool)
    for _ in range(2):
        slope, intercept = np.polyfit(index[keep], starts[keep], 1)
        deviation = starts - (intercept + slope * index)
        scale = 1.4826 * np.median(np.abs(deviation[keep]))
        keep = np.abs(deviation) <= max(5.0 * scale, 1e-9)
    jitter = float(np.sqrt(np.mean(deviation**2)))
    limit = 0.25 * slope if max_deviation is None else max_deviation
    if np.max(np.abs(deviation)) > limit:
        return RegularWindows(windows, jitter, False)
    fitted_starts = origin + intercept + slope * index
    exposure = float(np.median(windows[:, 1] - windows[:, 0]))
    return RegularWindows(np.column_stack([fitted_starts, fitted_starts + exposure]), jitter, True)


def estimate_clock_offset(
    camera_times,
    camera_omegas,
    exposure_windows,
    omega_start: float,
    omega_range: float,
    line=None,
) -> ClockOffset:
    """Offset between the camera and detector clocks, from the goniometer's motion.

    Detector frame ``i`` covers omega from ``omega_start + i * omega_range``
    over one frame period from its start, so the detector time at which
    omega had a camera frame's value is known; the median difference from
    the camera times is the offset. Only frames taken while omega turns at
    about the scan's speed count: the goniometer may rest inside the scan's
    range before the scan (at the last centring angle, for seconds while the
    detector arms), and such frames would pull the median off by seconds.
    This holds for rotational scans and for
    helical scans with an oscillation range (MXCuBE rotates omega by
    ``osc_range`` per image along the line too). When omega does not move
    (``omega_range`` 0, or fewer than 3 camera frames while it moves), the
    clocks cannot be related, unless a helical ``line`` is given: the sample
    then moves along it from the first exposure to the last, as omega would
    turn, and frames are timed by their positions along it. Otherwise the
    offset must be given. (Nothing else the recording holds fixes it: MXCuBE
    signals the collection's start before it moves to the centred position,
    takes the crystal snapshots and sets energy and resolution, seconds to
    minutes before the first exposure.)

    Parameters
    ----------
    camera_times : array_like of float, shape (n,)
        Camera frame timestamps, unix s (camera clock).
    camera_omegas : array_like of float, shape (n,)
        Omega of each camera frame, deg, read at the same moment as its
        timestamp, unwrapped (not reduced modulo 360); NaN when unknown.
    exposure_windows : array_like of float, shape (m, 2)
        (start, end) of each detector frame, unix s (detector clock).
    omega_start : float
        Omega at the start of the first detector frame, deg (``osc_start``).
    omega_range : float
        Rotation per detector frame, deg (``osc_range``); negative for a
        rotation towards lower angles.
    line : (start, end, positions), optional
        A helical scan's translation, used where omega tells nothing: the
        start and end of its line, shape (k,), and each camera frame's
        position, shape (n, k), in mm (the same k translation motors).

    Returns
    -------
    ClockOffset
        A float (s) with ``method`` (``"omega"`` or ``"helical line"``),
        per-frame ``residuals_s``, ``note``.

    Raises
    ------
    ValueError
        If there are no detector frames, or too few camera frames while omega turned.
    """
    times = np.asarray(camera_times, dtype=np.float64)
    omegas = np.asarray(camera_omegas, dtype=np.float64)
    windows = np.asarray(exposure_windows, dtype=np.float64).reshape(-1, 2)
    n = len(windows)
    if n == 0:
        raise ValueError("no detector frames: the master file declares no images")
    why = "omega did not move (osc_range 0)"
    if omega_range != 0:
        images = _scan_images(times, omegas, windows, omega_start, omega_range)
        offset = _offset_from_motion(times, images, windows, "omega")
        if offset is not None:
            return offset
        why = (f"only {_moving(times, images, windows).sum()} camera frames while omega moved from {omega_start} "
               f"deg by {omega_range} deg per image")  # fmt: skip
    if line is not None:
        start, end, positions = (np.asarray(a, dtype=np.float64) for a in line)
        length_squared = float(np.dot(end - start, end - start))
        if length_squared > 0:
            images = n * ((positions - start) @ (end - start)) / length_squared
            offset = _offset_from_motion(times, images, windows, "helical line")
            if offset is not None:
                return offset
            why += f", and only {_moving(times, images, windows).sum()} while the sample moved along the helical line"
    raise ValueError(f"{why}, so the motion cannot relate the camera and detector clocks")


def _moving(times: np.ndarray, images: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Whether each camera frame was taken during the scan, moving at its speed (``images``: its place in it, in
    detector frames from the first's start)."""
    n = len(windows)
    moving = np.isfinite(images) & (images >= _MARGIN_FRAMES) & (images <= n - _MARGIN_FRAMES)
    return moving & _at_scan_speed(times, images, frame_period(windows))


def _offset_from_motion(times, images, windows, method: str) -> ClockOffset | None:
    """The median difference between the detector's time of each moving camera frame's place in the scan and its
    camera time; None with too few moving frames."""
    moving = _moving(times, images, windows)
    if np.count_nonzero(moving) < _MIN_MOVING_FRAMES:
        return None
    frame = np.minimum(np.floor(images[moving]).astype(np.int64), len(windows) - 1)
    detector_time = windows[frame, 0] + (images[moving] - frame) * frame_period(windows)
    differences = detector_time - times[moving]
    offset = float(np.median(differences))
    residuals = np.full(times.shape, np.nan)
    residuals[moving] = offset - differences
    return ClockOffset(offset, method, residuals)


def _scan_images(times, omegas, windows, omega_start: float, omega_range: float) -> np.ndarray:
    """Each camera frame's place in the scan, in detector frames from the first's start, by its omega.

    A goniometer may read omega whole turns away from MXCuBE's ``osc_start`` (350 for a scan from -10): the
    readings are taken as they are, or moved by the whole turns that put the most camera frames in the scan
    while omega turns at its speed, among those within two of where most frames lie. Not by where most frames
    lie alone: before the scan the goniometer may rest for a minute elsewhere (the centring's angle, the crystal
    snapshots).
    """
    finite = omegas[np.isfinite(omegas)]
    middle = omega_start + 0.5 * omega_range * len(windows)
    nearest = int(np.round((np.median(finite) - middle) / 360.0)) if finite.size else 0
    shifts = dict.fromkeys([0, nearest, nearest - 1, nearest + 1, nearest - 2, nearest + 2])  # in this order
    candidates = [(omegas - 360.0 * turns - omega_start) / omega_range for turns in shifts]
    return max(candidates, key=lambda images: np.count_nonzero(_moving(times, images, windows)))


def _at_scan_speed(times: np.ndarray, images: np.ndarray, period: float) -> np.ndarray:
    """Whether omega turned at about the scan's speed at each camera frame.

    The speed is that between the frame's neighbours in time, in detector
    frames per frame period (1 during the scan).
    """
    result = np.zeros(times.shape, bool)
    known = np.flatnonzero(np.isfinite(times) & np.isfinite(images))
    if known.size < 2 or not np.isfinite(period) or period <= 0:
        return result
    order = known[np.argsort(times[known], kind="stable")]
    t, x = times[order], images[order]
    before = np.concatenate([[0], np.arange(t.size - 1)])
    after = np.concatenate([np.arange(1, t.size), [t.size - 1]])
    dt = t[after] - t[before]
    with np.errstate(divide="ignore", invalid="ignore"):
        speed = (x[after] - x[before]) / dt * period
    low, high = _SCAN_SPEED_RANGE
    result[order] = (dt > 0) & (speed >= low) & (speed <= high)
    return result


@dataclass(frozen=True)
class MatchResult:
    """Camera frames matched to detector frames, by ``match_frames``.

    Attributes
    ----------
    detector_frame : ndarray of int64, shape (n_camera,)
        0-based detector frame of each camera frame; -1 when unmatched.
    residual_s : ndarray of float, shape (n_camera,)
        ``camera time + clock_offset`` minus the centre of the matched
        exposure window, s; NaN when unmatched. Within half an exposure
        (plus the tolerance) by construction; the timing error itself is in
        ``clock_offset.residuals_s`` when the offset came from the motion.
    clock_offset : float
        Offset used, s; a ``ClockOffset`` when estimated.
    n_before, n_after, n_gap : int
        Unmatched frames before the first exposure, after the last one, and
        in shutter-closed gaps between exposures.
    frame_period_s : float
        Median period of the detector frames, s.
    """

    detector_frame: np.ndarray
    residual_s: np.ndarray
    clock_offset: float
    n_before: int
    n_after: int
    n_gap: int
    frame_period_s: float

    @property
    def n_matched(self) -> int:
        return int(np.count_nonzero(self.detector_frame >= 0))

    @property
    def n_dropped(self) -> int:
        return self.n_before + self.n_after + self.n_gap

    @property
    def offset_method(self) -> str:
        """How the offset was found: "omega" (estimated from the motion) or "given"."""
        return self.clock_offset.method if isinstance(self.clock_offset, ClockOffset) else "given"

    def timing_residuals_s(self) -> np.ndarray:
        """Timing residuals (see ``ClockOffset.residuals_s``) of the matched frames that have one, s."""
        if not isinstance(self.clock_offset, ClockOffset):
            return np.zeros(0)
        residuals = self.clock_offset.residuals_s[self.detector_frame >= 0]
        return residuals[np.isfinite(residuals)]

    def stats(self) -> dict:
        """Summary statistics, JSON-ready (times in s).

        ``neighbour_risk`` estimates the fraction of matched frames that got
        a neighbouring detector frame: a timing error ``e`` moves a frame
        across the nearer window edge with probability ``|e| / period``, so
        it is the mean absolute timing residual over the frame period
        (NaN without timing residuals).
        """
        timing = self.timing_residuals_s()
        matched = self.residual_s[self.detector_frame >= 0]

        def value(x):
            return float(x) if np.isfinite(x) else None

        mean_abs = float(np.mean(np.abs(timing))) if timing.size else float("nan")
        return {
            "n_camera": int(self.detector_frame.size),
            "n_matched": self.n_matched,
            "n_dropped": self.n_dropped,
            "n_before": self.n_before,
            "n_after": self.n_after,
            "n_gap": self.n_gap,
            "clock_offset_s": float(self.clock_offset),
            "offset_method": self.offset_method,
            "frame_period_s": value(self.frame_period_s),
            "timing_residual_rms_s": value(np.sqrt(np.mean(timing**2))) if timing.size else None,
            "timing_residual_max_s": value(np.max(np.abs(timing))) if timing.size else None,
            "neighbour_risk": value(min(1.0, mean_abs / self.frame_period_s)) if timing.size else None,
            "window_residual_max_s": value(np.max(np.abs(matched))) if matched.size else None,
        }


def match_frames(camera_times, exposure_windows, *, clock_offset: float = 0.0, tolerance: float = 0.005) -> MatchResult:
    """Assign each camera frame the detector frame exposed at its time.

    A camera frame at time ``t`` (camera clock) gets the detector frame
    whose exposure window holds ``t + clock_offset`` (detector clock), or
    the nearest window when none does and the nearest edge is within
    ``tolerance``; where windows overlap (time-stamping jitter), the one
    whose centre is nearest. Other frames, before or after the exposures or
    in shutter-closed gaps between them, are unmatched (-1) and counted.

    Parameters
    ----------
    camera_times : array_like of float, shape (n,)
        Moments the camera frames were exposed, unix s (camera clock).
    exposure_windows : array_like of float, shape (m, 2)
        (start, end) of each detector frame, unix s (detector clock); a
        window may overlap its neighbours but no further ones.
    clock_offset : float
        Detector clock minus camera clock, s (``estimate_clock_offset``).
    tolerance : float
        Largest distance outside a window for a frame to be matched to it, s.

    Returns
    -------
    MatchResult
    """
    t = np.asarray(camera_times, dtype=np.float64) + float(clock_offset)
    windows = np.asarray(exposure_windows, dtype=np.float64).reshape(-1, 2)
    n = len(windows)
    detector_frame = np.full(t.shape, -1, np.int64)
    residual = np.full(t.shape, np.nan)
    if n == 0:
        return MatchResult(detector_frame, residual, clock_offset, t.size, 0, 0, float("nan"))
    order = np.argsort(windows[:, 0], kind="stable")
    starts, ends = windows[order, 0], windows[order, 1]
    # The window starting last before t, and its neighbours: the previous one
    # may still be open (overlap), the next one may open within the tolerance.
    last = np.searchsorted(starts, t, side="right") - 1
    candidates = last[:, None] + np.array([-1, 0, 1])
    exists = (candidates >= 0) & (candidates < n)
    candidates = np.clip(candidates, 0, n - 1)
    outside = np.maximum(np.maximum(starts[candidates] - t[:, None], t[:, None] - ends[candidates]), 0.0)
    outside[~exists] = np.inf
    nearest = outside.min(axis=1)
    from_centre = t[:, None] - 0.5 * (starts[candidates] + ends[candidates])
    best = np.argmin(np.where(outside == nearest[:, None], np.abs(from_centre), np.inf), axis=1)
    rows = np.arange(t.size)
    matched = nearest <= tolerance
    detector_frame[matched] = order[candidates[rows, best]][matched]
    residual[matched] = from_centre[rows, best][matched]
    n_before = int(np.count_nonzero(~matched & (t < starts[0])))
    n_after = int(np.count_nonzero(~matched & (t > ends.max())))
    n_gap = int(np.count_nonzero(~matched)) - n_before - n_after
    return MatchResult(detector_frame, residual, clock_offset, n_before, n_after, n_gap, frame_period(windows))
