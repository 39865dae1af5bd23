"""Fusing the heatmaps of several omega angles into one sample point."""

import numpy as np
import pytest

from mxcube_autocenter.centring.fusion import View, fuse_views, outside, project, refine_on_image, triangulate, value_at
from mxcube_autocenter.geometry import centred_motors, sample_frame

PPMM = (1300.0, 1300.0)
BEAM = (640.0, 512.0)
MOTORS = {"omega": 30.0, "phiy": 0.05, "phiz": 0.01, "sampx": -0.02, "sampy": 0.03}
XS = np.arange(300.0, 1000.0, 6.0)
YS = np.arange(150.0, 900.0, 6.0)


def blob_view(omega, centres, sigma_px=12.0, heights=None, motors=MOTORS):
    """A heatmap with Gaussian peaks at the projections of ``centres`` (sample points) at ``omega``."""
    motors = dict(motors, omega=omega)
    gx, gy = np.meshgrid(XS, YS)
    values = np.zeros_like(gx)
    for centre, height in zip(centres, heights or [100.0] * len(centres)):
        x, y = project(centre, motors, PPMM, BEAM)
        values += height * np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * sigma_px**2))
    return View(values, XS, YS, motors)


def test_projection_of_a_centred_point_is_the_beam():
    point = np.array([0.1, -0.05, 0.07])
    for omega in (0.0, 37.0, 90.0, 200.0):
        assert project(point, centred_motors(point, omega), PPMM, BEAM) == pytest.approx(BEAM, abs=1e-9)


def test_fused_point_recovers_a_crystal_seen_in_every_view():
    crystal = np.array([0.12, 0.05, -0.08])
    views = [blob_view(w, [crystal]) for w in (30.0, 120.0, 210.0)]
    fused = fuse_views(views, PPMM, BEAM)
    # Within one grid step (6 px = 4.6 um) in every direction.
    assert np.abs(fused.point - crystal).max() * 1000 < 6 / 1.3
    # The peak height after the light smoothing (one 6 px cell) of a 12 px wide peak.
    assert fused.score == pytest.approx(100.0 * 12.0**2 / (12.0**2 + 6.0**2), rel=0.05)
    assert len(fused.scores) == 3


def test_views_taken_before_and_after_a_move_fuse_into_one_point():
    crystal = np.array([0.12, 0.05, -0.08])
    moved = {"phiy": 0.08, "phiz": 0.0, "sampx": 0.01, "sampy": -0.02}
    after = [blob_view(w, [crystal], motors=moved) for w in (75.0, 165.0, 255.0)]
    before = [blob_view(w, [crystal]) for w in (30.0, 120.0, 210.0)]
    for views in (after + before, before + after):
        fused = fuse_views(views, PPMM, BEAM)
        assert np.abs(fused.point - crystal).max() * 1000 < 6 / 1.3
        assert min(fused.scores) > 0.9 * fused.score


def test_fusion_ignores_a_peak_seen_in_one_view_only():
    crystal = np.array([0.12, 0.05, -0.08])
    views = [blob_view(w, [crystal], heights=[60.0]) for w in (30.0, 120.0, 210.0)]
    # A brighter feature in the middle view that the other views do not confirm.
    middle = views[1]
    gx, gy = np.meshgrid(XS, YS)
    glare = 150.0 * np.exp(-((gx - 400.0) ** 2 + (gy - 300.0) ** 2) / (2 * 12.0**2))
    views[1] = View(middle.values + glare, XS, YS, middle.motors)
    fused = fuse_views(views, PPMM, BEAM)
    assert np.abs(fused.point - crystal).max() * 1000 < 6 / 1.3


def test_mask_excludes_points_outside_the_loop():
    crystal, other = np.array([0.12, 0.05, -0.08]), np.array([-0.05, 0.0, 0.02])
    views = []
    for w in (30.0, 120.0, 210.0):
        view = blob_view(w, [crystal, other], heights=[100.0, 50.0])
        x, _ = project(crystal, view.motors, PPMM, BEAM)
        mask = np.broadcast_to(np.abs(XS - x) > 40, view.values.shape)
        views.append(View(view.values, XS, YS, view.motors, mask))
    fused = fuse_views(views, PPMM, BEAM)
    assert np.abs(fused.point - other).max() * 1000 < 6 / 1.3


