"""One 3D best point from the heatmaps of several omega angles.

Each view's heatmap predicts the reflection count with the beam through a
screen point at that omega. A sample point ``(a, u, v)`` projects into every
view (:func:`mxcube_autocenter.geometry.sample_to_screen`), so its expected
count over the rotation is estimated by the mean of the views' predictions
at its projections: the quantity the ground-truth best point maximises.
Choosing the 3D point with the best mean, instead of each view's own peak,
keeps the views on the same crystal and averages the views' errors.

All positions are in the conventions of :mod:`mxcube_autocenter.geometry`;
screen positions in pixels, sample positions in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from mxcube_autocenter.centring.peak import smooth
from mxcube_autocenter.learning.crops import BACKLIGHT_PERCENTILE
from mxcube_autocenter.geometry import sample_to_screen

# Stands for "outside a view's region or mask"; finite so interpolation stays finite.
_EXCLUDED = -1e9
# Mean weight (darkness below the backlight, times the relative prediction) under which
# refine_on_image leaves a view's projection where it is.
_MIN_DARKNESS = 0.01


@dataclass(frozen=True)
class View:
    """One omega angle's heatmap, in screen pixels.

    Attributes
    ----------
    values : (H, W) ndarray
        Predicted reflection counts on the grid.
    xs, ys : (W,), (H,) ndarray
        Screen x of each column and y of each row, evenly spaced, pixels.
    motors : dict
        Centring motor positions the frame was taken at (``omega`` in degrees).
    mask : (H, W) bool ndarray, optional
        Grid points that may hold the best point (e.g. inside the loop).
    """

    values: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    motors: dict
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class FusedPoint:
    """The best sample point over all views.

    Attributes
    ----------
    point : (3,) ndarray
        ``(a, u, v)``, mm.
    score : float
        Mean smoothed prediction over the views at its projections.
    scores : tuple of float
        Each view's smoothed prediction there.
    """

    point: np.ndarray
    score: float
    scores: tuple


def _interp_1d(values, coords, axis):
    """Linear interpolation of ``values`` along ``axis`` at fractional indices ``coords``.

    Indices outside the grid give :data:`_EXCLUDED`: the grid is padded
    with it on both sides, so no separate test is needed.
    """
    pad = [(0, 0)] * values.ndim
    pad[axis] = (1, 1)
    padded = np.pad(values, pad, constant_values=_EXCLUDED)
    c = np.clip(np.asarray(coords, dtype=np.float32) + 1, 0, values.shape[axis] + 1)
    lo = np.minimum(c.astype(np.int32), values.shape[axis])
    w = (c - lo).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(padded, lo, axis=axis) * (1 - w) + np.take(padded, lo + 1, axis=axis) * w


def _prepared(view: View, sigma_cells: float) -> np.ndarray:
    values = smooth(view.values, sigma_cells).astype(np.float32)
    if view.mask is not None and view.mask.any():
        values = np.where(view.mask, values, _EXCLUDED)
    return values


def fuse_views(views, pixels_per_mm, beam_position, step_px=None, sigma_cells=1.0, floor=None, blind=0,
               plateau=None) -> FusedPoint:  # fmt: skip
    """The sample point whose projections have the best mean predicted count.

    Searches a grid of sample points: along the spindle the columns of the
    first view's heatmap, across it a square grid in ``(u, v)`` covering
    every view's rows, both at the heatmap stride. The views may have been
    taken at different translation motor positions (before and after a
    move); the grid follows the first view's.
    With ``floor``, only points predicted at least ``floor`` in every view
    but ``blind`` of them compete (the beam must meet the crystal at every
    angle, but the camera may hardly show it in some), unless there are none.

    Parameters
    ----------
    views : sequence of View
        At least two, at different omegas (not 180 degrees apart only).
    pixels_per_mm : (float, float)
        Horizontal and vertical image scale, pixels per mm.
    beam_position : (float, float)
        Beam on screen, pixels.
    step_px : float, optional
        Grid step, pixels; default: the first view's row spacing.
    sigma_cells : float
        Smoothing of each heatmap before fusing, grid cells (as :func:`.peak.find_peak`).
    floor : float, optional
        Smallest prediction in any view (but ``blind``) of a point that may win.
    blind : int
        Views in which a point may be predicted below ``floor``.
    plateau : float, optional
        Take, instead of the best grid point, the grid point nearest the
        centroid of the connected region around it that scores at least
        ``plateau`` times its score. Predictions are flat across a crystal
        where the true count peaks within a beam width, so the maximum
        wanders over the plateau with the prediction's noise; its middle is
        steadier.

    Returns
    -------
    FusedPoint
    """
    if len(views) < 2:
        raise ValueError(f"fusing needs at least two views, got {len(views)}")
    if not 0 <= blind <= len(views) - 2:
        raise ValueError(f"blind = {blind}: between 0 and {len(views) - 2} with {len(views)} views (two must see a point)")
    motors = views[0].motors
    ppx, ppy = (float(p) for p in pixels_per_mm)
    if step_px is None:
        step_px = abs(views[0].ys[1] - views[0].ys[0]) if len(views[0].ys) > 1 else 1.0
    step = float(step_px)
    xs = np.asarray(views[0].xs, dtype=np.float64)
    # Offsets along each view's vertical from the spindle, mm: every row of every view is covered.
    reach = max(
        np.abs((np.asarray(v.ys, dtype=np.float64) - beam_position[1]) / ppy + v.motors["phiz"]).max()
        + np.hypot(v.motors["sampx"] - motors["sampx"], v.motors["sampy"] - motors["sampy"])
        for v in views
    )
    offsets = np.arange(-reach, reach + step / ppy, step / ppy)
    du, dv = np.meshgrid(offsets, offsets, indexing="ij")
    # The grid is separable: its columns along the spindle (a) project onto a view's x alone, and its
    # (u, v) points onto its y alone, so each view is read column-wise, then row-wise.
    along = np.zeros((len(xs), 3))
    along[:, 0] = motors["phiy"] + (xs - beam_position[0]) / ppx
    across = np.column_stack([np.zeros(du.size), motors["sampx"] + du.ravel(), motors["sampy"] + dv.ravel()])
    per_view = []
    for view in views:
        values = _prepared(view, sigma_cells)
        vx = np.asarray(view.xs, dtype=np.float64)
        vy = np.asarray(view.ys, dtype=np.float64)
        x = sample_to_screen(along, view.motors, pixels_per_mm, beam_position)[0][:, 0]
        columns = _interp_1d(values, (x - vx[0]) / (vx[1] - vx[0]) if len(vx) > 1 else np.zeros_like(x), axis=1)
        y = sample_to_screen(across, view.motors, pixels_per_mm, beam_position)[0][:, 1].reshape(du.shape)
        rows = (y - vy[0]) / (vy[1] - vy[0]) if len(vy) > 1 else np.zeros_like(y)
        score = _interp_1d(columns, rows.ravel(), axis=0).reshape(*du.shape, len(xs))
        score = np.where(np.isfinite(score), score, _EXCLUDED)  # a NaN prediction sees nothing
        per_view.append(score)
    # Summed view by view, not stacked: a copy of every view's scores cost a centring up to 0.4 s.
    total = per_view[0].copy()
    lowest = per_view[0].copy()
    for score in per_view[1:]:
        total += score
        np.minimum(lowest, score, out=lowest)
    total /= len(views)
    if floor is not None:
        # At most ``blind`` views below the floor (the lowest prediction once the ``blind`` lowest views are
        # left out reaches it; counted, not sorted: a partition along the views took half the fusion's time);
        # a point outside any view's region or mask is off the sample, never merely unseen.
        below = np.zeros(total.shape, np.int32)
        for score in per_view:
            below += score < floor
        competing = (below <= blind) & ~outside(lowest)
        if competing.any():
            total = np.where(competing, total, _EXCLUDED)
    i, j, k = np.unravel_index(int(np.argmax(total)), total.shape)
    if plateau is not None:
        i, j, k = _plateau_centre(total, (i, j, k), plateau)
    point = np.array([along[k, 0], *across[np.ravel_multi_index((i, j), du.shape), 1:]])
    return FusedPoint(point=point, score=float(total[i, j, k]), scores=tuple(float(s[i, j, k]) for s in per_view))


def _plateau_centre(total, peak, fraction):
    """The grid point nearest the centroid of the region around ``peak`` within ``fraction`` of its value."""
    if total[peak] <= 0:
        return peak
    labels, _ = ndimage.label(total >= fraction * total[peak])
    members = np.argwhere(labels == labels[peak])
    centroid = members.mean(axis=0)
    return tuple(members[np.argmin(np.sum((members - centroid) ** 2, axis=1))])


def outside(score):
    """Whether a view's score from :func:`fuse_views` marks a point outside that view's region or mask.

    Works on a number or elementwise on an array of them.
    """
    return score <= _EXCLUDED / 2


def value_at(view: View, point_px, sigma_cells=1.0) -> float:
    """A view's smoothed prediction at one screen point, as :func:`fuse_views` scores points.

    Parameters
    ----------
    view : View
    point_px : (float, float)
        Screen point, pixels.
    sigma_cells : float
        Smoothing, grid cells.

    Returns
    -------
    float
        Predicted count (bilinear between grid points), at least 0; off the
        grid or its mask a value that :func:`outside` tells apart. Within
        half a cell inside the mask's edge (an excluded neighbour weighs less
        than half), 0: hugely negative there, such a point falls below any
        ``floor`` in :func:`fuse_views` too, so both read it as not seen.
    """
    values = _prepared(view, sigma_cells)
    xs, ys = np.asarray(view.xs, dtype=np.float64), np.asarray(view.ys, dtype=np.float64)
    col = (point_px[0] - xs[0]) / (xs[1] - xs[0]) if len(xs) > 1 else 0.0
    row = (point_px[1] - ys[0]) / (ys[1] - ys[0]) if len(ys) > 1 else 0.0
    value = float(_interp_1d(_interp_1d(values, [col], axis=1), [row], axis=0)[0, 0])
    # Any weight on an excluded neighbour makes it hugely negative: outside, as the fusion counts it.
    return value if outside(value) else max(value, 0.0)


def triangulate(points, motors_list, pixels_per_mm, beam_position) -> np.ndarray:
    """The sample point that best projects onto given screen points (least squares).

    Parameters
    ----------
    points : sequence of (float, float)
        A screen point per view, pixels.
    motors_list : sequence of dict
        Motor positions of each view (only omega may differ).
    pixels_per_mm, beam_position
        As in :func:`fuse_views`.

    Returns
    -------
    (3,) ndarray
        ``(a, u, v)``, mm.
    """
    ppx, ppy = (float(p) for p in pixels_per_mm)
    m0 = motors_list[0]
    a = m0["phiy"] + np.mean([(p[0] - beam_position[0]) / ppx for p in points])
    omegas = np.radians([m["omega"] for m in motors_list])
    design = np.column_stack([np.sin(omegas), np.cos(omegas)])
    target = np.array([(p[1] - beam_position[1]) / ppy + m["phiz"] for p, m in zip(points, motors_list)])
    (du, dv), *_ = np.linalg.lstsq(design, target, rcond=None)
    return np.array([a, m0["sampx"] + du, m0["sampy"] + dv])


def project(point, motors, pixels_per_mm, beam_position) -> tuple:
    """Screen position, pixels, of a sample point at these motor positions."""
    xy, _ = sample_to_screen(np.asarray(point)[None], motors, pixels_per_mm, beam_position)
    return float(xy[0, 0]), float(xy[0, 1])


def refine_on_image(point, views, images, pixels_per_mm, beam_position, max_um=7.0, radius_um=16.0,
                    iterations=10, background_um=90.0) -> np.ndarray:  # fmt: skip
    """Move a fused point onto the dark mass of the crystal its views predict, by at most ``max_um``.

    The heatmaps see a crop hundreds of um wide, so their plateau lies over
    a crystal only to within several um, while a needle or a plate seen
    edge-on may be 10 um thick. The camera image is sharper: a crystal in
    the backlight is darker than the liquid around it. So the point goes
    where, in every view, the darkness weighted by the view's prediction
    has its centroid within ``radius_um`` of the point's projection (a
    mean shift: project, take each view's centroid, triangulate, repeat).
    The prediction, relative to its value at the fused point and at most 1,
    keeps the point off dark things the model does not take for a crystal
    (a loop's rim, a mesh's bars, anything outside the sample mask). In a
    view that hardly sees the crystal (a plate edge-on, the blind view of
    :func:`fuse_views`) that leaves the darkness nearly alone, and rightly:
    there the crystal is a thin dark line. A point that would leave any
    view's region or sample mask stays where it was.

    Parameters
    ----------
    point : (3,) array_like
        The fused sample point, ``(a, u, v)``, mm.
    views : sequence of View
        The views fused (their heatmaps, masks and motor positions).
    images : sequence of ndarray
        Each view's camera frame, (H, W) grey or (H, W, 3) colour.
    pixels_per_mm, beam_position
        As in :func:`fuse_views`.
    max_um : float
        Largest 3D move from ``point``, um; 0 returns ``point``.
    radius_um : float
        Reach of each view's centroid around the projection, um.
    iterations : int
        Mean-shift steps.
    background_um : float
        Half side of the square around the fused point's projection whose
        brightest pixels (``BACKLIGHT_PERCENTILE``, as the model's input
        normalisation) are taken as the backlight, um.

    Returns
    -------
    (3,) ndarray
        The refined point, mm.
    """
    point = np.asarray(point, dtype=np.float64)
    if max_um <= 0:
        return point
    ppmm = tuple(float(p) for p in pixels_per_mm)
    motors = [view.motors for view in views]
    weights = [_dark_weights(view, image, project(point, view.motors, ppmm, beam_position), ppmm, background_um)
               for view, image in zip(views, images)]
    current = point
    for _ in range(iterations):
        at = [project(current, m, ppmm, beam_position) for m in motors]
        targets = [_centroid(w, a, radius_um * 1e-3, ppmm) for w, a in zip(weights, at)]
        # The move the views ask for, as a difference: triangulate takes the first view's translations
        # for all, so it would not give ``current`` back from its own projections were the views' to differ.
        step = current - point + triangulate(targets, motors, ppmm, beam_position) - triangulate(
            at, motors, ppmm, beam_position)  # fmt: skip
        length = 1000.0 * np.linalg.norm(step)
        current = point + (step * max_um / length if length > max_um else step)
    if any(outside(value_at(view, project(current, view.motors, ppmm, beam_position))) for view in views):
        return point
    return current


def _dark_weights(view: View, image, at, pixels_per_mm, background_um) -> tuple:
    """Darkness times relative prediction on a window around ``at``: ``(weights, xs, ys)``, screen pixels."""
    ppx, ppy = pixels_per_mm
    half_x, half_y = int(np.ceil(background_um * 1e-3 * ppx)), int(np.ceil(background_um * 1e-3 * ppy))
    x, y = int(round(at[0])), int(round(at[1]))
    x0, y0 = max(0, x - half_x), max(0, y - half_y)
    window = np.asarray(image[y0 : max(0, y + half_y + 1), x0 : max(0, x + half_x + 1)], dtype=np.float32)
    if window.size == 0 or len(view.xs) < 2 or len(view.ys) < 2:
        return np.zeros((1, 1), np.float32), np.full((1, 1), float(x0)), np.full((1, 1), float(y0))
    grey = window.mean(axis=2) if window.ndim == 3 else window
    # About 1.5 um: pixel noise and JPEG blocks, not the crystal's edges.
    grey = cv2.GaussianBlur(grey, (0, 0), sigmaX=1.2e-3 * ppx, sigmaY=1.2e-3 * ppy)
    darkness = np.clip(1.0 - grey / max(float(np.percentile(grey, BACKLIGHT_PERCENTILE)), 1e-6), 0.0, None)
    values = _prepared(view, 1.0)
    values = np.where(values > _EXCLUDED / 2, values, 0.0)  # outside the sample: never a crystal
    rows = (y0 + np.arange(grey.shape[0]) - view.ys[0]) / (view.ys[1] - view.ys[0])
    cols = (x0 + np.arange(grey.shape[1]) - view.xs[0]) / (view.xs[1] - view.xs[0])
    r, c = np.meshgrid(rows, cols, indexing="ij")
    predicted = np.clip(ndimage.map_coordinates(values, [r, c], order=1, mode="constant", cval=0.0), 0.0, None)
    own = value_at(view, at)
    scale = max(0.0 if outside(own) else own, 1e-6)
    ys, xs = np.mgrid[y0 : y0 + grey.shape[0], x0 : x0 + grey.shape[1]]
    return darkness * np.clip(predicted / scale, 0.0, 1.0), xs, ys


def _centroid(weights, at, radius_mm, pixels_per_mm) -> tuple:
    """Weighted centroid, screen pixels, of the window's pixels within ``radius_mm`` of ``at``."""
    w, xs, ys = weights
    ppx, ppy = pixels_per_mm
    near = ((xs - at[0]) / ppx) ** 2 + ((ys - at[1]) / ppy) ** 2 <= radius_mm**2
    total = float(w[near].sum())
    # Next to nothing dark the model takes for a crystal: no pull, however lopsided the little there is.
    if total <= _MIN_DARKNESS * near.sum():
        return at
    return float((w[near] * xs[near]).sum() / total), float((w[near] * ys[near]).sum() / total)
