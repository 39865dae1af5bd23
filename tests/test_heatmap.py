"""Dense heatmaps: the fast path equals cropping every grid point and calling the model."""

import mmap
from pathlib import Path

import keras
import numpy as np
import pytest

from mxcube_autocenter.centring.heatmap import (
    DenseEvaluator,
    Heatmap,
    HeatmapError,
    dense_heatmap,
    prepare_region,
    reference_heatmap,
    symmetric_heatmap,
    within_frame,
)
from mxcube_autocenter.centring.loop import Roi, consistent_tips, extend_tip, find_loop, loop_roi, sample_mask
from mxcube_autocenter.centring.peak import find_peak
from mxcube_autocenter.centring.predictor import Predictor, PredictorError, load_predictor
from mxcube_autocenter.geometry import sample_to_screen
from mxcube_autocenter.simulation.render import Look, Renderer
from mxcube_autocenter.simulation.sample import make_sample

PPMM = (1300.0, 1300.0)


def frame_of(seed=3, omega=0.0, pin_side="left"):
    sample = make_sample(seed, n_crystals=1, pin_side=pin_side)
    motors = {"omega": omega, "phiy": float(sample.loop_centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
    return Renderer().render(sample, motors, PPMM, (640, 512))


def standardise(region):
    region = region.astype(np.float32)
    return (region - region.mean()) / (region.std() + 1e-6)


def assert_fast_equals_reference(model, frame, roi, crop_px, stride_px, every=7):
    evaluator = DenseEvaluator(model)
    region, origin, scale = prepare_region(frame, roi, crop_px, evaluator.input_size, standardise)
    fast = dense_heatmap(evaluator, region, origin, scale, stride_px)
    assert np.all(np.diff(fast.xs) <= stride_px + 1e-9) and np.all(np.diff(fast.ys) <= stride_px + 1e-9)
    # Every 7th row and column of the grid (about 1/50 of it) through the slow path.
    ref = reference_heatmap(model, region, origin, scale, evaluator.input_size, fast.xs[::every], fast.ys[::every])
    np.testing.assert_allclose(ref.values, fast.values[::every, ::every], atol=1e-5, rtol=1e-4)
    assert fast.xs[0] < roi.x0 + stride_px and fast.xs[-1] > roi.x1 - stride_px
    # Points off the region's pixels are evaluated at the nearest crop, and placed there (an evaluation report
    # drew them up to half a model pixel from the crop they came from).
    shifted = reference_heatmap(model, region, origin, scale, evaluator.input_size, fast.xs[::every] + 0.3 / scale,
                                fast.ys[::every] - 0.3 / scale)  # fmt: skip
    np.testing.assert_allclose(shifted.xs, fast.xs[::every])
    np.testing.assert_allclose(shifted.ys, fast.ys[::every])
    np.testing.assert_array_equal(shifted.values, ref.values)
    return fast


def test_a_pooling_models_heatmap_of_shifted_inputs_reaches_the_far_edges_of_the_roi():
    # Each shift's outputs were cut to the last shift's count: fcn_gap left 18 px of the roi's right edge unscored.
    from mxcube_autocenter.learning import architectures

    keras.utils.set_random_seed(0)
    model = architectures.build("fcn_gap", (128, 128, 3))
    assert len(DenseEvaluator(model).twin(6.0 * 128 / 312.0)[2]) > 1  # shifted inputs
    assert_fast_equals_reference(model, frame_of(), Roi(300, 200, 1210, 980), 312.0, 6.0)


def test_trained_fcn_dense_heatmap_equals_crop_by_crop(tiny_model):
    predictor = load_predictor(tiny_model)
    frame = frame_of()
    roi = Roi(500, 300, 900, 700)
    fast = assert_fast_equals_reference(predictor.model, frame, roi, 156.0, 6.0)
    counts = predictor.predict(frame, roi, PPMM, 6.0)
    # A model whose grid is subdivided in one pass keeps every grid point when averaged over turns.
    turned = predictor.predict(frame, roi, PPMM, 6.0, "dihedral")
    np.testing.assert_array_equal(turned.xs, fast.xs)
    np.testing.assert_array_equal(turned.ys, fast.ys)
    assert np.all(np.isfinite(counts.values)) and counts.values.min() >= -1e-3
    assert predictor.crystal_probability(frame, (700.0, 500.0), roi, PPMM) is None


def test_pooling_and_dense_head_model_equals_crop_by_crop():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Dropout(0.25),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    assert_fast_equals_reference(model, frame_of(), Roi(560, 420, 720, 600), 40.0, 3.0, every=5)


def test_each_heatmap_point_is_the_middle_of_the_crop_it_evaluates():
    # A heatmap value belongs at (xs, ys), where training put its label: the crop's middle, the point every
    # flip and turn of the crop keeps (crops.crop_uint8). A disc centred on a grid point is then the same crop
    # turned; on crop pixel size / 2 it was half a model pixel off (0.94 um of a 240 um crop at 128 px).
    from mxcube_autocenter.learning.augment import dihedral_np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(2, 4, strides=4), keras.layers.Flatten(),
                              keras.layers.Dense(1)])  # fmt: skip
    centre = (300, 200)
    ys, xs = np.mgrid[0:400, 0:600]
    disc = np.where((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= 9**2, 30, 210).astype(np.uint8)
    frame = np.repeat(disc[..., None], 3, axis=-1)
    roi = Roi(centre[0] - 20, centre[1] - 10, centre[0] + 20, centre[1] + 30)
    region, origin, scale = prepare_region(frame, roi, 40.0, 32, standardise)
    heatmap = dense_heatmap(DenseEvaluator(model), region, origin, scale, 5.0)
    col, row = int(np.argmin(np.abs(heatmap.xs - centre[0]))), int(np.argmin(np.abs(heatmap.ys - centre[1])))
    assert heatmap.xs[col] == pytest.approx(centre[0]) and heatmap.ys[row] == pytest.approx(centre[1])

    def asymmetry(batch, training=False):  # a "model": how far each crop is from its turns
        return np.array([[max(np.abs(dihedral_np(c, k) - c).max() for k in range(8))] for c in np.asarray(batch)])

    probe = reference_heatmap(asymmetry, region, origin, scale, 32, heatmap.xs[[col]], heatmap.ys[[row]])
    assert probe.values[0, 0] < 1e-4
    # The fast path evaluates that very crop.
    ref = reference_heatmap(model, region, origin, scale, 32, heatmap.xs[[col]], heatmap.ys[[row]])
    assert ref.values[0, 0] == pytest.approx(heatmap.values[row, col], abs=1e-5)


@pytest.mark.parametrize("symmetries", ["flips", "dihedral"])
def test_symmetric_heatmap_is_the_mean_over_the_turned_crops(symmetries):
    # A pooling model evaluates its grid on shifted inputs; the symmetric grid must keep them aligned.
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ])
    evaluator = DenseEvaluator(model)
    roi = Roi(560, 420, 730, 580)
    region, origin, scale = prepare_region(frame_of(), roi, 40.0, 32, standardise)
    assert len(evaluator.twin(1.5 * scale)[2]) == 4  # four shifted inputs per axis
    plain = dense_heatmap(evaluator, region, origin, scale, 1.5)
    # Every shift's outputs were cut to the last shift's count: the grid stopped short of the roi's far edges.
    assert plain.xs[-1] > roi.x1 - 1.5 and plain.ys[-1] > roi.y1 - 1.5
    turned = symmetric_heatmap(evaluator, region, origin, scale, 1.5, symmetries)
    np.testing.assert_array_equal(turned.xs, plain.xs)  # the same grid
    np.testing.assert_array_equal(turned.ys, plain.ys)
    ref = reference_heatmap(model, region, origin, scale, 32, turned.xs[::7], turned.ys[::7], symmetries=symmetries)
    np.testing.assert_allclose(ref.values, turned.values[::7, ::7], atol=1e-5, rtol=1e-4)
    assert np.abs(turned.values - plain.values).max() > 1e-3
    with pytest.raises(HeatmapError, match="'dihedral', 'flips', 'none'"):
        symmetric_heatmap(evaluator, region, origin, scale, 1.5, "rotations")
    # A grid step of 6 px is split into shifts that divide it (not 8 of them, which repeat grid points).
    uneven = keras.Sequential([keras.Input((30, 30, 3)), keras.layers.Conv2D(4, 3, strides=3),
                               keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(1)])
    region, origin, scale = prepare_region(frame_of(), roi, 40.0, 30, standardise)
    evaluator = DenseEvaluator(uneven)
    assert evaluator.step == 6 and evaluator.twin(1.5 * scale)[2] == [0, 1, 2, 3, 4, 5]
    turned = symmetric_heatmap(evaluator, region, origin, scale, 1.5, symmetries)
    assert np.all(np.diff(turned.xs) > 0) and np.allclose(np.diff(turned.xs), turned.xs[1] - turned.xs[0])
    ref = reference_heatmap(uneven, region, origin, scale, 30, turned.xs[::7], turned.ys[::7], symmetries=symmetries)
    np.testing.assert_allclose(ref.values, turned.values[::7, ::7], atol=1e-5, rtol=1e-4)


