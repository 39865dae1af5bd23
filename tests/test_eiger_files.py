"""Synthetic EIGER files: the writer's layout, and reading them back one frame at a time."""

import shutil
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from tests.helpers import GROUP_SIGNATURES, damaged_copy
from mxcube_autocenter.labelling.eiger import EigerFileError, iso_date, open_master
from mxcube_autocenter.simulation.eiger import (
    DEAD,
    EIGER_4M,
    EIGER_16M,
    GAP,
    HOT,
    SMALL,
    DetectorGeometry,
    write_eiger_collection,
)

START = 1_700_000_000.123456  # unix s, wall clock
FRAME_TIME = 0.1
COUNT_TIME = 0.0999
N_FRAMES = 25


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """25 frames in 3 data files, with per-frame start times by a detector clock 0.12 s ahead."""
    rng = np.random.default_rng(5)
    frame_starts = START + 0.12 + np.arange(N_FRAMES) * FRAME_TIME + rng.normal(0, 0.002, N_FRAMES)
    written = write_eiger_collection(
        tmp_path_factory.mktemp("eiger"), "xtal_1", list(range(0, 5 * N_FRAMES, 5)),
        start_time=START, frame_time=FRAME_TIME, count_time=COUNT_TIME,
        images_per_file=10, seed=3, frame_start_times=frame_starts,
    )  # fmt: skip
    return written, frame_starts


def small_collection(directory, n_frames=3, images_per_file=1, **kwargs):
    return write_eiger_collection(
        directory, "xtal_2", [20] * n_frames, start_time=START, frame_time=FRAME_TIME,
        count_time=COUNT_TIME, images_per_file=images_per_file, **kwargs,
    )  # fmt: skip


def test_real_eiger2_sizes_are_whole_modules():
    for geometry, n_modules in ((EIGER_4M, 8), (EIGER_16M, 32)):
        gaps = geometry.gap_mask()
        assert gaps.shape == (geometry.height, geometry.width)
        module_pixels = geometry.module_width * geometry.module_height
        assert np.count_nonzero(~gaps) == n_modules * module_pixels
    with pytest.raises(ValueError, match="not a whole number"):
        DetectorGeometry("odd", 500, 514, 250, 238, 12, 38, 250.0, 257.0)


def test_a_detectors_pixel_mask_is_its_own_whatever_the_collection_seed():
    from mxcube_autocenter.simulation.eiger import FrameSimulator

    first, other = FrameSimulator(SMALL, seed=0), FrameSimulator(SMALL, seed=7)
    np.testing.assert_array_equal(first.pixel_mask, other.pixel_mask)
    assert (first.capacity, first.ice_capacity) == (other.capacity, other.ice_capacity) == (1198, 187)
    assert not np.array_equal(first.frame(5)[0], other.frame(5)[0])  # noise and spots still follow the seed


def test_files_are_named_and_linked_as_the_eiger_filewriter_does(collection):
    written, _ = collection
    assert written.master_path.name == "xtal_1_master.h5"
    assert [p.name for p in written.data_paths] == [f"xtal_1_data_00000{k}.h5" for k in (1, 2, 3)]
    assert sorted(p.name for p in written.master_path.parent.iterdir()) == sorted(
        [written.master_path.name, *(p.name for p in written.data_paths)]
    )
    with h5py.File(written.master_path) as f:
        assert f["entry"].attrs["NX_class"] == "NXentry"
        for k, path in enumerate(written.data_paths, start=1):
            link = f["entry/data"].get(f"data_{k:06d}", getlink=True)
            assert isinstance(link, h5py.ExternalLink)
            assert (link.filename, link.path) == (path.name, "/entry/data/data")
            assert f[f"entry/data/data_{k:06d}"].shape[1:] == (SMALL.height, SMALL.width)


def test_master_file_holds_the_nexus_and_detector_specific_metadata(collection):
    written, _ = collection
    with h5py.File(written.master_path) as f:
        detector = f["entry/instrument/detector"]
        assert detector.attrs["NX_class"] == "NXdetector"
        assert detector["count_time"][()] == COUNT_TIME
        assert detector["frame_time"][()] == FRAME_TIME
        assert detector["count_time"].attrs["units"] == b"s"
        assert detector["x_pixel_size"][()] == pytest.approx(75e-6)
        assert detector["y_pixel_size"].attrs["units"] == b"m"
        assert detector["beam_center_x"][()] == SMALL.beam_center_x
        assert detector["beam_center_y"].attrs["units"] == b"pixel"
        assert detector["detector_distance"][()] == pytest.approx(SMALL.distance / 1e3)
        assert detector["sensor_material"][()] == b"Si"
        assert detector["sensor_thickness"][()] == pytest.approx(450e-6)
        assert f["entry/instrument/beam/incident_wavelength"][()] == SMALL.wavelength
        specific = detector["detectorSpecific"]
        assert specific["nimages"][()] == N_FRAMES
        assert specific["ntrigger"][()] == 1
        assert specific["data_collection_date"][()] == b"2023-11-14T22:13:20.123456+00:00"
        assert (specific["x_pixels_in_detector"][()], specific["y_pixels_in_detector"][()]) == (512, 514)
        assert specific["countrate_correction_count_cutoff"][()] == detector["saturation_value"][()]
        mask = specific["pixel_mask"][()]
    assert mask.dtype == np.uint32
    gaps = SMALL.gap_mask()
    assert np.all(mask[gaps] & GAP) and not np.any(mask[~gaps] & GAP)
    assert np.count_nonzero(mask & HOT) >= 3 and np.count_nonzero(mask & DEAD) >= 3


