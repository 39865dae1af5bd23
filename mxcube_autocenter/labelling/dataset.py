"""The training set: camera crops around the beam labelled with reflection counts.

One HDF5 file holds one row per labelled camera frame: the frame cropped to
a square of ``stored_crop_um`` around the beam (JPEG), where the beam lies
in the crop, the camera scale, the motor positions and the reflection count
of the detector frame exposed at that moment. ``append_recording`` adds the
rows of one camera recording; ``read_table`` reads every label into memory
and ``RowReader`` the images one row at a time, for training. The layout is
described in ``docs/data-formats.md``, section "Training set".

Appending is safe against crashes: rows are written past the committed
row count (the root attribute ``n_rows``), which is raised only once they
are all on disk; readers never look past it, and the next append first
trims whatever a killed append left behind. A new set is created under a
temporary name and linked to its name once its layout is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mxcube_autocenter import __version__
from mxcube_autocenter.hdf5errors import not_opened, open_hdf5, open_to_read, reading, system_error
from mxcube_autocenter.labelling.matching import MatchResult
from mxcube_autocenter.learning import crops
from mxcube_autocenter.recording import (
    JPEG_END,
    MOTOR_NAMES,
    MOTOR_UNITS,
    Recording,
    CorruptFrameError,
    _now_iso,
    decode_jpeg,
    encode_jpeg,
    jpeg_size,
    names_a_sample,
    read_recording,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_STORED_CROP_UM = 600.0
DEFAULT_JPEG_QUALITY = 95
TOOL = f"mxcube-autocenter {__version__}"

# Rows per HDF5 chunk, and rows prepared in memory before each write.
_ROWS_PER_CHUNK = 256
_WRITE_AGAIN = "write it again (label or synthesize)"
# Free space kept beyond a batch's size when writing, bytes.
_SPARE_BYTES = 50_000_000

_TEXT = h5py.string_dtype()
_JPEG = h5py.vlen_dtype(np.uint8)
# Per-row datasets under /rows: dtype and shape of one row.
ROW_FIELDS = {
    "jpeg": (_JPEG, ()),
    "beam_xy": (np.float64, (2,)),
    "pixels_per_mm": (np.float64, (2,)),
    "zoom": (_TEXT, ()),
    "omega": (np.float64, ()),
    "motors": (np.float64, (len(MOTOR_NAMES),)),
    "rc": (np.float32, ()),
    "scan_id": (_TEXT, ()),
    "crystal_id": (_TEXT, ()),
    "scan_type": (_TEXT, ()),
    "timestamp": (np.float64, ()),
    "detector_frame": (np.int32, ()),
    "recording_frame": (np.int32, ()),
    "padded": (np.bool_, ()),
}
# Per-recording datasets under /recordings.
RECORDING_FIELDS = {
    "scan_id": _TEXT,
    "fingerprint": _TEXT,
    "first_row": np.int64,
    "n_rows": np.int64,
    "provenance": _TEXT,
}


# h5py reports a failed write or flush (a full disk, a quota, a file-size limit) as RuntimeError, not OSError.
_WRITE_ERRORS = (OSError, RuntimeError)


class DatasetError(ValueError):
    """A training set or a recording cannot be written or read; the message names the file and the fix."""


def raised_inside_tensorflow(err: BaseException) -> DatasetError | None:
    """The DatasetError that tf.data re-raised as a TensorFlow error, or None for any other error.

    A corrupt row is found only when tf.data reads it, inside a numpy function,
    and TensorFlow re-raises the error as its own with the text embedded.
    """
    if not type(err).__module__.startswith("tensorflow"):
        return None
    found = re.search(r"DatasetError: (.+)", str(err))
    return DatasetError(found.group(1).strip()) if found else None


def crop_around_beam(frame: np.ndarray, beam_xy, pixels_per_mm, size_um: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """Cut a square of ``size_um`` centred on the beam out of a camera frame.

    Parameters
    ----------
    frame : ndarray, shape (H, W) or (H, W, C)
    beam_xy : (float, float)
        Beam position on the frame, pixels from its top-left corner.
    pixels_per_mm : (float, float)
        Camera scale along x and y, pixels/mm.
    size_um : float
        Side of the square, um.

    Returns
    -------
    crop : ndarray, shape (h, w) or (h, w, C)
        ``w = round(size_um * pixels_per_mm[0] / 1000)``, ``h`` likewise;
        parts beyond the frame edge repeat the edge pixels.
    beam_in_crop : ndarray of float, shape (2,)
        Beam position in the crop, pixels.
    padded : bool
        Whether the square reached past the frame edge.

    Raises
    ------
    ValueError
        If the square misses the frame entirely (beam far outside it).
    """
    size_px = crops.crop_side_px(size_um, pixels_per_mm)
    try:
        crop = crops.crop_centred(frame, beam_xy, size_px)
    except ValueError:
        height, width = frame.shape[:2]
        raise ValueError(f"a {size_um} um square around the beam at {tuple(beam_xy)} misses the {width}x{height} frame") from None
    x0, y0, w, h = crops.centred_window(beam_xy, size_px)
    height, width = frame.shape[:2]
    padded = x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height
    return crop, np.array([beam_xy[0] - x0, beam_xy[1] - y0], dtype=np.float64), padded


def recording_fingerprint(recording: Recording) -> str:
    """A content hash of a recording: the same collection gives the same hash wherever the file lies.

    SHA-256 (hex) of the timestamps, motor positions, camera frame counters
    and collection metadata; cheap, as the images are not read.
    """
    digest = hashlib.sha256()
    for array in (recording.timestamps, recording.motors, recording.camera_frames):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(recording.metadata, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def scan_id(recording: Recording, fingerprint: str) -> str:
    """Stable id of a recording in a training set: its file stem and the start of its fingerprint."""
    return f"{recording.path.stem}-{fingerprint[:8]}"


@dataclass(frozen=True)
class AppendResult:
    """What ``append_recording`` did.

    Attributes
    ----------
    scan_id : str
        The recording's id in the set (of the earlier copy for a duplicate).
    rows : int
        Rows appended (0 for a duplicate).
    n_unlabelled : int
        Matched camera frames left out because their detector frame has no
        reflection count (not in the spot-count file).
    duplicate : bool
        Whether the recording was already in the set and was skipped.
    message : str
        One line for the user.
    n_unreadable : int
        Labelled camera frames left out because their image cannot be
        decoded (a corrupt JPEG from the camera).
    """

    scan_id: str
    rows: int
    n_unlabelled: int
    duplicate: bool
    message: str
    n_unreadable: int = 0


def find_recording(dataset_path, fingerprint: str) -> str | None:
    """Scan id of the recording with this fingerprint in the set; None if absent or no set exists."""
    path = Path(dataset_path)
    if not path.exists():
        return None
    with _open(path, "r") as h5file:
        return _find(h5file, fingerprint)


def append_recording(
    dataset_path,
    recording_path,
    counts_per_detector_frame,
    match_result: MatchResult,
    *,
    stored_crop_um: float = DEFAULT_STORED_CROP_UM,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    provenance: dict | None = None,
) -> AppendResult:
    """Add the labelled camera frames of one recording to a training set.

    Every camera frame matched to a detector frame with a reflection count
    becomes a row: the frame cropped around the beam, its labels and motor
    positions. A frame whose image cannot be decoded is left out, counted
    and named in the recording's provenance. The set is created if missing. A recording already in the
    set (same fingerprint) is skipped. Rows count only once all are written
    (see the module description); on an error the set is left as it was.

    Parameters
    ----------
    dataset_path : path
        The training set (HDF5).
    recording_path : path
        A camera recording; its metadata must hold ``pixels_per_mm`` and
        ``beam_position``.
    counts_per_detector_frame : array_like of float, shape (nimages,)
        Reflection count of each detector frame (0-based); NaN for unknown.
    match_result : MatchResult
        ``match_frames`` of the recording's camera frames, in their order.
    stored_crop_um : float
        Side of the stored square, um: large enough for any training crop
        and its rotations.
    jpeg_quality : int
        JPEG quality of the stored crops, 0 to 100.
    provenance : dict, optional
        More to record about the recording (label source, spot-finder
        parameters, ...), JSON-ready.

    Returns
    -------
    AppendResult

    Raises
    ------
    DatasetError
        If the set cannot be opened or written, the recording lacks the
        camera scale or beam position, the match does not fit it, a count is
        negative, or none of its labelled frames can be decoded.
    RecordingError
        If the recording cannot be read.
    """
    check_stored_crop_um(stored_crop_um)
    dataset_path = Path(dataset_path)
    recording = read_recording(recording_path)
    fingerprint = recording_fingerprint(recording)
    scan = scan_id(recording, fingerprint)
    counts = np.asarray(counts_per_detector_frame, dtype=np.float64)
    frames = np.asarray(match_result.detector_frame)
    if frames.shape != recording.timestamps.shape:
        raise DatasetError(
            f"{recording.path}: {frames.size} matched camera frames for {len(recording)} in the recording: "
            "match the frames of this recording"
        )
    if frames.max(initial=-1) >= counts.size:
        raise DatasetError(
            f"{recording.path}: matched to detector frame {frames.max()} but only {counts.size} counts given: "
            "give one count per detector frame"
        )
    if np.any(counts < 0):
        raise DatasetError(
            f"{recording.path}: reflection count {counts[counts < 0][0]:g} for detector frame "
            f"{int(np.argmax(counts < 0))}: give counts >= 0 (NaN for a frame without one)"
        )
    ppmm, beam = camera_geometry(recording)
    matched = np.flatnonzero(frames >= 0)
    labelled = matched[np.isfinite(counts[frames[matched]])]
    if labelled.size == 0 and find_recording(dataset_path, fingerprint) is None:
        # Appended with no row, the recording would be in the set for good: labelling it again with the counts
        # it lacked would skip it as a duplicate. (One already in the set is skipped below, as any.)
        raise DatasetError(
            f"{recording.path}: none of its {matched.size} matched camera frames has a reflection count (their "
            "detector frames have none): nothing appended; label it again with counts for its images"
        )
    create_if_missing(dataset_path)
    failure = None  # the append's own error: closing after a failed write may fail too, and must not hide it
    try:
        with _open(dataset_path, "r+") as h5file:
            known = _find(h5file, fingerprint)
            if known is not None:
                message = f"{recording.path} is already in {dataset_path} as {known}: skipped"
                log.info(message)
                return AppendResult(known, 0, 0, True, message)
            first = int(h5file.attrs["n_rows"])
            n_recordings = int(h5file.attrs["n_recordings"])
            committed = {name: h5file.attrs[name] for name in _COMMIT_ATTRIBUTES if name in h5file.attrs}
            # Left by an append that was killed: never counted, now dropped.
            _resize(h5file["rows"], first)
            _resize(h5file["recordings"], n_recordings)
            constant = {
                "pixels_per_mm": ppmm,
                "zoom": str(recording.metadata.get("zoom", "")),
                "scan_id": scan,
                "crystal_id": _crystal_of(recording.metadata, scan),
                "scan_type": str(recording.metadata.get("experiment_type", "")),
            }
            unreadable = []
            written = 0
            try:
                with recording.reader() as frame:
                    for start in range(0, labelled.size, _ROWS_PER_CHUNK):
                        batch = labelled[start : start + _ROWS_PER_CHUNK]
                        rows = _rows(recording, frame, batch, frames, counts, ppmm, beam, stored_crop_um, jpeg_quality,
                                     unreadable)  # fmt: skip
                        if len(rows["jpeg"]):
                            _write_rows(h5file, dataset_path, first + written, {**rows, **constant})
                            written += len(rows["jpeg"])
                if labelled.size and not written:
                    raise DatasetError(
                        f"{recording.path}: none of its {labelled.size} labelled camera frames can be decoded "
                        f"({unreadable[0]}): check the camera's image format"
                    )
                entry = {
                    "scan_id": scan,
                    "recording": str(recording.path.resolve()),
                    "recording_status": recording.status,
                    "fingerprint": fingerprint,
                    "master_file": recording.metadata.get("master_file"),
                    "experiment_type": recording.metadata.get("experiment_type"),
                    "crystal_id": constant["crystal_id"],
                    "rows": written,
                    "unlabelled_matched_frames": int(matched.size - labelled.size),
                    "unreadable_frames": len(unreadable),
                    "unreadable_first": unreadable[:3],
                    "matching": match_result.stats(),
                    "stored_crop_um": stored_crop_um,
                    "jpeg_quality": jpeg_quality,
                    "appended": _now_iso(),
                    "tool": TOOL,
                    **(provenance or {}),
                }
                _append_recording(h5file["recordings"], n_recordings, {
                    "scan_id": scan, "fingerprint": fingerprint, "first_row": first,
                    "n_rows": written, "provenance": json.dumps(entry),
                })  # fmt: skip
                # The rows are on disk before the counts that make them visible.
                h5file.flush()
                # Every row's crop is at least this large (a smaller side only lowers it).
                previous = h5file.attrs.get("stored_crop_um", np.inf)
                h5file.attrs["stored_crop_um"] = min(float(previous), float(stored_crop_um))
                h5file.attrs["n_rows"] = first + written
                h5file.attrs["n_recordings"] = n_recordings + 1
                h5file.flush()
            except _WRITE_ERRORS as err:
                _roll_back(h5file, committed)
                failure = _write_failed(dataset_path, err)
                raise failure from err
            except BaseException as err:
                _roll_back(h5file, committed)
                failure = err
                raise
    except _WRITE_ERRORS as err:
        # Closing the file flushes it too, and can fail as the writes did.
        if failure is not None:
            raise failure  # its cause stays the write that failed
        raise _write_failed(dataset_path, err) from err
    message = f"{recording.path}: {written} rows appended to {dataset_path} as {scan}"
    if unreadable:
        message += f"; {len(unreadable)} corrupt camera frames left out (first: {unreadable[0]})"
        log.warning(message)
    return AppendResult(scan, written, int(matched.size - labelled.size), False, message, len(unreadable))


def add_row_column(dataset_path, name: str, values, description: str) -> None:
    """Add (or replace) a numeric per-row column under ``/rows``, e.g. the simulator's ``rc_expected``.

    For figures known only once every recording is labelled: the virtual
    beamline's ground-truth counts, a second spot finder's counts. Training
    and evaluation read such columns into ``Table.extra``. A later
    ``append_recording`` does not extend them: add them again after it.

    Parameters
    ----------
    dataset_path : path
        A training set written by ``append_recording``.
    name : str
        Column name; not one of the labelling columns (``ROW_FIELDS``).
    values : array_like of float, shape (n_rows,)
        One value per committed row.
    description : str
        What the column holds (stored as its ``description`` attribute).

    Raises
    ------
    DatasetError
        If the set cannot be opened, the name is a labelling column, or the
        values are not one finite number per row.
    """
    dataset_path = Path(dataset_path)
    if name in ROW_FIELDS:
        raise DatasetError(f"{dataset_path}: /rows/{name} is written by the labelling: give the column another name")
    values = np.asarray(values, dtype=np.float64)
    with _open(dataset_path, "r+") as h5file:
        n = int(h5file.attrs["n_rows"])
        if values.shape != (n,) or not np.all(np.isfinite(values)):
            raise DatasetError(
                f"{dataset_path}: column {name!r} needs one finite value per row ({n}), got shape {values.shape}: "
                "compute it for every committed row"
            )
        rows = h5file["rows"]
        if name in rows:
            del rows[name]
        rows.create_dataset(name, data=values)
        rows[name].attrs["description"] = description


def camera_geometry(recording: Recording) -> tuple[np.ndarray, np.ndarray]:
    """(pixels_per_mm, beam_position) of a recording, checked."""
    values = []
    for key in ("pixels_per_mm", "beam_position"):
        value = recording.metadata.get(key)
        array = np.asarray(value if value is not None else [], dtype=np.float64).ravel()
        if array.shape != (2,) or not np.all(np.isfinite(array)) or (key == "pixels_per_mm" and np.any(array <= 0)):
            raise DatasetError(
                f"{recording.path}: collection metadata {key} is {value!r}, not [x, y]: record with the "
                "AutoCenter object, which stores the camera scale and beam position, or add the attribute"
            )
        values.append(array)
    return values[0], values[1]


def _rows(recording, read_frame, batch, frames, counts, ppmm, beam, size_um, quality, unreadable: list) -> dict:
    """Per-row columns of the decodable camera frames of ``batch`` (read with ``read_frame``, see
    ``Recording.reader``); what the others say goes to ``unreadable``."""
    jpegs, beam_xy, padded, kept = [], [], [], []
    for i in batch:
        try:
            frame = read_frame(int(i))
        except CorruptFrameError as err:
            # One corrupt camera image costs its own row, not the recording's.
            unreadable.append(str(err))
            continue
        try:
            crop, xy, pad = crop_around_beam(frame, beam, ppmm, size_um)
        except ValueError as err:
            raise DatasetError(f"{recording.path}: frame {i}: {err}: check the beam_position metadata") from err
        jpegs.append(np.frombuffer(encode_jpeg(crop, quality), np.uint8))
        beam_xy.append(xy)
        padded.append(pad)
        kept.append(i)
    batch = np.asarray(kept, dtype=np.int64)
    stored = np.empty(len(jpegs), dtype=object)
    for k, jpeg in enumerate(jpegs):  # one by one: numpy would stack arrays of equal length
        stored[k] = jpeg
    return {
        "jpeg": stored,
        "beam_xy": np.reshape(beam_xy, (-1, 2)),
        "omega": recording.motors[batch, MOTOR_NAMES.index("omega")],
        "motors": recording.motors[batch],
        "rc": counts[frames[batch]],
        "timestamp": recording.timestamps[batch],
        "detector_frame": frames[batch],
        "recording_frame": batch,
        "padded": np.asarray(padded, bool),
    }


def create_if_missing(path: Path) -> None:
    """Create an empty set, complete or not at all: written as ``<name>.<unique>.tmp``, then linked to its name.

    A link, unlike a rename, never replaces a set that another run (a second
    ``label`` on the same set) created, and perhaps filled, meanwhile. On a
    file system without hard links the rename is made only by the run that
    created ``<name>.creating`` (exclusively); another waits for the set.

    Raises
    ------
    DatasetError
        If it cannot be written there (permissions, space), or if another
        run's ``<name>.creating`` stays without the set appearing.
    """
    if path.exists():
        return
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    _write_empty(path, temporary)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another run created it meanwhile
    except OSError:
        _rename_unless_created(temporary, path)
    finally:
        _remove_quietly(temporary)


# How long a run waits for the set that another run's claim says it is creating, s.
CLAIM_WAIT_S = 30.0


def _rename_unless_created(temporary: Path, path: Path) -> None:
    """Rename ``temporary`` to ``path`` unless the set appears meanwhile; one run at a time renames."""
    claim = path.with_name(f"{path.name}.creating")
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        try:
            descriptor = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pass  # another run is renaming its set: wait for it below
        except OSError as err:
            raise _write_failed(path, err) from None
        while claim.exists():
            if time.monotonic() > deadline:
                raise DatasetError(
                    f"{path}: {claim.name} says another run is creating the set, and for {CLAIM_WAIT_S:g} s it "
                    f"has not appeared: if no other run labels into it, remove {claim} and label again"
                )
            time.sleep(0.1)
        # Made before the claim went, so it is there unless that run failed: then claim it here.
        if path.exists():
            return
    try:
        # Checked while the claim is held: a rename would replace a set another run is filling.
        if not path.exists():
            os.replace(temporary, path)
    except OSError as err:
        raise _write_failed(path, err) from None
    finally:
        os.close(descriptor)
        _remove_quietly(claim)


def check_writable(path: Path) -> None:
    """Refuse a set that could not be created at ``path``: an empty one is written beside it and removed.

    For a run that writes the set only after long work (spot finding): a
    folder nothing can be written in, or a file system without locks that
    refuses even the unlocked open, fails now. Nothing is left.

    Raises
    ------
    DatasetError
        If it cannot be written there (permissions, space).
    """
    probe = path.with_name(f"{path.name}.{uuid.uuid4().hex}.probe")
    try:
        _write_empty(path, probe)
    finally:
        _remove_quietly(probe)


def _write_empty(path: Path, target: Path) -> None:
    """An empty set for ``path``, written at ``target``; nothing left there on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open_hdf5(target, "w") as h5file:
            h5file.attrs["format_version"] = FORMAT_VERSION
            h5file.attrs["n_rows"] = 0
            h5file.attrs["n_recordings"] = 0
            h5file.attrs["provenance"] = json.dumps(
                {"created": _now_iso(), "tool": TOOL, "layout": "docs/data-formats.md, Training set"}
            )
            rows = h5file.create_group("rows")
            for name, (dtype, shape) in ROW_FIELDS.items():
                rows.create_dataset(
                    name, shape=(0, *shape), maxshape=(None, *shape), chunks=(_ROWS_PER_CHUNK, *shape), dtype=dtype
                )
            rows["motors"].attrs["names"] = list(MOTOR_NAMES)
            rows["motors"].attrs["units"] = list(MOTOR_UNITS)
            recordings = h5file.create_group("recordings")
            for name, dtype in RECORDING_FIELDS.items():
                recordings.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(64,), dtype=dtype)
    except _WRITE_ERRORS as err:
        _remove_quietly(target)
        raise DatasetError(
            f"{path}: cannot create the training set ({system_error(path, err) or err}): check the directory is "
            "writable and has free space"
        ) from err
    except BaseException:
        _remove_quietly(target)
        raise


