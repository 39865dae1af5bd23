"""The virtual beamline booted as a real mxcubecore beamline."""

import time

import gevent
import numpy as np
import pytest

from mxcube_autocenter.geometry import beam_frame, centred_motors, sample_to_screen
from mxcube_autocenter.simulation.sample import make_sample
from tests.helpers import Gaps, SignalLog, assert_responsive, tick


def screen_position(beamline, point):
    diffr = beamline.diffractometer
    motors = beamline.sample_view.get_positions()
    xy, _ = sample_to_screen(
        np.asarray(point)[None], motors, diffr.get_pixels_per_mm(), beamline.beam.get_beam_position_on_screen()
    )
    return xy[0]


def test_camera_renders_the_mounted_sample_and_follows_zoom(beamline):
    camera = beamline.sample_view.camera
    mounted = beamline.sample_changer.mount(make_sample(3, n_crystals=1))
    beamline.diffractometer.phiy.set_value(float(mounted.sample.loop_centre[0]), timeout=10)
    frame = beamline.sample_view.get_snapshot(return_as_array=True)
    assert frame.shape == (camera.get_height(), camera.get_width(), 3)
    beamline.sample_changer.mount(None)
    empty = beamline.sample_view.get_snapshot(return_as_array=True)
    assert frame.mean() < empty.mean() - 1

    zoom = beamline.diffractometer.zoom
    low = beamline.diffractometer.get_pixels_per_mm()[0]
    zoom.set_value(zoom.VALUES.LEVEL4, timeout=5)
    gevent.sleep(0.3)
    assert beamline.diffractometer.get_pixels_per_mm()[0] == pytest.approx(4 * low)
    zoom.set_value(zoom.VALUES.LEVEL1, timeout=5)
    gevent.sleep(0.3)


def test_the_beam_object_reports_the_beam_that_diffracts(beamline):
    # The beam object's size goes into recordings and onto the screen: it must be the beam the counts integrate over.
    mounted = beamline.sample_changer.mount(make_sample(3, n_crystals=1))
    xray = mounted.diffraction.beam
    width, height = beamline.beam.get_beam_size()
    assert (1000 * width, 1000 * height) == pytest.approx((xray.width_um, xray.height_um))
    assert beamline.beam.get_beam_shape().name == ("RECTANGULAR" if xray.profile == "tophat" else "ELLIPTICAL")
    beamline.sample_changer.mount(None)


def test_camera_streams_jpeg_frames_without_blocking(beamline):
    camera = beamline.sample_view.camera
    log = SignalLog(camera, "imageReceived")
    gaps = Gaps()

    task = gevent.spawn(tick, gaps)
    motor = beamline.diffractometer.omega
    motor.set_value(motor.get_value() + 180, timeout=0)  # motion forces a new render every frame
    gevent.sleep(1.0)
    task.kill()
    jpeg, width, height = log.calls[-1][1]
    assert jpeg[:2] == b"\xff\xd8" and (width, height) == (camera.get_width(), camera.get_height())
    assert len(log.calls) >= 8  # 25 fps configured, at least 8 fps required (fewer on a loaded machine)
    assert_responsive(gaps)


def test_three_click_centring_brings_the_best_point_into_the_beam(beamline):
    mounted = beamline.sample_changer.mount(make_sample(23, n_crystals=1, habits=("cube",)))
    point, _ = mounted.best_point()
    sample_view = beamline.sample_view
    log = SignalLog(sample_view, "centringSuccessful", "centringFailed")
    sample_view.start_manual_centring(3)
    for _ in range(3):
        x, y = screen_position(beamline, point)
        sample_view.image_clicked(x, y)
    log.wait_for("centringSuccessful")
    gevent.sleep(0.2)
    motors = sample_view.get_positions()
    for omega in (0.0, 45.0, 90.0, 200.0):
        offsets = beam_frame(np.asarray(point)[None], {**motors, "omega": omega})[0]
        assert abs(offsets[0]) < 0.002 and abs(offsets[1]) < 0.002  # mm


