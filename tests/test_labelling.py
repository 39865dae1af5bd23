"""Labelling: camera-to-detector time matching, spot-count files, the training set and the pipeline."""

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from tests.helpers import GROUP_SIGNATURES, damaged_copy
from mxcube_autocenter.cli import build_parser, main
from mxcube_autocenter.geometry import centred_motors
from mxcube_autocenter.labelling.dataset import (
    DatasetError,
    RowReader,
    add_row_column,
    append_recording,
    crop_around_beam,
    read_table,
)
from mxcube_autocenter.labelling.matching import (
    ClockOffset,
    estimate_clock_offset,
    match_frames,
    regular_windows,
)
from mxcube_autocenter.labelling import pipeline
from mxcube_autocenter.labelling.pipeline import STILL_WRITTEN_S, count_spots, format_summary, label_recordings
from mxcube_autocenter.labelling.spots_file import SpotsFileError, read_spot_counts
from mxcube_autocenter.recording import FrameStore, RecordingError, encode_jpeg, read_recording
from mxcube_autocenter.simulation.collection import ScanPlan
from mxcube_autocenter.simulation.diffraction import DiffractionModel
from mxcube_autocenter.simulation.eiger import write_eiger_collection
from mxcube_autocenter.simulation.render import Renderer
from mxcube_autocenter.simulation.sample import make_sample

START = 1_700_000_000.0  # unix s, wall clock
FRAME_TIME = 0.05
CLOCK_OFFSET = 0.12  # detector clock minus wall clock, as the virtual collect object
JITTER = 0.002  # detector time stamps, s
LATENCY = 0.02  # camera: exposure to reception, s
TOLERANCE = 0.005


# Time matching, on timestamps alone -------------------------------------------------


@dataclass
class Timing:
    windows: np.ndarray  # detector exposure windows, detector clock
    received: np.ndarray  # camera timestamps (reception), wall clock
    omegas: np.ndarray  # omega read at reception
    exposed: np.ndarray  # true moment each camera frame was exposed, wall clock
    wall_start: float


def helical_timing(seed, *, n_images=40, count_time=FRAME_TIME * 0.999, osc_range=0.5, fps=None):
    """A helical scan as the virtual beamline runs it: camera frames from 0.5 s before to 0.5 s after."""
    rng = np.random.default_rng(seed)
    wall = START + 10 * seed
    starts = wall + np.arange(n_images) * FRAME_TIME + CLOCK_OFFSET + rng.normal(0, JITTER, n_images)
    fps = rng.uniform(10, 25) if fps is None else fps
    exposed = np.arange(wall - 0.5, wall + n_images * FRAME_TIME + 0.5, 1 / fps) + rng.uniform(0, 1 / fps)
    received = exposed + LATENCY
    # Omega turns by osc_range per frame during the scan, and rests before and after it.
    omegas = 30.0 + np.clip((received - wall) / FRAME_TIME, 0, n_images) * osc_range
    return Timing(np.column_stack([starts, starts + count_time]), received, omegas, exposed, wall)


def true_frames(exposed, wall_start, n_images=40, count_time=FRAME_TIME * 0.999):
    """Detector frame exposed at each camera exposure by the wall-clock schedule; -1: none.

    As ``match_frames`` decides: the window holding the moment, else the
    nearest one within the tolerance.
    """
    since = (np.asarray(exposed) - wall_start)[:, None]
    starts = np.arange(n_images) * FRAME_TIME
    outside = np.maximum(np.maximum(starts - since, since - starts - count_time), 0.0)
    frame = np.argmin(outside, axis=1)
    frame[outside.min(axis=1) > TOLERANCE] = -1
    return frame


def near_a_boundary(exposed, wall_start, n_images=40, count_time=FRAME_TIME * 0.999, within=0.0015):
    """Camera exposures within 1.5 ms of a moment where the matched frame changes.

    The fitted frame clock, from 40 time stamps of 2 ms jitter, is accurate to
    about 0.5 ms: these frames may go either way.
    """
    starts = np.arange(n_images) * FRAME_TIME
    ends = starts + count_time
    edges = np.concatenate([starts, starts - TOLERANCE, ends, ends + TOLERANCE, (ends[:-1] + starts[1:]) / 2])
    since = np.asarray(exposed) - wall_start
    return np.min(np.abs(since[:, None] - edges), axis=1) <= within


def test_matching_assigns_every_frame_of_a_helical_scan_with_an_estimated_offset():
    wrong_total = frames_total = 0
    for seed in range(20):
        timing = helical_timing(seed)
        fitted = regular_windows(timing.windows)
        assert fitted.regular and 0.001 < fitted.jitter_s < 0.003
        offset = estimate_clock_offset(timing.received, timing.omegas, fitted.windows, 30.0, 0.5)
        assert isinstance(offset, ClockOffset) and offset.method == "omega"
        assert offset == pytest.approx(CLOCK_OFFSET, abs=0.001)
        assert offset.n_used >= 15 and offset.residual_rms_s < 0.001
        match = match_frames(timing.received - LATENCY, fitted.windows, clock_offset=offset, tolerance=TOLERANCE)
        truth = true_frames(timing.exposed, timing.wall_start)
        # Every frame is matched to the right detector frame, or dropped if outside the
        # scan, unless it was exposed within 1.5 ms of a boundary; there, to a neighbour.
        wrong = match.detector_frame != truth
        assert not np.any(wrong & ~near_a_boundary(timing.exposed, timing.wall_start)), seed
        neighbour = (np.abs(match.detector_frame - truth) == 1) | (np.minimum(match.detector_frame, truth) < 0)
        assert np.all(neighbour[wrong])
        wrong_total += np.count_nonzero(wrong)
        frames_total += np.count_nonzero(truth >= 0)
        # Frames before and after the scan are dropped and counted.
        since = timing.exposed - timing.wall_start
        dropped = match.detector_frame < 0
        assert match.n_before == np.count_nonzero(dropped & (since < 0)) >= 5
        assert match.n_after == np.count_nonzero(dropped & (since > 40 * FRAME_TIME)) >= 5
        assert match.n_gap == 0 and match.n_matched + match.n_dropped == timing.received.size
        stats = match.stats()
        assert stats["offset_method"] == "omega" and stats["n_matched"] == match.n_matched
        assert stats["timing_residual_rms_s"] < 0.001 and stats["neighbour_risk"] < 0.02
        assert stats["window_residual_max_s"] <= FRAME_TIME / 2 + TOLERANCE
        json.dumps(stats)
    assert wrong_total <= 0.01 * frames_total


def test_recorded_jittery_windows_alone_mismatch_more_frames():
    wrong = {True: 0, False: 0}
    for seed in range(20):
        timing = helical_timing(seed)
        truth = true_frames(timing.exposed, timing.wall_start)
        for regular in (True, False):
            windows = regular_windows(timing.windows).windows if regular else timing.windows
            offset = estimate_clock_offset(timing.received, timing.omegas, windows, 30.0, 0.5)
            match = match_frames(timing.received - LATENCY, windows, clock_offset=offset)
            wrong[regular] += np.count_nonzero(match.detector_frame != truth)
    assert wrong[True] < wrong[False] / 2


def test_frames_in_shutter_closed_gaps_are_dropped():
    count_time = 0.03  # 20 ms closed between frames
    timing = helical_timing(3, count_time=count_time, fps=23.0)
    fitted = regular_windows(timing.windows)
    offset = estimate_clock_offset(timing.received, timing.omegas, fitted.windows, 30.0, 0.5)
    match = match_frames(timing.received - LATENCY, fitted.windows, clock_offset=offset, tolerance=TOLERANCE)
    truth = true_frames(timing.exposed, timing.wall_start, count_time=count_time)
    clear = ~near_a_boundary(timing.exposed, timing.wall_start, count_time=count_time)
    np.testing.assert_array_equal(match.detector_frame[clear], truth[clear])
    since = timing.exposed - timing.wall_start
    in_gaps = (match.detector_frame < 0) & (since > 0) & (since < 40 * FRAME_TIME)
    assert match.n_gap == np.count_nonzero(in_gaps) > 5
    assert match.n_matched + match.n_dropped == timing.received.size


def test_match_frames_takes_the_nearest_centre_where_windows_overlap_and_bridges_small_gaps():
    windows = np.array([[0.0, 1.0], [0.9, 2.0], [2.003, 3.0]])
    match = match_frames([0.92, 0.99, 2.0025, 2.001, -0.004, -0.01, 3.2], windows, clock_offset=0.0)
    assert match.detector_frame.tolist() == [0, 1, 2, 1, 0, -1, -1]
    assert (match.n_before, match.n_after, match.n_gap) == (1, 1, 0)
    assert match.residual_s[0] == pytest.approx(0.42)
    assert np.isnan(match.residual_s[-1])
    assert match.offset_method == "given"
    shifted = match_frames([10.5], windows, clock_offset=-9.0)
    assert shifted.detector_frame.tolist() == [1]


def test_regular_windows_keep_the_recorded_ones_when_frames_were_delayed():
    starts = START + np.arange(20) * FRAME_TIME
    starts[10:] += 0.1  # the detector waited for a trigger
    windows = np.column_stack([starts, starts + 0.04])
    fitted = regular_windows(windows)
    assert not fitted.regular and fitted.jitter_s > 0.02
    np.testing.assert_array_equal(fitted.windows, windows)


@pytest.mark.parametrize("osc_range, fps, why", [(0.0, 20.0, "omega did not move"),
                                                 (0.5, 0.9, "only 2 camera frames while omega moved")])