def _remove_quietly(path: Path) -> None:
    """Remove what a failed write left; a removal that fails too must not hide why the write failed."""
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass  # nothing was written (its folder could not be made)
    except OSError as err:
        log.warning("%s: not removed (%s)", path, err)


def _write_failed(path: Path, err: Exception) -> DatasetError:
    return DatasetError(
        f"{path}: cannot write the set ({system_error(path, err) or err}): check free space, quota and permissions, "
        "or write the set elsewhere"
    )


def check_stored_crop_um(stored_crop_um) -> None:
    """Raise DatasetError unless ``stored_crop_um`` is a side of stored crops, um.

    The set keeps the smallest side of its recordings' crops: one of 0 would make all its rows unreadable.
    """
    try:
        side = float(stored_crop_um)
    except (TypeError, ValueError):
        side = np.nan
    if not (np.isfinite(side) and side > 0):
        raise DatasetError(f"stored_crop_um = {stored_crop_um!r}: give the side of the stored crops, a number of um "
                           f"above 0 (default {DEFAULT_STORED_CROP_UM:g}; at least the largest training crop)")


def check_appendable(path) -> None:
    """Raise DatasetError unless ``path`` is a training set that ``append_recording`` can add to.

    The recordings' record and ids are read and every column opened too: a
    damaged one would otherwise be found only after the spot finding, or
    after the new rows were added. Then it is opened for writing, as the
    append opens it: a set this user may not write, or one another program
    holds open, fails now too.
    """
    path = Path(path)
    with _open(path, "r") as h5file, _reading_set(path):
        _recordings(h5file, "rows", path)
        _find(h5file, "")
        for group in ("rows", "recordings"):
            for name in h5file[group]:
                h5file[group][name]  # opens the column: a damaged header raises here
    _open(path, "r+").close()