def test_frames_are_bitshuffle_lz4_one_chunk_per_frame(collection):
    written, _ = collection
    for k, path in enumerate(written.data_paths):
        with h5py.File(path) as f:
            data = f["entry/data/data"]
            assert data.dtype == np.uint32
            assert data.chunks == (1, SMALL.height, SMALL.width)
            plist = data.id.get_create_plist()
            filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
            assert [code for code, *_ in filters] == [hdf5plugin.BSHUF_ID]
            assert filters[0][2][4] == 2  # bitshuffle's compression option: 2 = LZ4
            assert data.attrs["image_nr_low"] == 10 * k + 1
            assert data.attrs["image_nr_high"] == min(10 * (k + 1), N_FRAMES)


def test_timing_reads_back_as_written(collection):
    written, frame_starts = collection
    with open_master(written.master_path) as series:
        assert series.nimages == N_FRAMES
        assert series.count_time == COUNT_TIME and series.frame_time == FRAME_TIME
        assert series.start_time == pytest.approx(START, abs=1e-6)
        windows = series.frame_windows()
    assert windows.shape == (N_FRAMES, 2)
    np.testing.assert_allclose(windows[:, 0], frame_starts, rtol=0, atol=1e-6)
    np.testing.assert_allclose(windows[:, 1] - windows[:, 0], COUNT_TIME, rtol=0, atol=1e-6)


def test_windows_follow_frame_time_without_per_frame_times(tmp_path):
    written = small_collection(tmp_path, n_frames=4)
    with h5py.File(written.master_path) as f:
        assert "start_time" not in f["entry/instrument/detector"]
    with open_master(written.master_path) as series:
        assert series.frame_start_times is None
        windows = series.frame_windows()
    expected_start = START + FRAME_TIME * np.arange(4)
    np.testing.assert_allclose(windows, np.column_stack([expected_start, expected_start + COUNT_TIME]), atol=1e-6)


