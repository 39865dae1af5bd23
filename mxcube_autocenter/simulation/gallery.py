"""Contact sheets of rendered views, with the ground truth drawn on them."""

from __future__ import annotations

import cv2
import numpy as np

from mxcube_autocenter.geometry import sample_to_screen
from mxcube_autocenter.simulation.diffraction import DiffractionModel
from mxcube_autocenter.simulation.render import Renderer
from mxcube_autocenter.simulation.sample import VirtualSample

RED, YELLOW = (255, 40, 40), (255, 220, 0)


def annotated_view(renderer: Renderer, sample: VirtualSample, model: DiffractionModel, motors, pixels_per_mm, beam_position, best_point=None):
    """A rendered view with crystal outlines (yellow), the beam (red cross) and the best point (red circle)."""
    image = renderer.render(sample, motors, pixels_per_mm, beam_position)
    for hull in model.crystal_outlines(motors, pixels_per_mm, beam_position):
        cv2.polylines(image, [np.round(hull).astype(np.int32)], True, YELLOW, 2, cv2.LINE_AA)
    bx, by = (int(round(v)) for v in beam_position)
    cv2.drawMarker(image, (bx, by), RED, cv2.MARKER_CROSS, 40, 2)
    if best_point is not None:
        xy, _ = sample_to_screen(np.asarray(best_point)[None], motors, pixels_per_mm, beam_position)
        x, y = xy[0]
        cv2.circle(image, (int(round(x)), int(round(y))), 8, RED, 2, cv2.LINE_AA)
    return image


def sample_gallery(sample: VirtualSample, model: DiffractionModel, renderer: Renderer, *, omegas=(0, 45, 90, 135), pixels_per_um=(0.5, 1.3, 3.0), beam_position=(640, 512), tile_width=400):
    """A contact sheet: one row per zoom, one column per omega, the sample centred on its best point.

    Returns
    -------
    (H, W, 3) uint8 ndarray
        RGB image.
    """
    best, _ = model.best_point()
    target = sample.loop_centre if best is None else best
    rows = []
    for scale in pixels_per_um:
        ppmm = (scale * 1000.0, scale * 1000.0)
        tiles = []
        for omega in omegas:
            motors = {"omega": float(omega), "phiy": float(target[0]), "phiz": 0.0, "sampx": float(target[1]), "sampy": float(target[2])}
            view = annotated_view(renderer, sample, model, motors, ppmm, beam_position, best)
            tile = cv2.resize(view, (tile_width, int(tile_width * view.shape[0] / view.shape[1])), interpolation=cv2.INTER_AREA)
            cv2.putText(tile, f"omega {omega} deg, {scale} px/um", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.hstack(tiles))
    return np.vstack(rows)
