"""Labelling camera recordings with reflection counts into a training set.

For each camera recording: find the collection's EIGER master file, count
the reflections of every detector frame (our spot finder, in parallel
processes, or a spot-count file), match the camera frames to the detector
frames in time, and append the matched frames to the training set
(``labelling.dataset``). A recording that cannot be labelled (missing or
corrupt files) gets an error entry naming the file; the others are still
labelled, and the set only ever holds complete recordings.

The command line runs ``label_recordings`` and prints ``format_summary``::

    mxcube-autocenter label RECORDINGS... --out dataset.h5 [--spots-from counts.csv] [--nproc N]
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
import numbers
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mxcube_autocenter.labelling.dataset import (
    DEFAULT_STORED_CROP_UM,
    DatasetError,
    append_recording,
    camera_geometry,
    check_appendable,
    check_stored_crop_um,
    check_writable,
    find_recording,
    read_table,
    recording_fingerprint,
)
from mxcube_autocenter.geometry import TRANSLATION_MOTORS
from mxcube_autocenter.labelling.eiger import EigerFileError, open_master
from mxcube_autocenter.labelling.matching import (
    estimate_clock_offset,
    match_frames,
    regular_windows,
)
from mxcube_autocenter.labelling.spotfinder import SpotFinderParams, count_reflections
from mxcube_autocenter.labelling.spots_file import SpotsFileError, read_spot_counts
from mxcube_autocenter.outputs import check_creatable, save_figure_whole
from mxcube_autocenter.recording import RecordingError, read_recording

log = logging.getLogger(__name__)

# The virtual camera's delay from exposure to delivery; MD cameras take tens of ms.
DEFAULT_CAMERA_LATENCY_S = 0.02
DEFAULT_TOLERANCE_S = 0.005
# A recording still marked "recording" and changed more recently than this is taken to be still written
# (a writer flushes every 2 s); an older one is what a killed writer left, labelled up to its last flush.
STILL_WRITTEN_S = 60.0
# Largest estimated detector-minus-camera clock offset taken as such, s. Hosts kept by NTP agree to milliseconds;
# an estimate of minutes means the master file is another collection's (a later run that reused the prefix and
# run number, another sample's file of the same name): its counts would label the recording unnoticed.
MAX_CLOCK_OFFSET_S = 60.0
# Time zones differ by whole quarter hours, s.
_TIME_ZONE_STEP_S = 900.0
# DIALS' defaults, but spots on the ice rings are left out: the count labels
# what a crystal diffracts, and ice counted as crystal would teach a model to
# centre on ice.
DEFAULT_SPOT_FINDER = SpotFinderParams(ice_rings=True)
# Detector frames per task sent to a worker process: enough to outweigh the
# cost of a task, few enough (at least _MIN_TASKS tasks) that the workers
# finish together.
_MAX_FRAMES_PER_TASK = 16
_MIN_TASKS = 16


class LabellingError(Exception):
    """A recording cannot be labelled; the message names the file and the fix."""


@dataclass(frozen=True)
class RecordingLabels:
    """How one recording was labelled.

    Attributes
    ----------
    recording : Path
    status : {"labelled", "duplicate", "error"}
    message : str
        One line: rows added, why it was skipped, or the error naming the file.
    scan_id : str or None
        Its id in the training set.
    rows : int
        Rows added to the set.
    detector_frames : int
        Frames in the collection.
    frames_matched : int
        Detector frames a camera frame was matched to: the only ones whose
        reflections are counted.
    matching : dict
        ``MatchResult.stats()``: camera frames matched and dropped, clock
        offset and how it was found, timing residuals; empty when not matched.
    n_unlabelled : int
        Matched camera frames whose detector frame had no count (spot-count file).
    n_unreadable : int
        Labelled camera frames left out as corrupt images.
    spot_finding_s, total_s : float
        Seconds spent counting reflections, and in all.
    """

    recording: Path
    status: str
    message: str
    scan_id: str | None = None
    rows: int = 0
    detector_frames: int = 0
    frames_matched: int = 0
    matching: dict = field(default_factory=dict)
    n_unlabelled: int = 0
    n_unreadable: int = 0
    spot_finding_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class LabelSummary:
    """What ``label_recordings`` did.

    Attributes
    ----------
    dataset : Path
    recordings : list of RecordingLabels
        In the order given.
    histogram : Path or None
        PNG of the reflection counts of every row of the set; None when the set is empty.
    rc_stats : dict
        Over every row of the set: ``n_rows``, ``mean``, ``median``, ``p90``,
        ``max``, ``zero_fraction``.
    seconds : float
    """

    dataset: Path
    recordings: list
    histogram: Path | None
    rc_stats: dict
    seconds: float

    def _count(self, status: str) -> int:
        return sum(entry.status == status for entry in self.recordings)

    @property
    def n_labelled(self) -> int:
        return self._count("labelled")

    @property
    def n_duplicates(self) -> int:
        return self._count("duplicate")

    @property
    def n_errors(self) -> int:
        """Recordings that could not be labelled: a non-zero exit status for the command line."""
        return self._count("error")

    @property
    def rows_added(self) -> int:
        return sum(entry.rows for entry in self.recordings)


def count_spots(master_file, params: SpotFinderParams = DEFAULT_SPOT_FINDER, *, frames=None,
                executor: ProcessPoolExecutor | None = None, progress: bool = False) -> np.ndarray:  # fmt: skip
    """Reflection counts of the frames of an EIGER collection, with the spot finder.

    Frames are read one at a time, in tasks of up to 16 frames; with an
    executor, the tasks run in its worker processes, each of which keeps the
    collection open from one task to the next.

    Parameters
    ----------
    master_file : path
        ``<prefix>_master.h5``.
    params : SpotFinderParams
        Default: :data:`DEFAULT_SPOT_FINDER` (ice rings filtered).
    frames : array_like of int, optional
        0-based frames to count, in any order, repeats allowed; default all.
        Labelling counts only the frames a camera frame was matched to: a
        camera of 25 frames/s against a detector of 100 leaves three in four
        frames unused.
    executor : concurrent.futures.ProcessPoolExecutor, optional
        Runs the tasks in its processes; default: this process. No thread
        pool: each process keeps one collection open at a time, which
        threads would share.
    progress : bool
        Show a tqdm bar of the frames.

    Returns
    -------
    ndarray of float, shape (nimages,)
        NaN for the frames not counted, and for those that cannot be read
        (damaged chunks: logged, with their image numbers).

    Raises
    ------
    EigerFileError
        If the master file cannot be read, or none of the frames asked for.
    IndexError
        If a frame lies outside the collection.
    BrokenProcessPool
        If a worker of ``executor`` died; the message names the first image
        not counted.
    """
    if executor is not None and not isinstance(executor, concurrent.futures.ProcessPoolExecutor):
        raise TypeError(f"executor is a {type(executor).__name__}: give a ProcessPoolExecutor, or None to count in "
                        "this process")  # fmt: skip
    with open_master(master_file) as series:
        n, first_image = series.nimages, series.first_image_number
    wanted = np.arange(n) if frames is None else np.unique(np.asarray(frames, dtype=np.int64))
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= n):
        raise IndexError(f"frames {wanted[0]} to {wanted[-1]} asked for, outside 0..{n - 1} of {master_file}")
    size = max(1, min(_MAX_FRAMES_PER_TASK, math.ceil(wanted.size / _MIN_TASKS)))
    tasks = [wanted[start : start + size].tolist() for start in range(0, wanted.size, size)]
    count = partial(_count_frames, str(master_file), params)
    counts = np.full(n, np.nan)
    errors = []
    done = 0
    try:
        results = map(count, tasks) if executor is None else executor.map(count, tasks)
        with tqdm(total=wanted.size, desc=Path(master_file).name, unit="frame", leave=False,
                  disable=not progress) as bar:  # fmt: skip
            for task, (task_counts, task_errors) in zip(tasks, results):
                counts[task] = task_counts
                errors += task_errors
                done += 1
                bar.update(len(task))
    except BrokenProcessPool as err:
        # The tasks before it were counted; a later one may have been running in another worker.
        raise BrokenProcessPool(
            f"a spot-finding process died counting the frames of {master_file} from image "
            f"{tasks[done][0] + first_image} on"
        ) from err
    finally:
        if executor is None:
            _close_series()
    if errors:
        if len(errors) == wanted.size:
            raise EigerFileError(errors[0])
        unreadable = wanted[np.isnan(counts[wanted])] + first_image
        log.warning("%s: %d of its %d frames counted cannot be read (images %s): their camera frames are not "
                    "labelled; the first error: %s", master_file, len(errors), wanted.size,
                    ", ".join(map(str, unreadable[:5])) + (", ..." if len(unreadable) > 5 else ""), errors[0])
    return counts


# The EIGER collection a process is counting, kept open between its tasks
# (worker processes live for one label_recordings call): opening one reads
# its whole pixel mask, about 60 ms for a 4M.
_open_series = {}


def _count_frames(master_file: str, params: SpotFinderParams, frames: list) -> tuple:
    """The counts of ``frames`` (NaN where a frame cannot be read) and the errors of those that cannot."""
    if master_file not in _open_series:
        _close_series()
        _open_series[master_file] = open_master(master_file)
    series = _open_series[master_file]
    counts, errors = [], []
    for i in frames:
        try:
            frame, valid = series.frame(i)
            counts.append(count_reflections(frame, valid, params, geometry=series, overloaded=series.overloaded(frame)))
        except EigerFileError as err:
            # One damaged frame costs its own camera frames' labels, not the recording's.
            counts.append(math.nan)
            errors.append(str(err))
    return counts, errors


def _close_series():
    for series in _open_series.values():
        series.close()
    _open_series.clear()


def _one_thread_per_worker():
    # The workers are the parallelism: OpenCV threads in each would oversubscribe the cores.
    cv2.setNumThreads(1)
    # The labelling process opened each collection before its workers and logged what that said (an
    # aborted collection's missing frames); a worker would only say it again, outside its log format.
    logging.getLogger("mxcube_autocenter").setLevel(logging.ERROR)
    # Ctrl-C reaches every process of the terminal: the parent stops the labelling, and each worker's
    # KeyboardInterrupt traceback would only bury its one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _usable_processes(nproc: int) -> int:
    """``nproc``, but no more than the cores this process may run on: more only add memory and switching."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > cores:
        log.warning("nproc %d is more than the %d cores this process may use: spot finding in %d processes",
                    nproc, cores, cores)  # fmt: skip
    return min(nproc, cores)


