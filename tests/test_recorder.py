"""Recording camera frames through the AutoCenter object during virtual collections."""

import itertools
import logging
import os
import shutil
import subprocess
import sys
import time

import cv2
import gevent
import numpy as np
import pytest

from mxcube_autocenter.beamline import auto_centring
from mxcube_autocenter.recording import read_recording
from mxcube_autocenter.simulation.experiments import helical_end_points, run_collection
from mxcube_autocenter.simulation.sample import make_sample
from tests.helpers import Gaps, SignalLog, assert_responsive, tick


@pytest.fixture
def autocenter(beamline):
    ho = auto_centring(beamline)
    saved = ho.config.model_copy()
    beamline.sample_changer.mount(make_sample(16))
    yield ho
    for name in type(ho.config).model_fields:
        setattr(ho.config, name, getattr(saved, name))
    beamline.collect.inject_failure(None)


def wait_for_summary(ho, timeout=10):
    with gevent.Timeout(timeout, AssertionError("the recording did not close")):
        while ho.recorder.recording or ho.recorder.last_summary is None:
            gevent.sleep(0.05)
    return ho.recorder.last_summary


def collect(beamline, directory, kind, prefix="x", **params):
    mounted = beamline.sample_changer.mounted
    helical = helical_end_points(mounted, np.random.default_rng(1)) if kind == "Helical" else None
    params = {"n_images": 30, "exposure_time": 0.05, "osc_range": 1.0, **params}
    run_collection(beamline, directory, prefix, experiment_type=kind, helical=helical, **params)
    return beamline.collect.last_collection


@pytest.mark.parametrize("kind", ["Helical", "OSC"])
def test_collection_is_recorded_with_its_metadata_and_motor_positions(beamline, autocenter, tmp_path, kind):
    autocenter.recorder.last_summary = None
    delivered = SignalLog(beamline.sample_view.camera, "imageReceived")
    motors = beamline.diffractometer.get_motors()
    reported = {name: (motors[name].get_value(), SignalLog(motors[name], "valueChanged"))
                for name in ("omega", "phiy", "sampx", "sampy")}  # fmt: skip
    record = collect(beamline, tmp_path, kind)
    summary = wait_for_summary(autocenter)
    assert summary.status == "complete" and summary.error is None
    assert summary.path == tmp_path / "autocenter_frames" / "x_1_camera.h5"
    rec = read_recording(summary.path)
    assert rec.status == "complete"
    meta = rec.metadata
    assert meta["experiment_type"] == kind
    assert meta["master_file"] == record["master_file"]
    assert meta["number_of_images"] == 30
    assert meta["pixels_per_mm"] == list(beamline.diffractometer.get_pixels_per_mm())
    if kind == "Helical":
        assert meta["helical_start"]["phiy"] == pytest.approx(record["plan"].start["phiy"])
        assert meta["helical_end"]["sampx"] == pytest.approx(record["plan"].end["sampx"])

    # Frames at ~10/s (fewer if a loaded machine slows the camera) spanning the exposure.
    plan, start = record["plan"], record["wall_start"]
    during = (rec.timestamps >= start) & (rec.timestamps <= start + plan.duration)
    camera = [t for t in delivered.times if start <= t <= start + plan.duration]
    assert during.sum() >= 0.8 * min(10 * plan.duration, len(camera))
    # From the first frame the camera delivered in the exposure to its last: the rate limiter skips a frame
    # only within 0.1 s of the last one kept, and keeps the next one (which a slow camera delivers later).
    later = [t for t in camera if t >= min(camera) + 0.1]
    # (20 ms: the test's listener and the recorder's stamp the same frame a thread switch apart, frames are 40 ms apart)
    assert rec.timestamps[during].min() <= (later[0] if later else max(camera)) + 0.02
    assert rec.timestamps[during].max() > max(camera) - 0.1
    assert rec.frame(0).shape == (1024, 1280, 3)

    # Motor positions per frame are those the motors reported at that moment (the frame's timestamp), however
    # late a loaded machine ran the scan's motion steps: read once the camera's greenlet has let the frame go,
    # so one the motors reported within 30 ms after it.
    for name, (initial, log) in reported.items():
        times = np.array([-np.inf, *log.times])
        values = np.array([initial, *(args[0] for _, args in log.calls)])
        first = np.searchsorted(times, rec.timestamps[during], side="right") - 1
        last = np.searchsorted(times, rec.timestamps[during] + 0.03, side="right") - 1
        for recorded, lo, hi in zip(rec.motor(name)[during], first, last):
            assert np.any(np.abs(values[lo : hi + 1] - recorded) <= 1e-9), (name, recorded, values[lo : hi + 1])
    # ... and those of the scan: omega turned through the exposure.
    omega = rec.motor("omega")[during]
    assert np.all(np.diff(omega) >= 0)
    assert plan.omega_start <= omega.min() and omega.max() <= plan.motors_at(plan.duration)["omega"]


def test_unconfigured_collection_type_records_nothing(beamline, autocenter, tmp_path):
    autocenter.config.record_scan_types = ["Helical"]
    autocenter.recorder.last_summary = None
    collect(beamline, tmp_path, "OSC", n_images=10)
    gevent.sleep(0.3)
    assert autocenter.recorder.last_summary is None and not list(tmp_path.rglob("*_camera.h5"))
    # The same collection, its type configured, is recorded: the test above is no accident of the setup.
    autocenter.config.record_scan_types = ["OSC"]
    collect(beamline, tmp_path, "OSC", prefix="configured", n_images=10)
    assert wait_for_summary(autocenter).status == "complete"


def test_failed_collection_gives_a_file_marked_failed(beamline, autocenter, tmp_path, caplog):
    autocenter.recorder.last_summary = None
    beamline.collect.inject_failure(at_image=10)
    with caplog.at_level(logging.WARNING, logger="user_level_log"):
        collect(beamline, tmp_path, "OSC")
        summary = wait_for_summary(autocenter)
    assert summary.status == "failed"
    recording = read_recording(summary.path)
    # Why it failed is in the file, for `inspect` to say.
    assert recording.status == "failed" and recording.error.startswith("the collection failed")
    # The user hears of the collection's failure from the collect object, not of the recording's again.
    assert "Camera recording" not in caplog.text


def test_collection_stopped_by_the_user_gives_a_file_marked_aborted(beamline, autocenter, tmp_path):
    autocenter.recorder.last_summary = None
    running = gevent.spawn(collect, beamline, tmp_path, "OSC", prefix="stopped", n_images=100)
    with gevent.Timeout(10, AssertionError("the recording did not start")):
        while not autocenter.recorder.recording:
            gevent.sleep(0.05)
    gevent.sleep(0.5)
    beamline.collect.stop_collect()  # what the queue's stop does: the collection sends no signal
    summary = wait_for_summary(autocenter)
    assert summary.status == "aborted"
    assert read_recording(summary.path).status == "aborted"
    running.join(5)
    # The next collection runs in full and is recorded.
    autocenter.recorder.last_summary = None
    record = collect(beamline, tmp_path, "OSC", prefix="after", n_images=10)
    assert record["master_file"].endswith("after_1_master.h5")
    assert len(record["reflection_counts"]) == 10
    assert wait_for_summary(autocenter).status == "complete"


