"""The AutoCenter hardware object inside a real mxcubecore beamline."""

import gc
import sys

import gevent
import numpy as np
import pytest

from mxcube_autocenter.AutoCenter import AutoCenter
from mxcube_autocenter.beamline import auto_centring
from tests.helpers import Gaps, assert_responsive, tick


def test_plugin_loads_from_xml_with_its_properties(beamline):
    ho = beamline.get_object_by_role("auto_centring")
    assert isinstance(ho, AutoCenter)
    assert ho is auto_centring(beamline)
    settings = ho.settings()
    assert settings["record_frame_rate"] == 10.0
    assert settings["record_scan_types"] == ["OSC", "Helical"]
    assert settings["recording_enabled"] is True
    assert ho.get_property("record_frame_rate") == 10.0


def test_loaded_model_is_out_of_full_garbage_collections(beamline):
    # A full collection walks every tracked object with the event loop waiting;
    # TensorFlow's and the model's are frozen out of them once the model loads.
    assert auto_centring(beamline).predictor is not None
    keras_model = auto_centring(beamline).predictor.model
    assert "tensorflow" in sys.modules
    assert gc.get_freeze_count() > 100_000
    gc.collect()  # an unfrozen model, wherever it was, is then in generation 2, which get_objects() lists
    assert not any(obj is keras_model for obj in gc.get_objects())


def test_a_replaced_model_is_freed(beamline):
    # Frozen with everything else at its load, a model replaced later stayed in memory for good (2.9 MB of the
    # shipped models, and their 3 500 objects, at each replacement): only a collection frees its cycles.
    import weakref

    from mxcube_autocenter.centring.predictor import load_predictor

    ho = auto_centring(beamline)
    old = weakref.ref(ho.predictor.model)
    ho.use_predictor(load_predictor())
    gc.collect()
    assert old() is None and ho.predictor.model is not None


def test_the_models_load_with_the_event_loop_free(beamline, monkeypatch):
    # At start-up the other hardware objects' greenlets run on: loaded on the loop, the models held them 1-5 s.
    # The one full garbage collection that follows holds every thread, as any does, and is timed apart.
    from mxcube_autocenter import AutoCenter as module

    ho = auto_centring(beamline)
    before = ho.predictor
    frozen = []
    # Counted, not measured: gc.get_freeze_count() walks every frozen object (over 0.1 s in a whole test session).
    monkeypatch.setattr(module, "freeze_long_lived_objects", lambda: frozen.append(True) or 0.5)
    gaps = Gaps()
    # The collector's own automatic collections run on whichever thread allocates, the loop's too, and walk every
    # object not yet frozen (in a whole test session, over 0.1 s): collections are timed apart, as above.
    gc.disable()
    try:
        ticker = gevent.spawn(tick, gaps)
        gevent.sleep(0.05)
        ho._load_models()
        ticker.kill()
    finally:
        gc.enable()
    assert ho.centring_error is None and ho.predictor is not before and len(frozen) == 1
    assert len(gaps.wall) > 20  # the loop ran while the models loaded
    assert_responsive(gaps)


def test_a_missing_model_is_one_error_at_start_up_not_a_traceback(beamline, tmp_path, monkeypatch, capfd):
    # Loaded on a thread of its own, the error was printed with a traceback by gevent's pool as well.
    ho = auto_centring(beamline)
    predictor = ho.predictor
    monkeypatch.setattr(ho.config, "centring_model", str(tmp_path / "missing.keras"))
    try:
        ho._load_models()
        assert ho.centring_error.startswith(f"{tmp_path / 'missing.keras'}: no such model file")
        assert "Traceback" not in capfd.readouterr().err
    finally:
        ho.use_predictor(predictor)
    assert ho.centring_error is None


def test_sample_view_camera_and_motors_reachable(beamline):
    frame = beamline.sample_view.get_snapshot(return_as_array=True)
    assert frame.ndim == 3 and frame.shape[2] == 3
    assert frame.dtype == np.uint8
    assert frame.std() > 0  # a real image, not a blank buffer

    motors = beamline.diffractometer.get_motors()
    for role in ("omega", "phiy", "phiz", "sampx", "sampy"):
        assert role in motors
    assert beamline.diffractometer.zoom is not None
    assert all(v > 0 for v in beamline.diffractometer.get_pixels_per_mm())
    assert len(beamline.beam.get_beam_position_on_screen()) == 2
    for role in ("detector", "collect", "queue_manager", "queue_model"):
        assert beamline.get_object_by_role(role) is not None


def test_motor_moves_are_seen_through_the_beamline(beamline):
    phiy = beamline.diffractometer.phiy
    start = phiy.get_value()
    phiy.set_value(start + 0.05, timeout=10)
    assert phiy.get_value() == pytest.approx(start + 0.05, abs=1e-6)
    phiy.set_value(start, timeout=10)