# Longest wait for the spot-finding workers' first answer (each imports numpy, h5py, OpenCV), s.
_WORKER_START_S = 120.0


def _executor(nproc: int) -> ProcessPoolExecutor | None:
    """Worker processes for spot finding, started and answering; None, with a warning, where they cannot start.

    Then spot finding runs in this process, as it can anywhere. Workers do
    not start in a script that labels at import time (each would run it
    again), where processes cannot be made (no semaphores), or within
    ``_WORKER_START_S``.
    """
    try:
        # "spawn": forking a process with threads (tqdm's monitor, gevent's hub) can deadlock the child.
        executor = ProcessPoolExecutor(nproc, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_one_thread_per_worker)  # fmt: skip
    except (OSError, NotImplementedError) as err:
        failed = err
    else:
        try:  # the time-out is an OSError from Python 3.11 on, not in 3.10
            executor.submit(os.getpid).result(timeout=_WORKER_START_S)
            return executor
        except (BrokenProcessPool, FuturesTimeoutError, OSError, NotImplementedError) as err:
            executor.shutdown(wait=False, cancel_futures=True)
            failed = err
    log.warning(
        "spot-finding processes could not start (%s: %s): spot finding in this process, where a crash of HDF5's "
        "decompression filter on a damaged data file would end the labelling; a script that calls "
        "label_recordings must do so under `if __name__ == '__main__':`", type(failed).__name__, failed,
    )  # fmt: skip
    return None