def test_signals_of_a_multi_collect_object_give_one_file_per_collection_with_its_status(beamline, autocenter, tmp_path):
    """AbstractMultiCollect's signal sequences, sent by the collect object as such an object sends them.

    Its loop ends one collection and starts the next without yielding, some
    objects send a start twice, and a killed collection sends collectEnded
    (owner, True, ...) from its ``finally``.
    """
    collect(beamline, tmp_path / "first", "Helical")  # helical end points set, and used, for this one only
    wait_for_summary(autocenter)
    base = beamline.collect.current_dc_parameters
    first, second = ({**base, "fileinfo": {**base["fileinfo"], "directory": str(tmp_path), "prefix": p}}
                     for p in ("loop_a", "loop_b"))  # fmt: skip
    collect_ho = beamline.collect

    def started(params, osc_id):
        # AbstractMultiCollect: (owner, sample_id, sample_code, sample_location, parameters, osc_id)
        collect_ho.emit("collectOscillationStarted", (None, 1, "code", "1:01", params, osc_id))

    started(first, 1)
    gevent.sleep(0.6)
    started(dict(first), 1)  # sent twice (a copy of the parameters): still one recording
    collect_ho.emit("collectOscillationFinished", (None, True, "Data collection successful", 5, 1, first))
    started(second, 2)  # the loop's next collection, with no yield in between
    gevent.sleep(0.6)

    def killed_collection():
        try:
            gevent.sleep(30)
        finally:
            collect_ho.emit("collectEnded", None, True, "Data collection successful")

    running = gevent.spawn(killed_collection)
    gevent.sleep(0.1)
    running.kill()
    with gevent.Timeout(10, AssertionError("the recordings did not close")):
        while autocenter.recorder.recording or len(list(tmp_path.glob("autocenter_frames/loop_*_camera.h5"))) < 2:
            gevent.sleep(0.05)
    gevent.sleep(0.5)
    recordings = {path.name: read_recording(path) for path in tmp_path.glob("autocenter_frames/loop_*.h5")}
    assert sorted(recordings) == ["loop_a_1_camera.h5", "loop_b_1_camera.h5"]
    assert recordings["loop_a_1_camera.h5"].status == "complete"
    assert recordings["loop_b_1_camera.h5"].status == "aborted"
    assert all(len(r) >= 3 for r in recordings.values())
    # The helical end points of the earlier collection were not carried over.
    assert "helical_start" not in recordings["loop_a_1_camera.h5"].metadata


def two_collections(beamline, autocenter, tmp_path):
    """The collect object and the parameters of two collections, ``loop_a`` and ``loop_b``, for its signals
    (a collection's own, once it has run)."""
    collect(beamline, tmp_path / "first", "OSC")
    wait_for_summary(autocenter)
    base = beamline.collect.current_dc_parameters
    first, second = ({**base, "fileinfo": {**base["fileinfo"], "directory": str(tmp_path), "prefix": p}}
                     for p in ("loop_a", "loop_b"))  # fmt: skip
    return beamline.collect, first, second


def test_the_late_end_of_a_collection_does_not_end_the_next_ones_recording(beamline, autocenter, tmp_path):
    collect_ho, first, second = two_collections(beamline, autocenter, tmp_path)
    collect_ho.emit("collectOscillationStarted", (None, 1, "code", "1:01", first, 1))
    gevent.sleep(0.3)
    collect_ho.emit("collectOscillationStarted", (None, 1, "code", "1:01", second, 2))  # first's end not yet sent
    gevent.sleep(0.3)
    # The first collection's end arrives late, with a copy of its parameters.
    collect_ho.emit("collectOscillationFinished", (None, True, "Data collection successful", 5, 1, dict(first)))
    gevent.sleep(0.6)
    assert autocenter.recorder.recording
    collect_ho.emit("collectOscillationFinished", (None, True, "Data collection successful", 6, 2, dict(second)))
    with gevent.Timeout(10, AssertionError("the recordings did not close")):
        while autocenter.recorder.recording or len(list(tmp_path.glob("autocenter_frames/loop_*_camera.h5"))) < 2:
            gevent.sleep(0.05)
    gevent.sleep(0.5)
    recordings = {path.name: read_recording(path) for path in tmp_path.glob("autocenter_frames/loop_*.h5")}
    assert recordings["loop_a_1_camera.h5"].status == "aborted"
    assert recordings["loop_b_1_camera.h5"].status == "complete" and len(recordings["loop_b_1_camera.h5"]) >= 5


@pytest.mark.parametrize(("signal", "args"), [
    # AbstractMultiCollect (ESRF, MD2MultiCollect) and ALBA/PX1: the owner first, "mxcube" for the queue's.
    ("collectOscillationFailed", ("mxcube", False, "detector timeout", 1, 1)),
    ("collectEnded", ("mxcube", False, "detector timeout")),
    ("collectOscillationFailed", (None, False, "detector timeout", 1, 1)),  # AbstractCollect
])
def test_a_failed_collection_s_recording_keeps_the_collect_object_s_message(beamline, autocenter, tmp_path, signal,
                                                                           args):  # fmt: skip
    # The owner, the first string, was taken for the message: the file's error said "...: mxcube".
    collect_ho, first, _ = two_collections(beamline, autocenter, tmp_path)
    collect_ho.emit("collectOscillationStarted", (None, 1, "code", "1:01", first, 1))
    gevent.sleep(0.3)
    autocenter.recorder.last_summary = None
    collect_ho.emit(signal, args)
    summary = autocenter.recorder.wait_closed(10)
    assert summary.status == "failed" and summary.error.endswith(": detector timeout"), summary.error


def test_a_recording_closed_late_does_not_pass_for_the_next_ones(beamline, autocenter, tmp_path):
    # wait_closed gave the summary of whichever file closed last: the first recording, closed in the background
    # once the second collection had started, passed for the second's.
    collect_ho, first, second = two_collections(beamline, autocenter, tmp_path)
    collect_ho.emit("collectOscillationStarted", (None, 1, "code", "1:01", first, 1))
    gevent.sleep(0.3)
    autocenter.recorder.last_summary = None  # as a script does before its collection
    collect_ho.emit("collectOscillationStarted", (None, 1, "code", "1:01", second, 2))  # first's end never sent
    gevent.sleep(0.6)
    collect_ho.emit("collectOscillationFinished", (None, True, "Data collection successful", 6, 2, dict(second)))
    summary = autocenter.recorder.wait_closed(10)
    assert summary is not None and summary.path.name == "loop_b_1_camera.h5" and summary.status == "complete"


def test_unwritable_directory_is_logged_and_the_collection_is_unharmed(beamline, autocenter, tmp_path, caplog):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the recording directory should be")
    autocenter.config.record_directory = str(blocker / "frames")
    autocenter.recorder.last_summary = None
    with caplog.at_level(logging.ERROR, logger="HWR"):
        record = collect(beamline, tmp_path, "OSC", n_images=20)
        summary = wait_for_summary(autocenter)
    assert summary.status == "failed"
    assert str(blocker) in caplog.text
    # The collection went on as if nothing had happened.
    assert len(record["reflection_counts"]) == 20
    assert (tmp_path / "x_1_master.h5").exists()


def test_event_loop_keeps_ticking_while_recording_at_25_fps(beamline, autocenter, tmp_path):
    autocenter.config.record_frame_rate = 25
    autocenter.recorder.last_summary = None
    gaps = Gaps()
    ticker = gevent.spawn(tick, gaps)
    delivered = SignalLog(beamline.sample_view.camera, "imageReceived")
    record = collect(beamline, tmp_path, "OSC", n_images=60, exposure_time=0.05)
    summary = wait_for_summary(autocenter)
    ticker.kill()
    # During the exposure the recording kept the camera's rate (25/s, fewer on a
    # loaded machine); the rate limiter's fixed grid may skip a frame that comes
    # early after a late one, and the camera's frames before and after the
    # collection are not the recording's.
    plan, start = record["plan"], record["wall_start"]
    rec = read_recording(summary.path)
    kept = ((rec.timestamps >= start) & (rec.timestamps <= start + plan.duration)).sum()
    camera = [t for t in delivered.times if start <= t <= start + plan.duration]
    assert kept >= 0.8 * min(len(camera), 25 * plan.duration)
    assert summary.frames_dropped == 0
    assert_responsive(gaps)


