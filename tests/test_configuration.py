"""Booting the beamline from XML: configuration errors of the AutoCenter object, as
beamline staff meet them, a freshly booted beamline, and what a torn-down one
leaves running."""

import logging
import shutil

import gevent
import pytest

from mxcube_autocenter.beamline import auto_centring, hardware_repository, virtual_beamline_dir
from mxcube_autocenter.config import AutoCenterConfig
from mxcube_autocenter.geometry import CENTRING_MOTORS


def _config_with(tmp_path, old, new):
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    xml = config / "auto_centring.xml"
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new))
    return config


def _logged(caplog):
    return "\n".join(
        str(r.exc_info[1]) if r.exc_info else r.getMessage() for r in caplog.records
    )


def _refused_at_load(tmp_path, caplog, old, new) -> str:
    """Boot the virtual beamline with ``old`` replaced by ``new`` in the AutoCenter XML; the log of its refusal."""
    with caplog.at_level(logging.ERROR, logger="HWR"):
        with hardware_repository(_config_with(tmp_path, old, new)) as bl:
            assert bl.get_object_by_role("auto_centring") is None
            with pytest.raises(LookupError, match="beamline.yaml"):
                auto_centring(bl)
    return _logged(caplog)


def test_malformed_property_gives_clear_error(tmp_path, caplog):
    messages = _refused_at_load(tmp_path, caplog, "<record_frame_rate>10</record_frame_rate>",
                                "<record_frame_rate>fast</record_frame_rate>")  # fmt: skip
    assert "record_frame_rate = 'fast'" in messages
    assert "Frames recorded per second" in messages
    assert "docs/configuration.md" in messages


def test_unknown_scan_type_is_refused(tmp_path, caplog):
    messages = _refused_at_load(tmp_path, caplog, '["OSC", "Helical"]', '["OSC", "Mesh"]')
    assert "record_scan_types" in messages
    assert "'OSC' or 'Helical'" in messages


def test_a_recording_path_template_that_cannot_be_filled_in_is_refused_at_load(tmp_path, caplog):
    # Filled in only when a collection starts: there a typo would only log "could not start recording"
    # (a KeyError naming no property) at every collection, and nothing would ever be recorded.
    messages = _refused_at_load(tmp_path, caplog, "{data_directory}/autocenter_frames", "{data_dir}/autocenter_frames")
    assert "record_directory = '{data_dir}/autocenter_frames'" in messages and "{data_directory}" in messages
    for prop, value in [("record_directory", "autocenter_frames"), ("master_file_template", "{directory}/{prefix"),
                        ("master_file_template", "{}/{prefix}_master.h5")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"{prop} = "):
            AutoCenterConfig(**{prop: value})
    assert AutoCenterConfig(record_directory="/data/frames").record_directory == "/data/frames"


def test_centring_properties_from_xml_and_the_take_over_switch(tmp_path):
    with hardware_repository() as bl:
        ho = auto_centring(bl)
        assert bl.sample_view.start_auto_centring.__self__ is ho  # the web UI's button runs the ML centring
        settings = ho.centring_settings()
        assert (settings.n_angles, settings.verify, settings.heatmap_symmetries) == (3, "require", "none")
    config = _config_with(
        tmp_path,
        "</object>",
        "<centring_enabled>False</centring_enabled><centring_angles>4</centring_angles>"
        "<verify_centring>off</verify_centring><heatmap_symmetries>flips</heatmap_symmetries></object>",
    )
    with hardware_repository(config) as bl:
        ho = auto_centring(bl)
        assert bl.sample_view.start_auto_centring.__self__ is bl.sample_view  # MXCuBE's own lucid centring
        settings = ho.centring_settings()
        assert (settings.n_angles, settings.verify, settings.heatmap_symmetries) == (4, "off", "flips")


def test_blind_views_must_leave_two_views_to_see_the_crystal():
    assert AutoCenterConfig(centring_angles=4, blind_views=2).blind_views == 2
    with pytest.raises(ValueError) as err:
        AutoCenterConfig(centring_angles=3, blind_views=2)
    assert "blind_views = 2 with 3 centring angles: at most 1" in str(err.value)
    assert "hardware object's XML file" in str(err.value)


def test_camera_of_a_torn_down_beamline_stops_streaming():
    with hardware_repository() as bl:
        old_camera = bl.sample_view.camera
        gevent.sleep(0.2)
        assert old_camera.frame_number > 0
    with hardware_repository() as bl:
        camera = bl.sample_view.camera
        gevent.sleep(0.2)  # the old stream notices at its next frame
        old_frames, frames = old_camera.frame_number, camera.frame_number
        bl.diffractometer.get_motors()["phiy"].set_value(0.05, timeout=5)  # a new scene to film
        gevent.sleep(0.3)
        assert camera.frame_number > frames
        assert old_camera.frame_number == old_frames


def test_motors_of_a_fresh_beamline_can_be_aborted():
    # A failed centring stops every centring motor before moving the sample back,
    # also when nothing has moved since the beamline booted.
    with hardware_repository() as bl:
        motors = bl.diffractometer.get_motors()
        for name in CENTRING_MOTORS:
            motors[name].abort()
            assert motors[name].get_state() == motors[name].STATES.READY


def test_the_queue_task_is_registered_only_when_auto_centring_loads_after_the_queue_manager(tmp_path, caplog):
    from mxcubecore import queue_entry

    from mxcube_autocenter.queue_entry import OpticalMLCentring, OpticalMLCentringQueueEntry

    with hardware_repository():
        assert queue_entry.MODEL_QUEUE_ENTRY_MAPPINGS[OpticalMLCentring] is OpticalMLCentringQueueEntry
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    yaml = config / "beamline.yaml"
    lines = yaml.read_text().splitlines(keepends=True)
    auto = next(line for line in lines if "auto_centring:" in line)
    lines.remove(auto)
    lines.insert(lines.index(next(line for line in lines if "queue_manager:" in line)), auto)
    yaml.write_text("".join(lines))
    with caplog.at_level(logging.WARNING, logger="HWR"):
        with hardware_repository(config):
            assert OpticalMLCentring not in queue_entry.MODEL_QUEUE_ENTRY_MAPPINGS
    assert "list auto_centring after queue_manager in beamline.yaml" in _logged(caplog)


@pytest.mark.parametrize("prop, value", [("min_score", "nan"), ("max_displacement_mm", "inf"), ("move_timeout_s", "inf")])
def test_nan_or_inf_never_switches_a_threshold_or_limit_off(prop, value):
    with pytest.raises(ValueError) as err:
        AutoCenterConfig(**{prop: value})
    assert f"{prop} = '{value}': Input should be a finite number" in str(err.value)


def test_a_goniometer_unlike_the_centrings_projection_keeps_mxcubes_own_centring(tmp_path, caplog):
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    xml = config / "sample_view.xml"
    xml.write_text(xml.read_text().replace('"sampx": 1,', '"sampx": -1,'))
    with caplog.at_level(logging.ERROR, logger="HWR"):
        with hardware_repository(config) as bl:
            ho = auto_centring(bl)
            assert bl.sample_view.start_auto_centring.__self__ is bl.sample_view
            start = {name: bl.diffractometer.get_motors()[name].get_value() for name in CENTRING_MOTORS}
            result = ho.centre(save=False)
            assert not result.success and result.start_positions == start
    message = "the sample view's motor_directions of sampx are not 1 (SampleView XML)"
    assert message in result.message and message in _logged(caplog)