def find_master_files(recording) -> list:
    """The places that hold a file named as a recording's EIGER master file, in the order to try them.

    The path in the collection metadata (``master_file``), then a file of
    that name next to the recording and in the directory above it (data
    copied elsewhere with its recordings). Labelling takes the first whose
    collection is the recording's: the recorded path may hold a later
    collection's file of the same name.

    Parameters
    ----------
    recording : Recording
        From ``recording.read_recording``.

    Returns
    -------
    list of Path
        At least one, each file once.

    Raises
    ------
    LabellingError
        If the metadata names no master file or none of the places holds it.
    """
    recorded = recording.metadata.get("master_file")
    if not recorded:
        raise LabellingError(
            f"{recording.path}: no master_file in its collection metadata: the recording was not made by "
            "the AutoCenter object during a collection; it cannot be labelled"
        )
    recorded = Path(recorded)
    candidates = [recorded, recording.path.parent / recorded.name, recording.path.parent.parent / recorded.name]
    found = {}
    for candidate in candidates:
        if candidate.is_file():
            found.setdefault(candidate.resolve(), candidate)
    if not found:
        raise LabellingError(
            f"{recorded}: EIGER master file of {recording.path} not found (looked in "
            f"{', '.join(str(c.parent) for c in candidates)}): copy the collection's files next to the recording"
        )
    return list(found.values())