def _crystal_of(metadata: dict, scan: str) -> str:
    """The crystal id of a recording's rows: its own, else its LIMS sample id, else its scan's.

    mxcubecore's sample id is -1 without LIMS (and recordings made before 2026-12-05 stored it as their crystal
    id): every such collection would be one "crystal" for the split. A collection of nothing named is its own.
    """
    for key in ("crystal_id", "sample_id"):
        if names_a_sample(metadata.get(key)):
            return str(metadata[key])
    return scan


def _reading_set(path):
    """:func:`.hdf5errors.reading` for a training set: what h5py raises on a damaged one is a DatasetError."""
    return reading(path, "training set", DatasetError, _WRITE_AGAIN)


def _open(path: Path, mode: str) -> h5py.File:
    try:
        h5file = open_hdf5(path, mode)
    except OSError as err:
        locked = "unable to lock file" in str(err)  # another process holds it (HDF5's lock)
        read_only = mode != "r" and os.access(path, os.R_OK) and not os.access(path, os.W_OK)
        raise DatasetError(
            f"{path}: cannot open the training set: " + (
                "another program holds it open: to append, close programs reading it (a training run holds it "
                "open)" if locked else
                "no permission to write to it: ask for write access, or give another --out" if read_only else
                f"{not_opened(path, err)}: check the path")
        ) from err
    try:
        with _reading_set(path):
            version = h5file.attrs.get("format_version")
            if "samples" in h5file:
                raise DatasetError(f"{path}: a set written by `synthesize`, which labelling does not append to: "
                                   "give another --out")
            if version is None or "rows" not in h5file or "n_rows" not in h5file.attrs:
                raise DatasetError(f"{path}: not a training set (no format_version, n_rows or /rows): give another --out")
            if version > FORMAT_VERSION:
                raise DatasetError(
                    f"{path}: training set format {version}, this mxcube-autocenter reads up to {FORMAT_VERSION}: "
                    "upgrade it"
                )
    except DatasetError:
        h5file.close()
        raise
    return h5file