def test_camera_that_stops_sending_stops_the_recording(beamline, autocenter, tmp_path, caplog):
    autocenter.config.record_camera_timeout_s = 0.5
    autocenter.recorder.last_summary = None
    camera = beamline.sample_view.camera
    camera.stop_streaming()
    try:
        with caplog.at_level(logging.ERROR, logger="HWR"):
            collect(beamline, tmp_path, "OSC", n_images=30)
            summary = wait_for_summary(autocenter)
    finally:
        camera.start_streaming()
    assert summary.status == "failed"
    assert "sent no new frame" in caplog.text


def test_a_collection_of_a_type_not_recorded_still_ends_the_recording_before_it(beamline, autocenter, tmp_path):
    collect(beamline, tmp_path / "first", "OSC")
    wait_for_summary(autocenter)
    base = beamline.collect.current_dc_parameters
    recorded = {**base, "fileinfo": {**base["fileinfo"], "directory": str(tmp_path), "prefix": "loop_a"}}
    mesh = {**recorded, "experiment_type": "Mesh", "fileinfo": {**recorded["fileinfo"], "prefix": "mesh"}}
    assert "Mesh" not in autocenter.config.record_scan_types
    beamline.collect.emit("collectOscillationStarted", (None, 1, "code", "1:01", recorded, 1))
    gevent.sleep(0.6)
    beamline.collect.emit("collectOscillationStarted", (None, 1, "code", "1:01", mesh, 2))  # no end signalled before
    with gevent.Timeout(10, AssertionError("the recording did not close")):
        while autocenter.recorder.recording:
            gevent.sleep(0.05)
    gevent.sleep(0.3)
    assert [path.name for path in tmp_path.glob("autocenter_frames/*.h5")] == ["loop_a_1_camera.h5"]
    assert read_recording(tmp_path / "autocenter_frames" / "loop_a_1_camera.h5").status == "aborted"


def test_a_poll_source_whose_snapshots_fail_logs_once_and_stops_the_recording(beamline, autocenter, tmp_path, caplog,
                                                                              monkeypatch):  # fmt: skip
    def broken_snapshot():
        raise RuntimeError("camera device gone")

    autocenter.config.record_source = "poll"
    autocenter.config.record_camera_timeout_s = 0.5
    autocenter.recorder.last_summary = None
    monkeypatch.setattr(autocenter.recorder, "_snapshot", broken_snapshot)
    with caplog.at_level(logging.ERROR, logger="HWR"):
        collect(beamline, tmp_path, "OSC", n_images=30)
        summary = wait_for_summary(autocenter)
    assert summary.status == "failed"
    assert caplog.text.count("the sample view's snapshot failed") == 1 and "camera device gone" in caplog.text
    assert "sent no new frame" in caplog.text and "record_source" not in caplog.text


def test_a_poll_sources_frames_are_timed_when_the_snapshot_came_in_and_stored_as_taken(beamline, autocenter,
                                                                                      tmp_path, monkeypatch):
    # The time was taken before the snapshot (tens of ms on a Lima camera) and the motors after it: omega ran
    # ahead of each frame's time. And raw storage kept the snapshot once through JPEG.
    snapshot = autocenter.recorder._snapshot
    taken = []  # (monotonic clock when each snapshot came in, its pixels)

    def slow_snapshot():
        gevent.sleep(0.08)
        rgb = snapshot()
        taken.append((time.monotonic(), rgb))
        return rgb

    autocenter.config.record_source = "poll"
    autocenter.config.record_storage = "raw"
    autocenter.recorder.last_summary = None
    monkeypatch.setattr(autocenter.recorder, "_snapshot", slow_snapshot)
    collect(beamline, tmp_path, "OSC", n_images=20)
    summary = wait_for_summary(autocenter)
    assert summary.status == "complete" and summary.frames_kept > 3
    rec = read_recording(summary.path)
    # On the recorder's own clock (monotonic, counted from the wall clock at the start), which a slewed wall
    # clock does not stretch: this machine's ran 0.5 % fast, 7 ms over the recording.
    taken = [(autocenter.recorder._wall_clock(t), rgb) for t, rgb in taken]
    for k, stamp in enumerate(rec.timestamps):
        came_in, rgb = min(taken, key=lambda t: abs(t[0] - stamp))
        assert -0.005 < stamp - came_in < 0.02
        assert np.array_equal(rec.frame(k), rgb)


def test_a_poll_source_whose_camera_freezes_records_no_repeats_and_stops(beamline, autocenter, tmp_path, caplog,
                                                                        monkeypatch):  # fmt: skip
    frozen = beamline.sample_view.get_snapshot(return_as_array=True)
    autocenter.config.record_source = "poll"
    autocenter.config.record_camera_timeout_s = 0.5
    autocenter.recorder.last_summary = None
    monkeypatch.setattr(autocenter.recorder, "_snapshot", lambda: frozen.copy())
    with caplog.at_level(logging.ERROR, logger="HWR"):
        collect(beamline, tmp_path, "OSC", n_images=30)
        summary = wait_for_summary(autocenter)
    assert summary.status == "failed" and summary.frames_kept == 1  # the frozen image once, then no repeat
    assert "sent no new frame" in caplog.text


def test_the_collection_s_data_directory_is_made_by_the_collect_object_not_by_the_recording(beamline, autocenter,
                                                                                          tmp_path, monkeypatch,
                                                                                          caplog):  # fmt: skip
    # AbstractCollect announces the collection before it makes its directories (after the shutters and the LIMS):
    # the recording made the data directory first, with the process's umask, and a collect object that makes it
    # with the site's permissions (P11Collect: 0o777) skips one that exists.
    collect_object = beamline.collect

    def create_directories_as_the_site_does(*directories):
        for directory in directories:
            if not os.path.isdir(directory):
                os.makedirs(directory)
                os.chmod(directory, 0o777)

    monkeypatch.setattr(collect_object, "create_directories", create_directories_as_the_site_does)
    autocenter.recorder.last_summary = None
    data_directory = tmp_path / "visit" / "RAW_DATA"
    collect(beamline, data_directory, "OSC", n_images=20)
    summary = wait_for_summary(autocenter)
    assert summary.status == "complete" and summary.path.parent == data_directory / "autocenter_frames"
    assert data_directory.stat().st_mode & 0o777 == 0o777
    # A collect object that cannot make it (or has no create_directories): the recording makes it, as before.
    calls = []

    def failing_once(*directories):
        calls.append(directories)
        if len(calls) == 1:
            raise OSError(13, "Permission denied", directories[0])
        create_directories_as_the_site_does(*directories)

    monkeypatch.setattr(collect_object, "create_directories", failing_once)
    autocenter.recorder.last_summary = None
    with caplog.at_level(logging.WARNING, logger="HWR"):
        collect(beamline, tmp_path / "other" / "RAW_DATA", "OSC", n_images=20)
        summary = wait_for_summary(autocenter)
    assert summary.status == "complete"
    assert "the collect object could not make the data directory" in caplog.text


def test_a_poll_source_records_a_sample_that_stands_still(beamline, autocenter, tmp_path):
    # A collection of still images (no oscillation): each snapshot shows the same scene, and a real sensor's noise
    # still makes them differ. The virtual camera's once were identical, and the recording stopped as frozen.
    autocenter.config.record_source = "poll"
    autocenter.config.record_camera_timeout_s = 0.5
    autocenter.recorder.last_summary = None
    collect(beamline, tmp_path, "OSC", n_images=30, osc_range=0.0)  # 1.5 s of exposures
    summary = wait_for_summary(autocenter)
    assert summary.status == "complete", summary.error
    assert summary.frames_kept >= 8