def test_triangulate_inverts_projection():
    point = np.array([0.02, 0.11, -0.04])
    motors = [dict(MOTORS, omega=w) for w in (10.0, 100.0, 190.0)]
    clicks = [project(point, m, PPMM, BEAM) for m in motors]
    assert triangulate(clicks, motors, PPMM, BEAM) == pytest.approx(point, abs=1e-9)


def test_fusing_one_view_is_refused():
    with pytest.raises(ValueError, match="at least two views"):
        fuse_views([blob_view(0.0, [np.zeros(3)])], PPMM, BEAM)


def test_floor_prefers_a_point_seen_in_every_view():
    crystal = np.array([0.12, 0.05, -0.08])
    views = [blob_view(w, [crystal], heights=[30.0]) for w in (30.0, 120.0, 210.0)]
    # A strong feature in two views whose projections in the third fall on nothing.
    bright = np.array([-0.05, 0.0, 0.02])
    views[:2] = [blob_view(v.motors["omega"], [crystal, bright], heights=[30.0, 200.0]) for v in views[:2]]
    assert np.abs(fuse_views(views, PPMM, BEAM).point - bright).max() * 1000 < 6 / 1.3
    fused = fuse_views(views, PPMM, BEAM, floor=10.0)
    assert np.abs(fused.point - crystal).max() * 1000 < 6 / 1.3
    assert min(fused.scores) >= 10.0


def test_a_blind_view_lets_a_crystal_that_one_view_cannot_see_win():
    crystal = np.array([0.12, 0.05, -0.08])
    ice = np.array([-0.05, 0.0, 0.02])
    omegas = (30.0, 90.0, 150.0)
    # A plate: bright face-on at two angles, nothing edge-on at the third; a faint ice ball seen at all three.
    views = [blob_view(w, [crystal, ice], heights=[h, 20.0]) for w, h in zip(omegas, (100.0, 100.0, 0.0))]
    assert np.abs(fuse_views(views, PPMM, BEAM, floor=10.0).point - ice).max() * 1000 < 6 / 1.3
    fused = fuse_views(views, PPMM, BEAM, floor=10.0, blind=1)
    # The two views that see it place it in 3D.
    assert np.abs(fused.point - crystal).max() * 1000 < 6 / 1.3
    assert sorted(fused.scores)[1] >= 10.0 and min(fused.scores) < 1.0


def test_two_blind_views_of_six_let_a_crystal_seen_in_four_win_not_a_brighter_thing_seen_in_three():
    crystal = np.array([0.12, 0.05, -0.08])
    bright = np.array([-0.05, 0.0, 0.02])
    omegas = [30.0 * k for k in range(6)]
    crystal_heights = [40.0, 40.0, 40.0, 40.0, 0.0, 0.0]
    bright_heights = [200.0, 200.0, 200.0, 0.0, 0.0, 0.0]
    views = [blob_view(w, [crystal, bright], heights=[c, b]) for w, c, b in zip(omegas, crystal_heights, bright_heights)]
    assert np.abs(fuse_views(views, PPMM, BEAM).point - bright).max() * 1000 < 6 / 1.3
    fused = fuse_views(views, PPMM, BEAM, floor=10.0, blind=2)
    assert np.abs(fused.point - crystal).max() * 1000 < 6 / 1.3
    assert sum(score < 10.0 for score in fused.scores) == 2
    # Below the floor in three views, the crystal no longer competes either: the best mean wins again.
    assert np.abs(fuse_views(views, PPMM, BEAM, floor=10.0, blind=1).point - bright).max() * 1000 < 6 / 1.3


def test_a_blind_view_never_lets_a_point_off_the_sample_win():
    ghost = np.array([-0.05, 0.0, 0.02])
    omegas = (30.0, 90.0, 150.0)
    # Something bright in two views whose projection in the third lies outside that view's sample mask.
    views = [blob_view(w, [ghost], heights=[80.0]) for w in omegas]
    x, y = project(ghost, views[2].motors, PPMM, BEAM)
    gx, gy = np.meshgrid(XS, YS)
    views[2] = View(views[2].values, XS, YS, views[2].motors, mask=np.hypot(gx - x, gy - y) > 100)
    fused = fuse_views(views, PPMM, BEAM, floor=10.0, blind=1)
    # No point inside every mask reaches the floor in two views: the best mean there, not the ghost.
    assert not any(outside(s) for s in fused.scores)
    assert sorted(fused.scores)[1] < 10.0