def label_recordings(
    recordings,
    out,
    *,
    spots_from=None,
    nproc: int = 1,
    params: SpotFinderParams = DEFAULT_SPOT_FINDER,
    clock_offset: float | None = None,
    max_clock_offset: float = MAX_CLOCK_OFFSET_S,
    tolerance: float = DEFAULT_TOLERANCE_S,
    camera_latency: float = DEFAULT_CAMERA_LATENCY_S,
    regularise: bool = True,
    stored_crop_um: float = DEFAULT_STORED_CROP_UM,
    progress: bool = True,
) -> LabelSummary:
    """Label camera recordings with reflection counts and append them to a training set.

    Parameters
    ----------
    recordings : iterable of path
        Camera recordings (``recording.FrameStore`` files).
    out : path
        The training set; created if missing, appended to otherwise
        (recordings already in it are skipped). The reflection count
        histogram goes next to it as ``<out stem>_rc_histogram.png``.
    spots_from : path, optional
        Per-image counts from another spot finder (``spots_file``) instead of
        our spot finder; with several recordings it needs a ``master_file``
        column. The collections are still opened as for spot finding (their
        frame counts and exposure times): master and data files in place and
        readable, with hdf5plugin's filters.
    nproc : int
        Processes counting reflections, at most the cores this process may
        use (more are reduced to that, with a warning). Even one is a process
        of its own: a worker that dies (HDF5's decompression filter crashes
        on some damaged data) fails its recording, and the others are still
        labelled. Where workers cannot start (a script that labels at import
        time, not under ``if __name__ == '__main__':``), spot finding runs in
        this process, with a warning.
    params : SpotFinderParams
        Default: :data:`DEFAULT_SPOT_FINDER` (ice rings filtered).
    clock_offset : float, optional
        Detector clock minus camera clock, s; estimated per recording from
        the motion (``matching.estimate_clock_offset``) by default.
    max_clock_offset : float
        Largest estimated offset, s: a recording whose estimate is larger is
        an error (its master file is taken for another collection's) and its
        reflections are not counted. Not applied to a given ``clock_offset``.
    tolerance : float
        Largest distance outside an exposure window for a match, s.
    camera_latency : float
        Time from a camera frame's exposure to its timestamp, s: subtracted
        from the timestamps before matching.
    regularise : bool
        Match against exposure windows on the detector's fitted constant
        frame clock (``matching.regular_windows``) rather than the jittery
        recorded ones, where the frames are regular.
    stored_crop_um : float
        Side of the stored crops, um.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    LabelSummary

    Raises
    ------
    SpotsFileError, LabellingError
        If ``spots_from`` cannot be read or does not say which rows belong
        to which of several recordings; LabellingError also if ``nproc`` is
        not a whole number from 1.
    DatasetError
        If ``out`` exists but is not a readable training set, a file
        stands where it or its folder should be, or no set can be written
        there.
    """
    started = time.perf_counter()
    recordings = [Path(r) for r in recordings]
    check_stored_crop_um(stored_crop_um)
    if isinstance(nproc, bool) or not isinstance(nproc, numbers.Integral) or nproc < 1:
        raise LabellingError(f"nproc = {nproc!r}: give the number of spot-finding processes, a whole number from 1")
    out = Path(out)
    if out.exists():
        check_appendable(out)
    else:
        try:
            check_creatable(out)
        except OSError as err:
            raise DatasetError(str(err)) from None
        # Now, not after the first recording's spots are counted (the set is created by its append), and then
        # again after every other recording's.
        check_writable(out)
    spot_counts = None if spots_from is None else read_spot_counts(spots_from)
    if spot_counts is not None and spot_counts.master_files is None and len(recordings) > 1:
        raise LabellingError(
            f"{spot_counts.path}: no master_file column, so its counts fit one collection, not {len(recordings)}: "
            "add a master_file column naming each row's master file, or label one recording at a time"
        )
    options = dict(spot_counts=spot_counts, params=params, clock_offset=clock_offset,
                   max_clock_offset=max_clock_offset, tolerance=tolerance,
                   camera_latency=camera_latency, regularise=regularise, stored_crop_um=stored_crop_um)  # fmt: skip
    # Even one spot finder runs in a process of its own: HDF5's decompression filters can crash on damaged
    # data instead of reporting it, and that must cost one recording, not the labelling of all.
    executor = None
    if spot_counts is None:
        nproc = _usable_processes(nproc)
        executor = _executor(nproc)
    entries = []
    try:
        for path in tqdm(recordings, desc="labelling", unit="recording", disable=not progress):
            try:
                entry = _label_one(path, out, executor=executor, progress=progress, **options)
            except BrokenProcessPool as err:
                # A worker died: this recording fails, the pool is renewed.
                entry = RecordingLabels(
                    path, "error",
                    f"{path}: {err}: HDF5's decompression filter crashes on some damaged data, so a data file of "
                    "that collection is probably corrupt: copy its files again from the detector's storage (the other "
                    "recordings are labelled on); if the same files label elsewhere, report it",
                )  # fmt: skip
                executor.shutdown(cancel_futures=True)
                executor = _executor(nproc)
            if entry.status == "error":
                log.error(entry.message)
            entries.append(entry)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    rc = read_table(out).rc if out.exists() else np.zeros(0)
    histogram = None
    if rc.size:
        png = out.with_name(f"{out.stem}_rc_histogram.png")
        try:
            histogram = rc_histogram(rc, png, title=out.name)
        except OSError as err:
            # The figure is a by-product: the labels are written, and the summary must still be given.
            log.warning("%s: reflection-count histogram not written (%s): check the folder's space and permissions", png, err)
    return LabelSummary(out, entries, histogram, rc_statistics(rc), time.perf_counter() - started)