def test_motor_faults_can_be_injected(beamline):
    phiz = beamline.diffractometer.phiz
    start = phiz.get_value()
    phiz.inject_fault("fail")
    with pytest.raises(RuntimeError, match="simulated motor fault"):
        phiz.set_value(start + 0.1, timeout=5)
    assert phiz.get_value() == pytest.approx(start)  # it failed at once
    phiz.inject_fault("fail", after_s=0.02)  # of a 0.05 s move at 2 mm/s
    with pytest.raises(RuntimeError, match="simulated motor fault"):
        phiz.set_value(start + 0.1, timeout=5)
    assert start < phiz.get_value() < start + 0.1  # it had moved part of the way
    # In FAULT, as an MD3 motor reads: READY let a simultaneous move, waited for by the diffractometer, succeed.
    assert phiz.get_state() == phiz.STATES.FAULT
    phiz.inject_fault("fail", after_s=0.02)
    with pytest.raises(Exception, match="Timeout waiting for status ready"):
        beamline.diffractometer.set_value_motors({"phiz": start + 0.2}, timeout=1)
    phiz.inject_fault("timeout")
    with pytest.raises(RuntimeError, match="timed out"):
        phiz.set_value(start + 0.1, timeout=0.3)
    phiz.update_state(phiz.STATES.READY)
    phiz.inject_fault("unreadable")  # the move ends, then the motor reads None until the next one begins
    phiz.set_value(start + 0.05, timeout=5)
    assert phiz.get_value() is None and phiz.get_state() == phiz.STATES.READY
    # The camera, which reads the motors to draw the scene, keeps its last frame meanwhile.
    assert beamline.sample_view.get_snapshot(return_as_array=True).shape[2] == 3
    phiz.inject_fault(None)  # clears it too
    assert phiz.get_value() == pytest.approx(start + 0.05)
    phiz.set_value(start, timeout=5)
    assert phiz.get_value() == pytest.approx(start)
    with pytest.raises(ValueError, match="limits"):
        phiz.set_value(50.0, timeout=5)


def test_motors_read_over_a_network_wait_and_let_other_greenlets_run(beamline):
    # An MD3's position is an exporter request: a read waits, the event loop goes on, the camera films on.
    gaps = Gaps()
    ticker = gevent.spawn(tick, gaps)
    camera = SignalLog(beamline.sample_view.camera, "imageReceived")
    with beamline.diffractometer.read_latency(0.05):
        started = time.monotonic()
        positions = beamline.sample_view.get_positions()
        elapsed = time.monotonic() - started
        frames = len(camera.times)
    ticker.kill()
    assert elapsed >= 0.05 * len(positions) and frames >= 2  # a few at 25 frames/s, even on a loaded machine
    assert_responsive(gaps)
    started = time.monotonic()
    beamline.sample_view.get_positions()
    assert time.monotonic() - started < 0.05  # the latency ends with the context
    # A move's own reads of its position are no requests: it ends as soon as without the latency.
    phiz = beamline.diffractometer.phiz
    start = phiz.reading()
    with beamline.diffractometer.read_latency(0.2):
        started = time.monotonic()
        phiz.set_value(start + 0.001, timeout=5)
        moved = time.monotonic() - started
    phiz.set_value(start, timeout=5)
    assert moved < 0.2


def test_a_move_to_a_limit_never_reports_a_position_beyond_it(beamline):
    phiz = beamline.diffractometer.phiz
    start = phiz.get_value()
    low, high = phiz.get_limits()
    seen = SignalLog(phiz, "valueChanged")
    try:
        phiz.set_value(high, timeout=10)
        assert phiz.get_value() == high
        reported = [args[0] for _, args in seen.calls]
        assert len(reported) > 10  # positions on the way, not a jump
        assert start <= min(reported) and max(reported) <= high
        assert np.all(np.diff(reported) >= 0)
    finally:
        phiz.set_value(start, timeout=10)


def test_a_move_smaller_than_the_tolerance_reports_no_jump(beamline):
    # Below the 1e-4 mm tolerance update_value skips the last report; MotorMockup then covered the
    # "rest" at full speed in one step, and the camera filmed phiz 40 um away for 20 ms.
    phiz = beamline.diffractometer.phiz
    start = phiz.get_value()
    seen = SignalLog(phiz, "valueChanged")
    phiz.set_value(start + 5e-5, timeout=5)
    assert phiz.get_value() == start + 5e-5
    assert all(start <= args[0] <= start + 5e-5 for _, args in seen.calls)


def test_a_new_move_replaces_the_one_under_way_and_abort_stops_it(beamline):
    # As on an MD3: a motor that reported ready at its new target stays there.
    phiy = beamline.diffractometer.phiy  # 5 mm/s
    start, velocity = phiy.get_value(), phiy.get_velocity()
    try:
        phiy.set_value(start + 1.0, timeout=0)
        gevent.sleep(0.05)
        phiy.set_value(start + 0.3, timeout=0)
        phiy.wait_ready(5)
        gevent.sleep(0.3)
        assert phiy.get_value() == pytest.approx(start + 0.3, abs=1e-6)
        # abort() stops a move whoever started it, also one its caller waits for. Slowly, so that
        # the move is still under way after the 0.05 s sleep on a loaded machine (0.14 s at 5 mm/s).
        phiy.set_velocity(0.5)
        mover = gevent.spawn(phiy.set_value, start + 1.0, timeout=10)
        gevent.sleep(0.05)
        phiy.abort()
        stopped = phiy.get_value()
        gevent.sleep(0.3)
        assert start + 0.3 < stopped < start + 1.0 and phiy.get_value() == stopped
        mover.kill()
    finally:
        phiy.set_velocity(velocity)
        phiy.set_value(start, timeout=10)