def test_frames_read_one_at_a_time_with_their_valid_pixels(collection):
    written, _ = collection
    with open_master(written.master_path) as series:
        assert (series.width, series.height) == (SMALL.width, SMALL.height)
        assert (series.pixel_size, series.distance, series.wavelength) == pytest.approx((0.075, 60.0, 0.9763))
        for index in (0, 9, 10, 24):
            frame, valid = series.frame(index)
            with h5py.File(written.data_paths[index // 10]) as f:
                np.testing.assert_array_equal(frame, f["entry/data/data"][index % 10])
            flagged = series.pixel_mask != 0
            assert not np.any(valid[flagged])
            assert np.all(frame[series.pixel_mask & GAP != 0] == 0xFFFFFFFF)
            assert np.all(frame[series.pixel_mask & HOT != 0] == series.count_cutoff)
            assert np.array_equal(valid, ~flagged & (frame < series.count_cutoff))
        with pytest.raises(IndexError):
            series.frame(N_FRAMES)


def test_spots_are_exactly_the_requested_counts_off_masked_pixels(collection):
    written, _ = collection
    assert [len(p) for p in written.spot_positions] == list(range(0, 5 * N_FRAMES, 5))
    with open_master(written.master_path) as series:
        mask = series.pixel_mask
    for positions in written.spot_positions:
        columns, rows = np.floor(positions).astype(int).T
        assert not np.any(mask[rows, columns])


def test_sixteen_bit_frames_use_the_sixteen_bit_invalid_value(tmp_path):
    written = small_collection(tmp_path, n_frames=1, bit_depth=16)
    with open_master(written.master_path) as series:
        frame, valid = series.frame(0)
        assert frame.dtype == np.uint16 and series.count_cutoff == 0xFFFE
        assert np.all(frame[series.pixel_mask & GAP != 0] == 0xFFFF)
        assert not np.any(valid[series.pixel_mask != 0])


def test_an_empty_collection_still_has_a_master_file(tmp_path):
    written = write_eiger_collection(tmp_path, "empty", [], start_time=START, frame_time=0.1, count_time=0.1)
    assert written.data_paths == () and written.nimages == 0
    with open_master(written.master_path) as series:
        assert series.nimages == 0 and series.frame_windows().shape == (0, 2)


def test_a_failed_write_leaves_no_master_and_no_partial_files(tmp_path):
    too_many = SMALL.width * SMALL.height  # more spots than a frame holds: fails at frame 3
    with pytest.raises(ValueError, match="do not fit"):
        write_eiger_collection(
            tmp_path, "xtal_3", [10, 10, too_many], start_time=START, frame_time=0.1, count_time=0.1,
            images_per_file=1,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# Errors: each names the offending file.


def test_missing_master_file(tmp_path):
    path = tmp_path / "nothing_master.h5"
    with pytest.raises(EigerFileError, match="nothing_master.h5"):
        open_master(path)


def test_master_file_of_garbage_bytes(tmp_path):
    path = tmp_path / "garbage_master.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(EigerFileError, match="garbage_master.h5.*truncated or corrupt"):
        open_master(path)


def test_an_hdf5_file_that_is_not_an_eiger_master(tmp_path):
    path = tmp_path / "other_master.h5"
    with h5py.File(path, "w") as f:
        f["entry/title"] = "not a detector"
    with pytest.raises(EigerFileError, match="other_master.h5.*not an EIGER master file"):
        open_master(path)


def test_missing_data_file(tmp_path):
    written = small_collection(tmp_path)
    written.data_paths[1].unlink()
    with pytest.raises(EigerFileError, match="xtal_2_data_000002.h5: data file missing"):
        open_master(written.master_path)


def test_truncated_data_file(tmp_path):
    written = small_collection(tmp_path)
    path = written.data_paths[2]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EigerFileError, match="xtal_2_data_000003.h5.*truncated or corrupt"):
        open_master(written.master_path)


@pytest.mark.parametrize(
    "data, found",
    [
        (np.zeros((1, 5, 7), np.uint32), r"\(1, 5, 7\) uint32"),  # frames of another detector size
        (np.zeros((1, 7), np.uint32), r"\(1, 7\) uint32"),  # no frame axis
        (np.zeros(7, np.uint32)[0], r"\(\) uint32"),  # a scalar
    ],
)
def test_a_data_file_that_does_not_hold_the_declared_frames(tmp_path, data, found):
    written = small_collection(tmp_path)
    with h5py.File(written.data_paths[1], "r+") as f:
        del f["entry/data/data"]
        f["entry/data/data"] = data
    with pytest.raises(EigerFileError, match=f"xtal_2_data_000002.h5: data_000002 holds {found} data where "
                                             r"xtal_2_master.h5 declares frames of \d+ x \d+ integer counts"):  # fmt: skip
        open_master(written.master_path)


def test_float_frames_are_named_in_their_data_file(tmp_path):
    written = small_collection(tmp_path)
    with h5py.File(written.data_paths[0], "r+") as f:
        frames = f["entry/data/data"][()]
        del f["entry/data/data"]
        f["entry/data/data"] = frames.astype(np.float32)
    with pytest.raises(EigerFileError, match=r"xtal_2_data_000001.h5: data_000001 holds .* float32 data"):
        open_master(written.master_path)


@pytest.mark.parametrize(("field", "value"), [("frame_time", 0.0), ("frame_time", np.nan), ("frame_time", -0.1),
                                            ("count_time", 0.5), ("count_time", np.inf)])  # fmt: skip
def test_timing_fields_that_are_no_exposure_and_period_are_refused_naming_them(tmp_path, field, value):
    # Matching then crashed (a NaN period: "TypeError: expected non-empty vector for x ... please report it"),
    # found no frames (a period of 0), or gave camera frames after the scan the last frames' counts (exposures
    # longer than the period).
    written = small_collection(tmp_path)
    with h5py.File(written.master_path, "r+") as f:
        f[f"entry/instrument/detector/{field}"][()] = value
    with open_master(written.master_path) as series, pytest.raises(EigerFileError) as caught:
        series.frame_windows()
    assert str(written.master_path) in str(caught.value)
    assert f"{field} {value} s" in str(caught.value) and "0 < count_time <= frame_time" in str(caught.value)


def test_per_frame_times_that_are_not_finite_are_refused_naming_the_image(tmp_path):
    written = small_collection(tmp_path)
    with h5py.File(written.master_path, "r+") as f:
        f["entry/instrument/detector/start_time"] = [0.0, np.nan, 0.2]  # relative to data_collection_date
    with open_master(written.master_path) as series, pytest.raises(EigerFileError) as caught:
        series.frame_windows()
    assert f"{written.master_path}: image 2 has no exposure window (start nan" in str(caught.value)
    assert "the master file is corrupt" in str(caught.value)


def test_per_frame_times_for_fewer_images_than_declared(tmp_path):
    written = small_collection(tmp_path)
    with h5py.File(written.master_path, "r+") as f:
        f["entry/instrument/detector/start_time"] = [0.0, 0.1]  # relative to data_collection_date
    with pytest.raises(EigerFileError, match=r"xtal_2_master.h5: start_time holds 2 times for 3 images"):
        open_master(written.master_path)


def test_truncated_master_file(tmp_path):
    written = small_collection(tmp_path)
    path = written.master_path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EigerFileError, match="xtal_2_master.h5.*truncated or corrupt"):
        open_master(path)


@pytest.mark.parametrize("signature", GROUP_SIGNATURES)
def test_damaged_group_structures_of_the_master_file(tmp_path, signature):
    # h5py raises RuntimeError there, not OSError: it must still name the file, not escape as a bug.
    written = small_collection(tmp_path)
    path = damaged_copy(written.master_path, signature, written.master_path)
    with pytest.raises(EigerFileError, match="xtal_2_master.h5: cannot read its metadata.*truncated or corrupt"):
        with open_master(path) as series:
            series.frame(0)


def test_corrupt_frame_is_reported_when_read(tmp_path):
    written = small_collection(tmp_path, images_per_file=3)
    path = written.data_paths[0]
    with h5py.File(path) as f:
        chunk = f["entry/data/data"].id.get_chunk_info(1)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(b"\xff" * chunk.size)
    with open_master(written.master_path) as series:
        series.frame(0)
        with pytest.raises(EigerFileError, match="xtal_2_data_000001.h5: cannot read image 2"):
            series.frame(1)


def test_missing_compression_filter(tmp_path):
    import subprocess
    import sys

    written = small_collection(tmp_path)
    # HDF5 as it is without hdf5plugin: no bitshuffle filter. In a process of its own: HDF5 keeps a filter that
    # a dataset of this process still uses (after other tests' files, closed or not), and cannot unregister it.
    script = (
        "import sys, h5py, hdf5plugin\n"
        "from mxcube_autocenter.labelling.eiger import EigerFileError, open_master\n"
        "h5py.h5z.unregister_filter(hdf5plugin.BSHUF_ID)\n"
        "try:\n"
        "    open_master(sys.argv[1])\n"
        "except EigerFileError as err:\n"
        "    print(err)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(written.master_path)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "xtal_2_data_000001.h5" in run.stdout and "pip install hdf5plugin" in run.stdout, run.stdout


# Real beamline files (from a review against DECTRIS' FileWriter layouts).


def test_an_aborted_collection_keeps_the_frames_its_data_files_hold(tmp_path, caplog):
    # An aborted EIGER collection's master file links data files that were never written (dials/dials#605).
    written = small_collection(tmp_path, n_frames=5, images_per_file=2)
    written.data_paths[2].unlink()
    with caplog.at_level("WARNING"), open_master(written.master_path) as series:
        assert (series.nimages, series.declared_images) == (4, 5)
        assert series.frame_windows().shape == (4, 2)
        series.frame(3)
        with pytest.raises(IndexError):
            series.frame(4)
    assert "declares 5 images but its data files hold its first 4" in caplog.text
    assert "xtal_2_data_000003.h5" in caplog.text


def test_a_collection_numbered_from_another_start_image_reads_its_frames_in_order(tmp_path):
    # MXCuBE passes a collection's start_image_number to the FileWriter (image_nr_start): data files numbered
    # 101, 103, 105 were read wrapping round (every frame an IndexError) and 6, 8, 10 silently shifted.
    with open_master(small_collection(tmp_path / "from_1", n_frames=5, images_per_file=2).master_path) as series:
        frames = [series.frame(i)[0] for i in range(5)]
        assert series.first_image_number == 1
    written = small_collection(tmp_path / "from_101", n_frames=5, images_per_file=2)  # the same frames
    for k, path in enumerate(written.data_paths):
        with h5py.File(path, "r+") as f:
            f["entry/data/data"].attrs["image_nr_low"] = 101 + 2 * k
    with open_master(written.master_path) as series:
        assert series.nimages == 5
        assert all(np.array_equal(series.frame(i)[0], frames[i]) for i in range(5))
        assert series.first_image_number == 101  # what messages about its frames call images
    # Files that are no one run of images are refused, not read shifted.
    with h5py.File(written.data_paths[1], "r+") as f:
        f["entry/data/data"].attrs["image_nr_low"] = 110
    with pytest.raises(EigerFileError, match=r"not one run of images \(image_nr_low of each file: \[101, 105, 110\]\)"):
        open_master(written.master_path)


def test_data_files_without_image_nr_low_are_read_in_turn_unless_one_before_the_last_is_short(tmp_path):
    # Without image_nr_low each file's images follow the previous file's: a short file in the middle shifted
    # every later image by one, each labelled with its neighbour's count, and only an "aborted collection?"
    # warning said anything.
    with open_master(small_collection(tmp_path / "numbered", n_frames=7, images_per_file=3).master_path) as series:
        frames = [series.frame(i)[0] for i in range(7)]
    written = small_collection(tmp_path / "unnumbered", n_frames=7, images_per_file=3)  # files of 3, 3 and 1
    for path in written.data_paths:
        with h5py.File(path, "r+") as f:
            del f["entry/data/data"].attrs["image_nr_low"]
    with open_master(written.master_path) as series:
        assert series.nimages == 7 and all(np.array_equal(series.frame(i)[0], frames[i]) for i in range(7))
    with h5py.File(written.data_paths[1], "r+") as f:
        kept = f["entry/data/data"][:2]
        del f["entry/data/data"]
        f.create_dataset("entry/data/data", data=kept)
    with pytest.raises(EigerFileError, match=r"xtal_2_data_000002\.h5: holds 2 images where xtal_2_data_000001\.h5 "
                                             r"holds 3, and the data files carry no image_nr_low"):
        open_master(written.master_path)


def test_a_master_file_holding_its_data_blocks_itself_reads_and_closes(tmp_path):
    # Closing a series closes the data files its external links opened; blocks inside the master file close with
    # it (closing the master once per block raised on the second).
    written = small_collection(tmp_path, n_frames=4, images_per_file=2)
    with h5py.File(written.master_path, "r+") as master:
        for name, path in zip(("data_000001", "data_000002"), written.data_paths):
            del master["entry/data"][name]
            with h5py.File(path, "r") as data_file:
                data_file.copy(data_file["entry/data/data"], master["entry/data"], name)
    with open_master(written.master_path) as series:
        assert series.nimages == 4 and series.frame(3)[0].shape == (SMALL.height, SMALL.width)


def test_a_data_file_linked_by_an_absolute_path_is_found_next_to_the_master_as_hdf5_finds_it(tmp_path):
    written = small_collection(tmp_path, n_frames=2)
    with h5py.File(written.master_path, "r+") as f:
        for k, path in enumerate(written.data_paths, start=1):
            del f[f"entry/data/data_{k:06d}"]
            f[f"entry/data/data_{k:06d}"] = h5py.ExternalLink(f"/beamline/visit/raw/{path.name}", "/entry/data/data")
    with open_master(written.master_path) as series:
        assert series.nimages == 2
        series.frame(1)


def test_a_master_file_in_jungfraujochs_layout_reads_its_virtual_dataset_and_start_time(tmp_path, monkeypatch):
    # One virtual /entry/data/data over the data files and the start in /entry/start_time alone: read as "declares
    # 4 images but its data files hold 0" and "not a complete EIGER master file", which copying cannot fix.
    from datetime import datetime, timezone

    written = small_collection(tmp_path, n_frames=4, images_per_file=2)
    frames = []
    for path in written.data_paths:
        with h5py.File(path, "r") as data_file:
            frames.extend(data_file["entry/data/data"][()])
    layout = h5py.VirtualLayout(shape=(4, SMALL.height, SMALL.width), dtype=frames[0].dtype)
    for k, path in enumerate(written.data_paths):
        layout[2 * k : 2 * k + 2] = h5py.VirtualSource(path.name, "entry/data/data", shape=(2, SMALL.height, SMALL.width))
    start = datetime.fromtimestamp(START, timezone.utc).isoformat().replace("+00:00", "Z")
    with h5py.File(written.master_path, "r+") as master:
        for k in (1, 2):
            del master[f"entry/data/data_{k:06d}"]
        master["entry/data"].create_virtual_dataset("data", layout)
        del master["entry/instrument/detector/detectorSpecific/data_collection_date"]
        master["entry/start_time"] = start
    monkeypatch.chdir(tmp_path.parent)  # the sources are found next to the master file, wherever this runs
    with open_master(written.master_path) as series:
        assert series.nimages == 4 and series.start_time == pytest.approx(START, abs=1e-6)
        for k in range(4):
            assert np.array_equal(series.frame(k)[0], frames[k])
    # HDF5 fills the frames of a missing source with zeros, which would count no spot.
    written.data_paths[1].unlink()
    with pytest.raises(EigerFileError, match=f"{written.data_paths[1]}: data file missing"):
        open_master(written.master_path)
    h5py.File(written.data_paths[1], "w").close()  # created, never written (an aborted writer)
    with pytest.raises(EigerFileError, match=f"{written.data_paths[1]}: holds no readable entry/data/data, which "):
        open_master(written.master_path)
    with h5py.File(written.master_path, "r+") as master:
        del master["entry/start_time"]
    with pytest.raises(EigerFileError, match="neither /entry/instrument/detector/detectorSpecific/data_collection_date "
                                             "nor /entry/start_time, so no time the collection started"):
        open_master(written.master_path)


@pytest.mark.parametrize("text, read", [
    ("2023-11-14T22:13:20.123+01:00 ", "2023-11-14T22:13:20.123000+01:00"),  # a blank after it (a padded string)
    ("2023-11-14T22:13:20.123456789Z", "2023-11-14T22:13:20.123456+00:00"),  # nanoseconds: Python 3.10 read 3 or 6
    ("2023-11-14T22:13:20z", "2023-11-14T22:13:20+00:00"),
    ("2023-11-14 22:13:20.1+0200", "2023-11-14T22:13:20.100000+02:00"),
    ("2023-11-14T22:13:20+01", "2023-11-14T22:13:20+01:00"),
    ("2023-11-14T22:13:20.5", "2023-11-14T22:13:20.500000"),  # local time: no offset
    ("20231114T221320Z", "2023-11-14T22:13:20+00:00"),  # ISO 8601's basic form
])
def test_detector_dates_are_read_as_written_by_any_writer(text, read):
    assert iso_date(text).isoformat() == read


@pytest.mark.parametrize("text", ["2023-11-14", "2023-11-14T22:13", "2023-W46-2", "2023-11-14T22"])
def test_a_date_without_the_seconds_of_its_time_is_refused(text):
    # Read, a day alone would move the collection's start by up to a day, blamed on "another collection".
    with pytest.raises(ValueError, match="expected YYYY-MM-DDThh:mm:ss"):
        iso_date(text)


def test_a_date_that_is_none_is_refused_naming_the_field_and_the_form(tmp_path):
    written = small_collection(tmp_path, n_frames=1)
    with h5py.File(written.master_path, "r+") as master:
        master["entry/instrument/detector/detectorSpecific/data_collection_date"][()] = b"14/11/2023 22:13"
    with pytest.raises(EigerFileError, match=r"data_collection_date '14/11/2023 22:13' is not an ISO-8601 date "
                                             r"\(expected YYYY-MM-DDThh:mm:ss.*\): fix it in the file"):
        open_master(written.master_path)


def test_negative_counts_of_signed_frames_are_invalid(tmp_path):
    # Data converted to int32 turn EIGER's flag 0xFFFFFFFF into -1.
    written = small_collection(tmp_path, n_frames=1)
    with h5py.File(written.data_paths[0], "r+") as f:
        frames = f["entry/data/data"][()].view(np.int32)
        del f["entry/data/data"]
        f["entry/data/data"] = frames
    with h5py.File(written.master_path, "r+") as f:
        f["entry/instrument/detector/detectorSpecific/pixel_mask"][...] = 0  # the flags alone mark the gaps
    with open_master(written.master_path) as series:
        frame, valid = series.frame(0)
    assert np.any(frame < 0) and not np.any(valid[frame < 0])


def test_eigers_top_two_values_are_invalid_without_a_count_cutoff(tmp_path):
    written = small_collection(tmp_path, n_frames=1)
    with h5py.File(written.master_path, "r+") as f:
        del f["entry/instrument/detector/detectorSpecific/countrate_correction_count_cutoff"]
        del f["entry/instrument/detector/saturation_value"]
    with open_master(written.master_path) as series:
        assert series.count_cutoff == 0xFFFFFFFE


def test_a_count_cutoff_of_zero_is_none_written(tmp_path):
    # Every pixel at or above 0 was saturated: every frame gave 0 spots without a word.
    written = small_collection(tmp_path, n_frames=1)
    with h5py.File(written.master_path, "r+") as f:
        saturation = int(f["entry/instrument/detector/saturation_value"][()])
        f["entry/instrument/detector/detectorSpecific/countrate_correction_count_cutoff"][()] = 0
    with open_master(written.master_path) as series:
        assert series.count_cutoff == saturation and series.frame(0)[1].any()


def test_per_frame_times_are_read_in_their_units(tmp_path):
    written = small_collection(tmp_path, n_frames=3)
    with h5py.File(written.master_path, "r+") as f:
        detector = f["entry/instrument/detector"]
        detector["start_time"] = np.array([0, 100_000_000, 200_000_000], np.uint64)  # ns after data_collection_date
        detector["start_time"].attrs["units"] = np.bytes_("ns")
    with open_master(written.master_path) as series:
        np.testing.assert_allclose(series.frame_windows()[:, 0], START + np.array([0.0, 0.1, 0.2]), atol=1e-6)


def test_geometry_is_read_in_its_units(tmp_path):
    # NXmx lets a writer give lengths in mm and the beam centre as a length: read as metres and
    # pixels, a distance in mm put every pixel at a resolution 1000 times too low (no ice ring, no d_min).
    written = small_collection(tmp_path, n_frames=1)
    with open_master(written.master_path) as series:
        expected = (series.pixel_size, series.distance, series.wavelength, series.beam_center_x, series.beam_center_y)
    assert expected == pytest.approx((SMALL.pixel_size, SMALL.distance, SMALL.wavelength, SMALL.beam_center_x,
                                      SMALL.beam_center_y))  # fmt: skip
    with h5py.File(written.master_path, "r+") as f:
        detector, beam = f["entry/instrument/detector"], f["entry/instrument/beam"]
        for name, value, units in (
            ("x_pixel_size", SMALL.pixel_size, "mm"),
            ("detector_distance", SMALL.distance, "mm"),
            ("beam_center_x", SMALL.beam_center_x * SMALL.pixel_size, "mm"),
            ("beam_center_y", SMALL.beam_center_y * SMALL.pixel_size * 1e-3, "m"),
            ("incident_wavelength", SMALL.wavelength / 10, "nm"),
        ):
            group = beam if name == "incident_wavelength" else detector
            del group[name]
            group[name] = value
            group[name].attrs["units"] = np.bytes_(units)
    with open_master(written.master_path) as series:
        found = (series.pixel_size, series.distance, series.wavelength, series.beam_center_x, series.beam_center_y)
    assert found == pytest.approx(expected)
    with h5py.File(written.master_path, "r+") as f:
        f["entry/instrument/detector/detector_distance"].attrs["units"] = np.bytes_("furlong")
    with pytest.raises(EigerFileError, match=r"xtal_2_master.h5: .*detector_distance is in 'furlong'.*units attribute"):
        open_master(written.master_path)


def test_the_v2024_2_filewriter_format_is_refused_with_the_fix(tmp_path):
    written = small_collection(tmp_path)
    with h5py.File(written.master_path, "r+") as f:
        f["entry/instrument/detector"].create_group("threshold_1_channel")
        del f["entry/instrument/detector/detectorSpecific"]
    with pytest.raises(EigerFileError, match=r'xtal_2_master.h5: written in .*"hdf5 nexus v2024.2 nxmx".*legacy nxmx'):
        open_master(written.master_path)


def test_several_triggers_without_per_frame_times_are_refused(tmp_path):
    # Frames of later triggers start when the beamline triggers them: start + i * frame_time would be wrong.
    written = small_collection(tmp_path, n_frames=4)
    with h5py.File(written.master_path, "r+") as f:
        specific = f["entry/instrument/detector/detectorSpecific"]
        specific["nimages"][...] = 2
        del specific["ntrigger"]
        specific["ntrigger"] = 2
    with open_master(written.master_path) as series:
        assert (series.nimages, series.ntrigger) == (4, 2)
        with pytest.raises(EigerFileError, match="xtal_2_master.h5: 2 triggers and no per-frame start_time"):
            series.frame_windows()
    with h5py.File(written.master_path, "r+") as f:
        f["entry/instrument/detector/start_time"] = np.array([0.0, 0.1, 5.0, 5.1])
    with open_master(written.master_path) as series:
        np.testing.assert_allclose(series.frame_windows()[:, 0] - START, [0.0, 0.1, 5.0, 5.1], atol=1e-6)


@pytest.mark.parametrize("path", ["entry/instrument/detector/detector_distance", "entry/instrument/beam/incident_wavelength"])
def test_a_geometry_never_set_is_refused(tmp_path, path):
    # A detector distance of 0 made the ice-ring filter drop all spots or none; a zero wavelength crashed it.
    written = small_collection(tmp_path, n_frames=1)
    with h5py.File(written.master_path, "r+") as f:
        f[path][...] = 0
    with pytest.raises(EigerFileError, match=f"xtal_2_master.h5: {path.split('/')[-1]} is 0, not a length"):
        open_master(written.master_path)


def test_an_aborted_collection_with_per_frame_times_of_the_frames_it_took(tmp_path):
    # The detector has no times for frames never taken: the per-frame times stop with the data.
    written = small_collection(tmp_path, n_frames=5, images_per_file=2, frame_start_times=START + np.arange(5) * FRAME_TIME)
    written.data_paths[2].unlink()
    with h5py.File(written.master_path, "r+") as f:
        detector = f["entry/instrument/detector"]
        for name in ("start_time", "stop_time"):
            times, attrs = detector[name][()][:4], dict(detector[name].attrs)
            del detector[name]
            detector[name] = times
            detector[name].attrs.update(attrs)
    with open_master(written.master_path) as series:
        assert (series.nimages, series.declared_images) == (4, 5)
        np.testing.assert_allclose(series.frame_windows()[:, 0], START + np.arange(4) * FRAME_TIME, atol=1e-6)


def test_a_collection_reads_on_a_file_system_without_locks(collection, monkeypatch):
    # NFS without lockd: HDF5's default file lock fails (errno 37), and every master file was then reported as
    # truncated or corrupt. Recordings were already read without a lock.
    from mxcube_autocenter import hdf5errors

    written, _ = collection
    real = h5py.File

    def without_locks(name, mode="r", *args, **kwargs):
        if kwargs.get("locking", True) is not False:
            raise OSError(37, "Unable to synchronously open file (unable to lock file, errno = 37, error message = "
                              "'No locks available')")
        return real(name, mode, *args, **kwargs)

    monkeypatch.setattr(hdf5errors.h5py, "File", without_locks)
    with open_master(written.master_path) as series:
        assert series.nimages == N_FRAMES
        assert series.frame(N_FRAMES - 1) is not None  # in the last data file, through its external link


def test_a_file_this_process_reads_without_its_lock_opens_again(tmp_path):
    # Where the lock failed, the first reader opened the set without it; HDF5 then refused the second open with
    # the lock (training opens the set for its training and validation rows): every run failed on NFS.
    from mxcube_autocenter.hdf5errors import open_to_read

    path = tmp_path / "set.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with h5py.File(path, "r", locking=False) as first, open_to_read(path) as second:
        assert list(second["x"][:]) == list(first["x"][:]) == [0, 1, 2]


def test_a_training_set_another_process_writes_is_not_read_without_its_lock(tmp_path):
    # Only a file system without locks is read without one: a lock a writer holds (errno 11) keeps readers out.
    import subprocess
    import sys

    from mxcube_autocenter.hdf5errors import open_to_read

    path = tmp_path / "set.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    writer = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); time.sleep(30)", str(path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="unable to lock file"):
            open_to_read(path)
    finally:
        writer.kill()
        writer.wait()


def test_the_system_error_behind_a_failed_hdf5_write_names_the_file():
    # What h5py raised closing a synthetic set on a full tmpfs: a RuntimeError, whose only clue is HDF5's record.
    import errno

    from mxcube_autocenter.hdf5errors import system_error

    raised = RuntimeError("Disable slist on flush dest failure failed (file write failed: time = Mon Dec  7 20:43:14 "
                          "2026\n, filename = 'small/s.h5.part', file descriptor = 7, errno = 28, error message = 'No "
                          "space left on device', buf = 0x55638c74c238, total write size = 512, bytes this sub-write "
                          "= 512, offset = 230536)")  # fmt: skip
    found = system_error("small/s.h5", raised)
    assert isinstance(found, OSError) and found.errno == errno.ENOSPC and found.filename == "small/s.h5"
    assert str(found) == "[Errno 28] No space left on device: 'small/s.h5'"
    assert system_error("small/s.h5", RuntimeError("Unable to synchronously create group (name already exists)")) is None
    assert system_error("small/s.h5", KeyError("errno = 28")) is None


def test_a_master_file_this_user_may_not_read_is_named_so_not_as_damaged():
    # Beamline data often belongs to its user: "not a readable HDF5 file (Permission denied); it is truncated or
    # corrupt: copy it again, or re-collect" sent staff after a collection that was fine.
    import os
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))  # a folder another user may look into
    try:
        folder.chmod(0o755)
        written = small_collection(folder, n_frames=2, images_per_file=2)
        written.master_path.chmod(0o600 if os.geteuid() == 0 else 0)
        if os.geteuid() == 0:
            os.seteuid(65534)  # root reads anything: read as nobody
        try:
            with pytest.raises(EigerFileError) as refused:
                open_master(written.master_path)
            assert "no permission to read it: ask for read access" in str(refused.value)
            assert "corrupt" not in str(refused.value)
            if os.getuid() == 0:
                os.seteuid(0)
            # Nor a data file of a master file it may read.
            written.master_path.chmod(0o644)
            data_file = next(folder.glob("*_data_*.h5"))
            data_file.chmod(0o600 if os.geteuid() == 0 else 0)
            if os.getuid() == 0:
                os.seteuid(65534)
            with pytest.raises(EigerFileError) as refused:
                open_master(written.master_path)
            assert f"{data_file}: cannot open this data file" in str(refused.value)
            assert "no permission to read it: ask for read access" in str(refused.value)
            assert "corrupt" not in str(refused.value)
            if os.getuid() == 0:
                os.seteuid(0)
            folder.chmod(0o700 if os.getuid() == 0 else 0)  # nor in a folder it may not look into (PermissionError)
            if os.getuid() == 0:
                os.seteuid(65534)
            with pytest.raises(EigerFileError, match="no permission to look into its folder: ask for access"):
                open_master(written.master_path)
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