def test_same_padding_is_refused():
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, padding="same"), keras.layers.Flatten(), keras.layers.Dense(1)])
    with pytest.raises(HeatmapError, match="'valid'"):
        DenseEvaluator(model)


def test_missing_or_wrong_model_is_refused(tmp_path, tiny_model):
    with pytest.raises(PredictorError, match="no such model file"):
        load_predictor(tmp_path / "nothing.keras")
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a model")
    with pytest.raises(PredictorError, match=r"garbage.keras.*\(the centring_model property"):
        load_predictor(garbage)
    with pytest.raises(PredictorError, match="not a crystal/empty classifier"):
        load_predictor(tiny_model, tiny_model)
    # A classifier's file named its file alone: which property was wrong went unsaid.
    with pytest.raises(PredictorError, match=r"classifier.keras: no such model file.*\(the centring_classifier "
                                             r"property; --classifier on the command line\)"):  # fmt: skip
        load_predictor(tiny_model, tmp_path / "classifier.keras")


def test_the_ice_network_and_the_classifier_are_not_taken_for_each_other(tmp_path, tiny_model, tiny_classifier,
                                                                         tiny_ice_model):  # fmt: skip
    # Both are classifiers: an ice network in the classifier's place would call every ice ball a crystal.
    with pytest.raises(PredictorError, match=r"an ice network, not a crystal/empty classifier: give it as the "
                                             r"centring_ice_model property"):  # fmt: skip
        load_predictor(tiny_model, tiny_ice_model)
    with pytest.raises(PredictorError, match=r"not an ice network: .*--label on_ice.*\(the centring_ice_model "
                                             r"property; --ice-model on the command line\)"):  # fmt: skip
        load_predictor(tiny_model, None, tiny_classifier)
    with pytest.raises(PredictorError, match=r"ice.keras: no such model file.*\(the centring_ice_model property"):
        load_predictor(tiny_model, None, tmp_path / "ice.keras")
    predictor = Predictor(tiny_model, tiny_classifier, tiny_ice_model)
    assert predictor.describe().endswith(f"classifier model.keras, ice network {Path(tiny_ice_model).name}")
    frame, roi = frame_of(), Roi(500, 300, 900, 700)
    assert 0.0 <= predictor.ice_probability(frame, (700.0, 500.0), roi, PPMM) <= 1.0
    assert Predictor(tiny_model).ice_probability(frame, (700.0, 500.0), roi, PPMM) is None