def _label_one(path, out, *, executor, progress, spot_counts, params, clock_offset, max_clock_offset, tolerance,
               camera_latency, regularise, stored_crop_um) -> RecordingLabels:  # fmt: skip
    started = time.perf_counter()
    try:
        recording = read_recording(path)
        known = find_recording(out, recording_fingerprint(recording))
        if known is not None:
            message = f"{path}: already in {out} as {known}: skipped"
            log.info(message)
            return RecordingLabels(path, "duplicate", message, scan_id=known)
        if len(recording.timestamps) == 0:
            raise LabellingError(
                f"{path}: the recording holds no camera frame (status {recording.status!r}): nothing to label"
            )
        still = time.time() - os.path.getmtime(path)
        if recording.status == "recording" and still < STILL_WRITTEN_S:
            # Its frames so far would go in now, and all of them again (another fingerprint) once it is complete.
            raise LabellingError(
                f"{path}: still being written (status 'recording', changed {still:.0f} s ago): label it once its "
                f"collection has ended (a recording whose writer was killed is labelled {STILL_WRITTEN_S:.0f} s "
                f"after its last change)"
            )
        # Checked before the reflections are counted: a recording without its camera scale, or paired with the
        # wrong collection, fails in a second, not after an hour of spot finding.
        camera_geometry(recording)
        master, series, windows, fitted, offset = _own_collection(
            recording, find_master_files(recording), clock_offset, max_clock_offset, regularise)  # fmt: skip
        nimages = series.nimages
        match = match_frames(recording.timestamps - camera_latency, windows, clock_offset=offset, tolerance=tolerance)
        if match.n_matched == 0:
            raise LabellingError(
                f"{path}: no camera frame falls in an exposure window of {master} (clock offset "
                f"{float(offset):+.3f} s, {match.offset_method}): the recording does not cover this collection; "
                "if it does, give clock_offset"
            )
        spot_started = time.perf_counter()
        if spot_counts is None:
            counts = count_spots(master, params, frames=match.detector_frame[match.detector_frame >= 0],
                                 executor=executor, progress=progress)  # fmt: skip
            source = {"label_source": "spot finder", "spot_finder": asdict(params)}
        else:
            counts = spot_counts.for_collection(nimages, master, first_image=series.first_image_number)
            source = {"label_source": str(spot_counts.path.resolve()), "spots_column": spot_counts.column}
        spot_finding_s = time.perf_counter() - spot_started
        provenance = {
            "master_file": str(master.resolve()),
            "detector_frames": nimages,
            # The rows' detector_frame counts from it: image number - first_image_number.
            "first_image_number": series.first_image_number,
            # More when an aborted collection left the last data files unwritten.
            "declared_detector_frames": series.declared_images,
            "camera_latency_s": camera_latency,
            "tolerance_s": tolerance,
            "windows": {
                "regularised": bool(fitted is not None and fitted.regular),
                "jitter_s": None if fitted is None else fitted.jitter_s,
            },
            **source,
        }
        appended = append_recording(out, path, counts, match, stored_crop_um=stored_crop_um, provenance=provenance)
    except (RecordingError, EigerFileError, SpotsFileError, DatasetError, LabellingError) as err:
        return RecordingLabels(path, "error", str(err), total_s=time.perf_counter() - started)
    except BrokenProcessPool:
        raise  # label_recordings renews the pool
    except Exception as err:
        # Anything else is a bug or a file no check foresaw: it fails this
        # recording, with the traceback in the log, and the others still get labelled.
        log.exception("%s: labelling failed", path)
        message = f"{path}: labelling failed ({type(err).__name__}: {err}); the traceback is in the log: please report it"
        return RecordingLabels(path, "error", message, total_s=time.perf_counter() - started)
    return RecordingLabels(
        path,
        "duplicate" if appended.duplicate else "labelled",
        appended.message,
        scan_id=appended.scan_id,
        rows=appended.rows,
        detector_frames=nimages,
        frames_matched=int(np.unique(match.detector_frame[match.detector_frame >= 0]).size),
        matching=match.stats(),
        n_unlabelled=appended.n_unlabelled,
        n_unreadable=appended.n_unreadable,
        spot_finding_s=spot_finding_s,
        total_s=time.perf_counter() - started,
    )