def test_no_clock_offset_is_made_up_when_omega_does_not_turn_under_the_camera(osc_range, fps, why):
    # The fallback took the first camera frame after MXCuBE's collection start for the first exposure: MXCuBE
    # signals that start before it moves to the centred position, snapshots and sets energy and resolution, so
    # the offset was seconds off and every frame got another frame's count.
    timing = helical_timing(4, osc_range=osc_range, fps=fps)
    with pytest.raises(ValueError, match=f"{why}.*cannot relate the camera and detector clocks"):
        estimate_clock_offset(timing.received, timing.omegas, timing.windows, 30.0, osc_range)



@pytest.mark.parametrize("turns", [-1, 1, 2, 5])
def test_an_omega_read_whole_turns_from_the_scan_s_start_still_relates_the_clocks(turns):
    # A goniometer reading 390 for MXCuBE's osc_start 30 was "omega did not move": no frame fell inside the scan.
    timing = helical_timing(0)
    fitted = regular_windows(timing.windows)
    offset = estimate_clock_offset(timing.received, timing.omegas + 360.0 * turns, fitted.windows, 30.0, 0.5)
    assert offset == pytest.approx(CLOCK_OFFSET, abs=0.001)


# Spot-count files ---------------------------------------------------------------------

COUNTS = {1: 12, 2: 0, 3: 57, 5: 8}
# DIALS' per-image table of those counts (#spots_no_ice).
DIALS_TABLE = (
    "|   image |   #spots |   #spots_no_ice |   total_intensity |\n"
    "|---------+----------+-----------------+-------------------|\n"
    "|       1 |       14 |              12 |              5163 |\n"
    "|       2 |        0 |               0 |                 0 |\n"
    "|       3 |       61 |              57 |              3821 |\n"
    "|       5 |        8 |               8 |              3821 |\n"
)