def test_a_nan_prediction_sees_nothing():
    crystal = np.array([0.12, 0.05, -0.08])
    views = [blob_view(w, [crystal], heights=[30.0]) for w in (30.0, 90.0, 150.0)]
    values = views[0].values.copy()
    values[:10, :10] = np.nan  # far from the crystal
    views[0] = View(values, XS, YS, views[0].motors)
    fused = fuse_views(views, PPMM, BEAM, floor=10.0, blind=1)
    assert np.abs(fused.point - crystal).max() * 1000 < 6 / 1.3
    assert np.isfinite(fused.score)


def test_blind_views_leave_two_views():
    views = [blob_view(w, [np.zeros(3)]) for w in (30.0, 90.0, 150.0)]
    with pytest.raises(ValueError, match="blind = 2: between 0 and 1 with 3 views"):
        fuse_views(views, PPMM, BEAM, floor=5.0, blind=2)


def test_value_at_reads_the_smoothed_heatmap_as_the_fusion_scores_points():
    crystal = np.array([0.12, 0.05, -0.08])
    views = [blob_view(w, [crystal]) for w in (30.0, 120.0, 210.0)]
    fused = fuse_views(views, PPMM, BEAM)
    for view, score in zip(views, fused.scores):
        assert value_at(view, project(fused.point, view.motors, PPMM, BEAM)) == pytest.approx(score, rel=1e-3)
    view = views[0]
    assert outside(value_at(view, (XS[0] - 20.0, YS[0])))  # off the grid: off the sample, as the fusion counts it
    mask = np.ones(view.values.shape, bool)
    mask[:, : len(XS) // 2] = False
    masked = View(view.values, XS, YS, view.motors, mask)
    assert outside(value_at(masked, (XS[5], YS[40]))) and value_at(masked, (XS[-5], YS[40])) >= 0.0


def test_plateau_takes_the_middle_of_a_flat_crystal_not_its_brightest_end():
    # A rod along the spindle predicted flat over 80 um, brighter at one end (prediction noise).
    middle = np.array([0.12, 0.05, -0.08])
    rod = [middle + (da, 0.0, 0.0) for da in np.linspace(-0.04, 0.04, 9)]
    heights = [100.0] * 8 + [150.0]
    views = [blob_view(w, rod, heights=heights) for w in (30.0, 120.0, 210.0)]
    brightest = fuse_views(views, PPMM, BEAM)
    centred = fuse_views(views, PPMM, BEAM, plateau=0.8)
    assert np.linalg.norm(brightest.point - middle) * 1000 > 25
    assert np.linalg.norm(centred.point - middle) * 1000 < 8
    assert min(centred.scores) > 0.8 * brightest.score


def test_sample_frame_turns_reversed_readings_and_leaves_the_rest():
    readings = {"omega": 30.0, "phiy": 0.2, "phiz": -0.1, "sampx": 0.05, "sampy": 0.01, "kappa": 10.0}
    frame = sample_frame(readings, {"omega": -1, "phiy": -1, "sampy": 1})
    assert frame == {"omega": -30.0, "phiy": -0.2, "phiz": -0.1, "sampx": 0.05, "sampy": 0.01, "kappa": 10.0}


def rod_image(axis_uv, motors, half_width_um=5.0, shape=(1024, 1280)):
    """A backlit frame with a dark rod along the spindle through sample point ``(0, *axis_uv)``."""
    y = project(np.array([0.0, *axis_uv]), motors, PPMM, BEAM)[1]
    rows = np.arange(shape[0])[:, None]
    dark = np.abs(rows - y) <= half_width_um * PPMM[1] / 1000
    return np.broadcast_to(np.where(dark, 90.0, 200.0), shape).astype(np.float32)


def flat_view(omega, level=50.0, mask=None):
    return View(np.full((len(YS), len(XS)), level), XS, YS, dict(MOTORS, omega=omega), mask)


def refine(point, axis_uv, max_um=7.0, masks=(None, None, None)):
    views = [flat_view(w, mask=m) for w, m in zip((0.0, 60.0, 120.0), masks)]
    images = [rod_image(axis_uv, v.motors) for v in views]
    return refine_on_image(point, views, images, PPMM, BEAM, max_um=max_um)


def across_um(point, axis_uv):
    return 1000 * np.hypot(point[1] - axis_uv[0], point[2] - axis_uv[1])


def test_refinement_moves_a_point_beside_a_thin_rod_onto_it():
    axis_uv = (0.01, -0.02)
    point = np.array([0.1, axis_uv[0] + 0.004, axis_uv[1] - 0.003])  # 5 um beside a 10 um thick rod
    refined = refine(point, axis_uv)
    assert across_um(refined, axis_uv) < 1.0
    assert refined[0] == pytest.approx(point[0], abs=1e-4)  # the rod runs along the spindle: no pull along it


def test_refinement_moves_at_most_max_um():
    axis_uv = (0.01, -0.02)
    point = np.array([0.1, axis_uv[0] + 0.012, axis_uv[1]])  # 12 um away: within reach, beyond max_um
    for max_um in (3.0, 7.0):
        assert 1000 * np.linalg.norm(refine(point, axis_uv, max_um) - point) == pytest.approx(max_um, abs=0.05)
    np.testing.assert_array_equal(refine(point, axis_uv, 0.0), point)


def test_refinement_stays_where_the_image_is_uniform():
    views = [flat_view(w) for w in (0.0, 60.0, 120.0)]
    point = np.array([0.1, 0.01, -0.02])
    refined = refine_on_image(point, views, [np.full((1024, 1280, 3), 180, np.uint8)] * 3, PPMM, BEAM)
    assert 1000 * np.linalg.norm(refined - point) < 0.1


def test_refinement_ignores_dark_things_outside_the_sample_mask():
    axis_uv = (0.01, -0.02)
    point = np.array([0.1, axis_uv[0] + 0.006, axis_uv[1]])
    masks = []
    for w in (0.0, 60.0, 120.0):
        y = project(np.array([0.0, *axis_uv]), dict(MOTORS, omega=w), PPMM, BEAM)[1]
        masks.append(np.broadcast_to(np.abs(YS - y)[:, None] > 15, (len(YS), len(XS))))  # the rod is off the sample
    assert 1000 * np.linalg.norm(refine(point, axis_uv, masks=masks) - point) < 0.5


def test_refinement_does_not_drift_when_the_views_translations_differ():
    """Views taken at slightly different translations (fuse_views allows it): a uniform image moves nothing."""
    views = [View(np.full((len(YS), len(XS)), 50.0), XS, YS, dict(MOTORS, omega=w, phiy=MOTORS["phiy"] + dy))
             for w, dy in ((0.0, 0.0), (60.0, 0.001), (120.0, -0.0005))]  # fmt: skip
    point = np.array([0.1, 0.01, -0.02])
    refined = refine_on_image(point, views, [np.full((1024, 1280), 180, np.uint8)] * 3, PPMM, BEAM)
    assert 1000 * np.linalg.norm(refined - point) < 0.01


def test_refinement_keeps_a_point_off_the_frame_and_one_that_would_leave_a_mask():
    views = [flat_view(w) for w in (0.0, 60.0, 120.0)]
    far = np.array([0.1, 0.9, 0.9])  # projects hundreds of um beyond the frame's edges
    refined = refine_on_image(far, views, [rod_image((0.01, -0.02), v.motors) for v in views], PPMM, BEAM)
    np.testing.assert_array_equal(refined, far)
    # A dark blob 8 um along the spindle pulls the point there in two views; the third view's mask ends
    # 7 px (5 um) beyond the point, so the point would leave it: it stays where it was.
    point = np.array([0.1, 0.01, -0.02])
    blob = point + [0.008, 0.0, 0.0]
    images, masks = [], []
    for w in (0.0, 60.0, 120.0):
        motors = dict(MOTORS, omega=w)
        bx, by = project(blob, motors, PPMM, BEAM)
        yy, xx = np.mgrid[:1024, :1280]
        images.append(np.where((xx - bx) ** 2 + (yy - by) ** 2 <= (5 * 1.3) ** 2, 90, 200).astype(np.uint8))
        masks.append(np.broadcast_to(XS <= project(point, motors, PPMM, BEAM)[0] + 7, (len(YS), len(XS))))
    free = [flat_view(w) for w in (0.0, 60.0, 120.0)]
    assert 1000 * (refine_on_image(point, free, images, PPMM, BEAM)[0] - point[0]) == pytest.approx(7.0, abs=0.05)
    fenced = [flat_view(w, mask=m if k == 1 else None) for k, (w, m) in enumerate(zip((0.0, 60.0, 120.0), masks))]
    np.testing.assert_array_equal(refine_on_image(point, fenced, images, PPMM, BEAM), point)