def _find(h5file: h5py.File, fingerprint: str) -> str | None:
    n = int(h5file.attrs["n_recordings"])
    recordings = h5file["recordings"]
    with _reading_set(h5file.filename):
        fingerprints = recordings["fingerprint"].asstr()[:n]
        scan_ids = recordings["scan_id"].asstr()[:n]
    hits = np.flatnonzero(fingerprints == fingerprint)
    return scan_ids[hits[0]] if hits.size else None


def _resize(group: h5py.Group, n: int) -> None:
    for name in group:
        with _reading_set(group.file.filename):
            dataset = group[name]  # group.values() gives None for a column whose header no longer reads
        # A column added after labelling (add_row_column) is not resizable and keeps its
        # length: readers leave it out once appends outgrow it.
        if dataset.shape[0] != n and dataset.maxshape[0] is None:
            dataset.resize(n, axis=0)


def _append_recording(group: h5py.Group, at: int, values: dict) -> None:
    for name, value in values.items():
        dataset = group[name]
        dataset.resize(at + 1, axis=0)
        dataset[at] = value


def _write_rows(h5file: h5py.File, path: Path, at: int, columns: dict) -> None:
    n = len(columns["jpeg"])
    size = sum(len(j) for j in columns["jpeg"]) + n * 200
    free = shutil.disk_usage(path.parent).free
    if free < size + _SPARE_BYTES:
        raise DatasetError(
            f"{path}: disk almost full ({free / 1e6:.0f} MB free): free space or write the set elsewhere"
        )
    rows = h5file["rows"]
    for name, value in columns.items():
        dataset = rows[name]
        dataset.resize(at + n, axis=0)
        if name == "jpeg":
            # Row by row: h5py stacks a batch of equally long JPEGs (one row, a dark camera) into a 2-D array.
            for k, jpeg in enumerate(value):
                dataset[at + k] = jpeg
        else:
            # A value of one row (the recording's scale, ids) is broadcast to all.
            dataset[at : at + n] = value


