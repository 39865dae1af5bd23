"""The centring heatmap published on SampleView as a grid result (what the web UI draws), without the web server."""

import base64

import cv2
import numpy as np
import pytest

from mxcube_autocenter.beamline import auto_centring
from mxcube_autocenter.geometry import CENTRING_MOTORS

# Basket 1 position 1 holds a sample the shipped model centres from any start;
# basket 5 position 8 an empty loop it refuses (VirtualSampleChanger seed 1000: seeds 1101 and 1508).
CRYSTAL, EMPTY = "1:01", "5:08"


@pytest.fixture
def autocenter(beamline):
    """The AutoCenter object with the shipped model, the motors at rest and no shapes."""
    beamline.sample_view.clear_all()
    beamline.diffractometer.set_value_motors({name: 0.0 for name in CENTRING_MOTORS}, timeout=30)
    return auto_centring(beamline)


def grids(beamline):
    return beamline.sample_view.get_grids()


def view_at_current_omega(beamline, result):
    """The centring's view taken at the omega the goniometer is at now (the one the UI can show).

    After a success that is the verification view, taken where the sample is now.
    """
    omega = beamline.sample_view.get_positions()["omega"]
    views = result.angles + ([result.verification] if result.verification else [])
    (angle,) = [a for a in views if abs((a.omega - omega + 180) % 360 - 180) < 0.1]
    return angle


def grid_corner(grid) -> tuple:
    return tuple(grid.screen_coord[:2])


def corner_of(heatmap) -> tuple:
    """Top-left corner of a heatmap's first cell on screen, pixels."""
    half = (heatmap.xs[1] - heatmap.xs[0]) / 2
    return heatmap.xs[0] - half, heatmap.ys[0] - half


def decode(result) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(result), np.uint8), cv2.IMREAD_UNCHANGED)


def test_a_centring_publishes_its_heatmap_over_the_crystal(beamline, autocenter, monkeypatch):
    beamline.sample_changer.load(CRYSTAL, wait=True)
    # Without the verification view the fit leaves omega half a turn past the last view: no view to draw.
    monkeypatch.setattr(autocenter.config, "verify_centring", "off")
    result = autocenter.centre(save=False)
    assert result.success, result.message
    assert grids(beamline) == []
    # With omega turned on to the first view's, the heatmap taken there before the move, published again, is drawn
    # where the sample is now.
    beamline.diffractometer.set_value_motors({"omega": result.angles[0].omega + 360.0}, timeout=30)
    autocenter._publish_heatmap(result)
    (grid,) = grids(beamline)
    angle = view_at_current_omega(beamline, result)
    hm = angle.heatmap
    png = decode(grid.get_result())
    assert png.shape == (len(hm.ys), len(hm.xs), 4) == (grid.num_rows, grid.num_cols, 4)
    # The hottest cell is drawn brightest (inferno: bright yellow at the top).
    row, col = np.unravel_index(np.nanargmax(hm.values), hm.values.shape)
    assert png[row, col, :3].sum() == png[..., :3].sum(axis=-1).max()
    # The grid follows the sample: the point chosen in that view is now in the beam.
    ppmm = beamline.diffractometer.get_pixels_per_mm()
    step = hm.xs[1] - hm.xs[0]
    corner_then = np.array(corner_of(hm))
    point_now = np.array(grid.screen_coord[:2]) + np.array(angle.point) - corner_then
    beam = np.array(beamline.beam.get_beam_position_on_screen())
    assert np.linalg.norm(point_now - beam) < 0.03 * ppmm[0]  # 30 um
    assert grid.cell_width == pytest.approx(1000 * step / ppmm[0])

    monkeypatch.setattr(autocenter.config, "verify_centring", "report")
    again = autocenter.centre(save=False)
    assert again.success and len(grids(beamline)) == 1  # the last centring's heatmap only
    # Now the verification view's, taken where the sample is: the beam is its chosen point.
    assert view_at_current_omega(beamline, again) is again.verification
    assert grid_corner(grids(beamline)[0]) == pytest.approx(corner_of(again.verification.heatmap), abs=1.5)