def _require_motion(recording) -> None:
    """Refuse a recording whose metadata cannot relate its clock to any detector's (no oscillation)."""
    metadata = recording.metadata
    if "osc_start" not in metadata or "osc_range" not in metadata:
        raise LabellingError(
            f"{recording.path}: no osc_start/osc_range in its collection metadata, so the camera and detector "
            "clocks cannot be related by the motion: give clock_offset (detector minus camera clock, s)"
        )


def _estimate_offset(recording, windows):
    metadata = recording.metadata
    try:
        return estimate_clock_offset(
            recording.timestamps, recording.motor("omega"), windows, float(metadata["osc_start"]),
            float(metadata["osc_range"]), line=_helical_line(recording),
        )  # fmt: skip
    except ValueError as err:
        raise LabellingError(f"{recording.path}: {err}: give clock_offset (--clock-offset: detector minus camera "
                             "clock, s; 0 where both keep NTP time and the master file holds each image's start "
                             "time, as an EIGER may date the file when armed, before the first image)") from err


def _helical_line(recording):
    """A helical recording's ``(start, end, positions)`` of the translation motors both ends give, mm; None for
    another scan."""
    metadata = recording.metadata
    start, end = metadata.get("helical_start"), metadata.get("helical_end")
    if not start or not end:
        return None
    motors = [name for name in TRANSLATION_MOTORS if start.get(name) is not None and end.get(name) is not None]
    if not motors:
        return None
    positions = np.column_stack([recording.motor(name) for name in motors])
    return [start[name] for name in motors], [end[name] for name in motors], positions


