"""Showing a centring to people: heatmap overlays (PNG), the web UI's heatmap grid, and a JSON record."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path

import cv2
import numpy as np

from mxcube_autocenter.centring.procedure import AngleResult, CentringResult
from mxcube_autocenter.imagefiles import write_png
from mxcube_autocenter.outputs import write_json_whole


def heatmap_rgb(values) -> np.ndarray:
    """Heatmap values as colours, lowest to highest from black through red to yellow (inferno).

    Parameters
    ----------
    values : (H, W) array_like
        NaN counts as 0.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        RGB image, one pixel per grid point.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    span = float(values.max() - values.min()) or 1.0
    scaled = ((values - values.min()) / span * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def heatmap_png_base64(values, alpha=0.5) -> str:
    """Heatmap values as a base64 PNG (RGBA, uniform opacity ``alpha``), one pixel per grid point.

    The form the MXCuBE web UI draws over a grid shape's cells
    (``SampleView.set_grid_data`` with the beamline's default
    ``mesh_result_format`` PNG).
    """
    rgba = cv2.cvtColor(heatmap_rgb(values), cv2.COLOR_RGB2BGRA)
    rgba[..., 3] = int(round(255 * alpha))
    ok, png = cv2.imencode(".png", rgba)
    if not ok:
        raise ValueError("could not encode the heatmap as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


def omega_gap(a: float, b: float) -> float:
    """Smallest angle between two omega positions, degrees."""
    gap = abs(a - b) % 360.0
    return min(gap, 360.0 - gap)


def nearest_view(views, omega: float, max_gap_deg: float):
    """The view (:class:`AngleResult`) taken nearest ``omega``, degrees; None when it is more than
    ``max_gap_deg`` away (a grid further away in omega is hidden by SampleView, ``hide_grid_threshold``) or has
    no heatmap."""
    angle = min(views, key=lambda a: omega_gap(a.omega, omega), default=None)
    if angle is None or angle.heatmap is None or angle.heatmap.values.size == 0 \
            or omega_gap(angle.omega, omega) > max_gap_deg:  # fmt: skip
        return None
    return angle


@dataclasses.dataclass(frozen=True)
class GridCells:
    """A heatmap's grid as MXCuBE's grid shape takes it: one cell centred on each grid point.

    ``corner`` is the first cell's outer corner and ``step`` the cells' pitch,
    image pixels; ``cell_um`` their size, um; ``columns``, ``rows`` their numbers.
    """

    corner: tuple
    step: tuple
    cell_um: tuple
    columns: int
    rows: int


def grid_cells(heatmap, pixels_per_mm, single_step_px: float) -> GridCells:
    """The cells of ``heatmap`` (``xs``, ``ys``: grid points, pixels) at ``pixels_per_mm`` (x, y).

    ``single_step_px`` is the pitch along an axis with a single grid point.
    """
    step_x = float(heatmap.xs[1] - heatmap.xs[0]) if len(heatmap.xs) > 1 else float(single_step_px)
    step_y = float(heatmap.ys[1] - heatmap.ys[0]) if len(heatmap.ys) > 1 else float(single_step_px)
    return GridCells(
        corner=(float(heatmap.xs[0]) - step_x / 2, float(heatmap.ys[0]) - step_y / 2), step=(step_x, step_y),
        cell_um=(1000 * step_x / pixels_per_mm[0], 1000 * step_y / pixels_per_mm[1]),
        columns=len(heatmap.xs), rows=len(heatmap.ys),
    )


def overlay(angle: AngleResult, beam_position, alpha=0.45, crystal_found=True) -> np.ndarray:
    """The frame with the heatmap over the searched region, the loop tip, the chosen point and the beam.

    With ``crystal_found`` False the heatmap's best point is drawn thin and
    grey, and the label says that no crystal was found there.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        RGB image.
    """
    image = angle.frame.copy()
    hm = angle.heatmap
    if hm is not None and hm.values.size:
        x0, x1 = int(round(hm.xs[0])), int(round(hm.xs[-1])) + 1
        y0, y1 = int(round(hm.ys[0])), int(round(hm.ys[-1])) + 1
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, image.shape[1]), min(y1, image.shape[0])
        if x1 > x0 and y1 > y0:
            colour = cv2.resize(heatmap_rgb(hm.values), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
            image[y0:y1, x0:x1] = cv2.addWeighted(image[y0:y1, x0:x1], 1 - alpha, colour, alpha, 0)
    roi = angle.roi
    cv2.rectangle(image, (roi.x0, roi.y0), (roi.x1 - 1, roi.y1 - 1), (80, 160, 255), 1)
    if angle.loop is not None:
        cv2.drawMarker(image, tuple(int(v) for v in angle.loop), (0, 200, 255), cv2.MARKER_DIAMOND, 18, 2)
    point = tuple(int(round(v)) for v in angle.point)
    cv2.circle(image, point, 10, *(((0, 255, 0), 2) if crystal_found else ((160, 160, 160), 1)), cv2.LINE_AA)
    cv2.drawMarker(image, tuple(int(round(v)) for v in beam_position), (255, 0, 0), cv2.MARKER_CROSS, 30, 2)
    # An image file has no omega (NaN)
    label = ("" if np.isnan(angle.omega) else f"omega {angle.omega:.1f}  ") + f"score {angle.score:.1f}"
    if not crystal_found:
        label += "  no crystal found"
    if angle.crystal_probability is not None:
        label += f"  p(crystal) {angle.crystal_probability:.2f}"
    if angle.ice_probability is not None:
        label += f"  p(ice) {angle.ice_probability:.2f}"
    cv2.putText(image, label, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
    return image


def record(result: CentringResult) -> dict:
    """The JSON-able record of a centring (no images)."""
    out = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in ("angles", "verification")}
    out["angles"] = [_angle_record(angle) for angle in result.angles]
    out["verification"] = None if result.verification is None else _angle_record(result.verification)
    return json.loads(json.dumps(out, default=float))


def _angle_record(angle) -> dict:
    fields = {f.name: getattr(angle, f.name) for f in dataclasses.fields(angle) if f.name not in ("heatmap", "mask", "frame")}
    fields["roi"] = dataclasses.asdict(angle.roi)
    return fields


def save(result: CentringResult, directory, beam_position) -> Path:
    """Write ``centring_<time>_omega<angle>.png`` overlays (``centring_<time>_verification_omega<angle>.png`` for
    the verification view) and ``centring_<time>.json``; returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S") + f"_{int(time.time() * 1000) % 1000:03d}"
    views = [(angle, "") for angle in result.angles]
    if result.verification is not None:
        views.append((result.verification, "_verification"))
    for angle, kind in views:
        png = directory / f"centring_{stamp}{kind}_omega{angle.omega:.0f}.png"
        write_png(png, overlay(angle, beam_position))
    path = directory / f"centring_{stamp}.json"
    # Written last and whole (a rename): whoever sees the record finds it complete, with its overlays.
    write_json_whole(path, record(result), indent=2)
    return path
