"""Booting the beamline from XML: configuration errors of the AutoCenter object, as
beamline staff meet them, a freshly booted beamline, and what a torn-down one
leaves running."""

import logging
import re
import shutil

import gevent
import pytest
from mxcubecore.BaseHardwareObjects import HardwareObjectNode

from mxcube_autocenter.beamline import auto_centring, hardware_repository, virtual_beamline_dir
from mxcube_autocenter.centring.predictor import SHIPPED_ICE_MODEL, SHIPPED_REGRESSOR
from mxcube_autocenter.config import AutoCenterConfig
from mxcube_autocenter.geometry import CENTRING_MOTORS
from mxcube_autocenter.simulation.sample import make_sample


def _config_with(tmp_path, old, new):
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    xml = config / "auto_centring.xml"
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new))
    return config


def _from_xml(**texts) -> AutoCenterConfig:
    """The configuration of XML elements with these texts, read as mxcubecore reads them (no beamline booted)."""
    node = HardwareObjectNode("auto_centring")
    for name, text in texts.items():
        node._set_property(name, text)  # mxcubecore's own conversion of an element's text
    return AutoCenterConfig(**node.get_properties())


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


@pytest.mark.parametrize("name, value", [("min_score", float("nan")), ("pin_side", "up"), ("record_frame_rate", 0),
                                         ("verify_centring", "maybe"), ("blind_views", 9),
                                         # 0.7 mm typed into a um field: an empty region, an OpenCV error each time
                                         ("roi_width_um", 0.7)])
def test_a_value_set_from_a_script_is_checked_as_the_xml_is_and_a_refused_one_changes_nothing(name, value):
    # Unchecked, a NaN min_score switched the crystal threshold off and a frame rate of 0 divided by zero.
    config = AutoCenterConfig()
    before = config.model_dump()
    with pytest.raises(ValueError, match=name):
        setattr(config, name, value)
    assert config.model_dump() == before
    config.min_score = 3  # an accepted value takes its type
    assert config.min_score == 3.0 and isinstance(config.min_score, float)


def test_a_misspelt_property_set_from_a_script_is_refused_naming_the_right_one():
    # It was stored beside the properties and changed nothing.
    config = AutoCenterConfig()
    with pytest.raises(AttributeError, match="no property 'min_scor': did you mean 'min_score'"):
        config.min_scor = 50


def test_a_polled_camera_must_be_heard_before_its_watchdog_ends_the_recording():
    # A frame period over the time-out stopped every recording of a camera that streamed fine.
    with pytest.raises(ValueError, match="record_camera_timeout_s .5 s. must be at least two frame periods"):
        AutoCenterConfig(record_source="poll", record_frame_rate=0.1)
    AutoCenterConfig(record_source="stream", record_frame_rate=0.1)  # the stream hears every image the camera sends


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
    # None at all recorded nothing, without a word, while recording_enabled said yes.
    with pytest.raises(ValueError, match=r"record_scan_types = \[\]: List should have at least 1 item"):
        _from_xml(record_scan_types="[]")


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
        assert (settings.n_angles, settings.verify_centring, settings.heatmap_symmetries) == (6, "require", "none")
        assert settings.blind_views == 2
        # A script's or queue task's fewer views keep two that must see the crystal.
        assert (ho.centring_settings(3).n_angles, ho.centring_settings(3).blind_views) == (3, 1)
        assert ho.centring_settings(8).blind_views == 2
    config = _config_with(
        tmp_path,
        '<record_frame_rate>10</record_frame_rate>\n  <record_scan_types>["OSC", "Helical"]</record_scan_types>\n'
        "</object>",
        '<record_frame_rate>7</record_frame_rate><record_scan_types>["Helical"]</record_scan_types>'
        "<centring_enabled>False</centring_enabled><centring_angles>4</centring_angles>"
        "<verify_centring>off</verify_centring><heatmap_symmetries>flips</heatmap_symmetries></object>",
    )
    with hardware_repository(config) as bl:
        ho = auto_centring(bl)
        sample_view = bl.sample_view
        assert sample_view.start_auto_centring.__wrapped__.__self__ is sample_view  # MXCuBE's own lucid centring
        settings = ho.centring_settings()
        assert (settings.n_angles, settings.verify_centring, settings.heatmap_symmetries) == (4, "off", "flips")
        # The recording's properties too (the virtual beamline's own XML gives their defaults).
        assert (ho.settings()["record_frame_rate"], ho.settings()["record_scan_types"]) == (7.0, ["Helical"])
        # A script's or the queue task's optical ML centring runs all the same: SampleView's own centrings, lucid's
        # from the button and a click centring, must not move the sample under it.
        mounted = bl.sample_changer.mount(make_sample(16))
        bl.diffractometer.set_value_motors({"omega": 0.0, "phiy": float(mounted.sample.loop_centre[0]), "phiz": 0.0,
                                            "sampx": 0.0, "sampy": 0.0}, timeout=30)  # fmt: skip
        centring = gevent.spawn(ho.centre, save=False)
        with gevent.Timeout(60, AssertionError("the centring did not start")):
            while not ho._centring_lock.locked():
                gevent.sleep(0.02)
        sample_view.start_auto_centring()
        sample_view.start_manual_centring(3)
        assert sample_view.current_centring_procedure is None
        assert centring.get(timeout=150).success


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