def _own_collection(recording, masters, clock_offset, max_clock_offset, regularise) -> tuple:
    """The first of ``masters`` whose collection is the recording's, with its frame windows and clock offset.

    With ``clock_offset`` given there is nothing to check it by: the first
    readable one is taken. A file that cannot be read (a later collection
    still being written, or aborted) is passed over like another
    collection's. When none is the recording's, the first one's error is
    raised.

    Returns
    -------
    tuple
        ``(master, series (closed: for its header figures), windows,
        regular-window fit or None, clock offset)``.
    """
    if clock_offset is None:
        _require_motion(recording)
    first_error = None
    for master in masters:
        try:
            with open_master(master) as series:
                windows = series.frame_windows()
            if len(windows) == 0:
                raise EigerFileError(f"{master}: no detector frames: the master file declares no images")
        except EigerFileError as err:
            first_error = first_error or err
            continue
        fitted = regular_windows(windows) if regularise else None
        if fitted is not None and fitted.regular:
            windows = fitted.windows
        offset = clock_offset
        if offset is None:
            try:
                # Its failure may be this file's (another collection's frames and period): the next may fit.
                offset = _estimate_offset(recording, windows)
                _check_same_collection(recording, master, offset, series.start_time, max_clock_offset,
                                       series.local_dates, series.ambiguous_local_s)  # fmt: skip
            except LabellingError as err:
                first_error = first_error or err
                continue
        if first_error is not None:
            log.warning("%s: %s", recording.path, first_error)
            log.warning("%s: labelled with %s instead", recording.path, master)
        return master, series, windows, fitted, offset
    raise first_error


def _check_same_collection(recording, master: Path, offset, detector_start: float, limit: float,
                           local_dates: bool = False, ambiguous_local_s: float = 0.0) -> None:  # fmt: skip
    """Refuse a master file whose collection the estimated clock offset says is not the recording's.

    The offset is estimated so that the detector frames fall on the camera
    frames, whichever collection they come from: only its size tells
    another collection's master file (minutes or days away) from this one's.

    Parameters
    ----------
    recording : Recording
    master : Path
        The master file found for it.
    offset : ClockOffset
        Estimated detector clock minus camera clock, s.
    detector_start : float
        The master file's collection start, unix s (detector clock).
    limit : float
        Largest offset taken as such, s.
    local_dates : bool
        The master file's dates carry no UTC offset (read as this computer's
        local time): an offset within ``limit`` of whole quarter hours is
        then more likely a time zone than another collection, and the error
        says so.
    ambiguous_local_s : float
        Such a date in the hour a daylight-saving change repeats, read at its
        first reading: an offset within ``limit`` of minus this much is its
        second reading, the same collection (the offset carries the hour).

    Raises
    ------
    LabellingError
        If the offset exceeds ``limit``.
    """
    if abs(float(offset)) <= limit:
        return
    if local_dates and ambiguous_local_s and abs(float(offset) + ambiguous_local_s) <= limit:
        log.info("%s: its dates carry no UTC offset and fall in the hour a daylight-saving change repeats: read at "
                 "the second one (the clock offset %+.1f s carries the hour)", master, float(offset))  # fmt: skip
        return
    started = recording.metadata.get("collection_start", recording.timestamps[0])
    zone_s = round(float(offset) / _TIME_ZONE_STEP_S) * _TIME_ZONE_STEP_S
    if local_dates and abs(float(offset) - zone_s) <= limit:
        here = datetime.fromtimestamp(detector_start).astimezone().strftime("%z")
        raise LabellingError(
            f"{master}: its dates carry no UTC offset and are read as this computer's local time (UTC{here}), "
            f"and its frames fall on those of {recording.path} with the detector's clock {float(offset):+.1f} s "
            f"({zone_s / 3600:+g} h) off the camera's: the detector wrote its dates in another time zone. Label "
            "in the detector's time zone (TZ=... before the command), or give clock_offset (--clock-offset "
            f"{float(offset):.3f}, detector minus camera, s)"
        )
    raise LabellingError(
        f"{master}: not the collection of {recording.path}: its frames fall on the recording's only with the "
        f"detector's clock {float(offset):+.1f} s off the camera's (estimated from the goniometer's motion; more than "
        f"{limit:g} s); its collection started {_local_time(detector_start)}, the recording's "
        f"{_local_time(float(started))}. Another collection took the file's name (a later run with the same prefix "
        "and run number, another sample's file copied here): copy its own collection's master and data files next "
        "to the recording (looked for there after the recorded path); if the two clocks really differ that much, raise "
        "max_clock_offset (--max-clock-offset, s) or give clock_offset (--clock-offset, detector minus camera, s)"
    )