# What an append commits, written last: the rows it adds count only once these say so.
_COMMIT_ATTRIBUTES = ("n_rows", "n_recordings", "stored_crop_um")


def _roll_back(h5file: h5py.File, committed: dict) -> None:
    """Put the set back as it was before a failed append: its commit attributes, then its rows.

    The failure (an interrupt, a full disk) may come after the new counts
    were written, in the flush that commits them.
    """
    try:
        for name in _COMMIT_ATTRIBUTES:
            if name in committed:
                h5file.attrs[name] = committed[name]
            elif name in h5file.attrs:
                del h5file.attrs[name]
        _resize(h5file["rows"], int(committed["n_rows"]))
        _resize(h5file["recordings"], int(committed["n_recordings"]))
        h5file.flush()
    except Exception as err:
        # The counts still hide the rows; the next append trims them.
        log.warning("%s: could not trim the rows of a failed append (%s)", h5file.filename, err)


# -- reading --------------------------------------------------------------------

NUMERIC = ("beam_xy", "pixels_per_mm", "omega", "rc", "timestamp", "detector_frame", "recording_frame")
TEXT = ("scan_id", "crystal_id", "scan_type", "zoom")
REQUIRED = ("image", *NUMERIC, *TEXT)


def _text(values) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind in "iub":  # integer ids (a LIMS sample id) in full, never rounded to 6 digits
        return np.array([str(int(v)) for v in values], dtype=object)
    if values.dtype.kind == "f":  # the synthetic sets store the zoom as a number; labelling as text
        return np.array([str(int(v)) if float(v).is_integer() else repr(float(v)) for v in values], dtype=object)
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