def _auto_centring_listed_before(tmp_path, role: str):
    """A copy of the virtual beamline whose beamline.yaml lists auto_centring just before ``role``."""
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    yaml = config / "beamline.yaml"
    lines = yaml.read_text().splitlines(keepends=True)
    auto = next(line for line in lines if "auto_centring:" in line)
    lines.remove(auto)
    lines.insert(lines.index(next(line for line in lines if f"{role}:" in line)), auto)
    yaml.write_text("".join(lines))
    return config


def test_the_queue_task_is_registered_only_when_auto_centring_loads_after_the_queue_manager(tmp_path, caplog):
    from mxcubecore import queue_entry

    from mxcube_autocenter.queue_entry import OpticalMLCentring, OpticalMLCentringQueueEntry

    with hardware_repository():
        assert queue_entry.MODEL_QUEUE_ENTRY_MAPPINGS[OpticalMLCentring] is OpticalMLCentringQueueEntry
    config = _auto_centring_listed_before(tmp_path, "queue_manager")
    with caplog.at_level(logging.WARNING, logger="HWR"):
        with hardware_repository(config):
            assert OpticalMLCentring not in queue_entry.MODEL_QUEUE_ENTRY_MAPPINGS
    assert "list auto_centring after queue_manager in beamline.yaml" in _logged(caplog)


def test_auto_centring_listed_before_the_sample_view_says_so_and_the_button_keeps_lucid(tmp_path, caplog):
    # It set an attribute on None: an AttributeError traceback, and no word of the order.
    config = _auto_centring_listed_before(tmp_path, "sample_view")
    with caplog.at_level(logging.WARNING, logger="HWR"):
        with hardware_repository(config) as bl:
            assert bl.sample_view.start_auto_centring.__self__ is bl.sample_view
            assert auto_centring(bl) is not None
    assert "list auto_centring after sample_view in beamline.yaml" in _logged(caplog)
    assert "AttributeError" not in caplog.text


@pytest.mark.parametrize("prop, value", [("min_score", "nan"), ("max_displacement_mm", "inf"), ("move_timeout_s", "inf")])
def test_nan_or_inf_never_switches_a_threshold_or_limit_off(prop, value):
    with pytest.raises(ValueError) as err:
        AutoCenterConfig(**{prop: value})
    assert f"{prop} = '{value}': Input should be a finite number" in str(err.value)


def test_a_goniometer_unlike_the_centrings_projection_keeps_mxcubes_own_centring(tmp_path, caplog):
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    xml = config / "sample_view.xml"
    xml.write_text(xml.read_text().replace('"sampx": 1,', '"sampx": 0.5,'))
    with caplog.at_level(logging.ERROR, logger="HWR"):
        with hardware_repository(config) as bl:
            ho = auto_centring(bl)
            assert bl.sample_view.start_auto_centring.__wrapped__.__self__ is bl.sample_view
            start = {name: bl.diffractometer.get_motors()[name].get_value() for name in CENTRING_MOTORS}
            result = ho.centre(save=False)
            assert not result.success and result.start_positions == start
    message = "the sample view's motor_directions of sampx are not 1 or -1 (SampleView XML)"
    assert message in result.message and message in _logged(caplog)


def test_a_rotation_axis_without_its_reference_position_is_warned_of_once_and_not_otherwise(tmp_path, caplog):
    # Without phiz's reference the centring takes the axis at phiz 0: 30 um off, it centred 58 um off the crystal,
    # and the verification view accepted it.
    with caplog.at_level(logging.WARNING, logger="HWR"):
        with hardware_repository() as bl:
            assert bl.sample_view.centring_motors["phiz"].reference_position == 0.0
    assert "centring_reference_position" not in _logged(caplog)
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    xml = config / "sample_view.xml"
    xml.write_text(xml.read_text().replace('<centring_reference_position>{"phiz": 0.0}</centring_reference_position>',
                                           ""))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="HWR"):
        with hardware_repository(config) as bl:
            auto_centring(bl).use_predictor(auto_centring(bl).predictor)
    assert _logged(caplog).count("phiz has no centring_reference_position (SampleView XML)") == 1