def test_heatmap_command_gives_the_ice_networks_word_on_the_best_point(tmp_path, capsys, tiny_model, tiny_ice_model):
    import json

    import cv2

    from mxcube_autocenter.cli import main

    image = str(tmp_path / "crystal.png")
    cv2.imwrite(image, cv2.cvtColor(frame_of(1), cv2.COLOR_RGB2BGR))
    assert main(["heatmap", image, "--pixels-per-mm", str(PPMM[0]), "--json", "--model", str(tiny_model),
                 "--ice-model", str(tiny_ice_model)]) == 0  # fmt: skip
    assert 0.0 <= json.loads(capsys.readouterr().out)["ice_probability"] <= 1.0


def test_peak_is_the_smoothed_maximum():
    values = np.zeros((20, 30), np.float32)
    values[5:8, 20:23] = 10.0
    values[15, 3] = 40.0  # a single hot cell
    hm = Heatmap(values, xs=np.arange(30) * 4.0, ys=np.arange(20) * 4.0)
    peak = find_peak(hm, sigma_cells=1.5)
    assert (peak.row, peak.col) == (6, 21)
    assert (peak.x, peak.y) == (84.0, 24.0)
    assert find_peak(hm, sigma_cells=0).col == 3
    # An overflowed prediction (inf) is no number, as NaN: no crystal, not the largest one.
    values[15, 3] = np.inf
    values[2, 2] = np.nan
    peak = find_peak(hm, sigma_cells=1.5)
    assert (peak.row, peak.col) == (6, 21) and np.isfinite(peak.score)
    values[:] = np.nan
    assert np.isfinite(find_peak(Heatmap(values, hm.xs, hm.ys)).x)


def test_the_side_a_pin_enters_from_is_told_where_it_is_clear():
    from mxcube_autocenter.centring.loop import pin_entry_side
    from mxcube_autocenter.imagefiles import read_rgb

    for seed in range(4):
        for pin_side in ("left", "right"):
            assert pin_entry_side(frame_of(seed, omega=90.0 * seed, pin_side=pin_side)) == pin_side
    # Real photographs, whose pins enter from the right (in two of them lit too brightly to darken the edge).
    real = sorted((Path(__file__).parent / "data" / "real_oav").glob("*.png"))
    sides = [pin_entry_side(read_rgb(path)) for path in real]
    assert sides.count("right") >= 3 and "left" not in sides
    assert pin_entry_side(np.full((480, 640, 3), 200, np.uint8)) is None


@pytest.mark.parametrize("pin_side", ["left", "right"])
def test_lucid_finds_the_loop_tip_on_either_side(pin_side):
    sample = make_sample(3, n_crystals=1, pin_side=pin_side)
    tip_index = np.argmax(sample.loop_outline[:, 0]) if pin_side == "left" else np.argmin(sample.loop_outline[:, 0])
    frame = frame_of(pin_side=pin_side)
    tip = find_loop(frame, pin_side)
    assert tip is not None
    expected_x = 640 + PPMM[0] * (sample.loop_outline[tip_index, 0] - sample.loop_centre[0])
    assert abs(tip[0] - expected_x) < 60
    roi = loop_roi(tip, frame.shape, PPMM, width_um=500, height_um=400, pin_side=pin_side)
    assert roi.width > 0 and roi.height > 0
    assert (roi.x0 < tip[0] < roi.x1)


def test_loop_tips_short_of_the_farthest_along_the_spindle_move_out_to_it():
    # 1.3 px/um: 100 um is 130 px. Two views of three stopped on the stem, 289 px short of the third.
    tips = [(545.0, 559.0), (834.0, 706.0), (539.0, 441.0)]
    assert consistent_tips(tips, PPMM) == [(834.0, 559.0), (834.0, 706.0), (834.0, 441.0)]
    # Tips within 100 um of the farthest stay where lucid3 found them.
    assert consistent_tips([(873, 640), (889, 373), (856, 370)], PPMM) == [(873, 640), (889, 373), (856, 370)]
    # A pin from the right: the farthest tip is the leftmost.
    mirrored = [(1280 - x, y) for x, y in tips]
    assert consistent_tips(mirrored, PPMM, "right") == [(446.0, 559.0), (446.0, 706.0), (446.0, 441.0)]