def test_a_zoom_change_during_a_collection_ends_its_recording_keeping_the_frames_before(beamline, autocenter,
                                                                                         tmp_path, monkeypatch,
                                                                                         caplog):  # fmt: skip
    # The frames are cropped at the scale the recording started with: those after a zoom change in the web UI
    # were recorded, and labelled, at the wrong scale.
    from mxcube_autocenter.beamline import ZOOM_LEVEL, set_zoom

    autocenter.recorder.last_summary = None
    caplog.set_level(logging.INFO, logger="user_level_log")
    collection = gevent.spawn(collect, beamline, tmp_path, "OSC", n_images=60)
    with gevent.Timeout(10, AssertionError("the recording did not start")):
        while not autocenter.recorder.recording:
            gevent.sleep(0.05)
    gevent.sleep(1.0)
    try:
        set_zoom(beamline, "LEVEL5")
        summary = wait_for_summary(autocenter)
        assert collection.get(timeout=60) and not autocenter.recorder.recording  # the collection went on
    finally:
        set_zoom(beamline, ZOOM_LEVEL)
    assert summary.status == "failed" and summary.frames_kept > 5
    assert summary.error.startswith("the camera's scale changed during the collection (zoom LEVEL5: ")
    # The web UI shows the user log alone: the user changed the zoom, and hears what it did.
    told = [r.getMessage() for r in caplog.records if r.name == "user_level_log" and r.levelno >= logging.WARNING]
    assert told == [f"Camera recording for the optical ML centring failed: {summary.error}"]
    assert read_recording(summary.path).error == summary.error
    # A diffractometer that updates its scale after the zoom's signal (GenericDiffractometer) says it apart.
    autocenter.recorder.last_summary = None
    collection = gevent.spawn(collect, beamline, tmp_path, "OSC", prefix="scaled", n_images=60)
    with gevent.Timeout(10, AssertionError("the recording did not start")):
        while not autocenter.recorder.recording:
            gevent.sleep(0.05)
    beamline.diffractometer.emit("pixelsPerMmChanged", ((1234.0, 1234.0)))  # as GenericDiffractometer emits it
    summary = wait_for_summary(autocenter)
    collection.get(timeout=60)
    assert summary.status == "failed" and f"(zoom {ZOOM_LEVEL}: 1234 pixels/mm, not 1300)" in summary.error
    # and as EMBLMiniDiff, PX2Diffractometer and others emit it: one argument, the pair.
    autocenter.recorder.last_summary = None
    collection = gevent.spawn(collect, beamline, tmp_path, "OSC", prefix="scaled_pair", n_images=60)
    with gevent.Timeout(10, AssertionError("the recording did not start")):
        while not autocenter.recorder.recording:
            gevent.sleep(0.05)
    beamline.diffractometer.emit("pixelsPerMmChanged", (((1234.0, 1234.0),)))
    summary = wait_for_summary(autocenter)
    collection.get(timeout=60)
    assert summary.status == "failed" and "1234 pixels/mm, not 1300" in summary.error
    # A recording started without a scale (an uncalibrated zoom level reads (None, None)) has none to compare.
    autocenter.recorder.last_summary = None
    with monkeypatch.context() as patched:
        patched.setattr(beamline.diffractometer, "get_pixels_per_mm", lambda: (None, None))
        collection = gevent.spawn(collect, beamline, tmp_path, "OSC", prefix="unscaled", n_images=30)
        with gevent.Timeout(10, AssertionError("the recording did not start")):
            while not autocenter.recorder.recording:
                gevent.sleep(0.05)
    beamline.diffractometer.emit("pixelsPerMmChanged", ((1234.0, 1234.0)))
    summary = wait_for_summary(autocenter)
    collection.get(timeout=60)
    assert summary.status == "complete", summary.error


def recorded_alone(beamline, autocenter, tmp_path, caplog, source, prefix, level):
    """The summary of one collection of 20 images recorded from ``source``, with its log at ``level`` alone in
    ``caplog``."""
    autocenter.config.record_source = source
    autocenter.recorder.last_summary = None
    caplog.clear()
    with caplog.at_level(level, logger="HWR"):
        collect(beamline, tmp_path, "OSC", prefix=prefix, n_images=20)
        return wait_for_summary(autocenter)


def test_motors_that_cannot_be_read_cost_their_frames_and_one_log_line(beamline, autocenter, tmp_path, caplog,
                                                                       monkeypatch):  # fmt: skip
    def unreadable_motors():
        raise RuntimeError("exporter connection lost")

    monkeypatch.setattr(autocenter.recorder, "_read_motors", unreadable_motors)
    # Each collection says it once (the second said nothing), counts the frames as dropped and ends failed (it
    # ended complete, of no frame; the poll source blamed the camera).
    for source, prefix in (("stream", "first"), ("stream", "second"), ("poll", "polled")):
        summary = recorded_alone(beamline, autocenter, tmp_path, caplog, source, prefix, logging.ERROR)
        assert (summary.status, summary.frames_kept) == ("failed", 0) and summary.frames_dropped > 0, prefix
        assert summary.error == "no frame kept: reading the centring motors failed", prefix
        assert caplog.text.count("reading the centring motors failed; frames") == 1, prefix
        assert "exporter connection lost" in caplog.text and "sent no new frame" not in caplog.text, prefix


def test_a_motor_the_diffractometer_leaves_out_is_recorded_as_nan_with_one_warning(beamline, autocenter, tmp_path,
                                                                                    caplog, monkeypatch):  # fmt: skip
    # An MD3 leaves a motor its server reports Disable or Unknown out of get_motors; so does the HO's read then.
    read = autocenter.recorder._read_motors
    for source, missing in (("stream", "phiz"), ("poll", "omega")):
        monkeypatch.setattr(autocenter.recorder, "_read_motors",
                            lambda: {k: v for k, v in read().items() if k != missing})  # fmt: skip
        summary = recorded_alone(beamline, autocenter, tmp_path, caplog, source, source, logging.WARNING)
        assert summary.status == "complete" and summary.frames_kept > 0, source
        rec = read_recording(summary.path)
        assert np.all(np.isnan(rec.motor(missing))) and np.all(np.isfinite(rec.motor("sampx"))), source
        assert caplog.text.count(f"get_motors() has no {missing}") == 1, source
        # Labelling times frames by omega's motion: without it, only a given clock offset labels the recording.
        assert ("labelled only with the clock offset given" in caplog.text) == (missing == "omega")


def test_poll_source_records_snapshots(beamline, autocenter, tmp_path):
    autocenter.config.record_source = "poll"
    autocenter.recorder.last_summary = None
    start = time.time()
    collect(beamline, tmp_path, "OSC", n_images=20)
    summary = wait_for_summary(autocenter)
    assert summary.status == "complete" and summary.frames_kept >= 5
    rec = read_recording(summary.path)
    assert rec.timestamps.min() >= start