def test_elements_written_over_several_lines_and_the_text_none_read_as_meant(tmp_path):
    # mxcubecore keeps an element's blanks and line breaks, and reads the text None as None.
    config = _config_with(
        tmp_path,
        '<record_scan_types>["OSC", "Helical"]</record_scan_types>',
        '<record_scan_types>\n    ["Helical"]\n  </record_scan_types>\n'
        "  <record_source>\n    poll\n  </record_source>\n"
        "  <centring_enabled>\n    False\n  </centring_enabled>\n"
        "  <heatmap_symmetries>None</heatmap_symmetries><no_crystal_fallback>None</no_crystal_fallback>",
    )
    with hardware_repository(config) as bl:
        ho = auto_centring(bl)
        assert ho.config.record_scan_types == ["Helical"] and ho.config.record_source == "poll"
        assert ho.config.centring_enabled is False
        assert (ho.config.heatmap_symmetries, ho.config.no_crystal_fallback) == ("none", "none")


@pytest.mark.parametrize("prop", ["record_max_frames", "centring_angles", "blind_views", "min_crystal_probability",
                                  "refine_max_um"])
def test_true_or_false_is_no_number(prop):
    # mxcubecore reads the text True as a bool, which pydantic would take as 1: one frame a collection,
    # or a classifier that refuses every crystal.
    with pytest.raises(ValueError) as err:
        _from_xml(**{prop: "True"})
    assert f"{prop} = True: Value error, expected a number, not True or False" in str(err.value)


def test_refinement_onto_the_crystal_is_bounded_and_may_be_off():
    assert _from_xml(refine_max_um="0").refine_max_um == 0.0
    assert _from_xml().refine_max_um == 7.0
    for bad in ("-1", "80"):
        with pytest.raises(ValueError) as err:
            _from_xml(refine_max_um=bad)
        assert f"refine_max_um = {bad}" in str(err.value)


def test_home_in_a_path_is_expanded_and_a_save_folder_is_no_template(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = _from_xml(centring_model="~/site.keras", centring_save_directory="~/centrings",
                       record_directory="~/frames")  # fmt: skip
    assert config.centring_model == str(tmp_path / "site.keras")
    assert config.centring_save_directory == str(tmp_path / "centrings")
    assert config.record_directory == str(tmp_path / "frames")
    # Only record_directory is filled in at each collection: here a literal "{data_directory}" folder would be made.
    with pytest.raises(ValueError, match=r"centring_save_directory = '\{data_directory\}/centrings': .*not a template"):
        _from_xml(centring_save_directory="{data_directory}/centrings")


@pytest.mark.parametrize("template, why", [("{dirctory}/{prefix}_{run_number}_master.h5", "KeyError: 'dirctory'"),
                                           ("{directory}/{prefix}_{run_number:s}_master.h5", "ValueError"),
                                           ("{prefix}_{run_number}_master.h5", "absolute path")])
def test_a_master_file_template_that_no_collection_can_fill_in_is_refused_at_load(template, why):
    # Accepted, it failed at every collection, as "could not start recording" in the log.
    with pytest.raises(ValueError, match=rf"master_file_template = .*{why}"):
        _from_xml(master_file_template=template)
    assert _from_xml(master_file_template="{archive_directory}/../{prefix}_{run_number:d}_master.h5")


def test_an_empty_master_file_template_is_refused():
    # It would name the master file "." in every recording, which no labelling could find.
    with pytest.raises(ValueError, match="master_file_template = '': .*leave the property out for the default"):
        _from_xml(master_file_template="")


def test_a_folder_or_name_of_digits_is_refused_with_how_to_write_it():
    # mxcubecore makes the text 2024 (or 007, 1e3) a number: the refusal said only "Input should be a valid
    # string", and turning the number back into text would name another folder ("7", "1000.0").
    for name, text in (("centring_save_directory", "007"), ("username", "1e3")):
        with pytest.raises(ValueError, match=rf"{name} = .*reads this text as the number .*give a folder or file as "
                                             r"\./NAME, a name with a letter in it"):
            _from_xml(**{name: text})
    assert _from_xml(centring_save_directory="./2024").centring_save_directory == "./2024"


def test_relative_paths_start_at_the_xml_files_folder(tmp_path, monkeypatch):
    # Not at MXCuBE's working directory, which is no fixed place for a service.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = _config_with(tmp_path, "</object>", "<centring_model>models/site.keras</centring_model>"
                                                 "<centring_ice_model>models/ice.keras</centring_ice_model>"
                                                 "<centring_save_directory>centrings</centring_save_directory></object>")
    (config / "models").mkdir()
    shutil.copy(SHIPPED_REGRESSOR, config / "models" / "site.keras")
    shutil.copy(SHIPPED_ICE_MODEL, config / "models" / "ice.keras")
    with hardware_repository(config) as bl:
        ho = auto_centring(bl)
        assert ho.centring_error is None
        assert ho.predictor.regressor_path == config / "models" / "site.keras"
        assert ho.predictor.ice[0] == config / "models" / "ice.keras"
        assert ho.config.centring_save_directory == str(config / "centrings")
        # A script's relative path starts there too, not where MXCuBE happens to run.
        ho.config.centring_save_directory = "reviews"
        assert ho.config.centring_save_directory == str(config / "reviews")