def test_sample_changer_mounts_reproducible_samples(beamline):
    changer = beamline.sample_changer
    changer.load((2, 3))
    first = changer.mounted.sample
    assert changer.mounted.crystal_id == "2:3"
    changer.load((2, 3))
    np.testing.assert_array_equal(first.loop_outline, changer.mounted.sample.loop_outline)
    changer.unload()
    assert changer.mounted is None
    # A sample put on directly (as the demo and tests do) is taken off too: unload raised and left it there.
    changer.mount(first)
    changer.unload()
    assert changer.mounted is None


def test_a_streamed_frame_is_the_scene_at_its_exposure_whatever_is_asked_meanwhile(beamline, monkeypatch):
    # A snapshot asked for while a frame was on its way (the web UI's, a poll) rendered the later scene into it:
    # the frame arrived showing the sample where it was after its exposure time.
    import cv2

    camera, phiy = beamline.sample_view.camera, beamline.diffractometer.phiy
    mounted = beamline.sample_changer.mount(make_sample(3, n_crystals=1))
    start = float(mounted.sample.loop_centre[0])
    phiy.set_value(start, timeout=10)
    camera.stop_streaming()
    monkeypatch.setattr(camera, "_latency_s", 1.0)
    camera.get_last_image()

    def image(jpeg):
        return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE).astype(float)

    exposed = image(camera._jpeg)
    frames = []
    camera.connect("imageReceived", lambda image, *args: frames.append(image))
    try:
        camera.start_streaming()
        gevent.sleep(0.1)  # the first frame exposed, on its way
        phiy.set_value(start + 0.05, timeout=10)
        camera.get_last_image()
        later = image(camera._jpeg)
        with gevent.Timeout(5):
            while not frames:
                gevent.sleep(0.02)
    finally:
        camera.stop_streaming()
        camera.start_streaming()
        phiy.set_value(start, timeout=10)
    delivered = image(frames[0])
    assert np.abs(delivered - exposed).mean() < 0.1 < np.abs(delivered - later).mean()


COLLECT_SIGNALS = (
    "collectOscillationStarted",
    "collectStarted",
    "collectImageTaken",
    "collectOscillationFinished",
    "collectOscillationFailed",
    "collectEnded",
)


@pytest.mark.parametrize("kind", ["Helical", "OSC"])
def test_collections_move_the_goniometer_and_write_eiger_files(beamline, tmp_path, kind):
    from mxcube_autocenter.labelling.eiger import open_master
    from mxcube_autocenter.labelling.pipeline import DEFAULT_SPOT_FINDER
    from mxcube_autocenter.labelling.spotfinder import count_reflections
    from mxcube_autocenter.simulation.experiments import helical_end_points, run_collection

    mounted = beamline.sample_changer.mount(make_sample(16))
    log = SignalLog(beamline.collect, *COLLECT_SIGNALS)
    omega_log = SignalLog(beamline.diffractometer.omega, "valueChanged")
    helical = helical_end_points(mounted, np.random.default_rng(0)) if kind == "Helical" else None
    point, _ = mounted.best_point()
    beamline.diffractometer.set_value_motors(
        {m: v for m, v in centred_motors(point).items() if m != "omega"}, timeout=30
    )
    run_collection(beamline, tmp_path, "x", experiment_type=kind, helical=helical, n_images=20,
                   exposure_time=0.04, osc_range=1.0)
    names = log.names()
    assert names[0] == "collectOscillationStarted"
    assert names.count("collectImageTaken") == 20
    assert "collectOscillationFinished" in names and "collectOscillationFailed" not in names
    assert names.index("collectStarted") < names.index("collectImageTaken")
    images = [args[0] for name, args in log.calls if name == "collectImageTaken"]
    assert images == list(range(1, 21))
    # The motors moved continuously through the scan, not in one jump.
    scanned = {round(args[0], 3) for _, args in omega_log.calls if 0.0 < args[0] < 20.0}
    assert len(scanned) > 20
    assert beamline.diffractometer.omega.get_value() == pytest.approx(20.0, abs=1e-4)
    if kind == "Helical":
        # Within the motors' reporting tolerance (0.1 um in the virtual beamline's XML).
        assert beamline.diffractometer.phiy.get_value() == pytest.approx(helical[1]["phiy"], abs=1e-4)

    record = beamline.collect.last_collection
    assert record["master_file"] == str(tmp_path / "x_1_master.h5")
    with open_master(record["master_file"]) as series:
        assert series.nimages == 20
        windows = series.frame_windows()
        np.testing.assert_allclose(windows[:, 0], record["detector_frame_starts"], atol=1e-6)
        found = [count_reflections(*series.frame(i), DEFAULT_SPOT_FINDER, geometry=series)
                 for i in range(series.nimages)]  # fmt: skip
    truth = record["reflection_counts"]
    assert max(truth) > 0
    for f, t in zip(found, truth):
        assert abs(f - t) <= max(3, 0.1 * t)