def test_inspect_prints_a_summary_and_writes_a_contact_sheet(beamline, autocenter, tmp_path, capsys):
    import cv2

    from mxcube_autocenter.cli import main

    autocenter.recorder.last_summary = None
    collect(beamline, tmp_path, "OSC", n_images=10)
    path = wait_for_summary(autocenter).path
    png = tmp_path / "sheet.png"
    assert main(["inspect", str(path), "--png", str(png), "--frames", "4"]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "x_1_master.h5" in out
    assert cv2.imread(str(png)).shape[2] == 3
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 1
    assert "missing.h5" in capsys.readouterr().err
    # One sheet for several recordings: refused, not left out for sheets beside each.
    assert main(["inspect", str(path), str(path), "--png", str(tmp_path / "both.png")]) == 2
    assert "--png names one contact sheet, and 2 recordings were given" in capsys.readouterr().err
    assert not (tmp_path / "both.png").exists() and not path.with_suffix(".png").exists()

    # `inspect *.h5 | head`: the reader goes away; one quiet stop, not an error per recording.
    copies = [str(shutil.copy(path, tmp_path / f"copy{k}_master.h5")) for k in range(3)]
    reader, writer = os.pipe()
    os.close(reader)
    try:
        run = subprocess.run([sys.executable, "-m", "mxcube_autocenter.cli", "inspect", *copies, "--frames", "1"],
                             stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(writer)
    assert run.returncode == 141 and "Broken pipe" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def test_label_command_turns_recordings_into_a_training_set(beamline, autocenter, tmp_path, capsys):
    from mxcube_autocenter.cli import main
    from mxcube_autocenter.labelling.dataset import RowReader, read_table

    autocenter.recorder.last_summary = None
    record = collect(beamline, tmp_path, "Helical", n_images=30)
    recording = wait_for_summary(autocenter).path
    out = tmp_path / "dataset.h5"
    assert main(["label", str(recording), "--out", str(out)]) == 0
    assert str(recording.name) in capsys.readouterr().out
    data = read_table(out)
    assert len(data) >= 5
    # Each row carries the reflection count of the detector frame exposed at that moment.
    truth = np.asarray(record["reflection_counts"], dtype=float)
    frames = np.asarray(data.detector_frame)
    assert frames.min() >= 0 and frames.max() < 30
    assert np.mean(np.abs(np.asarray(data.rc) - truth[frames]) <= np.maximum(3, 0.1 * truth[frames])) >= 0.9
    with RowReader(data.path, data.image_dataset) as reader:
        assert reader.image(0).ndim == 3
    # Labelling the same recording again is detected and skipped.
    assert main(["label", str(recording), "--out", str(out)]) == 0
    assert len(read_table(out)) == len(data)


@pytest.mark.parametrize("video_mode", ["RGB24", "RGB32", "RGB8"])
def test_a_lima_camera_that_streams_raw_pixels_is_recorded(beamline, autocenter, tmp_path, video_mode):
    """mxcubecore's TangoLimaVideo sends imageReceived(pixel_bytes, width, height, False), not JPEG: 3 bytes a
    pixel in its RGB24 video mode, 4 (RGBA) in RGB32, 1 (grey) in RGB8; the recorder reads its video_mode property."""
    camera = beamline.sample_view.camera
    camera.set_stream(video_mode, interval_ms=15)  # TangoLimaVideo's example configuration: repeats too
    try:
        autocenter.recorder.last_summary = None
        collect(beamline, tmp_path, "OSC")
        summary = wait_for_summary(autocenter)
    finally:
        camera.set_stream()
    assert summary.status == "complete" and summary.error is None and summary.frames_dropped == 0, summary
    rec = read_recording(summary.path)
    assert len(rec) > 5
    # Repeats are no frames: at most one frame an exposure, 25 a second.
    assert np.all(np.diff(rec.timestamps) > 0.03)
    rgb = np.frombuffer(camera.get_last_image()[0], np.uint8).reshape(camera.get_height(), camera.get_width(), 3)
    expected = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2) if video_mode == "RGB8" else rgb
    frame = rec.frame(len(rec) - 1)
    assert frame.shape == expected.shape
    assert np.abs(frame.astype(float) - expected).mean() < 8  # the same picture, once through JPEG


def test_a_raw_rgb_frame_whose_first_pixel_reads_like_a_jpeg_marker_is_raw(beamline):
    from mxcube_autocenter.collection_recorder import stream_frame

    camera = beamline.sample_view.camera
    data, width, height = camera.get_last_image()
    pixels = bytearray(data)
    pixels[:3] = b"\xff\xd8\xff"  # a saturated first pixel, green 216
    frame = stream_frame(bytes(pixels), (width, height, False))
    assert isinstance(frame, np.ndarray) and frame.shape == (height, width, 3)
    assert tuple(frame[0, 0]) == (255, 216, 255)


# Lima's raw video modes, built byte by byte: each must come out as the image the camera saw.
# A known image: three bands of colour (multiples of 17, exact in 12 bits), each 8 pixels wide.
BANDS = np.array([(204, 51, 17), (17, 170, 68), (34, 85, 238)], np.uint8)
KNOWN = np.repeat(np.repeat(BANDS[None], 12, axis=0), 8, axis=1)  # 12 x 24 pixels


def decoded(data, video_mode, shape=KNOWN.shape):
    """What the writer thread makes of a raw frame from a camera in ``video_mode``."""
    from mxcube_autocenter.collection_recorder import stream_frame

    frame = stream_frame(data, (shape[1], shape[0], False), video_mode)
    assert callable(frame)  # decoded on the writer thread, not in the event loop
    rgb = frame()
    assert rgb.shape == (*shape[:2], 3) and rgb.dtype == np.uint8
    return rgb


@pytest.mark.parametrize("video_mode", ["RGB24", "BGR24", "RGB32", "BGR32"])
def test_rgb_and_bgr_frames_are_decoded_by_the_cameras_video_mode(video_mode):
    from mxcube_autocenter.collection_recorder import stream_frame

    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    pixels = rgb[:, :, ::-1] if video_mode.startswith("BGR") else rgb
    if video_mode.endswith("32"):
        pixels = np.concatenate([pixels, np.full((6, 10, 1), 255, np.uint8)], axis=2)  # alpha last
    assert np.array_equal(decoded(pixels.tobytes(), video_mode, rgb.shape), rgb)
    if video_mode == "BGR24":  # without the mode, the layout is guessed from the byte count: red and blue swap
        assert np.array_equal(stream_frame(pixels.tobytes(), (10, 6, False)), pixels)


@pytest.mark.parametrize("video_mode", ["Y8", "RGB8"])
def test_grey_frames_are_decoded_by_the_cameras_video_mode(video_mode):
    grey = np.arange(60, dtype=np.uint8).reshape(6, 10)
    assert np.array_equal(decoded(grey.tobytes(), video_mode, grey.shape), np.stack([grey] * 3, axis=2))


def test_y16_frames_are_scaled_to_8_bits_by_the_bits_they_use():
    """A 12-bit camera in Y16: 0..4095, two bytes a pixel, low byte first; 273 * k is 17 * k in 8 bits."""
    levels = np.arange(16).repeat(4).reshape(8, 8)
    data = b"".join(int(273 * k).to_bytes(2, "little") for k in levels.ravel())
    assert np.array_equal(decoded(data, "Y16", levels.shape), np.stack([17 * levels] * 3, axis=2))


def test_sixteen_bit_frames_of_one_recording_keep_one_brightness_scale():
    # Guessed frame by frame, a 12-bit frame whose brightest pixel is 1100 came out at 68 and the same scene 9 %
    # dimmer (1000, read as 10-bit) at 249.
    from mxcube_autocenter.collection_recorder import BitDepth, decode_raw_frame

    depth = BitDepth()
    bright, dim = (decode_raw_frame(np.full((4, 8), level, "<u2").tobytes(), 8, 4, "Y16", depth)[0, 0, 0]
                   for level in (1100, 1000))  # fmt: skip
    assert (bright, dim) == (round(1100 * 255 / 4095), round(1000 * 255 / 4095))
    assert decode_raw_frame(np.full((4, 8), 1000, "<u2").tobytes(), 8, 4, "Y16")[0, 0, 0] == round(1000 * 255 / 1023)


def test_yuv422_frames_are_decoded_as_lima_packs_them_u_y_v_y():
    """Each pair of pixels is U, Y0, V, Y1 (BT.601, Y in 16..235, as OpenCV takes it)."""

    def yuv(r, g, b):
        return (16 + 0.257 * r + 0.504 * g + 0.098 * b, 128 - 0.148 * r - 0.291 * g + 0.439 * b,
                128 + 0.439 * r - 0.368 * g - 0.071 * b)  # fmt: skip

    # Pairs share their colour (U, V) but not their brightness (Y): a dark and a light grey, then the bands.
    rgb = np.concatenate([np.array([[[60, 60, 60], [200, 200, 200]]], np.uint8), BANDS.repeat(2, axis=0)[None]], axis=1)
    data = bytearray()
    for left, right in zip(rgb[0, 0::2], rgb[0, 1::2]):
        (y0, u, v), (y1, _, _) = yuv(*left), yuv(*right)
        data += bytes(round(c) for c in (u, y0, v, y1))
    frame = decoded(bytes(data), "YUV422", rgb.shape)
    assert np.abs(frame.astype(int) - rgb).max() <= 3, frame


@pytest.mark.parametrize("video_mode", ["BAYER_RG8", "BAYER_BG8", "BAYER_RG16", "BAYER_BG16"])
def test_bayer_frames_are_demosaiced_in_the_sensors_pattern(video_mode):
    """Lima's BAYER_RG is a sensor whose rows run R G R G ..., G B G B ...; BAYER_BG's B G ..., G R ...."""
    red, green, blue = (KNOWN[:, :, c].astype(np.uint16) for c in range(3))
    first, last = (red, blue) if video_mode.startswith("BAYER_RG") else (blue, red)
    mosaic = green.copy()
    mosaic[0::2, 0::2] = first[0::2, 0::2]
    mosaic[1::2, 1::2] = last[1::2, 1::2]
    if video_mode.endswith("16"):
        data = (mosaic // 17 * 273).astype("<u2").tobytes()  # a 12-bit sensor, 2 bytes a pixel, low byte first
    else:
        data = mosaic.astype(np.uint8).tobytes()
    frame = decoded(data, video_mode)
    # Inside the bands (away from their edges, where demosaicing blends neighbours) the colours are the image's.
    for band in range(3):
        inside = (slice(2, -2), slice(8 * band + 2, 8 * band + 6))
        assert np.abs(frame[inside].astype(int) - KNOWN[inside]).max() <= 1, (band, frame[inside][0, 0])


def bare_recorder(tmp_path, camera, **settings):
    """A CollectionRecorder of ``camera`` (streamed), without a beamline, and a collection's parameters for it."""
    from mxcube_autocenter.collection_recorder import CollectionRecorder
    from mxcube_autocenter.config import AutoCenterConfig

    # The XML properties' own validation: a property renamed or dropped fails here, as it would in MXCuBE.
    settings = AutoCenterConfig(**{
        "recording_enabled": True, "record_scan_types": ["OSC"], "record_directory": str(tmp_path),
        "record_storage": "jpeg", "record_min_free_mb": 0.0, "record_frame_rate": 10.0, "record_max_frames": 1000,
        "record_source": "stream", "record_camera_timeout_s": 0.5, **settings,
    })  # fmt: skip
    recorder = CollectionRecorder(lambda: settings, camera, None, lambda: {"omega": 0.0}, lambda: {})
    dc_params = {"experiment_type": "OSC", "oscillation_sequence": [{"start": 0.0, "range": 0.1}],
                 "fileinfo": {"directory": str(tmp_path), "prefix": "x", "run_number": 1}}  # fmt: skip
    return recorder, dc_params


class BareCamera:
    """A camera as the recorder sees it: its ``video_mode`` property (TangoLimaVideo's; None: none, as a JPEG
    camera has), its ``imageReceived`` stream."""

    def __init__(self, video_mode):
        self.video_mode = video_mode
        self.properties_read = 0

    def get_property(self, name, default=None):
        self.properties_read += 1
        return self.video_mode if name == "video_mode" else default

    def connect(self, *args):
        pass

    def disconnect(self, *args):
        pass


def test_a_lima_camera_is_recorded_by_its_video_mode_read_once_a_recording(tmp_path, caplog):
    camera = BareCamera("BGR24")
    recorder, dc_params = bare_recorder(tmp_path, camera, record_storage="raw")
    recorder.start(dc_params)
    frames = [np.roll(KNOWN, k, axis=1) for k in range(4)]  # a repeated image is not a new frame
    with caplog.at_level(logging.WARNING):
        for frame in frames:
            recorder.frame_received(frame[:, :, ::-1].tobytes(), 24, 12, False)
            gevent.sleep(0.15)
        # A frame that does not fit the mode is dropped, naming the property to check.
        recorder.frame_received(KNOWN.tobytes()[:-3], 24, 12, False)
        gevent.sleep(0.01)  # its motors read
        summary = recorder.stop("complete")
    assert (summary.status, summary.error, summary.frames_kept, summary.frames_dropped) == ("complete", None, 4, 1)
    assert np.array_equal(read_recording(summary.path).frame(3), frames[3])
    assert camera.properties_read == 1
    assert "a BGR24 frame of 24 x 12 pixels is 864 bytes, the camera sent 861" in caplog.text
    assert "video_mode property" in caplog.text


def test_a_lima_camera_in_a_video_mode_the_recorder_cannot_decode_is_not_recorded_with_one_error(tmp_path, caplog):
    recorder, dc_params = bare_recorder(tmp_path, BareCamera("I420"))
    with caplog.at_level(logging.ERROR, logger="HWR"):
        recorder.start(dc_params)
        for _ in range(3):
            recorder.frame_received(bytes(24 * 12 * 3 // 2), 24, 12, False)
    assert not recorder.recording and not list(tmp_path.rglob("*.h5"))
    [error] = caplog.records
    assert "video_mode property is 'I420'" in error.getMessage()
    assert "RGB24, BGR24, RGB32, BGR32, RGB8, Y8, Y16, YUV422, BAYER_RG8, BAYER_BG8, BAYER_RG16, BAYER_BG16" in error.getMessage()


def test_a_recording_that_ends_while_a_frame_reads_the_motors_takes_that_frame_quietly(beamline, autocenter, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """An MD3's motor positions come over the network: the collection may end while a frame waits for them."""
    errors = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: errors.append(exc))  # what mxcubecore's dispatcher calls
    # What gevent calls for a greenlet's error (the frames' motor reads run in greenlets of their own).
    monkeypatch.setattr(gevent.get_hub(), "handle_error", lambda context, *exc: errors.append(exc))
    # 0.15 s for a frame's five motors: longer than the recording's frame period, so a frame is always waiting.
    with beamline.diffractometer.read_latency(0.03):
        for prefix in ("a", "b", "c"):
            autocenter.recorder.last_summary = None
            collect(beamline, tmp_path, "OSC", prefix=prefix, n_images=10)
            assert wait_for_summary(autocenter).status == "complete"
    gevent.sleep(0.5)
    assert errors == [], [str(exc[1]) for exc in errors]


def test_motors_read_over_a_network_do_not_slow_the_camera_down(beamline, autocenter, tmp_path, monkeypatch):
    # The reads ran in the camera's own greenlet: an MD3's network waits held up its poller, and every other
    # listener of its frames (25 -> 14 frames/s recording at 10/s). Measured as the time each frame's delivery holds
    # the camera, which a slow machine's rendering does not change (its frame rate it does).
    camera = beamline.sample_view.camera
    emit, holds = camera.emit, []

    def timed_emit(signal, *args):
        start = time.monotonic()
        emit(signal, *args)
        if signal == "imageReceived":
            holds.append(time.monotonic() - start)

    monkeypatch.setattr(camera, "emit", timed_emit)
    autocenter.recorder.last_summary = None
    with beamline.diffractometer.read_latency(0.012):  # 60 ms for a frame's five motors
        record = collect(beamline, tmp_path, "OSC", n_images=40, exposure_time=0.05)
        summary = wait_for_summary(autocenter)
    duration = record["plan"].duration
    assert summary.frames_kept >= 0.8 * 10 * duration and summary.frames_dropped == 0
    assert len(holds) >= summary.frames_kept and np.mean(holds) < 0.015, (len(holds), np.mean(holds), max(holds))


def test_the_clock_origin_is_read_as_at_one_moment_when_another_thread_takes_the_gil_between_reads(monkeypatch):
    # Read one after the other, a GIL switch between the two reads (5 ms) put every frame's time 5 ms early.
    from mxcube_autocenter import collection_recorder

    now, reads = [100.0], []

    def read(offset):
        def clock():
            reads.append(offset)
            if len(reads) == 2:  # the first wall-clock read comes 5 ms late
                now[0] += 0.005
            now[0] += 1e-6
            return now[0] + offset
        return clock

    monkeypatch.setattr(collection_recorder.time, "monotonic", read(0.0))
    monkeypatch.setattr(collection_recorder.time, "time", read(1.7e9))
    wall, monotonic = collection_recorder.clock_origin()
    assert abs((wall - monotonic) - 1.7e9) < 2e-6


def test_a_clock_step_during_a_collection_neither_skips_frames_nor_stops_the_recording(tmp_path, monkeypatch):
    """NTP may step the wall clock (time.time) by seconds: the frames must keep their rate and steady timestamps."""
    from types import SimpleNamespace

    from mxcube_autocenter import collection_recorder
    from mxcube_autocenter.recording import encode_jpeg, synthetic_frame

    step = [0.0]
    monkeypatch.setattr(collection_recorder, "time", SimpleNamespace(
        time=lambda: time.time() + step[0], monotonic=time.monotonic))  # fmt: skip
    recorder, dc_params = bare_recorder(tmp_path, BareCamera(None))  # no video_mode: a JPEG camera
    frame = synthetic_frame(160, 128)
    jpegs = iter([encode_jpeg(np.clip(frame.astype(int) + k, 0, 255).astype(np.uint8)) for k in range(45)])
    recorder.start(dc_params)
    for clock_step in (0.0, -30.0, +60.0):  # back 30 s, then 30 s ahead of the true time
        step[0] = clock_step
        for _ in range(15):  # 0.6 s of camera frames at 25 frames/s
            recorder.frame_received(next(jpegs), 160, 128)
            gevent.sleep(0.04)
    summary = recorder.stop("complete")
    assert (summary.status, summary.error) == ("complete", None)
    timestamps = read_recording(summary.path).timestamps
    assert len(timestamps) >= 16  # 1.8 s at 10 frames/s: none skipped while the clock was behind
    assert np.all(np.diff(timestamps) > 0) and np.all(np.diff(timestamps) < 0.5)


def test_a_frozen_streaming_camera_records_no_repeats_and_stops_the_recording(tmp_path):
    # mxcubecore's TangoLimaVideo sends its last image on every poll, changed or not: each copy was kept with a new
    # time and new motor positions (labelled with other moments' counts), and the watchdog never fired.
    from mxcube_autocenter.recording import encode_jpeg, synthetic_frame

    recorder, dc_params = bare_recorder(tmp_path, BareCamera(None), record_camera_timeout_s=0.5)
    frozen = encode_jpeg(synthetic_frame(160, 128))
    recorder.start(dc_params)
    for _ in range(50):  # 2 s of the same image at 25 frames/s
        recorder.frame_received(frozen, 160, 128)
        gevent.sleep(0.04)
    summary = recorder.last_summary or recorder.stop("complete")
    assert (summary.frames_kept, summary.status) == (1, "failed")
    assert summary.error == "the camera sent no new frame for 0.5 s" == read_recording(summary.path).error


def test_a_camera_sending_new_images_between_the_frames_kept_keeps_the_recording_alive(tmp_path):
    # At 1 frame/s kept, a 0.5 s time-out heard only the frames kept: every recording of a live camera failed.
    from mxcube_autocenter.recording import encode_jpeg, synthetic_frame

    recorder, dc_params = bare_recorder(tmp_path, BareCamera(None), record_frame_rate=1.0, record_camera_timeout_s=0.5)
    frame = synthetic_frame(160, 128)
    recorder.start(dc_params)
    for k in range(60):  # 2.4 s of new images at 25 frames/s
        recorder.frame_received(encode_jpeg(np.clip(frame.astype(int) + k % 50, 0, 255).astype(np.uint8)), 160, 128)
        gevent.sleep(0.04)
    summary = recorder.last_summary or recorder.stop("complete")
    assert (summary.status, summary.error) == ("complete", None) and summary.frames_kept >= 2


def test_a_frame_kept_is_an_images_first_arrival_with_its_own_time(tmp_path):
    # A new image arriving before its due time was skipped, and its repeat after the due time kept, stamped with
    # the repeat's arrival (up to a camera frame late) and the motors read then.
    from mxcube_autocenter.recording import decode_jpeg, encode_jpeg, synthetic_frame

    recorder, dc_params = bare_recorder(tmp_path, BareCamera(None), record_frame_rate=10.0, record_camera_timeout_s=2)
    base = synthetic_frame(160, 128)
    images = [encode_jpeg(np.clip(base.astype(int) + 3 * k, 0, 255).astype(np.uint8)) for k in range(20)]
    recorder.start(dc_params)
    first_heard = {}
    gevent.sleep(0.05)  # new images half-way between the due times
    for k, image in enumerate(images):  # a new image every 60 ms, sent again every 20 ms
        for _ in range(3):
            first_heard.setdefault(k, time.time())
            recorder.frame_received(image, 160, 128)
            gevent.sleep(0.02)
    recording = read_recording(recorder.stop("complete").path)
    decoded = [decode_jpeg(image).astype(int) for image in images]
    with recording.reader() as frame:
        kept = [int(np.argmin([np.abs(frame(i).astype(int) - d).mean() for d in decoded])) for i in range(len(recording))]
    assert len(kept) >= 5
    late_ms = [1000 * (stamp - first_heard[k]) for stamp, k in zip(recording.timestamps, kept)]
    assert max(late_ms) < 5


def test_a_camera_that_sends_qt_images_ends_the_recording_failed_naming_the_fix(tmp_path, caplog):
    # mxcubecore's Qt cameras (AbstractVideoDevice) emit imageReceived(QPixmap): it went to the writer thread, which
    # failed with "unexpected error ... please report it" (or, the payload never compared equal, never timed out).
    class QPixmap:
        pass

    recorder, dc_params = bare_recorder(tmp_path, BareCamera(None))
    recorder.start(dc_params)
    with caplog.at_level(logging.ERROR, logger="HWR"):
        recorder.frame_received(QPixmap())
    summary = recorder.wait_closed(5)
    assert summary.status == "failed" and summary.frames_kept == 0
    assert "sends QPixmap images" in summary.error and "record_source to 'poll'" in summary.error
    assert "sends QPixmap images" in caplog.text and "please report it" not in caplog.text


def test_a_camera_that_cannot_be_listened_to_ends_the_recording_failed(tmp_path):
    # mxcubecore's connect asks TangoLimaVideo's Lima device, which raises when the server is down: the recording
    # stayed open without a watchdog until the next collection, then closed as complete.
    class UnreachableCamera(BareCamera):
        def connect(self, *args):
            raise RuntimeError("DevFailed: device not exported")

        def disconnect(self, *args):  # as pydispatch's, for a slot never registered
            raise KeyError("no receivers for imageReceived")

    recorder, dc_params = bare_recorder(tmp_path, UnreachableCamera(None))
    with pytest.raises(RuntimeError, match="not exported"):
        recorder.start(dc_params)
    assert not recorder.recording
    summary = recorder.wait_closed()
    assert summary.status == "failed" and "could not listen to the camera" in summary.error


def test_an_event_loop_held_up_is_no_silence_of_the_camera(tmp_path):
    # Something else in MXCuBE holds the event loop longer than the camera time-out: the camera's frames were held
    # up with it, and the watchdog, woken first, stopped the recording as if the camera were silent.
    from gevent import monkey

    from mxcube_autocenter.recording import encode_jpeg, synthetic_frame

    recorder, dc_params = bare_recorder(tmp_path, BareCamera(None), record_camera_timeout_s=1.0)
    base = synthetic_frame(160, 128)
    images = [encode_jpeg(np.clip(base.astype(int) + k, 0, 255).astype(np.uint8)) for k in range(60)]

    def camera():  # as TangoLimaVideo: read the device (yields), send the image, wait
        for k in range(10**6):
            gevent.sleep(0.005)
            recorder.frame_received(images[k % 60], 160, 128)
            gevent.sleep(0.04)

    recorder.start(dc_params)
    streaming = gevent.spawn(camera)
    gevent.sleep(0.5)
    monkey.get_original("time", "sleep")(1.5)  # the event loop held for 1.5 s
    gevent.sleep(1.0)
    streaming.kill()
    assert recorder.recording
    assert recorder.stop("complete").status == "complete"


def test_the_virtual_camera_streams_a_still_scene_as_new_exposures(beamline):
    # A real sensor's noise makes each frame of a still scene differ: the recorder would take identical frames
    # of the virtual camera for a frozen camera (a 16M collection's files take longer to write than the time-out).
    camera = beamline.sample_view.camera
    frames = []

    def received(image, *args):
        frames.append(image)

    camera.connect("imageReceived", received)
    try:
        gevent.sleep(0.3)
    finally:
        camera.disconnect("imageReceived", received)
    assert len(frames) >= 3 and len(set(frames)) == len(frames)
    images = [cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR) for f in frames[:2]]
    assert np.array_equal(*images)


def test_the_virtual_camera_delivers_a_moving_scene_its_latency_after_the_exposure(beamline, monkeypatch):
    # It slept latency_s after rendering: a frame of a moving scene came 30 ms after its exposure where labelling
    # subtracts 20 ms, and one row in eight of a rotation was matched with the next detector frame.
    camera = beamline.sample_view.camera
    scene, update, exposed, rendered, delays = camera._scene, camera._update, [], [], []

    def moving_scene():  # a new scene every frame (omega turning), so that every frame is rendered
        exposed.append(time.monotonic())
        key, *parts = scene()
        return (key, exposed[-1]), *parts

    def timed_update():
        update()
        rendered.append(time.monotonic())

    def received(*args):
        if not rendered:  # the exposure under way when the scene was swapped
            return
        # Due latency_s after the exposure, or once rendered where rendering takes longer (a slow machine).
        due = max(exposed[-1] + camera._latency_s, rendered[-1])
        delays.append((time.monotonic() - exposed[-1], time.monotonic() - due))

    monkeypatch.setattr(camera, "_scene", moving_scene)
    monkeypatch.setattr(camera, "_update", timed_update)
    camera.connect("imageReceived", received)
    try:
        # Five frames: 0.2 s at 25 frames/s, longer where each takes 150 ms to render (a loaded 2-core machine).
        with gevent.Timeout(5.0, False):
            while len(delays) < 5:
                gevent.sleep(0.05)
    finally:
        camera.disconnect("imageReceived", received)
    since_exposure, late = np.array(delays).T
    assert len(delays) >= 5 and np.min(since_exposure) > camera._latency_s - 0.002 and np.median(late) < 0.004


def test_the_crystal_id_is_the_collections_own_or_the_lims_sample_or_the_named_sample_at_its_position():
    # mxcubecore's queue sends blSampleId -1 without LIMS, and no crystal_id: the sample changer position alone
    # made every crystal mounted from it one "crystal" for the split.
    from mxcube_autocenter.collection_recorder import crystal_id

    assert crystal_id({"crystal_id": "xtal-7", "blSampleId": 12}, "3:05") == "xtal-7"
    assert crystal_id({"blSampleId": 345678, "sample_name": "lyso-1"}, "3:05") == 345678
    assert crystal_id({"blSampleId": -1, "sample_name": "lyso-1"}, "3:05") == "lyso-1 @ 3:05"
    assert crystal_id({"blSampleId": -1, "sample_name": "lyso-2"}, "3:05") != crystal_id(
        {"blSampleId": -1, "sample_name": "lyso-1"}, "3:05")
    assert crystal_id({"blSampleId": None}, "3:05") == "3:05"
    assert crystal_id({}, None) is None


def test_frames_stay_in_time_order_when_a_motor_read_is_slow(tmp_path):
    # An MD3's positions come over the exporter: a frame arriving during a slow read was written before the frame
    # being read, with positions read after that one's.
    from mxcube_autocenter.recording import encode_jpeg, synthetic_frame

    recorder, dc_params = bare_recorder(tmp_path, BareCamera(None), record_frame_rate=25.0, record_camera_timeout_s=5)
    delays = itertools.chain([0.005, 0.09], itertools.repeat(0.005))
    start = time.time()

    def read_motors():
        gevent.sleep(next(delays))
        return {"omega": 10.0 * (time.time() - start), "phiy": 0.0, "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}

    recorder._read_motors = read_motors
    base = synthetic_frame(160, 128)
    recorder.start(dc_params)
    arrivals = []
    for k in range(12):  # a camera at 25 frames/s, each frame delivered in a greenlet of its own
        frame = encode_jpeg(np.clip(base.astype(int) + 3 * k, 0, 255).astype(np.uint8))
        arrivals.append(gevent.spawn(recorder.frame_received, frame, 160, 128))
        gevent.sleep(0.04)
    gevent.joinall(arrivals)
    recording = read_recording(recorder.stop("complete").path)
    assert np.all(np.diff(recording.timestamps) > 0), recording.timestamps - start
    # Each row's omega was read within a short read of its time (the slow read's own frame aside).
    lag = recording.motor("omega") / 10.0 - (recording.timestamps - start)
    assert np.sort(lag)[-2] < 0.05, lag  # a slow read written out of order lags by its 90 ms


def test_a_recording_that_cannot_be_written_is_said_twice_not_three_times(tmp_path, caplog):
    # The writer's "camera recording stopped", the watchdog's "recording stopped" and the summary's "recording
    # failed ... in None" for one failure: three alarms per collection in a misconfigured folder.
    (tmp_path / "a_file").write_text("")
    recorder, dc_params = bare_recorder(tmp_path / "a_file", BareCamera(None), record_camera_timeout_s=5)
    with caplog.at_level(logging.ERROR):
        recorder.start(dc_params)
        with gevent.Timeout(10, AssertionError("the recording did not stop")):
            while recorder.recording:
                gevent.sleep(0.05)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and "recording failed: 0 frames kept, 0 dropped in no file" in errors[1], errors


def test_a_lima_camera_s_poller_that_listening_started_stops_when_no_one_listens(beamline):
    # mxcubecore's TangoLimaVideo starts polling its device when imageReceived is first connected to, and never
    # stops: after the first recording or centring, each poll converted a frame on the event loop for good
    # (16-36 % of it), though mxcubeweb itself never listens.
    from mxcubecore.HardwareObjects.TangoLimaVideo import TangoLimaVideo

    from mxcube_autocenter.collection_recorder import listen_to_camera, stop_listening_to_camera
    from mxcube_autocenter.simulation.lima import VirtualLimaDevice

    camera = TangoLimaVideo("lima")
    camera._video_mode = "RGB24"
    camera.device = VirtualLimaDevice(beamline.sample_view.camera)
    heard = []

    def recorder(image, width, height, *args):
        heard.append((width, height))

    def centring(*args):
        pass

    def others(*args):
        pass

    def polled_within(seconds=0.3):
        before = camera.device.reads
        gevent.sleep(seconds)
        return camera.device.reads > before

    listen_to_camera(camera, recorder)
    listen_to_camera(camera, centring)
    assert polled_within() and heard[-1] == (1280, 1024)
    stop_listening_to_camera(camera, recorder)
    assert polled_within()  # the centring still listens
    stop_listening_to_camera(camera, centring)
    assert not polled_within()
    listen_to_camera(camera, centring)  # and it starts again
    assert polled_within()
    stop_listening_to_camera(camera, centring)
    assert not polled_within()
    # Two first listeners at once (the recorder's and a centring's): the camera reads its device between looking
    # for a poller and starting one, so both started one, and one of them ran on for good.
    gevent.joinall([gevent.spawn(listen_to_camera, camera, recorder), gevent.spawn(listen_to_camera, camera, centring)])
    gevent.joinall([gevent.spawn(stop_listening_to_camera, camera, recorder),
                    gevent.spawn(stop_listening_to_camera, camera, centring)])  # fmt: skip
    assert not polled_within()
    # A poller that someone else's connection started is theirs.
    camera.connect("imageReceived", others)
    listen_to_camera(camera, centring)
    stop_listening_to_camera(camera, centring)
    camera.disconnect("imageReceived", others)
    try:
        assert polled_within()
    finally:
        camera._TangoLimaVideo__polling.kill()