@dataclass
class Table:
    """Everything in a dataset file but the images.

    Attributes
    ----------
    path : str
    rc : (N,) float64
    crystal_id, scan_id, scan_type : (N,) object arrays of str
    zoom : (N,) object array of str
        The zoom level as recorded: a beamline's zoom names it (``"Zoom 4"``),
        the synthetic sets by its scale.
    beam_xy, pixels_per_mm : (N, 2) float64
    omega, timestamp : (N,) float64
    detector_frame, recording_frame : (N,) int64
    stored_crop_um : float or None
        None when a labelling-layout file does not record it.
    format_version : int
    provenance : dict or str
    extra : dict
        Other numeric per-row datasets (e.g. ``motors``, ``padded``, ``rc_expected``).
    image_dataset : str
        Where the JPEG crops are: ``samples/image`` or ``rows/jpeg``.
    recordings : list of dict
        The labelling layout's record of each recording (source files,
        spot-finder parameters, matching statistics); empty for the other.
    """

    path: str
    rc: np.ndarray
    crystal_id: np.ndarray
    scan_id: np.ndarray
    scan_type: np.ndarray
    beam_xy: np.ndarray
    pixels_per_mm: np.ndarray
    zoom: np.ndarray
    omega: np.ndarray
    timestamp: np.ndarray
    detector_frame: np.ndarray
    recording_frame: np.ndarray
    stored_crop_um: float
    format_version: int
    provenance: object
    extra: dict = field(default_factory=dict)
    image_dataset: str = "samples/image"
    recordings: list = field(default_factory=list)

    def __len__(self):
        return len(self.rc)

    def summary(self) -> dict:
        """Sizes and label statistics, as stored in a model's metadata."""
        rc = self.rc
        return {
            # The file name only: a model file travels, the machine it was trained on does not matter.
            "path": os.path.basename(self.path),
            "rows": int(len(rc)),
            "crystals": int(len(set(self.crystal_id))),
            "scans": int(len(set(self.scan_id))),
            "stored_crop_um": None if self.stored_crop_um is None else float(self.stored_crop_um),
            "format_version": int(self.format_version),
            "rc": {
                "mean": float(rc.mean()) if len(rc) else None,
                "median": float(np.median(rc)) if len(rc) else None,
                "max": float(rc.max()) if len(rc) else None,
                "zero_fraction": float(np.mean(rc == 0)) if len(rc) else None,
            },
            "provenance": self.provenance,
        }