def _local_time(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time).isoformat(sep=" ", timespec="seconds")


def rc_statistics(rc) -> dict:
    """Summary of reflection counts: ``n_rows``, ``mean``, ``median``, ``p90``, ``max``, ``zero_fraction``."""
    rc = np.asarray(rc, dtype=np.float64)
    if rc.size == 0:
        return {"n_rows": 0}
    return {
        "n_rows": int(rc.size),
        "mean": float(rc.mean()),
        "median": float(np.median(rc)),
        "p90": float(np.percentile(rc, 90)),
        "max": float(rc.max()),
        "zero_fraction": float(np.mean(rc == 0)),
    }


def rc_histogram(rc, path, *, title: str = "") -> Path:
    """Write a histogram of reflection counts (log count axis) as a PNG.

    Parameters
    ----------
    rc : array_like of float
        Reflection counts, one per sample.
    path : path
        The PNG; written under a temporary name and renamed.
    title : str
        Added to the plot title.

    Returns
    -------
    Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rc = np.asarray(rc, dtype=np.float64)
    path = Path(path)
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # Integer-wide bins while they fit, so that zero counts get a bar of their own.
    top = max(1.0, float(rc.max()))
    bins = np.arange(-0.5, top + 1.5) if top <= 200 else np.linspace(0, top, 101)
    axes.hist(rc, bins=bins, color="tab:blue")
    axes.set_yscale("log")
    axes.set_xlabel("reflection count (spots per detector frame)")
    axes.set_ylabel("camera frames")
    axes.set_title(f"Reflection counts of {rc.size} samples" + (f": {title}" if title else ""))
    figure.tight_layout()
    save_figure_whole(figure, path)
    return path


def format_summary(summary: LabelSummary) -> str:
    """Lines for the command line: each recording's outcome, the reflection counts, the histogram."""
    lines = [
        f"Labelled {summary.n_labelled} of {len(summary.recordings)} recordings into {summary.dataset} "
        f"({summary.rows_added} rows added; {summary.n_duplicates} already there, {summary.n_errors} failed) "
        f"in {summary.seconds:.1f} s"
    ]
    for entry in summary.recordings:
        lines.append(f"  {entry.recording.name}: {entry.status}")
        if entry.status != "labelled":
            lines.append(f"    {entry.message}")
            continue
        m = entry.matching
        lines.append(
            f"    {entry.rows} rows; {m['n_camera']} camera frames: {m['n_matched']} matched, {m['n_dropped']} dropped "
            f"({m['n_before']} before, {m['n_after']} after the exposures, {m['n_gap']} in gaps)"
            + (f", {entry.n_unlabelled} without a count" if entry.n_unlabelled else "")
            + (f", {entry.n_unreadable} corrupt images left out" if entry.n_unreadable else "")
        )
        offset = f"    clock offset {m['clock_offset_s']:+.4f} s ({m['offset_method']}"
        if m["timing_residual_rms_s"] is not None:
            offset += (
                f"; timing residual rms {1e3 * m['timing_residual_rms_s']:.2f} ms, "
                f"max {1e3 * m['timing_residual_max_s']:.2f} ms; about {100 * m['neighbour_risk']:.1f} % "
                "of frames may carry a neighbouring detector frame's count"
            )
        lines.append(offset + ")")
        lines.append(
            f"    {entry.detector_frames} detector frames, {entry.frames_matched} with a camera frame: reflections "
            f"counted in {entry.spot_finding_s:.1f} s, {entry.total_s:.1f} s in all"
        )
    rc = summary.rc_stats
    if rc["n_rows"]:
        lines.append(
            f"Reflection counts of the {rc['n_rows']} rows in the set: mean {rc['mean']:.1f}, median "
            f"{rc['median']:.0f}, 90th percentile {rc['p90']:.0f}, max {rc['max']:.0f}, "
            f"{100 * rc['zero_fraction']:.0f} % zero"
        )
    if summary.histogram is not None:
        lines.append(f"Histogram: {summary.histogram}")
    return "\n".join(lines)