def test_a_refused_centring_shows_the_heatmap_where_the_sample_is_again(beamline, autocenter):
    beamline.sample_changer.load(EMPTY, wait=True)
    start = beamline.sample_view.get_positions()
    result = autocenter.centre(save=False)
    assert not result.success and "no crystal" in result.message
    assert beamline.sample_view.get_positions() == pytest.approx(start, abs=1e-3)
    (grid,) = grids(beamline)
    hm = view_at_current_omega(beamline, result).heatmap
    assert grid.state == "SAVED"  # shown: taken at the omega the sample is back at
    assert grid_corner(grid) == pytest.approx(corner_of(hm), abs=1.5)
    assert decode(grid.get_result()).shape[:2] == hm.values.shape


def test_a_grid_the_user_drew_after_a_mount_is_not_taken_for_the_last_centrings_heatmap(beamline, autocenter):
    # Mounting a sample clears the shapes and restarts their ids (SampleView.clear_all, as mxcubeweb calls it):
    # the user's next grid gets the id the last heatmap had, and replacing that heatmap deleted the user's grid.
    beamline.sample_changer.load(EMPTY, wait=True)
    result = autocenter.centre(save=False)
    (heatmap,) = grids(beamline)
    beamline.sample_view.clear_all()
    mesh = beamline.sample_view.add_shape_from_mpos([beamline.sample_view.get_positions()], (100.0, 100.0), "G")
    assert mesh.id == heatmap.id
    autocenter._publish_heatmap(result)
    assert mesh in grids(beamline) and len(grids(beamline)) == 2


def test_the_grid_shows_the_view_nearest_the_current_omega_within_the_hidden_grid_threshold():
    from mxcube_autocenter.centring.heatmap import Heatmap
    from mxcube_autocenter.centring.procedure import AngleResult
    from mxcube_autocenter.centring.report import nearest_view, omega_gap

    assert omega_gap(350.0, 10.0) == pytest.approx(20.0) and omega_gap(-30.0, 690.0) == pytest.approx(0.0)
    heatmap = Heatmap(np.ones((2, 3)), np.arange(3.0), np.arange(2.0))
    views = [AngleResult(omega=w, loop=None, roi=None, point=(0, 0), score=1.0, crystal_probability=None,
                         heatmap=heatmap) for w in (0.0, 30.0, 60.0)]  # fmt: skip
    assert nearest_view(views, 395.0, max_gap_deg=10.0) is views[1]  # a turn on
    assert nearest_view(views, 100.0, max_gap_deg=10.0) is None  # SampleView would hide it
    views[1].heatmap = Heatmap(np.ones((0, 0)), np.zeros(0), np.zeros(0))
    assert nearest_view(views, 30.0, max_gap_deg=10.0) is None  # nothing to show


def test_the_grids_cells_are_centred_on_the_heatmaps_points():
    from mxcube_autocenter.centring.heatmap import Heatmap
    from mxcube_autocenter.centring.report import grid_cells

    cells = grid_cells(Heatmap(np.ones((2, 3)), np.array([10.0, 16.0, 22.0]), np.array([5.0, 11.0])), (1300.0, 650.0),
                       single_step_px=4.0)  # fmt: skip
    assert cells.corner == (7.0, 2.0) and cells.step == (6.0, 6.0) and (cells.columns, cells.rows) == (3, 2)
    assert cells.cell_um == pytest.approx((6 / 1.3, 6 / 0.65))
    single = grid_cells(Heatmap(np.ones((1, 1)), np.array([10.0]), np.array([5.0])), (1300.0, 1300.0), 4.0)
    assert single.corner == (8.0, 3.0) and single.step == (4.0, 4.0)