def _recordings(f, layout: str, path) -> list:
    """The labelling layout's record of each recording (``/recordings/provenance``); none in the other layout."""
    if layout != "rows" or "recordings/provenance" not in f:
        return []
    n = int(f.attrs.get("n_recordings", f["recordings/provenance"].shape[0]))
    try:
        return [json.loads(text) for text in f["recordings/provenance"].asstr()[:n]]
    except ValueError as err:
        raise DatasetError(f"{path}: /recordings/provenance is damaged ({err}): label the recordings again") from err


def _stored_crop_um(f, recordings) -> float | None:
    """Side of the stored crops: the root attribute, else (labelling layout) the smallest of the recordings'."""
    if "stored_crop_um" in f.attrs:
        return float(f.attrs["stored_crop_um"])
    sides = []
    for record in recordings:
        try:
            sides.append(float(record["stored_crop_um"]))
        except (KeyError, TypeError, ValueError):
            pass
    return min(sides) if sides else None


def read_table(path) -> Table:
    """Read and check everything but the images of a dataset file.

    Two layouts are read: the contract's (``/samples`` with ``image``, root
    attribute ``stored_crop_um``) and the one the labelling code writes
    (``/rows`` with ``jpeg``, only the first ``n_rows`` rows committed,
    ``stored_crop_um`` per recording in ``/recordings/provenance``, ``zoom``
    as text).

    Raises
    ------
    DatasetError
        Missing file, group, dataset or attribute, unequal lengths or an
        unknown format version, with a message that names the file and the
        fix.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such dataset file (make one with `mxcube-autocenter label RECORDING... --out "
                           "DATASET` from camera recordings, or `mxcube-autocenter synthesize`)")
    try:
        f = open_to_read(path)
    except OSError as err:
        raise DatasetError(f"{path}: {not_opened(path, err)}: give a dataset (from `mxcube-autocenter label` or "
                           "`synthesize`)") from err
    with f, _reading_set(path):
        # The other files of this workflow, by what they hold: say which it is and where it goes.
        if "regions" in f:
            raise DatasetError(f"{path}: a region set (synthesize-regions), not a dataset of crops: train on it with "
                               "`mxcube-autocenter train-dense`, or give a dataset (label, synthesize)")
        if "entry" in f and "frames" not in f:
            raise DatasetError(f"{path}: an EIGER (NeXus) file, not a dataset: label the collection's camera "
                               "recordings (`mxcube-autocenter label RECORDING... --out DATASET`) and give the dataset")
        version = f.attrs.get("format_version")
        if version is None:
            raise DatasetError(f"{path}: no root attribute 'format_version': not a mxcube_autocenter dataset")
        if int(version) != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: dataset format_version {int(version)}, this code reads version {FORMAT_VERSION}: "
                "relabel the recordings with this version of mxcube_autocenter"
            )
        if "samples" in f:
            layout, g, image_name = "samples", f["samples"], "image"
        elif "rows" in f and "n_rows" in f.attrs:
            layout, g, image_name = "rows", f["rows"], "jpeg"
        elif "frames" in f:
            raise DatasetError(f"{path}: a camera recording, not a dataset: label it first (`mxcube-autocenter label "
                               f"{path} --out dataset.h5`) and give the dataset")
        else:
            raise DatasetError(f"{path}: no group '/samples' (nor the labelling code's '/rows' with the attribute n_rows)")
        required = [image_name if name == "image" else name for name in REQUIRED]
        missing = [name for name in required if name not in g]
        if missing:
            raise DatasetError(f"{path}: /{layout} lacks the datasets {missing} (see docs/learning.md for the format)")
        datasets = [name for name in g if isinstance(g[name], h5py.Dataset)]
        scalar = [name for name in datasets if g[name].ndim == 0]
        if scalar:
            raise DatasetError(f"{path}: /{layout}/{scalar[0]} holds one value, not one per row: the file is damaged; "
                               f"{_WRITE_AGAIN}")  # fmt: skip
        lengths = {name: g[name].shape[0] for name in datasets}
        if layout == "rows":
            n = int(f.attrs["n_rows"])
            short = {name: m for name, m in lengths.items() if m < n}
            if set(short) & set(required):
                raise DatasetError(f"{path}: n_rows is {n} but /rows datasets are shorter: {short}")
            # A column added after labelling (add_row_column) that a later append did not extend.
            for name in short:
                log.warning("%s: /rows/%s covers %d of the %d rows: not read (add it again)", path, name, short[name],
                            n)  # fmt: skip
                del lengths[name]
        else:
            n = lengths[image_name]
            unequal = {name: m for name, m in lengths.items() if m != n}
            if unequal:
                raise DatasetError(f"{path}: /samples datasets differ in length: image has {n} rows, {unequal}")
        recordings = _recordings(f, layout, path)
        stored = _stored_crop_um(f, recordings)
        if stored is None and layout == "samples":
            raise DatasetError(f"{path}: no root attribute 'stored_crop_um' (side of the stored crops, um)")
        if stored is not None and not (np.isfinite(stored) and stored > 0):
            raise DatasetError(f"{path}: stored_crop_um reads {stored}, no side of a stored crop: the file is damaged; "
                               f"{_WRITE_AGAIN}")  # fmt: skip
        provenance = f.attrs.get("provenance", "{}")
        if isinstance(provenance, bytes):
            provenance = provenance.decode()
        try:
            provenance = json.loads(provenance)
        except (TypeError, ValueError):
            provenance = str(provenance)
        arrays = {name: g[name][:n] for name in NUMERIC}
        texts = {name: _text(g[name][:n]) for name in TEXT}
        extra = {
            name: g[name][:n]
            for name in lengths
            if name not in required and g[name].dtype.kind in "fiub"
        }
        table = Table(
            path=path,
            rc=np.asarray(arrays["rc"], dtype=np.float64).reshape(n),
            crystal_id=texts["crystal_id"],
            scan_id=texts["scan_id"],
            scan_type=texts["scan_type"],
            beam_xy=np.asarray(arrays["beam_xy"], dtype=np.float64).reshape(n, 2),
            pixels_per_mm=np.asarray(arrays["pixels_per_mm"], dtype=np.float64).reshape(n, 2),
            zoom=texts["zoom"],
            omega=np.asarray(arrays["omega"], dtype=np.float64).reshape(n),
            timestamp=np.asarray(arrays["timestamp"], dtype=np.float64).reshape(n),
            detector_frame=np.asarray(arrays["detector_frame"], dtype=np.int64).reshape(n),
            recording_frame=np.asarray(arrays["recording_frame"], dtype=np.int64).reshape(n),
            stored_crop_um=stored,
            format_version=int(version),
            provenance=provenance,
            extra=extra,
            image_dataset=f"{layout}/{image_name}",
            recordings=recordings,
        )
    if np.any(~np.isfinite(table.rc)) or np.any(table.rc < 0):
        raise DatasetError(f"{path}: reflection counts must be finite and >= 0")
    bad = np.flatnonzero(~np.all(np.isfinite(table.pixels_per_mm) & (table.pixels_per_mm > 0), axis=1)
                         | ~np.all(np.isfinite(table.beam_xy), axis=1))
    if bad.size:
        raise DatasetError(f"{path}: {bad.size} rows (first: {bad[0]}) have a pixels_per_mm that is not positive "
                           f"and finite ({table.pixels_per_mm[bad[0]].tolist()}) or a non-finite beam_xy "
                           f"({table.beam_xy[bad[0]].tolist()}): write the camera scale and beam position of every row")
    return table


class RowReader:
    """Reads the stored images of a dataset one row at a time (thread-safe).

    ``fix`` says, in the errors of a damaged file, how to make it again.
    """

    def __init__(self, path, image_dataset: str = "samples/image", fix: str = _WRITE_AGAIN):
        self.path = str(path)
        self.image_dataset = image_dataset
        self.fix = fix
        self._file = None
        self._lock = threading.Lock()

    def _images(self) -> h5py.Dataset:
        """The stored images, the file opened on first use; call it holding the lock."""
        if self._file is None:
            try:
                self._file = open_to_read(self.path)
            except OSError as err:
                raise DatasetError(f"{self.path}: cannot open it ({err}): check that it is still there") from err
        return self._file[self.image_dataset]

    def image(self, i: int) -> np.ndarray:
        """The stored crop of row ``i``, RGB uint8."""
        with self._lock:
            with reading(self.path, f"file's {self.image_dataset}", DatasetError, self.fix):
                data = self._images()[int(i)]
        try:
            return decode_jpeg(data)
        except ValueError as err:
            raise DatasetError(f"{self.path}: row {i}: {err}: the file is damaged; {self.fix}") from err

    def check(self, rows) -> None:
        """Refuse the first of ``rows`` whose stored image cannot be read or holds no whole JPEG image, naming it.

        Reads the rows' bytes but decodes no image (the start and end markers
        and the frame header are read, which finds a cut or overwritten image
        but not bytes changed within one): a pipeline that hits a damaged row
        inside TensorFlow ends in an abort or a hang of the whole program
        after its error, and the test rows are read only once the training is
        over.
        """
        with self._lock:
            with reading(self.path, f"file's {self.image_dataset}", DatasetError, self.fix):
                images = self._images()
            for i in np.unique(np.asarray(rows, dtype=np.int64)):
                with reading(self.path, f"file's {self.image_dataset} (row {i})", DatasetError, self.fix):
                    data = images[int(i)]
                # Written whole by this package's encoder: a start marker, a frame header, the end marker last.
                if jpeg_size(data) is None or bytes(data[-2:]) != JPEG_END:
                    raise DatasetError(f"{self.path}: row {i}: its stored image is no readable JPEG image: the file "
                                       f"is damaged; {self.fix}")  # fmt: skip

    def close(self):
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