def test_the_shipped_ice_network_is_asked_unless_another_is_configured(tmp_path, caplog):
    with hardware_repository() as bl:
        assert auto_centring(bl).predictor.ice[0] == SHIPPED_ICE_MODEL
    # A crystal regressor given as the ice network: refused at start-up, MXCuBE's own centring kept.
    config = _config_with(tmp_path, "</object>", f"<centring_ice_model>{SHIPPED_REGRESSOR}</centring_ice_model></object>")
    with caplog.at_level(logging.ERROR, logger="HWR"):
        with hardware_repository(config) as bl:
            ho = auto_centring(bl)
            assert bl.sample_view.start_auto_centring.__wrapped__.__self__ is bl.sample_view
            result = ho.centre(save=False)
    reason = f"{SHIPPED_REGRESSOR}: not an ice network"
    assert not result.success and reason in result.message and "centring_ice_model property" in _logged(caplog)


def test_a_model_folder_keeps_mxcubes_own_centring_and_names_the_file_in_it(tmp_path, caplog):
    # `train --out DIR` writes DIR/model.keras: a staff member may well give DIR.
    folder = tmp_path / "site" / "regressor"
    folder.mkdir(parents=True)
    shutil.copy(SHIPPED_REGRESSOR, folder / "model.keras")
    config = _config_with(tmp_path, "</object>", f"<centring_model>{folder}</centring_model></object>")
    with caplog.at_level(logging.ERROR, logger="HWR"):
        with hardware_repository(config) as bl:
            ho = auto_centring(bl)  # the object loads: recording still works
            assert ho.recorder is not None
            assert bl.sample_view.start_auto_centring.__wrapped__.__self__ is bl.sample_view
            result = ho.centre(save=False)
    reason = f"{folder}: a folder, not a model file. Give the model file in it: {folder / 'model.keras'}"
    assert not result.success and reason in result.message and reason in _logged(caplog)


def test_a_check_across_properties_names_them_without_listing_every_property():
    with pytest.raises(ValueError) as err:
        _from_xml(username="Staff centring", centring_angles="3", blind_views="2")
    message = str(err.value)
    assert "blind_views = 2 with 3 centring angles: at most 1" in message
    assert "Staff centring" not in message and "(configuration)" not in message


@pytest.mark.parametrize(("xml", "element", "value", "message"), [
    ("motor_omega.xml", "velocity", "180 deg/s", "velocity = '180 deg/s': give a number from 1e-06 units/s"),
    ("collect.xml", "detector", "4m", "detector = '4m': give one of small, 4M, 16M"),
    ("beam.xml", "beam_profile", "top-hat", "beam_profile = 'top-hat': give one of gaussian, tophat"),
    ("camera.xml", "look", "Random", "look = 'Random': give one of default, random"),
    ("camera.xml", "video_mode", "BAYER_RG16", "video_mode = 'BAYER_RG16': give one of RGB24, RGB32, RGB8"),
    ("camera.xml", "interval", "15 ms", "interval = '15 ms': give a number from 1 to 10000 ms"),
    ("diffractometer.xml", "pixels_per_um", "[500000.0]", "pixels_per_um = '[500000.0]': give the scale of each zoom"),
])  # fmt: skip
def test_a_virtual_beamline_property_mxcubecore_cannot_use_is_named_with_the_fix(tmp_path, caplog, xml, element,
                                                                                  value, message):  # fmt: skip
    # They failed as a bare ValueError or KeyError ("could not convert string to float", "KeyError: '4m'"), the
    # object left out (a later centring said omega was "Disable or Unknown"), or were taken silently.
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    path = config / xml
    text = path.read_text()
    if f"<{element}>" not in text:  # camera.xml's look is present; others are added where absent
        text = text.replace("</object>", f"  <{element}>x</{element}>\n</object>")
    path.write_text(re.sub(f"<{element}>.*?</{element}>", f"<{element}>{value}</{element}>", text))
    with caplog.at_level(logging.ERROR):
        with hardware_repository(config):
            pass
    assert f"{xml.removesuffix('.xml')}: {message}" in caplog.text