@pytest.mark.parametrize("pin_side", ["left", "right"])
def test_a_faint_loop_past_where_lucid_stops_is_followed_to_its_tip(pin_side):
    # A defocused mesh loop of the demo's held-out samples (seed50008): lucid3 stops where the stem meets it.
    look = Look(tint=(0.84, 0.98, 0.81), brightness=0.644, vignetting=0.586, hotspot=(0.665, 0.385, 0.054),
                flare=0.089, blur_px=1.93, numerical_aperture=0.0755, noise=6.1, jpeg_quality=66, front_light=0.506,
                rim_darkness=0.688, film_opacity=0.299, crystal_opacity=0.311)  # fmt: skip
    sample = make_sample(50008, loop_kinds=("mesh",), n_crystals=2, pin_side=pin_side)
    motors = {"omega": 399.85, "phiy": float(sample.loop_centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
    frame = Renderer(look=look).render(sample, motors, PPMM, (640, 512))
    outline, _ = sample_to_screen(sample.loop_outline, motors, PPMM, (640, 512))
    loop_tip_x = outline[:, 0].max() if pin_side == "left" else outline[:, 0].min()
    lucid = find_loop(frame, pin_side)
    assert abs(lucid[0] - loop_tip_x) > 400  # on the stem, 0.3 mm and more short of the loop's tip
    tip = extend_tip(frame, lucid, PPMM, pin_side)
    assert 0 < (loop_tip_x - tip[0] if pin_side == "left" else tip[0] - loop_tip_x) < 40  # just inside the rim
    assert abs(tip[1] - outline[np.argmin(np.abs(outline[:, 0] - loop_tip_x)), 1]) < 60
    # The tip lies on the loop, so the sample mask, grown from the tip, finds the loop there.
    roi = loop_roi(tip, frame.shape, PPMM, pin_side=pin_side)
    assert not sample_mask(frame, roi, tip, PPMM, pin_side).all()
    # An object that runs on out of the image has no known end: lucid3's tip stays.
    cut = frame[:, : int(loop_tip_x) - 60] if pin_side == "left" else frame[:, int(loop_tip_x) + 60 :]
    lucid_cut = (lucid[0], lucid[1]) if pin_side == "left" else (lucid[0] - (int(loop_tip_x) + 60), lucid[1])
    assert extend_tip(np.ascontiguousarray(cut), lucid_cut, PPMM, pin_side) == lucid_cut
    # Where lucid3 found the tip, it stays.
    well_lit = frame_of(pin_side=pin_side)
    found = find_loop(well_lit, pin_side)
    assert extend_tip(well_lit, found, PPMM, pin_side) == found


def test_no_loop_in_an_empty_field():
    assert find_loop(Renderer().render_empty()) is None


@pytest.mark.parametrize("shape", [(16, 200), (200, 16), (200, 24), (31, 31)])
def test_no_loop_in_a_frame_too_small_to_hold_one_rather_than_lucid3s_error(shape):
    # lucid3 raised OpenCV's or its own error on these: `heatmap` on a thumbnail ended the whole batch.
    frame = np.full((*shape, 3), 200, np.uint8)
    frame[shape[0] // 3: 2 * shape[0] // 3, : shape[1] // 2] = 30
    assert find_loop(frame) is None and find_loop(frame, "right") is None


def test_sample_mask_covers_the_loop_and_not_the_empty_field():
    sample = make_sample(3, n_crystals=1)
    frame = frame_of()
    tip = find_loop(frame)
    roi = loop_roi(tip, frame.shape, PPMM)
    mask = sample_mask(frame, roi, tip, PPMM)
    crystal = sample.crystals[0].centre
    x = 640 + PPMM[0] * (crystal[0] - sample.loop_centre[0]) - roi.x0
    assert mask.shape == (roi.height, roi.width)
    assert 0.02 < mask.mean() < 0.6  # the loop, not the whole region
    assert mask[:, int(x)].any()  # the crystal's column is inside the sample
    assert not mask[0, -1] and not mask[-1, -1]  # far corners are empty field


@pytest.mark.parametrize("pin_side", ["left", "right"])
def test_the_pin_and_what_lies_behind_it_are_left_out_of_the_sample_mask(pin_side):
    sample = make_sample(8, n_crystals=1, pin_side=pin_side)
    towards_tip = 1.0 if pin_side == "left" else -1.0
    phiy = float(sample.loop_centre[0]) - towards_tip * 0.2  # the pin's end 0.8 mm from the beam, in the region
    motors = {"omega": 0.0, "phiy": phiy, "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
    frame = Renderer().render(sample, motors, PPMM, (640, 512))
    tip = find_loop(frame, pin_side)
    roi = loop_roi(tip, frame.shape, PPMM, width_um=1000.0, pin_side=pin_side)
    pin_end = 640 + PPMM[0] * (sample.pin_start - phiy)
    assert roi.x0 < pin_end < roi.x1
    cols = np.nonzero(sample_mask(frame, roi, tip, PPMM, pin_side).any(axis=0))[0] + roi.x0
    rough = 15  # px: the pin's glued end is rough on the scale of ~10 um
    if pin_side == "left":
        assert pin_end < cols.min() < pin_end + rough and cols.max() > tip[0] - 10
    else:
        assert pin_end - rough < cols.max() < pin_end and cols.min() < tip[0] + 10


def test_a_large_dark_crystal_is_not_taken_for_the_pin():
    # The verification view of a demo held-out sample (seed 4's seed54018, a 117 um plate, dim light): the plate
    # is opaque and thicker than the pin's 120 um, and the sample mask used to end at its far side.
    from mxcube_autocenter.simulation.diffraction import DiffractionModel
    from mxcube_autocenter.simulation.render import random_look

    sample = make_sample(54018, n_crystals=1)
    motors = {"omega": 408.90, "phiy": 0.04802, "phiz": 0.0, "sampx": -0.07139, "sampy": 0.03270}
    frame = Renderer(look=random_look(np.random.default_rng([4, 54018])), seed=54018).render(sample, motors, PPMM,
                                                                                            (640, 512))  # fmt: skip
    tip = (920.0, 584.0)
    roi = loop_roi(tip, frame.shape, PPMM)
    mask = sample_mask(frame, roi, tip, PPMM)
    (hull,) = DiffractionModel(sample).crystal_outlines(motors, PPMM, (640, 512))
    xs, ys = hull[:, 0, 0], hull[:, 0, 1]
    assert xs.max() - xs.min() > 120 * PPMM[0] / 1000  # wider than the pin's 120 um
    assert mask[512 - roi.y0, 640 - roi.x0]  # the beam, on the plate
    assert mask[int(ys.mean()) - roi.y0, int(xs.min()) - roi.x0 + 10]  # and the plate's side towards the pin


def test_a_large_dark_crystal_in_a_loop_larger_than_the_region_is_not_taken_for_the_pin():
    # The loop's film runs on past the region's edge on the pin side, so the thick dark object the crystal
    # lies in reaches that edge as a pin's does; the crystal itself stays far from it.
    import cv2

    grey = np.full((1024, 1280), 200, np.uint8)
    cv2.ellipse(grey, (625, 512), (475, 250), 0, 0, 360, 160, -1)  # the loop with its film, 730 um long
    cv2.line(grey, (150, 512), (0, 512), 120, 20)  # the stem
    cv2.rectangle(grey, (600, 430), (800, 630), 40, -1)  # a 150 um crystal, opaque
    frame = np.dstack([grey] * 3)
    tip = (1100.0, 512.0)
    roi = loop_roi(tip, frame.shape, PPMM)
    assert roi.x0 > 150  # the loop, not the stem, runs out of the region
    mask = sample_mask(frame, roi, tip, PPMM)
    assert mask[512 - roi.y0, 700 - roi.x0] and mask[512 - roi.y0, 300 - roi.x0]


def test_within_frame_keeps_the_grid_points_clear_of_the_frame_edge():
    grid = Heatmap(values=np.zeros((5, 7)), xs=np.array([-10.0, 0, 10, 50, 90, 100, 110]),
                   ys=np.array([0.0, 10, 40, 70, 80]))  # fmt: skip
    inside = within_frame(grid, (80, 100, 3), 10.0)
    assert inside.shape == (5, 7)
    np.testing.assert_array_equal(inside.any(axis=0), [False, False, True, True, True, False, False])
    np.testing.assert_array_equal(inside.any(axis=1), [False, True, True, True, False])
    assert within_frame(grid, (80, 100, 3), 0.0).sum() == 5 * 5  # x in [0, 100], y in [0, 80]


def test_no_candidate_point_lies_where_the_crop_overhangs_the_frame():
    from mxcube_autocenter.centring.procedure import EDGE_MARGIN_CROPS, CentringSettings, analyse_frame
    from mxcube_autocenter.config import AutoCenterConfig

    frame = frame_of()
    tip = find_loop(frame)
    predictor = load_predictor()
    angle = analyse_frame(predictor, frame, tip, PPMM, CentringSettings.from_config(AutoCenterConfig()))
    margin = EDGE_MARGIN_CROPS * predictor.crop_px(PPMM)[0]
    assert angle.roi.x0 == 0  # the searched region reaches the frame's left edge, the stem runs off it
    assert not angle.mask[:, angle.heatmap.xs < margin].any()
    assert angle.mask[:, angle.heatmap.xs >= margin].any()
    assert angle.point[0] >= margin


def test_a_sample_wholly_near_the_frame_edge_keeps_its_sample_mask():
    from mxcube_autocenter.centring.procedure import CentringSettings, analyse_frame
    from mxcube_autocenter.config import AutoCenterConfig

    # A frame smaller than two edge margins: every grid point lies in the edge band.
    sample = make_sample(3, n_crystals=1)
    motors = {"omega": 0.0, "phiy": float(sample.loop_centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
    frame = Renderer(240, 150).render(sample, motors, PPMM, (120, 75))
    angle = analyse_frame(load_predictor(), frame, (200.0, 75.0), PPMM, CentringSettings.from_config(AutoCenterConfig()))
    assert angle.mask.any() and not angle.mask.all()
    assert angle.mask[np.argmin(np.abs(angle.heatmap.ys - angle.point[1])), np.argmin(np.abs(angle.heatmap.xs - angle.point[0]))]


def test_non_square_pixels_give_the_heatmap_of_square_ones():
    # A camera whose pixels are 10 % shorter than wide (analogue PAL cameras, uneven binning): the model's
    # crop must stay 240 um square on the sample, as in training, not 240 um wide and 267 um tall.
    import cv2

    from mxcube_autocenter.centring.loop import Roi
    from mxcube_autocenter.centring.peak import find_peak
    from mxcube_autocenter.centring.predictor import load_predictor

    predictor = load_predictor()
    frame = frame_of()
    square = find_peak(predictor.predict(frame, Roi(400, 300, 900, 700), PPMM, 8.0))
    fy = 0.9
    squashed = cv2.resize(frame, (frame.shape[1], round(frame.shape[0] * fy)), interpolation=cv2.INTER_AREA)
    short = find_peak(predictor.predict(squashed, Roi(400, 270, 900, 630), (PPMM[0], PPMM[1] * fy), 8.0))
    assert abs(short.x - square.x) / PPMM[0] * 1000 < 10 and abs(short.y / fy - square.y) / PPMM[1] * 1000 < 10


def test_added_memory_counts_the_peak_of_the_call_not_earlier_peaks_of_the_process():
    from mxcube_autocenter.centring.benchmark import added_memory_mb

    def touch(mb):
        # Pages fresh from the kernel: after other tests the allocator may hand out freed memory it kept
        # resident, which adds nothing to the process (the full suite once measured 0 MB for 80 that way).
        with mmap.mmap(-1, mb * 2**20) as block:
            for offset in range(0, len(block), mmap.PAGESIZE):
                block[offset] = 1

    assert added_memory_mb(lambda: touch(80)) >= 60
    # The 80 MB peak above is over: a small call reports its own few MB.
    assert added_memory_mb(lambda: touch(1)) < 20


def test_heatmap_benchmark_leaves_the_reference_models_first_call_out_of_its_time():
    # The fast path is timed after a warm-up call; the reference's per-crop time,
    # scaled to the whole grid, must not carry the model's one-time first-call cost.
    import time

    from mxcube_autocenter.centring.benchmark import heatmap_figures

    class FirstCallSlow:
        calls = 0

        def __call__(self, crops, training=False):
            self.calls += 1
            if self.calls == 1:
                time.sleep(1.0)
            return np.zeros((len(crops), 1), np.float32)

    predictor = load_predictor()
    predictor.model = FirstCallSlow()  # the dense path keeps the real model's twin
    figures = heatmap_figures(predictor, frame_of(), quick=True)
    # One call of 256 crops, sleep included: under 260 crops/s; the crops alone: thousands.
    assert figures["heatmap_reference_crops_per_s"] > 1000


def test_lucid_benchmark_leaves_lucid3s_one_time_set_up_out_of_its_time(monkeypatch):
    import time

    from mxcube_autocenter.centring import benchmark

    calls = []

    def first_call_slow(frame):
        calls.append(frame)
        if len(calls) == 1:
            time.sleep(0.5)

    monkeypatch.setattr(benchmark, "find_loop", first_call_slow)
    assert benchmark.lucid_s(np.zeros((8, 8, 3), np.uint8), runs=3) < 0.05


def test_fusion_benchmark_times_the_default_views_of_a_virtual_sample():
    from mxcube_autocenter.centring import benchmark
    from mxcube_autocenter.centring.predictor import load_predictor
    from mxcube_autocenter.simulation.render import Renderer
    from mxcube_autocenter.simulation.sample import make_sample

    sample = make_sample(3, n_crystals=1)
    motors = {"omega": 30.0, "phiy": float(sample.loop_centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
    seconds = benchmark.fusion_s(load_predictor(), sample, motors, Renderer(), runs=1)
    assert 0 < seconds < 30


def test_added_memory_still_makes_the_call_where_the_peak_cannot_be_reset(monkeypatch):
    # heatmap_figures relies on the call as its warm-up; macOS has no /proc, some sandboxes refuse it.
    import builtins

    from mxcube_autocenter.centring.benchmark import added_memory_mb

    real_open = builtins.open

    def no_clear_refs(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_clear_refs)
    calls = []
    assert added_memory_mb(lambda: calls.append(1)) is None
    assert calls == [1]


def test_heatmap_command_finds_the_crystal_and_no_crystal_in_a_black_or_empty_frame(tmp_path, capsys):
    import json

    import cv2

    from mxcube_autocenter.cli import main

    sample = make_sample(1, n_crystals=1)
    frames = {
        "crystal.png": frame_of(1),
        "black.png": np.zeros((1024, 1280, 3), np.uint8),
        "empty.png": Renderer().render_empty(),
    }
    paths = []
    for name, rgb in frames.items():
        paths.append(str(tmp_path / name))
        cv2.imwrite(paths[-1], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    paths.append(str(tmp_path / "truncated.png"))
    (tmp_path / "truncated.png").write_bytes((tmp_path / "black.png").read_bytes()[:100])

    status = main(["heatmap", *paths, "--pixels-per-mm", str(PPMM[0]), "--json"])
    results = {Path(entry["image"]).name: entry for entry in map(json.loads, capsys.readouterr().out.splitlines())}
    assert status == 1  # one image could not be read
    crystal = results["crystal.png"]
    assert crystal["crystal_found"] and crystal["score"] >= 5.0
    # The best point lies on the crystal: within 50 um of the projection of its centre.
    motors = {"omega": 0.0, "phiy": float(sample.loop_centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
    (expected,), _ = sample_to_screen(sample.crystals[0].centre[None], motors, PPMM, (640, 512))
    assert np.hypot(*np.subtract(crystal["best"], expected)) < 0.05 * PPMM[0]
    # Averaged over the region's flips and quarter turns, the heatmap still finds it.
    assert main(["heatmap", paths[0], "--pixels-per-mm", str(PPMM[0]), "--json", "--symmetries", "dihedral"]) == 0
    turned = json.loads(capsys.readouterr().out)
    assert turned["crystal_found"] and np.hypot(*np.subtract(turned["best"], expected)) < 0.05 * PPMM[0]
    for name in ("black.png", "empty.png"):
        assert results[name]["loop"] is None and not results[name]["crystal_found"] and results[name]["best"] is None
    assert "truncated.png" in results["truncated.png"]["error"]


# The loop in each real photograph (tests/data/real_oav), drawn by hand: x0, y0, x1, y1 in pixels (1024 x 768).
REAL_LOOPS = {
    "dls_generate_snapshot_input.png": (470, 310, 580, 420),
    "dls_ins_15_33_0.png": (290, 320, 470, 430),
    "dls_ins_15_33_90.png": (280, 350, 450, 440),
    "dls_thau_1_91_0.png": (395, 285, 640, 420),
    "dls_thau_1_91_90.png": (395, 335, 565, 420),
}


@pytest.mark.parametrize("mirrored", [False, True])
def test_heatmap_keeps_its_best_point_in_the_loop_of_real_photographs(tmp_path, capsys, mirrored):
    """Real OAV images, pin from the right (and mirrored, pin from the left): the pin and stem never win."""
    import json

    import cv2

    from mxcube_autocenter.cli import main

    data = Path(__file__).parent / "data" / "real_oav"
    paths = []
    for name in REAL_LOOPS:
        image = cv2.imread(str(data / name))
        paths.append(str(tmp_path / name))
        cv2.imwrite(paths[-1], image[:, ::-1] if mirrored else image)
    status = main(["heatmap", *paths, "--pixels-per-mm", "1000", "--pin-side", "left" if mirrored else "right",
                   "--json"])  # fmt: skip
    assert status == 0
    results = {Path(entry["image"]).name: entry for entry in map(json.loads, capsys.readouterr().out.splitlines())}
    for name, (x0, y0, x1, y1) in REAL_LOOPS.items():
        if mirrored:
            x0, x1 = 1023 - x1, 1023 - x0
        entry = results[name]
        for key in ("loop", "best"):
            x, y = entry[key]
            assert x0 <= x <= x1 and y0 <= y <= y1, (name, key, entry[key])


def test_find_loop_finds_the_loop_of_dark_real_photographs():
    """A dim lamp or a short exposure (backlight ~25 of 255): lucid3's fixed thresholds found nothing or the pin."""
    import cv2

    data = Path(__file__).parent / "data" / "real_oav"
    for name, (x0, y0, x1, y1) in REAL_LOOPS.items():
        rgb = cv2.cvtColor(cv2.imread(str(data / name)), cv2.COLOR_BGR2RGB)
        dark = np.round(rgb * 0.25).astype(np.uint8)
        tip = find_loop(dark, "right")
        assert tip is not None and x0 <= tip[0] <= x1 and y0 <= tip[1] <= y1, (name, tip)
    assert find_loop(np.zeros((768, 1024, 3), np.uint8), "right") is None


def test_heatmap_reads_16_bit_images_of_cameras_with_fewer_bits(tmp_path, capsys):
    """A 12-bit camera's frame in a 16-bit PNG or TIFF reads as the 8-bit one, not as 16 grey levels."""
    import json

    import cv2

    from mxcube_autocenter.cli import main

    name = "dls_thau_1_91_0.png"
    grey = cv2.imread(str(Path(__file__).parent / "data" / "real_oav" / name), cv2.IMREAD_GRAYSCALE)
    paths = []
    for stem, factor in (("12bit.png", 16), ("12bit.tif", 16), ("16bit.png", 257)):
        paths.append(str(tmp_path / stem))
        assert cv2.imwrite(paths[-1], grey.astype(np.uint16) * factor)
    assert main(["heatmap", paths[0], "--pixels-per-mm", "1000", "--pin-side", "right", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    x0, y0, x1, y1 = REAL_LOOPS[name]
    assert entry["loop"] is not None and x0 <= entry["loop"][0] <= x1 and y0 <= entry["loop"][1] <= y1, entry

    from mxcube_autocenter.imagefiles import read_rgb

    for path in paths:
        rgb = read_rgb(path)
        assert rgb.shape == (*grey.shape, 3) and rgb.dtype == np.uint8
        assert np.abs(rgb.astype(int) - grey[..., None]).max() <= 1, path
    with pytest.raises(OSError, match=r"no_such.png \(No such file or directory\)"):
        read_rgb(tmp_path / "no_such.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(OSError, match="empty.png as an image"):
        read_rgb(tmp_path / "empty.png")


def test_an_image_file_is_read_upright_as_its_exif_orientation_says(tmp_path):
    # A phone or a camera that saves turned images with an orientation tag: the loop must be found upright.
    from PIL import Image

    from mxcube_autocenter.imagefiles import read_rgb

    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = 255  # the left end bright: at the top once turned 90 degrees clockwise
    tagged = Image.fromarray(image)
    exif = tagged.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    tagged.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    rgb = read_rgb(tmp_path / "turned.jpg")
    assert rgb.shape == (40, 20, 3)
    assert rgb[:8].mean() > 200 and rgb[-25:].mean() < 30


def test_a_jpeg_cut_short_is_refused_not_read_with_its_missing_part_grey(tmp_path, capsys):
    # libjpeg decodes what there is and fills the rest grey, warning only on stderr: heatmap found a loop
    # and a crystal in half a camera image, with exit status 0.
    import json

    import cv2

    from mxcube_autocenter.cli import main
    from mxcube_autocenter.imagefiles import read_rgb

    whole, cut = tmp_path / "snapshot.jpg", tmp_path / "cut.jpg"
    frame = frame_of(1)
    assert cv2.imwrite(str(whole), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_rgb(whole).shape == frame.shape
    with pytest.raises(OSError, match="cut.jpg: the JPEG file ends before its image does"):
        read_rgb(cut)
    status = main(["heatmap", str(whole), str(cut), "--pixels-per-mm", str(PPMM[0]), "--json"])
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1 and entries[0]["loop"] is not None and "error" not in entries[0]
    assert entries[1]["loop"] is None and "ends before its image does" in entries[1]["error"]


@pytest.mark.parametrize("pixels_per_mm", ["0.5", "1e300"])
def test_heatmap_command_names_a_scale_no_camera_has(tmp_path, capsys, pixels_per_mm):
    # 0.5 (pixels per um given for pixels per mm) ended in OpenCV's "!_src.empty()" traceback, 1e300 in numpy's
    # "Maximum allowed dimension exceeded".
    import json

    import cv2

    from mxcube_autocenter.cli import main

    image = tmp_path / "snapshot.png"
    assert cv2.imwrite(str(image), cv2.cvtColor(frame_of(1), cv2.COLOR_RGB2BGR))
    assert main(["heatmap", str(image), "--pixels-per-mm", pixels_per_mm, "--json"]) == 1
    entry = json.loads(capsys.readouterr().out)
    assert entry["loop"] is None and entry["error"].startswith(f"--pixels-per-mm: pixels_per_mm ({float(pixels_per_mm)}")
    hint = {"0.5": "pixels per mm (not per um)", "1e300": "pixels per mm: this one is far too large"}[pixels_per_mm]
    assert f"an on-axis camera sees 0.05 to 20 mm across: the scale is {hint}" in entry["error"]


def test_heatmap_command_names_a_bad_beam_position_and_an_overlay_it_cannot_write(tmp_path, capsys):
    import json

    from mxcube_autocenter.cli import main
    from mxcube_autocenter.imagefiles import write_png

    image = str(write_png(tmp_path / "crystal.png", frame_of(1)))
    with pytest.raises(SystemExit) as exit_info:
        main(["heatmap", image, "--pixels-per-mm", str(PPMM[0]), "--beam", "100"])
    assert exit_info.value.code == 2
    assert "'100': expected the beam position as X,Y in pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["heatmap", image, "--pixels-per-mm", str(PPMM[0]), "--beam", "nan,512"])
    assert "'nan,512': expected the beam position" in capsys.readouterr().err

    out = tmp_path / "no_such_directory" / "overlay.png"
    status = main(["heatmap", image, "--pixels-per-mm", str(PPMM[0]), "--json", "--png", str(out)])
    (entry,) = map(json.loads, capsys.readouterr().out.splitlines())
    assert status == 1 and entry["crystal_found"]  # the image was analysed; only its overlay is missing
    assert f"cannot write {out}" in entry["error"]

    # Snapshots of the same name from two days' folders each get their overlay.
    images = []
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
        images.append(str(write_png(tmp_path / day / "snapshot.png", frame_of(1))))
    assert main(["heatmap", *images, "--pixels-per-mm", str(PPMM[0]), "--png", str(tmp_path / "overlays")]) == 0
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["snapshot_2_heatmap.png",
                                                                         "snapshot_heatmap.png"]
    # One image and an existing folder (a shell pattern that matched one image): its overlay goes in it, as for
    # several; it was "a PNG file name must end in .png", once the heatmap was computed.
    assert main(["heatmap", images[0], "--pixels-per-mm", str(PPMM[0]), "--png", str(tmp_path / "overlays")]) == 0
    assert (tmp_path / "overlays" / "snapshot_heatmap.png").is_file()
    capsys.readouterr()
    # Refused before any work: a file name for several overlays (it became a folder named so), no .png for one.
    assert main(["heatmap", *images, "--pixels-per-mm", str(PPMM[0]), "--png", str(tmp_path / "many.png")]) == 2
    assert "2 images give one overlay each: give a folder" in capsys.readouterr().err
    assert main(["heatmap", images[0], "--pixels-per-mm", str(PPMM[0]), "--png", str(tmp_path / "overlay")]) == 2
    assert "give a file name ending in .png, or a folder" in capsys.readouterr().err
    assert not (tmp_path / "many.png").exists() and not (tmp_path / "overlay").exists()


def test_the_overlay_of_a_view_without_a_crystal_says_so():
    # The heatmap's best point of an empty field is no chosen point: no green circle, and an image's NaN
    # omega is left out of the label.
    from mxcube_autocenter.centring import report
    from mxcube_autocenter.centring.procedure import CentringSettings, analyse_frame
    from mxcube_autocenter.config import AutoCenterConfig

    frame = frame_of()
    angle = analyse_frame(load_predictor(), frame, find_loop(frame), PPMM, CentringSettings.from_config(AutoCenterConfig()))
    green = np.array([0, 255, 0])
    found = report.overlay(angle, (640, 512))
    empty = report.overlay(angle, (640, 512), crystal_found=False)
    assert np.all(found == green, axis=-1).sum() > 30 and np.all(empty == green, axis=-1).sum() == 0
    assert not np.array_equal(found[:40], empty[:40])  # the label differs


def test_write_png_says_when_the_file_cannot_be_written(tmp_path):
    from mxcube_autocenter.imagefiles import write_png

    rgb = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(OSError, match="no_such_directory.*directory exists"):
        write_png(tmp_path / "no_such_directory" / "x.png", rgb)
    with pytest.raises(OSError, match="must end in .png"):
        write_png(tmp_path / "x.jpg", rgb)
    assert write_png(tmp_path / "x.png", rgb).stat().st_size > 0