def test_a_collection_diffracts_where_the_camera_draws_the_sample(beamline, tmp_path):
    # A goniometer wired with omega and phiz readings against the sample and the rotation axis at phiz 0.1 mm:
    # the best point drawn in the beam diffracts as much as it would at the same place with the +1 wiring.
    from mxcube_autocenter.geometry import sample_frame
    from mxcube_autocenter.simulation.experiments import run_collection

    diffractometer = beamline.diffractometer
    directions, axis = {"omega": -1, "phiz": -1}, 0.1
    mounted = beamline.sample_changer.mount(make_sample(16))
    point, _ = mounted.best_point()
    in_beam = centred_motors(point)
    readings = sample_frame(in_beam, directions)
    readings["phiz"] += axis
    diffractometer.motor_directions, diffractometer.rotation_axis_phiz = directions, axis
    try:
        diffractometer.set_value_motors({m: v for m, v in readings.items() if m != "omega"}, timeout=30)
        run_collection(beamline, tmp_path, "x", n_images=20, exposure_time=0.02, osc_range=2.0)
    finally:
        diffractometer.motor_directions, diffractometer.rotation_axis_phiz = {}, 0.0
    counts = beamline.collect.last_collection["reflection_counts"]
    expected = [mounted.diffraction.expected_rc({**in_beam, "omega": -(2.0 * i + 1.0)}) for i in range(20)]
    assert sum(expected) > 1000
    assert sum(counts) == pytest.approx(sum(expected), rel=0.1)


def test_ice_in_the_beam_writes_ice_ring_spots_that_labelling_leaves_out(beamline, tmp_path):
    from mxcube_autocenter.labelling.eiger import open_master
    from mxcube_autocenter.labelling.pipeline import DEFAULT_SPOT_FINDER
    from mxcube_autocenter.labelling.spotfinder import count_reflections
    from mxcube_autocenter.simulation.experiments import run_collection

    mounted = beamline.sample_changer.mount(make_sample(50001, n_crystals=0, ice=True))
    ball = mounted.sample.ice[np.argmax(mounted.sample.ice[:, 3])]
    beamline.diffractometer.set_value_motors(
        {m: v for m, v in centred_motors(ball[:3]).items() if m != "omega"}, timeout=30
    )
    run_collection(beamline, tmp_path, "ice", n_images=12, exposure_time=0.04, osc_range=1.0)
    record = beamline.collect.last_collection
    with open_master(record["master_file"]) as series:
        all_spots = [count_reflections(*series.frame(i), geometry=series) for i in range(series.nimages)]
        reflections = [count_reflections(*series.frame(i), DEFAULT_SPOT_FINDER, geometry=series)
                       for i in range(series.nimages)]  # fmt: skip
    # An empty loop: the ice ball's spots (3 a frame on average) are all on the ice rings.
    assert sum(all_spots) >= 12 and sum(all_spots) > 3 * sum(reflections)
    assert max(abs(f - t) for f, t in zip(reflections, record["reflection_counts"])) <= 3


def test_failing_collection_reports_failure(beamline, tmp_path):
    from mxcube_autocenter.simulation.experiments import run_collection

    beamline.sample_changer.mount(make_sample(16))
    log = SignalLog(beamline.collect, *COLLECT_SIGNALS)
    beamline.collect.inject_failure(at_image=5)
    run_collection(beamline, tmp_path, "bad", n_images=20, exposure_time=0.02)
    names = log.names()
    assert "collectOscillationFailed" in names and "collectOscillationFinished" not in names
    assert names.count("collectImageTaken") == 5


def test_helical_scan_beyond_the_limits_fails_without_moving_there(beamline, tmp_path):
    from mxcube_autocenter.simulation.experiments import run_collection

    beamline.sample_changer.mount(make_sample(16))
    phiz = beamline.diffractometer.phiz
    low, high = phiz.get_limits()
    start = {name: motor.get_value() for name, motor in beamline.diffractometer.get_motors().items()
             if name in ("phiy", "phiz", "sampx", "sampy")}  # fmt: skip
    log = SignalLog(beamline.collect, *COLLECT_SIGNALS)
    seen = SignalLog(phiz, "valueChanged")
    run_collection(beamline, tmp_path, "far", experiment_type="Helical", n_images=10, exposure_time=0.02,
                   helical=(start, {**start, "phiz": high + 1.0}))  # fmt: skip
    assert "collectOscillationFailed" in log.names() and "collectImageTaken" not in log.names()
    assert all(low <= args[0] <= high for _, args in seen.calls)