@pytest.mark.parametrize(
    "name, text",
    [
        ("counts.csv", "image,spots\n1,12\n2,0\n3,57\n5,8\n"),
        ("counts.csv", "# image;n_spots\n1;12\n2;0\n# a comment\n3;57\n5;8\n"),
        ("counts.tsv", "Image\tReflections\n1\t12\n2\t0\n3\t57\n5\t8\n"),
        ("counts.txt", "image  spots  d_min\n1 12 2.1\n2 0 9.9\n3 57 1.8\n5 8 3.0\n"),
        ("list.json", json.dumps([{"image": i, "spots": c} for i, c in COUNTS.items()])),
        ("columns.json", json.dumps({"image": list(COUNTS), "n_spots_total": list(COUNTS.values()), "d_min": [1] * 4})),
        (
            "no_ice.json",
            json.dumps({"image": list(COUNTS), "n_spots_total": [c + 3 for c in COUNTS.values()],
                        "n_spots_no_ice": list(COUNTS.values())}),
        ),
        ("mapping.json", json.dumps({str(i): c for i, c in COUNTS.items()})),
        (
            "dials.log",
            "Number of centroids per image for imageset 0:\n"
            "+---------+----------+-----------------+-------------------+\n"
            + DIALS_TABLE
            + "+---------+----------+-----------------+-------------------+\n",
        ),
        (
            "spot_counts_per_image.log",  # the per-image table, then the overall statistics
            DIALS_TABLE + "\nOverall statistics:\n| Statistic   |   Value |\n|-------------+---------|\n"
            "| #spots      |      83 |\n",
        ),
    ],
)
def test_spot_counts_are_read_from_csv_json_and_dials_tables(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    spots = read_spot_counts(path)
    assert dict(zip(spots.images.tolist(), spots.counts.tolist())) == COUNTS
    counts = spots.for_collection(6)
    np.testing.assert_array_equal(counts, [12, 0, 57, np.nan, 8, np.nan])


def test_the_json_that_dials_spot_counts_per_image_writes_is_read(tmp_path):
    # dials.spot_counts_per_image json=... dumps its per-image statistics, one list per field
    # in image order from image 1, and no image list.
    path = tmp_path / "spot_counts.json"
    path.write_text(json.dumps({
        "d_min_distl_method_1": [-1.0, -1.0, 2.1], "d_min_distl_method_2": [-1.0, -1.0, 2.3],
        "estimated_d_min": [-1.0, -1.0, 1.9], "n_spots_4A": [3, 0, 20], "n_spots_no_ice": [12, 0, 57],
        "n_spots_total": [14, 0, 61], "noisiness_method_1": [-1.0, -1.0, 0.2],
        "noisiness_method_2": [-1.0, -1.0, 0.3], "total_intensity": [5163.0, 0.0, 3821.0],
    }))  # fmt: skip
    spots = read_spot_counts(path)
    assert spots.column == "n_spots_no_ice"
    np.testing.assert_array_equal(spots.for_collection(4), [12, 0, 57, np.nan])


def test_spot_counts_numbered_as_the_detector_numbered_the_images_or_from_1_fit_the_collection(tmp_path, caplog):
    # A collection whose images start at 101 (MXCuBE's start image number): its counts listed 101 to 140 were
    # refused ("do not fit a collection of 40 images (numbered from 1)").
    path = tmp_path / "counts.csv"
    path.write_text("image,spots\n101,5\n103,7\n")
    np.testing.assert_array_equal(read_spot_counts(path).for_collection(4, first_image=101), [5, np.nan, 7, np.nan])
    path.write_text("image,spots\n1,5\n3,7\n")  # as DIALS numbers any collection's images
    np.testing.assert_array_equal(read_spot_counts(path).for_collection(4, first_image=101), [5, np.nan, 7, np.nan])
    path.write_text("image,spots\n4,5\n")  # fits 3..6 and 1..4: the detector's numbering, said so
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(read_spot_counts(path).for_collection(4, first_image=3), [np.nan, 5, np.nan,
                                                                                                np.nan])
    assert "image numbers 4 to 4 fit the collection numbered from 3 (the detector's) and from 1" in caplog.text
    path.write_text("image,spots\n50,5\n")
    with pytest.raises(SpotsFileError, match=r"image numbers 50 to 50 do not fit a collection of 4 images "
                                             r"\(numbered from 1, or from 101 as the detector numbered them\)"):
        read_spot_counts(path).for_collection(4, first_image=101)


def test_spot_counts_of_several_collections_are_told_apart_by_master_file(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("master_file,image,spots\n/data/a_1_master.h5,1,5\n/data/a_1_master.h5,2,6\nb_1_master.h5,1,9\n")
    spots = read_spot_counts(path)
    np.testing.assert_array_equal(spots.for_collection(2, "/elsewhere/a_1_master.h5"), [5, 6])
    np.testing.assert_array_equal(spots.for_collection(2, Path("b_1_master.h5")), [9, np.nan])
    with pytest.raises(SpotsFileError, match=r"counts\.csv.*no row with master_file c_1_master\.h5"):
        spots.for_collection(2, "c_1_master.h5")


@pytest.mark.parametrize(
    "text, message",
    [
        ("frame,count\n1,2\n", r"columns found: frame, count; expected an image column \(image.*spots"),
        ("image,spots\n1,many\n", "column spots holds a value that is not a number"),
        ("image,spots\n1,2\n1,3\n", "image 1 is listed more than once"),
        ("image,spots\n0,2\n", "do not fit a collection of 4 images"),
        ("image,spots\n1,2\n9,3\n", "do not fit a collection of 4 images"),
        ("image,spots\n1.5,2\n", "non-integer image numbers"),
        ("image,spots\n", "no rows of counts"),
        ("image,spots\n1,2\n2,-1\n", r"column spots holds a negative value \(-1, data row 2\): give counts >= 0"),
        ("image,spots\n1,2\n2\n3,4\n", r"data row 2 has 1 values where the header \['image', 'spots'\] names 2"),
        (
            "| image | #spots |\n|-------+--------|\n| 1 | 5 |\n| 2 | 6 | 7 |\n",
            r"line 4 has 3 cells where the table header \['image', '#spots'\] names 2",
        ),
        ('{"image": [1, 2, 3], "spots": [5, 6]}', r"columns of different lengths \(image 3, spots 2 values\)"),
        ("[1, 2]", "a JSON list must hold one object per image"),
        ('{"image": [1, 2', "not valid JSON"),
    ],
)
def test_spot_count_errors_name_the_file_and_the_expected_columns(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(SpotsFileError, match=message) as caught:
        read_spot_counts(path).for_collection(4)
    assert str(path) in str(caught.value)


def test_missing_spot_count_file(tmp_path):
    with pytest.raises(SpotsFileError, match=r"missing\.csv: cannot read"):
        read_spot_counts(tmp_path / "missing.csv")


# Crops --------------------------------------------------------------------------------


def test_crop_around_beam_is_square_in_um_and_padded_by_edge_replication():
    frame = np.arange(100 * 80 * 3, dtype=np.uint32).reshape(80, 100, 3).astype(np.uint8)
    crop, beam, padded = crop_around_beam(frame, (50.0, 40.0), (400.0, 200.0), 100.0)
    assert crop.shape == (20, 40, 3) and not padded
    np.testing.assert_array_equal(beam, [20.0, 10.0])
    np.testing.assert_array_equal(crop, frame[30:50, 30:70])
    crop, beam, padded = crop_around_beam(frame, (5.0, 78.0), (400.0, 400.0), 100.0)
    assert crop.shape == (40, 40, 3) and padded
    np.testing.assert_array_equal(beam, [20.0, 20.0])
    np.testing.assert_array_equal(crop[:22, 15:], frame[58:80, 0:25])
    np.testing.assert_array_equal(crop[:22, :15], np.repeat(frame[58:80, :1], 15, axis=1))
    np.testing.assert_array_equal(crop[22:], np.repeat(crop[21:22], 18, axis=0))
    for beam_off_the_frame in ((500.0, 40.0), (-30.0, 40.0), (50.0, -30.0)):
        with pytest.raises(ValueError, match="misses"):
            crop_around_beam(frame, beam_off_the_frame, (400.0, 400.0), 100.0)


# Recordings of simulated collections --------------------------------------------------

N_IMAGES = 40
CAMERA = (480, 384)  # width, height, pixels
PIXELS_PER_MM = (500.0, 500.0)


@dataclass
class Collection:
    recording: Path
    master: Path
    data_files: tuple
    counts: np.ndarray  # drawn reflection count of each detector frame
    exposed: np.ndarray  # camera exposure moments, wall clock
    wall_start: float


def simulate_collection(directory, name, seed, *, kind="Helical", osc_range=0.5, beam=(240.0, 192.0), fps=20.0,
                        waits_at=None):  # fmt: skip
    """Camera recording and EIGER files of one collection, as the virtual beamline makes them.

    ``waits_at``: omega (deg) at which the goniometer rests for 3 s before it
    moves to the scan's start, as after a centring while the detector arms.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    sample = make_sample(seed, n_crystals=1)
    centre = sample.crystals[0].centre
    start = centred_motors(centre - [0.06, 0.0, 0.0]) if kind == "Helical" else centred_motors(centre)
    end = centred_motors(centre + [0.06, 0.0, 0.0]) if kind == "Helical" else start
    translations = ("phiy", "phiz", "sampx", "sampy")
    plan = ScanPlan(kind, 20.0, osc_range, N_IMAGES, FRAME_TIME, {m: start[m] for m in translations},
                    {m: end[m] for m in translations})  # fmt: skip
    model = DiffractionModel(sample, points_per_crystal=1000)
    expected = [model.expected_rc(plan.motors_at((i + 0.5) * FRAME_TIME)) for i in range(N_IMAGES)]
    counts = np.minimum(rng.poisson(np.add(expected, 2.0)), 400)
    wall = START + 1000 * seed
    starts = wall + np.arange(N_IMAGES) * FRAME_TIME + CLOCK_OFFSET + rng.normal(0, JITTER, N_IMAGES)
    written = write_eiger_collection(
        directory / "data", f"{name}_1", counts, start_time=starts[0], frame_time=FRAME_TIME,
        count_time=FRAME_TIME * 0.999, seed=seed, frame_start_times=starts,
    )  # fmt: skip
    metadata = {
        "experiment_type": kind, "osc_start": 20.0, "osc_range": osc_range, "number_of_images": N_IMAGES,
        "exposure_time": FRAME_TIME, "master_file": str(written.master_path), "collection_start": wall - 0.3,
        "sample_id": seed, "crystal_id": f"xtal-{seed}", "zoom": 2, "pixels_per_mm": list(PIXELS_PER_MM),
        "beam_position": list(beam),
    }  # fmt: skip
    if kind == "Helical":  # as the recorder writes them (collection_metadata)
        metadata.update(helical_start=dict(plan.start), helical_end=dict(plan.end))
    store = FrameStore.create(directory, f"{name}_1_camera", metadata)
    renderer = Renderer(*CAMERA, seed=seed)
    first = wall - 0.4 if waits_at is None else wall - 3.4
    exposed = np.arange(first, wall + N_IMAGES * FRAME_TIME + 0.4, 1 / fps) + rng.uniform(0, 1 / fps)

    def motors_at(moment):
        motors = plan.motors_at(moment - wall)
        return motors if waits_at is None or moment >= wall - 0.4 else {**motors, "omega": waits_at}

    for k, moment in enumerate(exposed):
        rgb = renderer.render(sample, motors_at(moment), PIXELS_PER_MM, beam)
        # The recorder stamps a frame and reads the motors when it arrives.
        received = moment + LATENCY
        store.append(encode_jpeg(rgb), received, motors_at(received), k)
    store.close("complete")
    return Collection(store.path, written.master_path, written.data_paths, counts, exposed, wall)


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    directory = tmp_path_factory.mktemp("collections")
    return [
        simulate_collection(directory, "helical", 11),
        # Beam near the corner: the stored crops reach past the frame edge.
        simulate_collection(directory, "rotation", 12, kind="OSC", osc_range=1.0, beam=(120.0, 300.0), fps=13.0),
    ]


@pytest.fixture(scope="module")
def labelled(collections, tmp_path_factory):
    out = tmp_path_factory.mktemp("set") / "dataset.h5"
    summary = label_recordings([c.recording for c in collections], out, progress=False)
    return out, summary


def check_labels(dataset, collection, scan_id):
    """Rows of one recording: every matched frame, with its drawn count within spot-finder accuracy."""
    rows = np.flatnonzero(dataset.scan_id == scan_id)
    recording = read_recording(collection.recording)
    truth = np.floor((collection.exposed - collection.wall_start) / FRAME_TIME).astype(int)
    in_scan = np.flatnonzero((truth >= 0) & (truth < N_IMAGES))
    assert set(in_scan) <= set(dataset.recording_frame[rows])
    assert rows.size <= in_scan.size + 2  # frames within the tolerance of the ends
    frames = dataset.detector_frame[rows]
    expected = collection.counts[frames]
    assert np.all(np.abs(dataset.rc[rows] - expected) <= np.maximum(3, 0.1 * expected))
    clear = ~near_a_boundary(collection.exposed[dataset.recording_frame[rows]], collection.wall_start)
    np.testing.assert_array_equal(frames[clear], truth[dataset.recording_frame[rows]][clear])
    np.testing.assert_allclose(dataset.timestamp[rows], recording.timestamps[dataset.recording_frame[rows]])
    np.testing.assert_allclose(dataset.extra["motors"][rows], recording.motors[dataset.recording_frame[rows]])
    return rows


def test_labelling_writes_every_matched_frame_with_its_reflection_count(labelled, collections):
    out, summary = labelled
    assert summary.n_labelled == 2 and summary.n_errors == 0
    dataset = read_table(out)
    assert len(dataset) == summary.rows_added == sum(e.matching["n_matched"] for e in summary.recordings)
    for collection, entry in zip(collections, summary.recordings):
        assert entry.status == "labelled" and entry.detector_frames == N_IMAGES
        assert entry.matching["offset_method"] == "omega"
        assert entry.matching["clock_offset_s"] == pytest.approx(CLOCK_OFFSET, abs=0.001)
        rows = check_labels(dataset, collection, entry.scan_id)
        assert rows.size == entry.rows == entry.matching["n_matched"]
    helical, rotation = (np.flatnonzero(dataset.scan_id == e.scan_id) for e in summary.recordings)
    assert set(dataset.scan_type[helical]) == {"Helical"} and set(dataset.crystal_id[rotation]) == {"xtal-12"}
    assert not dataset.extra["padded"][helical].any() and dataset.extra["padded"][rotation].all()
    with RowReader(dataset.path, dataset.image_dataset) as reader:
        image = reader.image(int(rotation[0]))
    assert image.shape == (300, 300, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(dataset.beam_xy[rotation[0]], [150.0, 150.0])
    np.testing.assert_allclose(dataset.pixels_per_mm, np.tile(PIXELS_PER_MM, (len(dataset), 1)))
    assert set(dataset.zoom) == {"2"} and dataset.stored_crop_um == 600.0
    recordings = dataset.recordings
    assert [r["master_file"] for r in recordings] == [str(c.master.resolve()) for c in collections]
    assert recordings[0]["label_source"] == "spot finder" and recordings[0]["spot_finder"]["sigma_strong"] == 3.0
    assert recordings[0]["spot_finder"]["ice_rings"] is True
    assert recordings[0]["matching"]["n_matched"] == helical.size and recordings[0]["windows"]["regularised"]
    # detector_frame counts from the collection's first image number, kept to give the rows' image numbers back.
    assert (recordings[0]["first_image_number"], recordings[0]["detector_frames"]) == (1, N_IMAGES)
    assert dataset.provenance["tool"].startswith("mxcube-autocenter")
    assert summary.histogram == out.with_name("dataset_rc_histogram.png") and summary.histogram.stat().st_size > 0
    assert summary.rc_stats["n_rows"] == summary.rows_added
    text = format_summary(summary)
    assert "Labelled 2 of 2 recordings" in text and "Histogram:" in text
    assert re.search(r"clock offset \+0\.1[12]\d\d s \(omega; timing residual rms", text)


def test_frames_while_the_goniometer_waits_inside_the_scan_range_do_not_set_the_clock_offset(tmp_path):
    # After a centring at omega 30 the goniometer rests there, inside the scan's 20 to 40 deg, for 3 s
    # while the detector arms: 60 camera frames at rest against 40 during the scan.
    waiting = simulate_collection(tmp_path, "waiting", 25, waits_at=30.0)
    out = tmp_path / "dataset.h5"
    summary = label_recordings([waiting.recording], out, progress=False)
    entry = summary.recordings[0]
    assert entry.status == "labelled", entry.message
    assert entry.matching["offset_method"] == "omega"
    assert entry.matching["clock_offset_s"] == pytest.approx(CLOCK_OFFSET, abs=0.002)
    dataset = read_table(out)
    check_labels(dataset, waiting, entry.scan_id)
    # The frames at rest are not labelled with the scan's counts.
    assert np.all(waiting.exposed[dataset.recording_frame] > waiting.wall_start - TOLERANCE)


def test_appending_the_same_recording_again_is_detected(labelled, collections, tmp_path):
    out, first = labelled
    # A copy elsewhere is the same recording.
    copy = tmp_path / "copy.h5"
    shutil.copy(collections[0].recording, copy)
    summary = label_recordings([collections[1].recording, copy], out, progress=False)
    assert [e.status for e in summary.recordings] == ["duplicate", "duplicate"]
    assert summary.recordings[1].scan_id == first.recordings[0].scan_id
    assert "already in" in summary.recordings[0].message
    assert summary.rows_added == 0 and len(read_table(out)) == first.rows_added
    assert "2 already there" in format_summary(summary)


def test_several_processes_give_the_same_labels_in_no_more_processes_than_cores(labelled, collections, tmp_path,
                                                                               caplog):  # fmt: skip
    out, _ = labelled
    parallel = tmp_path / "parallel.h5"
    with caplog.at_level(logging.WARNING):
        summary = label_recordings([collections[0].recording], parallel, nproc=1000, progress=False)
    assert summary.n_labelled == 1
    cores = len(os.sched_getaffinity(0))
    assert f"nproc 1000 is more than the {cores} cores this process may use: spot finding in {cores} processes" in caplog.text
    serial = read_table(out)
    dataset = read_table(parallel)
    rows = serial.scan_id == summary.recordings[0].scan_id
    np.testing.assert_array_equal(dataset.rc, serial.rc[rows])
    np.testing.assert_array_equal(dataset.recording_frame, serial.recording_frame[rows])


def test_a_collection_without_rotation_is_labelled_by_its_helical_line_or_the_clock_offset_given(tmp_path):
    def labelled_right(collection, out):
        # Each frame with the count of the detector frame exposed when it was taken.
        table = read_table(out)
        exposed = collection.exposed[table.recording_frame]
        image = np.floor((exposed - collection.wall_start) / FRAME_TIME).astype(int)
        return np.mean(table.rc == collection.counts[np.clip(image, 0, N_IMAGES - 1)])

    # A helical line without oscillation: the sample moves along it from the first exposure to the last, as omega
    # would turn. It was refused, and the advice to give 0 where both clocks keep NTP time labelled every frame
    # with another frame's count where the EIGER dates its master file at arming, before the first trigger.
    line = simulate_collection(tmp_path, "line", 26, osc_range=0.0, fps=12.0)
    entry = label_recordings([line.recording], tmp_path / "line.h5", progress=False).recordings[0]
    assert entry.status == "labelled" and entry.matching["offset_method"] == "helical line"
    assert entry.matching["clock_offset_s"] == pytest.approx(CLOCK_OFFSET, abs=0.005)
    assert labelled_right(line, tmp_path / "line.h5") > 0.9
    # A still collection (no rotation, no line): nothing relates the clocks.
    still = simulate_collection(tmp_path, "still", 27, kind="OSC", osc_range=0.0, fps=12.0)
    out = tmp_path / "set" / "dataset.h5"
    entry = label_recordings([still.recording], out, progress=False).recordings[0]
    assert entry.status == "error" and not out.exists()
    assert "omega did not move (osc_range 0)" in entry.message and "give clock_offset (--clock-offset" in entry.message
    entry = label_recordings([still.recording], out, clock_offset=CLOCK_OFFSET, progress=False).recordings[0]
    assert entry.status == "labelled" and labelled_right(still, out) > 0.9


@pytest.mark.parametrize("rest_omega, rest_s, osc_range", [(270.0, 30.0, 0.1), (-1.0, 60.0, 0.36), (0.0, 60.0, 0.72)])
def test_a_long_rest_before_the_scan_does_not_move_omega_by_a_turn(rest_omega, rest_s, osc_range):
    # The turn was chosen by where most camera frames lay: a minute at the centring's angle before a scan of
    # 100 or 360 degrees put none of them in the scan, and before one of 720 degrees gave an offset a turn's time off.
    start, period, n_images, offset = 1000.0, 0.1, 1000, 5.0
    times = np.arange(start - rest_s, start + n_images * period + 2.0, 0.1)
    omegas = np.where(times < start, rest_omega, np.clip((times - start) / period, 0, n_images) * osc_range)
    starts = start + offset + np.arange(n_images) * period
    windows = np.column_stack([starts, starts + 0.99 * period])
    assert estimate_clock_offset(times, omegas, windows, 0.0, osc_range) == pytest.approx(offset, abs=1e-6)


def test_a_helical_line_without_rotation_relates_the_clocks_by_the_sample_s_place_along_it():
    timing = helical_timing(3)
    start, end = np.array([0.10, -0.20, 0.0, 0.05]), np.array([0.30, -0.20, 0.01, 0.05])
    place = (timing.omegas - 30.0) / 0.5 / 40  # where omega turned 0.5 deg an image over 40, the sample moves
    positions = start + np.outer(np.clip(place, 0, 1), end - start)
    fitted = regular_windows(timing.windows)
    offset = estimate_clock_offset(timing.received, np.full(len(place), 30.0), fitted.windows, 30.0, 0.0,
                                   line=(start, end, positions))  # fmt: skip
    assert offset.method == "helical line" and offset == pytest.approx(CLOCK_OFFSET, abs=0.001)
    with pytest.raises(ValueError, match="omega did not move .*, and only 0 while the sample moved along the helical "
                                         "line, so the motion cannot relate"):
        estimate_clock_offset(timing.received, np.full(len(place), 30.0), fitted.windows, 30.0, 0.0,
                              line=(start, end, np.tile(start, (len(place), 1))))  # fmt: skip


def test_a_recording_still_being_written_is_labelled_only_once_it_rests(tmp_path):
    # Labelled while written, its frames so far would go in, and all of them again once it is complete
    # (another fingerprint). A writer killed mid-collection leaves "recording" for good: that one is labelled.
    still = simulate_collection(tmp_path / "still", "still", 24, fps=12.0)
    with h5py.File(still.recording, "a") as f:
        f.attrs["status"] = "recording"
    out = tmp_path / "set" / "dataset.h5"
    entry = label_recordings([still.recording], out, progress=False).recordings[0]
    assert entry.status == "error" and "still being written" in entry.message and str(still.recording) in entry.message
    rested = time.time() - STILL_WRITTEN_S - 1
    os.utime(still.recording, (rested, rested))
    assert label_recordings([still.recording], out, progress=False).recordings[0].status == "labelled"


def test_corrupt_and_missing_files_fail_their_recording_only(tmp_path):
    corrupt = simulate_collection(tmp_path / "corrupt", "corrupt", 21, fps=12.0)
    corrupt.master.write_bytes(np.random.default_rng(0).bytes(4096))
    missing = simulate_collection(tmp_path / "missing", "missing", 22, fps=12.0)
    missing.data_files[0].unlink()
    good = simulate_collection(tmp_path / "good", "good", 23, fps=12.0)
    unreadable = tmp_path / "unreadable_camera.h5"
    unreadable.write_bytes(b"not HDF5")
    out = tmp_path / "set" / "dataset.h5"
    recordings = [corrupt.recording, good.recording, missing.recording, unreadable]
    summary = label_recordings(recordings, out, progress=False)
    assert [e.status for e in summary.recordings] == ["error", "labelled", "error", "error"]
    assert str(corrupt.master) in summary.recordings[0].message and "corrupt" in summary.recordings[0].message
    message = summary.recordings[2].message
    assert str(missing.data_files[0]) in message and "data file missing" in message
    assert str(unreadable) in summary.recordings[3].message
    dataset = read_table(out)
    assert len(dataset) == summary.recordings[1].rows > 0
    assert set(dataset.scan_id) == {summary.recordings[1].scan_id}
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset.h5", "dataset_rc_histogram.png"]
    assert "3 failed" in format_summary(summary)


def test_an_aborted_collection_is_labelled_up_to_its_last_written_frame(tmp_path, caplog):
    # An aborted collection's master file declares frames its data files never got.
    aborted = simulate_collection(tmp_path, "aborted", 24, fps=12.0)
    with h5py.File(aborted.data_files[0], "r+") as f:
        frames = f["entry/data/data"]
        kept, attrs = frames[:25], dict(frames.attrs)
        del f["entry/data/data"]
        frames = f.create_dataset("entry/data/data", data=kept, chunks=(1, *kept.shape[1:]), **hdf5plugin.Bitshuffle())
        frames.attrs.update({**attrs, "image_nr_high": 25})
    out = tmp_path / "dataset.h5"
    with caplog.at_level(logging.WARNING):
        summary = label_recordings([aborted.recording], out, progress=False)
    entry = summary.recordings[0]
    assert entry.status == "labelled" and entry.detector_frames == 25, entry.message
    assert "declares 40 images but its data files hold its first 25" in caplog.text
    dataset = read_table(out)
    assert dataset.detector_frame.max() == 24 and entry.matching["n_after"] > 0
    assert dataset.recordings[0]["declared_detector_frames"] == N_IMAGES


def test_a_master_file_of_another_collection_is_refused_before_spot_finding(tmp_path, monkeypatch):
    # A later collection with the same prefix and run number overwrote the files the recording names. Same
    # scan: the offset estimated from the motion puts its frames on the recording's, 1000 s off.
    recorded = simulate_collection(tmp_path / "first", "xtal", 26, fps=12.0)
    later = simulate_collection(tmp_path / "later", "xtal", 27, fps=12.0)
    for source, target in zip((later.master, *later.data_files), (recorded.master, *recorded.data_files)):
        shutil.copy(source, target)
    counted, count_spots = [], pipeline.count_spots
    monkeypatch.setattr(pipeline, "count_spots",
                        lambda master, *args, **kwargs: counted.append(master) or count_spots(master, *args, **kwargs))
    out = tmp_path / "dataset.h5"
    entry = label_recordings([recorded.recording], out, progress=False).recordings[0]
    assert entry.status == "error" and not counted and not out.exists()
    assert entry.message.startswith(f"{recorded.master}: not the collection of {recorded.recording}")
    assert "clock +1000.1 s off the camera's (estimated from the goniometer's motion" in entry.message
    assert "raise max_clock_offset (--max-clock-offset, s) or give clock_offset (--clock-offset" in entry.message
    # Clocks that far apart: an offset given is taken as it is, and a larger limit lets the estimate through.
    entry = label_recordings([recorded.recording], out, clock_offset=1000.12, progress=False).recordings[0]
    assert entry.status == "labelled" and counted == [recorded.master]
    # The command line leaves the limit to label_recordings unless given, and says the same default.
    assert build_parser().parse_args(["label", "x.h5", "--out", "y.h5"]).max_clock_offset is None
    assert f"(default: {pipeline.MAX_CLOCK_OFFSET_S:g})" in " ".join(build_parser()._subparsers._group_actions[0]
                                                                     .choices["label"].format_help().split())
    raised = tmp_path / "raised.h5"
    assert main(["label", str(recorded.recording), "--out", str(raised), "--max-clock-offset", "1200"]) == 0
    assert read_table(raised).recordings[0]["matching"]["clock_offset_s"] == pytest.approx(1000.12, abs=0.01)
    # A camera slower to deliver than the virtual one: its latency is given, and recorded with the rows.
    slow = tmp_path / "slow.h5"
    assert main(["label", str(recorded.recording), "--out", str(slow), "--max-clock-offset", "1200",
                 "--camera-latency", "0.03"]) == 0
    assert read_table(slow).recordings[0]["camera_latency_s"] == 0.03


def test_the_own_master_file_next_to_a_recording_is_taken_when_the_recorded_path_holds_another(tmp_path, caplog):
    # The recording and its collection's files were copied away; later, a collection with the same prefix and
    # run number took the names the recording's metadata gives.
    recorded = simulate_collection(tmp_path / "first", "xtal", 26, fps=12.0)
    later = simulate_collection(tmp_path / "later", "xtal", 27, fps=12.0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in (recorded.recording, recorded.master, *recorded.data_files):
        shutil.copy(path, copy / path.name)
    for source, target in zip((later.master, *later.data_files), (recorded.master, *recorded.data_files)):
        shutil.copy(source, target)
    out = tmp_path / "dataset.h5"
    with caplog.at_level(logging.WARNING):
        entry = label_recordings([copy / recorded.recording.name], out, progress=False).recordings[0]
    assert entry.status == "labelled", entry.message
    assert f"{recorded.master}: not the collection of" in caplog.text
    assert f"labelled with {copy / recorded.master.name} instead" in caplog.text
    dataset = read_table(out)
    assert dataset.recordings[0]["master_file"] == str((copy / recorded.master.name).resolve())
    assert abs(dataset.recordings[0]["matching"]["clock_offset_s"]) < 1.0
    # A later collection still being written there (its master file not yet readable) is passed over too,
    # also with the clock offset given; with no copy of its own, the recorded path's error is the one raised.
    recorded.master.write_bytes(b"not HDF5 yet")
    for offset in (None, 0.0):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = label_recordings([copy / recorded.recording.name], tmp_path / f"again_{offset}.h5",
                                     clock_offset=offset, progress=False).recordings[0]  # fmt: skip
        assert again.status == "labelled", again.message
        assert f"labelled with {copy / recorded.master.name} instead" in caplog.text
    # None of the places readable: the recorded path's error is the one given.
    (copy / recorded.master.name).write_bytes(b"cut short")
    entry = label_recordings([copy / recorded.recording.name], tmp_path / "none.h5", progress=False).recordings[0]
    assert entry.status == "error" and entry.message.startswith(str(recorded.master)), entry.message


def test_the_own_master_file_is_taken_when_the_recorded_path_holds_a_collection_too_short_to_relate_clocks(tmp_path):
    # The clock offset's estimate failed on the later, 4-image collection at the recorded path ("only 1 camera
    # frames while omega moved: give clock_offset"), and the recording's own copy was never tried.
    recorded = simulate_collection(tmp_path / "first", "xtal", 26, fps=12.0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in (recorded.recording, recorded.master, *recorded.data_files):
        shutil.move(path, copy / path.name)
    write_eiger_collection(recorded.master.parent, "xtal_1", [5] * 4, start_time=time.time(), frame_time=0.05,
                           count_time=0.0499)  # fmt: skip
    entry = label_recordings([copy / recorded.recording.name], tmp_path / "set.h5", progress=False).recordings[0]
    assert entry.status == "labelled", entry.message
    assert read_table(tmp_path / "set.h5").recordings[0]["master_file"] == str((copy / recorded.master.name).resolve())


def test_a_set_that_cannot_be_written_fails_before_any_spot_finding_and_nothing_is_left(collections, tmp_path,
                                                                                         monkeypatch, file_size_limit):  # fmt: skip
    # A set that cannot be written there (here: no file may grow past 64 bytes) was found only at the first
    # append, after that recording's spot finding, and then again for every recording.
    counted = []
    monkeypatch.setattr(pipeline, "count_spots", lambda *args, **kwargs: counted.append(args) or None)
    file_size_limit(64)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'set.h5'}: cannot create the training set"):
        label_recordings([c.recording for c in collections], tmp_path / "set.h5", progress=False)
    file_size_limit(None)
    assert counted == [] and list(tmp_path.iterdir()) == []


def test_a_set_into_which_nothing_went_is_not_left_behind(collections, tmp_path):
    # Whether a set can be written there is checked before any recording is labelled (an empty one written and
    # removed): a run into which nothing goes must leave nothing behind.
    recording = read_recording(collections[0].recording)
    store = FrameStore.create(tmp_path, "empty", recording.metadata)
    store.close("failed")
    out = tmp_path / "set.h5"
    summary = label_recordings([store.path], out, progress=False)
    assert summary.recordings[0].status == "error" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.path.name]


def test_spot_finding_processes_are_counted_from_one_and_are_processes(collections, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from mxcube_autocenter.labelling.pipeline import LabellingError, count_spots

    for nproc in (0, -1, 1.5, True):
        with pytest.raises(LabellingError, match=rf"nproc = {re.escape(repr(nproc))}: .*a whole number from 1"):
            label_recordings([collections[0].recording], tmp_path / "new" / "set.h5", nproc=nproc, progress=False)
    assert not (tmp_path / "new").exists()  # refused before anything was made
    # Each worker keeps one collection open between its tasks: threads would share (and race for) it.
    with ThreadPoolExecutor(2) as threads, pytest.raises(TypeError, match="executor is a ThreadPoolExecutor"):
        count_spots(collections[0].master, executor=threads)


def test_a_set_held_open_elsewhere_is_refused_before_any_spot_finding(collections, tmp_path):
    # A training run reading the set holds HDF5's lock: the append would fail, so it fails before the spots are
    # counted, as it does for a set that cannot be created.
    import subprocess
    import sys

    from mxcube_autocenter.labelling.dataset import DatasetError

    out = tmp_path / "set.h5"
    label_recordings([collections[0].recording], out, progress=False)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, h5py; f = h5py.File(sys.argv[1], 'r'); "
                               "print('open', flush=True); time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        # Raised up front: once the spots were counted, the append's failure would be that recording's error.
        with pytest.raises(DatasetError, match="another program holds it open"):
            label_recordings([collections[1].recording], out, progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_a_set_is_written_on_a_file_system_without_locks(collections, tmp_path, monkeypatch):
    # NFS without lockd: HDF5's lock fails (errno 37); reading worked without it, writing the set did not.
    from mxcube_autocenter import hdf5errors

    real = h5py.File

    def without_locks(name, mode="r", *args, **kwargs):
        if kwargs.get("locking", True) is not False:
            raise OSError(37, "Unable to synchronously open file (unable to lock file, errno = 37, error message = "
                              "'No locks available')")  # fmt: skip
        return real(name, mode, *args, **kwargs)

    monkeypatch.setattr(hdf5errors.h5py, "File", without_locks)
    summary = label_recordings([collections[0].recording], tmp_path / "set.h5", progress=False)
    assert summary.n_labelled == 1, summary.recordings[0].message
    monkeypatch.undo()
    assert len(read_table(tmp_path / "set.h5")) == summary.rows_added > 0


def rewrite_master_dates(path, rewrite):
    """Write a master file's dates again as ``rewrite(datetime) -> datetime`` gives them (older EIGER firmware:
    without a UTC offset)."""

    def again(value):
        text = value.decode() if isinstance(value, bytes) else str(value)
        return np.bytes_(rewrite(datetime.fromisoformat(text)).isoformat(timespec="microseconds"))

    with h5py.File(path, "r+") as master:
        specific = master["entry/instrument/detector/detectorSpecific"]
        date = again(specific["data_collection_date"][()])
        del specific["data_collection_date"]
        specific["data_collection_date"] = date
        for name in ("start_time", "stop_time"):
            times = master["entry/instrument/detector"][name]
            times.attrs["start"] = again(times.attrs["start"])


@contextlib.contextmanager
def time_zone(monkeypatch, zone: str):
    """This process in time zone ``zone`` (a TZ value) for the ``with`` block."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def test_master_dates_without_a_utc_offset_read_in_another_time_zone_are_named_as_such(tmp_path, monkeypatch):
    # Older EIGER firmware writes its dates without a UTC offset (here in UTC); labelled on a computer two hours
    # east, the detector's clock reads 2 h off the camera's: no other collection, and the error must say so.
    recorded = simulate_collection(tmp_path, "xtal", 29, fps=12.0)
    rewrite_master_dates(recorded.master, lambda date: date.astimezone(timezone.utc).replace(tzinfo=None))
    with time_zone(monkeypatch, "Etc/GMT-2"):  # UTC+02:00
        entry = label_recordings([recorded.recording], tmp_path / "dataset.h5", progress=False).recordings[0]
    assert entry.status == "error"
    assert entry.message.startswith(f"{recorded.master}: its dates carry no UTC offset")
    assert "(UTC+0200)" in entry.message and "(-2 h) off the camera's" in entry.message
    assert "TZ=" in entry.message and "--clock-offset -7199." in entry.message


def test_master_dates_without_a_utc_offset_in_the_hour_daylight_saving_repeats_are_labelled(tmp_path, monkeypatch):
    # A date without a UTC offset in the autumn's repeated hour reads at its first reading, an hour early: the
    # frames fell on the camera's with the clocks 1 h apart, and the error blamed a time zone the detector shares.
    recorded = simulate_collection(tmp_path, "xtal", 29, fps=12.0)  # at about START + 29 000 s
    # A zone of UTC+1, +2 in summer, whose summer ends 10 minutes before the collection: its hour repeats.
    with time_zone(monkeypatch, "XST-1XDT,J1/0,J319/08:06:40"):
        rewrite_master_dates(recorded.master, lambda date: date.astimezone().replace(tzinfo=None))  # local time
        entry = label_recordings([recorded.recording], tmp_path / "dataset.h5", progress=False).recordings[0]
    assert entry.status == "labelled", entry.message
    assert entry.matching["clock_offset_s"] == pytest.approx(CLOCK_OFFSET - 3600.0, abs=0.005)


def test_only_the_detector_frames_matched_to_a_camera_frame_are_counted(tmp_path, monkeypatch):
    # A camera of 5 frames/s against a detector of 20: three in four detector frames label nothing.
    slow = simulate_collection(tmp_path, "slow", 28, fps=5.0)
    counted = []

    def counting(*args, **kwargs):
        counts = count_spots(*args, **kwargs)
        counted.append(int(np.isfinite(counts).sum()))
        return counts

    monkeypatch.setattr(pipeline, "count_spots", counting)
    summary = label_recordings([slow.recording], tmp_path / "dataset.h5", progress=False)
    entry = summary.recordings[0]
    assert entry.status == "labelled", entry.message
    dataset = read_table(tmp_path / "dataset.h5")
    check_labels(dataset, slow, entry.scan_id)
    assert counted == [entry.frames_matched] and entry.frames_matched == np.unique(dataset.detector_frame).size <= 12
    assert entry.n_unlabelled == 0
    text = format_summary(summary)
    assert f"40 detector frames, {entry.frames_matched} with a camera frame: reflections counted" in text


def test_corrupt_camera_images_cost_their_own_rows_only(collections, tmp_path):
    copy = tmp_path / "corrupt_frames_camera.h5"
    shutil.copy(collections[0].recording, copy)
    junk = np.frombuffer(b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(2000), np.uint8)
    with h5py.File(copy, "r+") as h5file:
        # In the middle of the scan, so both matched: junk after a JPEG start, and an empty
        # image (what a write that failed half-way leaves).
        h5file["frames/jpeg"][20] = junk
        h5file["frames/jpeg"][21] = np.zeros(0, np.uint8)
    summary = label_recordings([copy], tmp_path / "dataset.h5", progress=False)
    entry = summary.recordings[0]
    assert entry.status == "labelled" and entry.n_unreadable == 2
    assert entry.rows == entry.matching["n_matched"] - 2
    assert f"frame 20 of {copy} is a corrupt image" in entry.message
    assert "2 corrupt images left out" in format_summary(summary)
    dataset = read_table(tmp_path / "dataset.h5")
    assert len(dataset) == entry.rows and not {20, 21} & set(dataset.recording_frame)
    assert dataset.recordings[0]["unreadable_frames"] == 2

    with h5py.File(copy, "r+") as h5file:
        for i in range(len(h5file["frames/jpeg"])):
            h5file["frames/jpeg"][i] = junk
    summary = label_recordings([copy], tmp_path / "all_corrupt.h5", progress=False)
    entry = summary.recordings[0]
    assert entry.status == "error" and "none of its" in entry.message and "check the camera's image format" in entry.message


def _dies_counting(master_name):
    """Spot-finding worker initialiser: the worker dies, as a crashing HDF5 filter kills it, on ``master_name``."""
    pipeline._one_thread_per_worker()
    count_frames = pipeline._count_frames

    def dying(master_file, *args):
        if Path(master_file).name == master_name:
            os.kill(os.getpid(), signal.SIGSEGV)
        return count_frames(master_file, *args)

    # The tasks name the function, and the worker looks it up after this has run.
    pipeline._count_frames = dying


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_spot_finder_that_dies_fails_its_recording_only(collections, tmp_path, monkeypatch, nproc):
    # Overwriting bytes of EIGER data files at random, 4 in 400 made hdf5plugin's bitshuffle-LZ4 filter crash
    # the reading process with a segmentation fault: which bytes do is the filter's business, so the crash
    # is brought about here, in a real worker process, by the signal it dies of.
    dying = collections[0].master.name
    spawn = multiprocessing.get_context("spawn")
    monkeypatch.setattr(pipeline, "ProcessPoolExecutor", lambda n, **kwargs: ProcessPoolExecutor(
        n, mp_context=spawn, initializer=_dies_counting, initargs=(dying,)))  # fmt: skip
    out = tmp_path / "dataset.h5"
    summary = label_recordings([c.recording for c in collections], out, nproc=nproc, progress=False)
    first, second = summary.recordings
    assert first.status == "error" and first.rows == 0
    assert f"{collections[0].recording}: a spot-finding process died counting the frames of" in first.message
    assert dying in first.message and "from image 1 on" in first.message
    assert "a data file of that collection is probably corrupt" in first.message
    assert second.status == "labelled" and second.rows > 0
    assert set(read_table(out).scan_id) == {second.scan_id}


def _cannot_start():
    raise RuntimeError("no worker here")  # as a script without a __main__ guard makes its workers fail


def test_spot_finding_runs_here_when_no_worker_can_start(labelled, collections, tmp_path, monkeypatch, caplog):
    spawn = multiprocessing.get_context("spawn")
    monkeypatch.setattr(pipeline, "ProcessPoolExecutor", lambda n, **kwargs: ProcessPoolExecutor(
        n, mp_context=spawn, initializer=_cannot_start))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        summary = label_recordings([collections[0].recording], tmp_path / "dataset.h5", progress=False)
    assert summary.n_labelled == 1
    # The same labels as the workers give.
    here, workers = read_table(tmp_path / "dataset.h5"), read_table(labelled[0])
    rows = workers.scan_id == summary.recordings[0].scan_id
    np.testing.assert_array_equal(here.rc, workers.rc[rows])
    np.testing.assert_array_equal(here.recording_frame, workers.recording_frame[rows])
    assert "spot-finding processes could not start (BrokenProcessPool" in caplog.text
    assert "spot finding in this process" in caplog.text and "if __name__ == '__main__':" in caplog.text


def test_an_unforeseen_error_fails_its_recording_only(collections, tmp_path, monkeypatch, caplog):
    from mxcube_autocenter.labelling import pipeline

    original = pipeline.match_frames
    calls = []

    def match_frames_with_a_bug(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")  # a stand-in for any error no check foresaw
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "match_frames", match_frames_with_a_bug)
    summary = label_recordings([c.recording for c in collections], tmp_path / "dataset.h5", progress=False)
    first, second = summary.recordings
    assert first.status == "error" and str(collections[0].recording) in first.message
    assert "KeyError" in first.message and "please report it" in first.message
    assert "Traceback" in caplog.text
    assert second.status == "labelled" and second.rows > 0


@pytest.mark.parametrize("signature", GROUP_SIGNATURES)
def test_damaged_recordings_and_training_sets_are_named_as_damaged(labelled, collections, tmp_path, signature):
    # h5py raises RuntimeError or KeyError for these: "please report it" would send the user after a bug.
    recording = damaged_copy(collections[0].recording, signature, tmp_path / "damaged_camera.h5")
    damaged = ": the file is damaged; "
    with pytest.raises(RecordingError, match=f"{re.escape(str(recording))}: cannot read this camera recording .*{damaged}"):
        read_recording(recording)
    entry = label_recordings([recording], tmp_path / "dataset.h5", progress=False).recordings[0]
    assert entry.status == "error" and damaged in entry.message and "please report" not in entry.message
    dataset = damaged_copy(labelled[0], signature, tmp_path / "damaged_set.h5")
    message = f"{re.escape(str(dataset))}: cannot read this training set .*{damaged}" r"write it again \(label or synthesize\)"
    with pytest.raises(DatasetError, match=message):
        read_table(dataset)
    with pytest.raises(DatasetError, match=message):  # appending to it
        label_recordings([collections[1].recording], dataset, progress=False)


@pytest.mark.parametrize("column", ["rows/motors", "recordings/fingerprint"])
def test_a_set_with_a_damaged_column_is_refused_before_the_spot_finding(labelled, collections, tmp_path,
                                                                         monkeypatch, column):
    # Its column headers were opened only while appending, after the spot finding: "AttributeError: 'NoneType'
    # object has no attribute 'shape' ... please report it".
    with h5py.File(labelled[0], "r") as h5file:
        header = h5py.h5o.get_info(h5file[column].id).addr
    data = bytearray(Path(labelled[0]).read_bytes())
    data[header : header + 4] = b"\xa5\x5a\xa5\x5a"
    dataset = tmp_path / "damaged_set.h5"
    dataset.write_bytes(bytes(data))
    monkeypatch.setattr(pipeline, "count_spots", lambda *args, **kwargs: pytest.fail("spot finding ran"))
    with pytest.raises(DatasetError, match=f"{re.escape(str(dataset))}: cannot read this training set .*damaged"):
        label_recordings([collections[1].recording], dataset, progress=False)
    assert dataset.read_bytes() == bytes(data)


def test_a_stored_crop_of_no_size_is_refused_before_anything_is_written(labelled, collections, tmp_path,
                                                                         monkeypatch):
    # The set keeps its recordings' smallest stored crop: 0 um made every row of it unreadable.
    dataset = tmp_path / "dataset.h5"
    dataset.write_bytes(Path(labelled[0]).read_bytes())
    monkeypatch.setattr(pipeline, "count_spots", lambda *args, **kwargs: pytest.fail("spot finding ran"))
    for side in (0.0, -600, float("nan"), "600 um"):
        with pytest.raises(DatasetError, match="stored_crop_um = .*: give the side of the stored crops"):
            label_recordings([collections[1].recording], dataset, stored_crop_um=side, progress=False)
    assert dataset.read_bytes() == Path(labelled[0]).read_bytes()
    assert len(read_table(dataset)) > 0


def test_recording_without_master_file_or_camera_scale(collections, tmp_path, monkeypatch):
    # Both refused before any spot finding: a long collection's would be thrown away.
    monkeypatch.setattr(pipeline, "count_spots", lambda *args, **kwargs: pytest.fail("spot finding ran"))
    recording = read_recording(collections[0].recording)
    for drop, message in (("master_file", "no master_file in its collection metadata"),
                          ("pixels_per_mm", "collection metadata pixels_per_mm is None")):  # fmt: skip
        metadata = {k: v for k, v in recording.metadata.items() if k != drop}
        store = FrameStore.create(tmp_path, f"no_{drop}", metadata)
        for k in range(3):
            store.append(encode_jpeg(np.zeros((64, 64, 3), np.uint8)), recording.timestamps[k + 20],
                         recording.motors[k + 20], k)  # fmt: skip
        store.close()
        summary = label_recordings([store.path], tmp_path / "dataset.h5", progress=False)
        assert summary.recordings[0].status == "error"
        assert str(store.path) in summary.recordings[0].message and message in summary.recordings[0].message


def test_recording_without_frames_is_refused_before_spot_finding(collections, tmp_path):
    recording = read_recording(collections[0].recording)
    store = FrameStore.create(tmp_path, "empty", recording.metadata)
    store.close("failed")  # a camera that sent nothing
    summary = label_recordings([store.path], tmp_path / "dataset.h5", progress=False)
    entry = summary.recordings[0]
    assert entry.status == "error"
    assert str(store.path) in entry.message and "no camera frame" in entry.message
    assert "nothing to label" in entry.message and "clock_offset" not in entry.message


def test_spot_count_file_gives_the_labels(collections, tmp_path):
    path = tmp_path / "counts.csv"
    lines = ["master_file,image,n_spots"]
    for collection in collections:
        lines += [f"{collection.master},{i + 1},{c}" for i, c in enumerate(collection.counts) if i != 7]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "dataset.h5"
    summary = label_recordings([c.recording for c in collections], out, spots_from=path, progress=False)
    assert summary.n_labelled == 2
    dataset = read_table(out)
    for collection, entry in zip(collections, summary.recordings):
        rows = dataset.scan_id == entry.scan_id
        np.testing.assert_array_equal(dataset.rc[rows], collection.counts[dataset.detector_frame[rows]])
        assert 7 not in dataset.detector_frame[rows]
        assert entry.n_unlabelled == entry.matching["n_matched"] - entry.rows > 0
    assert dataset.recordings[0]["label_source"] == str(path.resolve())
    single = tmp_path / "single.csv"
    single.write_text("image,spots\n1,3\n")
    with pytest.raises(Exception, match=r"single\.csv: no master_file column"):
        label_recordings([c.recording for c in collections], out, spots_from=single, progress=False)


def test_a_recording_none_of_whose_frames_has_a_count_is_not_appended_and_can_be_labelled_later(collections,
                                                                                                   tmp_path):
    # Appended with no row, it was in the set for good: labelling it again with its counts skipped it.
    recording = read_recording(collections[1].recording)
    store = FrameStore.create(tmp_path, "uncounted", recording.metadata)
    for k in range(3):
        store.append(encode_jpeg(np.zeros((CAMERA[1], CAMERA[0], 3), np.uint8)), recording.timestamps[0] + k * 0.001,
                     recording.motors[0], k)  # fmt: skip
    store.close()
    out = tmp_path / "dataset.h5"
    match = match_frames(np.arange(3.0), [[-1.0, 0.5], [0.5, 5.0]])
    with pytest.raises(DatasetError, match=f"{store.path}: none of its 3 matched camera frames has a reflection count"):
        append_recording(out, store.path, [np.nan, np.nan], match)
    assert not out.exists()
    assert append_recording(out, store.path, [5.0, 2.0], match).rows == 3
    assert append_recording(out, store.path, [np.nan, np.nan], match).duplicate  # in the set: skipped, as any


def test_an_interrupted_append_leaves_the_committed_rows(collections, tmp_path, monkeypatch):
    from mxcube_autocenter.labelling import dataset as dataset_module

    out = tmp_path / "dataset.h5"
    first = label_recordings([collections[0].recording], out, progress=False).rows_added
    calls = []

    def failing_encode(rgb, quality):
        calls.append(1)
        if len(calls) > 300:
            raise OSError(28, "No space left on device")
        return encode_jpeg(rgb, quality)

    # A long recording, so that its rows are written in several batches before the failure.
    recording = read_recording(collections[1].recording)
    store = FrameStore.create(tmp_path, "long", recording.metadata)
    for k in range(400):
        store.append(encode_jpeg(np.full((CAMERA[1], CAMERA[0], 3), k % 255, np.uint8)),
                     recording.timestamps[0] + k * 0.001, recording.motors[0], k)  # fmt: skip
    store.close()
    match = match_frames(np.arange(400.0), [[-1.0, 500.0]])
    monkeypatch.setattr(dataset_module, "encode_jpeg", failing_encode)
    with pytest.raises(DatasetError, match=f"{out}: cannot write the set .*No space left.*check free space"):
        append_recording(out, store.path, [5.0], match)
    monkeypatch.undo()
    dataset = read_table(out)
    assert len(dataset) == first and len(dataset.recordings) == 1
    with h5py.File(out, "r") as h5file:
        assert h5file["rows/rc"].shape[0] == first
    # Rows written past the count by a killed process are never read, and trimmed on the next append.
    with h5py.File(out, "r+") as h5file:
        for dataset in h5file["rows"].values():
            dataset.resize(first + 7, axis=0)
    assert len(read_table(out)) == first
    with pytest.raises(DatasetError, match="reflection count -1 for detector frame 0: give counts >= 0"):
        append_recording(out, store.path, [-1.0], match)
    result = append_recording(out, store.path, [5.0], match)
    assert result.rows == 400
    dataset = read_table(out)
    assert len(dataset) == first + 400 and np.all(dataset.rc[first:] == 5.0)
    with RowReader(dataset.path, dataset.image_dataset) as reader:
        assert reader.image(first + 399).shape == (300, 300, 3)
    with h5py.File(out, "r") as h5file:
        assert h5file["rows/rc"].shape[0] == first + 400
    assert [p.name for p in tmp_path.glob("*.tmp")] == []


def test_a_batch_of_equally_long_jpegs_is_written(collections, tmp_path):
    # h5py stacks equally long arrays into a 2-D one: a single row, or a dark camera's identical frames.
    recording = read_recording(collections[1].recording)
    store = FrameStore.create(tmp_path, "dark", recording.metadata)
    dark = encode_jpeg(np.zeros((CAMERA[1], CAMERA[0], 3), np.uint8))
    for k in range(3):
        store.append(dark, recording.timestamps[0] + k * 0.001, recording.motors[0], k)
    store.close()
    out = tmp_path / "dataset.h5"
    match = match_frames(np.arange(3.0), [[-1.0, 5.0]])
    assert append_recording(out, store.path, [5.0], match).rows == 3
    one = tmp_path / "one.h5"  # only the first camera frame's detector frame has a count
    first_only = match_frames(np.arange(3.0), [[-1.0, 0.5], [0.5, 5.0]])
    assert append_recording(one, store.path, [5.0, np.nan], first_only).rows == 1
    with RowReader(out, "rows/jpeg") as reader:
        assert reader.image(2).shape == (300, 300, 3)


def test_an_interrupt_in_the_flush_that_commits_an_append_leaves_the_set_as_it_was(collections, tmp_path, monkeypatch):
    out = tmp_path / "dataset.h5"
    first = label_recordings([collections[0].recording], out, progress=False).rows_added
    flush = h5py.File.flush

    def flush_then_interrupt(h5file):
        flush(h5file)
        if h5file.attrs["n_rows"] > first:  # the commit is on disk: Ctrl-C arrives as the flush returns
            raise KeyboardInterrupt

    monkeypatch.setattr(h5py.File, "flush", flush_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        label_recordings([collections[1].recording], out, progress=False)
    monkeypatch.undo()
    dataset = read_table(out)
    assert len(dataset) == first and len(dataset.recordings) == 1
    again = label_recordings([collections[1].recording], out, progress=False)
    assert again.n_labelled == 1 and len(read_table(out).recordings) == 2


@pytest.fixture
def file_size_limit():
    """``limit(n)`` makes writes past n bytes fail with EFBIG, as a full disk or a quota would; ``limit(None)`` lifts it."""
    import resource

    saved = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size):
        resource.setrlimit(resource.RLIMIT_FSIZE, saved if size is None else (size, saved[1]))

    yield limit
    limit(None)


def test_a_write_that_fails_in_hdf5_itself_is_a_dataset_error_and_loses_nothing(collections, tmp_path, file_size_limit):
    # h5py raises RuntimeError, not OSError, when a flush or the file's growth fails.
    out, new = tmp_path / "dataset.h5", tmp_path / "new.h5"
    first = label_recordings([collections[0].recording], out, progress=False).rows_added
    file_size_limit(out.stat().st_size + 4096)
    failed = label_recordings([collections[1].recording], out, progress=False).recordings[0]
    assert failed.status == "error" and f"{out}: cannot write the set" in failed.message
    assert "check free space" in failed.message and "please report it" not in failed.message
    assert "File too large" in failed.message  # the write that failed, not the close after it
    assert "buf = " not in failed.message  # the system's error, not HDF5's whole record of it
    file_size_limit(64)
    with pytest.raises(DatasetError, match=f"{new}: cannot create the training set"):
        label_recordings([collections[1].recording], new, progress=False)
    file_size_limit(None)
    assert not new.exists() and [p.name for p in tmp_path.glob("*.tmp")] == []
    dataset = read_table(out)
    assert len(dataset) == first and len(dataset.recordings) == 1
    assert label_recordings([collections[1].recording], out, progress=False).n_labelled == 1


def test_a_set_under_a_file_is_refused_before_labelling_naming_the_file(collections, tmp_path):
    # Each recording's spots were counted, then it failed with "labelling failed (NotADirectoryError: ...
    # set.h5.tmp): please report it": removing the temporary file that could not be made failed too.
    from mxcube_autocenter.labelling import dataset

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="a_file is a file, not a folder: choose another --out"):
        label_recordings([collections[0].recording], blocker / "set.h5", progress=False)
    with pytest.raises(DatasetError, match=r"set\.h5: cannot create the training set .*File exists"):
        dataset.create_if_missing(blocker / "set.h5")
    assert blocker.read_text() == ""


def without_hard_links(monkeypatch):
    """The file system of a set where hard links cannot be made (some network and FUSE file systems)."""

    def refused(source, target, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(source), None, str(target))

    monkeypatch.setattr(os, "link", refused)


@pytest.mark.parametrize("hard_links", [True, False])
def test_two_runs_creating_the_same_set_at_once_lose_nothing(collections, tmp_path, monkeypatch, hard_links):
    # The later run's rename replaced the set that the other had created, and filled, meanwhile.
    from mxcube_autocenter.labelling import dataset

    if not hard_links:
        without_hard_links(monkeypatch)
    out = tmp_path / "set.h5"
    write_empty = dataset._write_empty

    def other_run_meanwhile(path, target):
        write_empty(path, target)
        if target.name.endswith(".tmp"):  # this run's set written, not yet in place
            monkeypatch.setattr(dataset, "_write_empty", write_empty)
            label_recordings([collections[1].recording], out, progress=False)

    monkeypatch.setattr(dataset, "_write_empty", other_run_meanwhile)
    label_recordings([collections[0].recording], out, progress=False)
    assert len(read_table(out).recordings) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.h5", "set_rc_histogram.png"]


def test_without_hard_links_a_set_another_run_is_renaming_into_place_is_waited_for_not_replaced(tmp_path,
                                                                                                  monkeypatch):  # fmt: skip
    # Without links the set was renamed into place after a look that it was missing: a second run could look
    # before the first one's set was there and replace it afterwards, with the rows the first had written.
    from mxcube_autocenter.labelling import dataset

    without_hard_links(monkeypatch)
    out = tmp_path / "set.h5"
    claim = tmp_path / "set.h5.creating"
    claim.write_text("")  # the other run's claim: it is renaming its set into place

    def other_run():
        time.sleep(0.3)
        dataset._write_empty(out, tmp_path / "other.tmp")
        with h5py.File(tmp_path / "other.tmp", "r+") as h5file:
            h5file.attrs["n_rows"] = 7  # and fills it
        os.replace(tmp_path / "other.tmp", out)
        claim.unlink()

    other = threading.Thread(target=other_run)
    other.start()
    dataset.create_if_missing(out)
    other.join()
    with h5py.File(out, "r") as h5file:
        assert h5file.attrs["n_rows"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5"]

    # A claim that stays, the set never made: named, with what to do.
    out.unlink()
    claim.write_text("")
    monkeypatch.setattr(dataset, "CLAIM_WAIT_S", 0.3)
    with pytest.raises(DatasetError, match=r"set\.h5\.creating says another run is creating the set, .* if no other "
                                           r"run labels into it, remove .*set\.h5\.creating and label again"):  # fmt: skip
        dataset.create_if_missing(out)
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5.creating"]
    # The other run stopped before making it: this one makes it.
    threading.Timer(0.1, claim.unlink).start()
    monkeypatch.setattr(dataset, "CLAIM_WAIT_S", 30.0)
    dataset.create_if_missing(out)
    assert len(read_table(out)) == 0 and [p.name for p in tmp_path.iterdir()] == ["set.h5"]


def test_a_histogram_that_cannot_be_written_costs_only_the_figure(collections, tmp_path, caplog):
    out = tmp_path / "dataset.h5"
    (tmp_path / "dataset_rc_histogram.png").mkdir()  # in the figure's way, as a full disk or a read-only file would be
    with caplog.at_level(logging.WARNING):
        summary = label_recordings([collections[0].recording], out, progress=False)
    assert summary.n_labelled == 1 and summary.histogram is None and len(read_table(out)) == summary.rows_added
    assert "dataset_rc_histogram.png: reflection-count histogram not written" in caplog.text


def test_a_file_that_is_not_a_training_set_is_refused(collections, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5file:
        h5file["x"] = 1
    with pytest.raises(DatasetError, match=r"other\.h5: not a training set"):
        label_recordings([collections[0].recording], other, progress=False)
    # A synthesize set has a format_version: "no format_version, n_rows or /rows" sent its user looking for it.
    synthetic = tmp_path / "synthetic.h5"
    with h5py.File(synthetic, "w") as h5file:
        h5file.attrs["format_version"] = 1
        h5file.create_group("samples")
    with pytest.raises(DatasetError, match=r"synthetic\.h5: a set written by `synthesize`, which labelling does not "
                                           r"append to: give another --out"):
        label_recordings([collections[0].recording], synthetic, progress=False)
    with pytest.raises(DatasetError, match=r"missing\.h5: no such dataset file"):
        read_table(tmp_path / "missing.h5")
    damaged = tmp_path / "damaged.h5"
    label_recordings([collections[0].recording], damaged, progress=False)
    with h5py.File(damaged, "r+") as h5file:
        h5file["recordings/provenance"][0] = "{not json"
    before = damaged.read_bytes()
    with pytest.raises(DatasetError, match=r"damaged\.h5: /recordings/provenance is damaged"):
        label_recordings([collections[1].recording], damaged, progress=False)
    assert damaged.read_bytes() == before  # refused before anything was added


def test_a_column_added_after_labelling_is_read_until_an_append_outgrows_it(collections, tmp_path, caplog):
    out = tmp_path / "dataset.h5"
    label_recordings([collections[0].recording], out, progress=False)
    n = len(read_table(out))
    truth = np.arange(n, dtype=float)
    add_row_column(out, "rc_expected", truth, "ground truth")
    np.testing.assert_array_equal(read_table(out).extra["rc_expected"], truth)
    with pytest.raises(DatasetError, match=r"/rows/rc is written by the labelling"):
        add_row_column(out, "rc", truth, "counts")
    with pytest.raises(DatasetError, match=rf"one finite value per row \({n}\)"):
        add_row_column(out, "rc_expected", truth[:-1], "ground truth")
    # The next recording's rows have no such value: the set stays readable without the column.
    label_recordings([collections[1].recording], out, progress=False)
    table = read_table(out)
    assert table.rc.size > n and "rc_expected" not in table.extra
    assert "/rows/rc_expected covers" in caplog.text
    # Later appends leave the outgrown column as it is, and it can be added again over all rows.
    third = simulate_collection(tmp_path, "third", 13)
    before = len(read_table(out))
    summary = label_recordings([third.recording], out, progress=False)
    n_all = len(read_table(out))
    assert n_all > before, summary
    add_row_column(out, "rc_expected", np.ones(n_all), "ground truth")
    assert read_table(out).extra["rc_expected"].shape == (n_all,)


def test_a_recording_without_a_crystal_or_lims_sample_is_its_own_crystal():
    # mxcubecore's sample id is -1 without LIMS: all such collections were one crystal "-1" for the split.
    from mxcube_autocenter.labelling.dataset import _crystal_of

    assert _crystal_of({"crystal_id": "xtal-3", "sample_id": 12}, "scan_a") == "xtal-3"
    assert _crystal_of({"sample_id": 345678}, "scan_a") == "345678"
    assert _crystal_of({"sample_id": -1}, "scan_a") == "scan_a"
    assert _crystal_of({"sample_id": -1}, "scan_b") == "scan_b"
    assert _crystal_of({}, "scan_c") == "scan_c"
    assert _crystal_of({"crystal_id": "-1", "sample_id": -1}, "scan_d") == "scan_d"  # as older recordings stored it


def test_a_damaged_detector_frame_costs_its_own_camera_frames_only(tmp_path, caplog):
    # One damaged chunk of a data file failed the whole recording, where a corrupt camera image costs one row.
    collection = simulate_collection(tmp_path, "damaged", 31, fps=12.0)
    data_file = collection.data_files[0]
    with h5py.File(data_file, "r") as h5file:
        chunk = h5file["entry/data/data"].id.get_chunk_info(10)  # the 11th image's compressed frame
    with open(data_file, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(np.random.default_rng(0).bytes(chunk.size))
    whole = simulate_collection(tmp_path / "whole", "damaged", 31, fps=12.0)
    with caplog.at_level(logging.WARNING):
        damaged = label_recordings([collection.recording], tmp_path / "damaged.h5", progress=False).recordings[0]
    intact = label_recordings([whole.recording], tmp_path / "whole.h5", progress=False).recordings[0]
    assert damaged.status == "labelled", damaged.message
    assert 0 < intact.rows - damaged.rows <= 3  # the camera frames matched to image 11, at 12 frames/s
    assert "1 of its" in caplog.text and "(images 11)" in caplog.text and "are not labelled" in caplog.text
