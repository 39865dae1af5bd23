"""Recording on-axis camera frames during X-ray collections, one HDF5 file each.

MXCuBE delivers camera frames in its gevent event loop, which must never
block. :class:`RecordingWriter` takes each frame with :meth:`~RecordingWriter.submit`
(a non-blocking queue put) and a real OS thread writes it into a
:class:`FrameStore`. Frames that arrive faster than they can be written are
dropped and counted. :func:`read_recording`, :func:`summarise` and
:func:`contact_sheet` read a recording back; the file layout is described in
``docs/data-formats.md``, section "Camera recordings".

A typical use from a hardware object::

    writer = RecordingWriter(
        lambda: FrameStore.create(directory, "sample1_run1", metadata),
        on_error=log.error,
    )
    # for each camera frame, in the event loop:
    writer.submit(jpeg_bytes, time.time(), motor_positions, frame_number)
    # when the collection ends:
    summary = writer.close("complete")
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import errno
import io
import json
import logging
import os
import queue
import shutil
import struct
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Mapping

import cv2
import gevent
import h5py
import numpy as np
from gevent import monkey

from mxcube_autocenter.geometry import CENTRING_MOTORS
from mxcube_autocenter.hdf5errors import DAMAGED_FILE_ERRORS, not_opened, reading
from mxcube_autocenter.imagefiles import write_png
from mxcube_autocenter.outputs import json_default

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The recording file's motor columns, in this order (docs/data-formats.md).
MOTOR_NAMES = CENTRING_MOTORS
MOTOR_UNITS = ("deg", "mm", "mm", "mm", "mm")
STORAGES = ("jpeg", "raw")
COMPRESSIONS = ("lzf", "gzip")
FINAL_STATUSES = ("complete", "failed", "aborted")

JPEG_MAGIC = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
# Rows of the per-frame 1-D datasets per HDF5 chunk: a few minutes at 25 fps.
_ROWS_PER_CHUNK = 4096
# How often the writer thread wakes when no frame arrives, to flush on time
# and to notice close().
_POLL_S = 0.1
# Extra time close() gives the writer thread to close the file after the
# queue has been drained or discarded.
_CLOSE_GRACE_S = 10.0
# A recording opened as its writer grows it may read as truncated: tries, and the wait between them (s).
_OPEN_TRIES = 3
_OPEN_RETRY_S = 0.1
# Time, in s, a recording still open when the program ends has to write its queued frames.
_EXIT_CLOSE_S = 5.0


class RecordingError(Exception):
    """A recording cannot be created, written or read; the message says why and what to do."""


class FrameSizeChanged(ValueError):
    """A camera frame of another size than the recording's first (a binning, ROI or stream size change)."""


class CorruptFrameError(RecordingError):
    """One frame of a readable recording cannot be read, or holds an image that cannot be decoded."""


def unique_path(directory, name: str, suffix: str = ".h5") -> Path:
    """The first free file name among ``name``, ``name_2``, ``name_3``, ... in ``directory``.

    Parameters
    ----------
    directory : path
        Directory of the file.
    name : str
        File name without suffix.
    suffix : str
        File name suffix.

    Returns
    -------
    pathlib.Path
        ``<directory>/<name><suffix>`` if no such file exists, otherwise
        ``<directory>/<name>_<k><suffix>`` with the smallest free ``k >= 2``.
    """
    directory = Path(directory)
    candidate = directory / f"{name}{suffix}"
    k = 2
    # lexists: a dangling symbolic link holds the name too (O_EXCL refuses it).
    while os.path.lexists(candidate):
        candidate = directory / f"{name}_{k}{suffix}"
        k += 1
    return candidate


def check_free_space(directory, min_free_mb: float, path=None) -> None:
    """Raise :class:`RecordingError` if ``directory`` has less than ``min_free_mb`` free.

    Parameters
    ----------
    directory : path
        Directory whose file system is checked.
    min_free_mb : float
        Minimum free space, in MB (10**6 bytes); 0 disables the check.
    path : path, optional
        The recording being written, named in the message.
    """
    if min_free_mb <= 0:
        return
    free_mb = shutil.disk_usage(directory).free / 1e6
    if free_mb < min_free_mb:
        what = f"while writing {path}" if path else f"for a new recording in {directory}"
        raise RecordingError(
            f"disk almost full {what}: {free_mb:.0f} MB free on {directory}, "
            f"{min_free_mb:.0f} MB required: free space or set record_directory"
        )


def describe_write_error(err: OSError, path) -> str:
    """One line naming the file, the cause of a failed write and the fix.

    Parameters
    ----------
    err : OSError
        The error raised while writing.
    path : path
        The file being written.

    Returns
    -------
    str
        For example ``"disk full while writing /data/x.h5: free space or set record_directory"``.
    """
    causes = {
        errno.ENOSPC: ("disk full", "free space or set record_directory"),
        errno.EDQUOT: ("disk quota exceeded", "free space or set record_directory"),
        errno.EFBIG: (
            "file size limit reached",
            "raise the file size limit (ulimit -f) or lower max_frames",
        ),
        errno.EACCES: ("permission denied", "make the directory writable or set record_directory"),
        errno.EPERM: ("permission denied", "make the directory writable or set record_directory"),
        errno.EROFS: ("read-only file system", "set record_directory to a writable directory"),
    }
    cause, fix = causes.get(
        err.errno, (err.strerror or str(err), "check the disk and record_directory")
    )
    return f"{cause} while writing {path}: {fix}"


def decode_jpeg(data) -> np.ndarray:
    """Decode a JPEG image to an RGB array.

    Parameters
    ----------
    data : bytes-like
        The JPEG file content.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
        The image, RGB channel order.

    Raises
    ------
    ValueError
        If ``data`` is not a decodable JPEG.
    """
    buffer = np.frombuffer(data, np.uint8)
    # An empty buffer makes OpenCV raise instead of returning None.
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if bgr is None:
        raise ValueError("camera frame is not a decodable JPEG image" + ("" if buffer.size else " (empty)"))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# Start-of-frame markers (baseline, progressive, ...): SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC).
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data) -> tuple[int, int] | None:
    """The (height, width) a JPEG's frame header gives, in pixels, without decoding the image.

    Reads the marker segments up to the first start-of-frame one. None when
    ``data`` holds no readable frame header (no JPEG, or a damaged one), or
    one of no pixels.
    """
    data = memoryview(data).cast("B")
    if bytes(data[:2]) != JPEG_MAGIC:
        return None
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _JPEG_FRAME_MARKERS:
            if at + 9 > len(data):
                return None
            # The segment: length (2 bytes), sample precision (1), height (2), width (2), ...
            size = int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
            return size if min(size) > 0 else None
        at += 2 + length
    return None


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB array as JPEG, as the camera sends frames.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        The image, RGB channel order.
    quality : int
        JPEG quality, 0 to 100.

    Returns
    -------
    bytes
    """
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError(f"cannot encode an array of shape {rgb.shape} as JPEG")
    return encoded.tobytes()


def motor_row(motors) -> np.ndarray:
    """Motor positions as one row in the order of :data:`MOTOR_NAMES`.

    Parameters
    ----------
    motors : mapping or sequence
        Positions by name (``omega`` in deg; ``phiy``, ``phiz``, ``sampx``,
        ``sampy`` in mm), as ``get_value_motors`` returns them, or five
        positions in that order. A missing or ``None`` position becomes NaN.

    Returns
    -------
    ndarray of float64, shape (5,)
    """
    if isinstance(motors, Mapping):
        motors = [motors.get(name) for name in MOTOR_NAMES]
    if len(motors) != len(MOTOR_NAMES):
        raise ValueError(
            f"expected {len(MOTOR_NAMES)} motor positions {MOTOR_NAMES}, got {len(motors)}"
        )
    return np.array([np.nan if m is None else m for m in motors], dtype=np.float64)


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _attr_value(key: str, value):
    """An HDF5 attribute value: numbers and text as they are, dicts and lists as JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=json_default)
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist())
    if isinstance(value, (str, bool, int, float, np.number, np.bool_)):
        return value
    raise TypeError(
        f"recording metadata {key!r} = {value!r}: use a number, text, list or dict"
    )


def _python_value(value):
    """The Python value of an HDF5 attribute written by :func:`_attr_value`."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# The undo journal beside a recording being written (<recording>.undo): the bytes of the file as at its
# last flush wherever the flush in progress overwrote them. A header (magic, the file's size at that flush),
# then records (offset, length, the bytes).
JOURNAL_SUFFIX = ".undo"
_JOURNAL_HEADER = struct.Struct("<8sQ")
_JOURNAL_MAGIC = b"ACUNDO01"
_JOURNAL_RECORD = struct.Struct("<QQ")


def journal_path(path) -> Path:
    """The undo journal of the recording at ``path``: ``<path>.undo``."""
    path = Path(path)
    return path.with_name(path.name + JOURNAL_SUFFIX)


class _GuardedFile:
    """The file object HDF5 writes through, which never reports a failed write and keeps an undo journal.

    HDF5 cannot recover from a failed write: closing the file retries it, and
    h5py may then crash the whole process (seen on EFBIG with HDF5 1.14).
    This file records the first ``OSError`` and reports success to HDF5;
    :class:`FrameStore` raises the recorded error itself.

    A flush rewrites HDF5's metadata in place (the frames' index, the heap of
    JPEG images), so a write that fails half-way through one, or a process
    killed in one, leaves a file whose metadata points at frames it no longer
    holds (raw storage: all of them). So before a write overwrites any byte
    of the file as at its last flush, the bytes are appended to the undo
    journal (:func:`journal_path`) and that reaches the disk; a
    :meth:`commit` (after a successful flush) empties it. After a failed
    write the journal is played back, the file cut to its committed size, and
    later writes ignored: the file stays as it was at the last flush. After a
    killed process, :func:`read_recording` reads the file through the journal
    it left. Writes go straight to the operating system, so whatever HDF5 has
    flushed also survives a killed process.
    """

    def __init__(self, path: Path):
        self._raw = io.FileIO(path, "x+")
        self.error: OSError | None = None
        self._committed_size = 0
        # Byte ranges [start, end) of the committed file already in the journal: each is kept once per flush
        # (the per-frame datasets' chunks are rewritten at every frame).
        self._journaled: list[tuple[int, int]] = []
        self._journal = None
        # The recording's name is this process's (created exclusively): a journal there is a stale one's.
        try:
            self._journal = io.FileIO(journal_path(path), "w+")
            _write_all(self._journal, _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, 0))
        except OSError:
            self._raw.close()
            if self._journal is not None:
                self._journal.close()
            path.unlink()
            journal_path(path).unlink(missing_ok=True)
            raise

    def commit(self):
        """Make the file as it is now the state to return to after a failed write."""
        if self.error is None:
            try:
                self._committed_size = os.fstat(self._raw.fileno()).st_size
                self._journaled.clear()
                # Emptied before the new size is written: a journal cut short in between holds no record, and the
                # file, already on disk as it is now, is read as it is.
                self._journal.truncate(0)
                self._journal.seek(0)
                _write_all(self._journal, _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, self._committed_size))
            except OSError as err:
                self._roll_back(err)

    def sync(self):
        """Put everything written so far on the disk (``fsync``).

        A power cut keeps only what reached the disk, in any order; and a
        network file system (NFS) may report a full disk or quota only here,
        not at the write.
        """
        if self.error is None:
            try:
                os.fsync(self._raw.fileno())
            except OSError as err:
                self._roll_back(err)

    def seek(self, offset, whence=os.SEEK_SET):
        return self._raw.seek(offset, whence)

    def tell(self):
        return self._raw.tell()

    def readinto(self, buffer):
        return self._raw.readinto(buffer)

    def read(self, size=-1):
        return self._raw.read(size)

    def write(self, data):
        view = memoryview(data).cast("B")
        if self.error is None:
            offset = self._raw.tell()
            try:
                self._keep_committed(offset, len(view))
                _write_all(self._raw, view)
            except OSError as err:
                self._roll_back(err)
        return len(view)

    def truncate(self, size=None):
        if self.error is None:
            try:
                size = self._raw.tell() if size is None else size
                self._keep_committed(size, self._committed_size - size)
                self._raw.truncate(size)
            except OSError as err:
                self._roll_back(err)
        return size

    def _keep_committed(self, offset: int, size: int):
        """Journal the committed bytes that a write of ``size`` bytes at ``offset`` is about to change.

        Only those not journaled since the last commit: the first record of a
        place holds its committed bytes.
        """
        new = _uncovered(self._journaled, offset, min(offset + size, self._committed_size))
        for start, end in new:
            original = os.pread(self._raw.fileno(), end - start, start)
            # Whole, or an error before the write it undoes: a record cut short (a full disk) is no record.
            _write_all(self._journal, _JOURNAL_RECORD.pack(start, len(original)) + original)
        if new:
            # On disk before the write it undoes can be: a power cut keeps writes in any order.
            os.fdatasync(self._journal.fileno())
            self._journaled = _merged(self._journaled + new)

    def _roll_back(self, err: OSError):
        self.error = err
        try:
            _, records = _read_journal(journal_path(self._raw.name))
            # Overwriting bytes already on disk needs no new space.
            for offset, original in reversed(records):
                os.pwrite(self._raw.fileno(), original, offset)
            self._raw.truncate(self._committed_size)
            os.fsync(self._raw.fileno())  # the file put back on disk before its journal is emptied
            self._journal.truncate(_JOURNAL_HEADER.size)
        except (OSError, RecordingError) as undo_err:
            log.warning("%s could not be put back as at its last flush (its journal %s is kept to read it so): %s",
                        self._raw.name, journal_path(self._raw.name), undo_err)

    def flush(self):
        # Unbuffered: every write is already with the operating system.
        pass

    def close(self):
        """Close the file, and remove its journal unless the file still needs it to read as at its last flush.

        Call it once HDF5 has closed the file, which leaves it whole: what
        HDF5 wrote in closing is put on disk and committed first.
        """
        self.sync()
        self.commit()
        self._raw.close()
        self._journal.close()
        try:
            if os.stat(self._journal.name).st_size <= _JOURNAL_HEADER.size:
                os.unlink(self._journal.name)
        except OSError as err:
            log.warning("the undo journal %s could not be removed: %s", self._journal.name, err)


def _write_all(file: io.FileIO, data) -> None:
    """Write all of ``data`` at the file's position: a short write (a full disk) goes on until it raises."""
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += file.write(view[written:])


def _uncovered(ranges, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` outside the sorted, disjoint ``ranges`` (``[start, end)`` pairs)."""
    parts = []
    for lo, hi in ranges:
        if hi <= start or lo >= end:
            continue
        if lo > start:
            parts.append((start, lo))
        start = max(start, hi)
    if start < end:
        parts.append((start, end))
    return parts


def _merged(ranges) -> list[tuple[int, int]]:
    """``[start, end)`` ranges sorted, with those that touch or overlap joined."""
    merged = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _read_journal(path) -> tuple[int, list[tuple[int, bytes]]]:
    """A recording's undo journal: the committed size, and its complete records in order.

    A record cut short (a process killed while writing it) is left out: the
    write it would undo had not started. No journal (a writer that closed the
    file meanwhile), or one without a record, has nothing to put back.

    Raises
    ------
    RecordingError
        If the journal is not one.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0, []
    if len(data) <= _JOURNAL_HEADER.size:
        return 0, []
    magic, committed_size = _JOURNAL_HEADER.unpack_from(data)
    if magic != _JOURNAL_MAGIC:
        raise RecordingError(f"{path} is not an undo journal of mxcube-autocenter's recorder: move it away")
    records = []
    at = _JOURNAL_HEADER.size
    while at + _JOURNAL_RECORD.size <= len(data):
        offset, size = _JOURNAL_RECORD.unpack_from(data, at)
        at += _JOURNAL_RECORD.size
        if at + size > len(data):
            break
        records.append((offset, data[at:at + size]))
        at += size
    return committed_size, records


class _AsLastFlushed(io.RawIOBase):
    """A recording whose writer was killed in a flush, read-only, as it was at the last flush.

    Reads come from the file itself, up to the size it had then, with the
    bytes its journal kept put back in their places (the earliest record of
    a place is the flushed one). Nothing is written to either file.
    """

    def __init__(self, path, committed_size: int, records):
        super().__init__()
        self._file = open(path, "rb", buffering=0)
        self._size = committed_size
        self._records = records
        self._position = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def tell(self):
        return self._position

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        size = max(0, min(len(view), self._size - self._position))
        start = self._position
        data = bytearray(os.pread(self._file.fileno(), size, start).ljust(size, b"\0"))
        for offset, original in reversed(self._records):
            lo, hi = max(offset, start), min(offset + len(original), start + size)
            if lo < hi:
                data[lo - start:hi - start] = original[lo - offset:hi - offset]
        view[:size] = data
        self._position += size
        return size

    def close(self):
        self._file.close()
        super().close()


def names_a_sample(value) -> bool:
    """Whether a crystal or LIMS sample id names something: not empty, not mxcubecore's -1 (or 0) without LIMS."""
    text = "" if value is None else str(value).strip()
    if text in ("", "None"):
        return False
    try:
        return int(text) > 0
    except ValueError:
        return True


class FrameStore:
    """One HDF5 file of camera frames and motor positions for one collection.

    Create it with :meth:`create`. It is not thread-safe: use it from one
    thread at a time (:class:`RecordingWriter` uses it from its own thread).

    Attributes
    ----------
    path : pathlib.Path
        The HDF5 file.
    storage : {"jpeg", "raw"}
        How frames are stored.
    frames_dropped : int
        Frames lost before reaching the store, counted by the caller and
        written to the file at each flush.
    min_free_mb : float
        Free space, in MB, below which writing stops (0: no check).
    """

    def __init__(self, path, h5file, guarded, storage, compression, flush_interval_s, min_free_mb):
        # Use FrameStore.create(): it makes the file and its layout.
        self.path = Path(path)
        self.storage = storage
        self.frames_dropped = 0
        self.min_free_mb = min_free_mb
        self._h5 = h5file
        self._guarded = guarded
        self._compression = compression
        self._flush_interval_s = flush_interval_s
        self._frames = h5file["frames"]
        self._kept = 0
        self._jpeg_shape = None  # (H, W, 3) of the frames stored as JPEG, from the first
        self._flushed = 0
        self._last_flush = time.monotonic()
        self._closed = False

    @classmethod
    def create(
        cls,
        directory,
        name: str,
        metadata: Mapping,
        storage: str = "jpeg",
        compression: str = "lzf",
        flush_interval_s: float = 2.0,
        min_free_mb: float = 0.0,
    ) -> "FrameStore":
        """Create ``<directory>/<name>.h5`` (or ``<name>_2.h5``, ... : never overwrites).

        Parameters
        ----------
        directory : path
            Where the file goes; created if missing.
        name : str
            File name without ``.h5``, for example ``<prefix>_<run number>``.
        metadata : mapping
            The collection's scan metadata, stored as attributes of
            ``/collection``: ``experiment_type`` ("OSC" or "Helical"),
            ``osc_start`` (deg), ``osc_range`` (deg), ``number_of_images``,
            ``exposure_time`` (s), ``helical_start`` and ``helical_end``
            (motor positions by name), ``file_template``, ``master_file``
            (EIGER master file path), ``collection_start`` (unix s),
            ``sample_id``, ``crystal_id``, ``beamline``, ``zoom``,
            ``pixels_per_mm`` (x, y), ``beam_position`` (x, y, pixels on the
            camera frame), ``beam_size_um`` (x, y). Numbers and text are stored
            as they are, lists and dicts as JSON text, ``None`` is left out.
        storage : {"jpeg", "raw"}
            "jpeg" keeps the camera's JPEG bytes (compact); "raw" decodes them
            and keeps RGB pixels.
        compression : {"lzf", "gzip"}
            Compression of raw frames; lzf is fast enough for 25 fps, gzip
            (level 1) gives smaller files.
        flush_interval_s : float
            Longest time, in s, between flushes to disk: a crash loses at most
            the frames of this interval.
        min_free_mb : float
            Free space, in MB, below which the recording is refused or
            stopped; 0 disables the check.

        Raises
        ------
        RecordingError
            If the directory cannot be created or written, or has too little
            free space.
        """
        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r}: use one of {STORAGES}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r}: use one of {COMPRESSIONS}")
        if os.sep in name:
            raise ValueError(f"recording name {name!r} holds {os.sep!r}: give the directory apart")
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RecordingError(
                f"cannot create the recording directory {directory} ({err.strerror}): "
                "set record_directory to a writable directory"
            ) from err
        check_free_space(directory, min_free_mb)
        while True:
            path = unique_path(directory, name)
            try:
                guarded = _GuardedFile(path)
                break
            except FileExistsError:
                continue  # another recorder took this name since unique_path looked
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # the journal's first bytes
                    raise RecordingError(describe_write_error(err, path)) from err
                raise RecordingError(
                    f"cannot create {path} ({err.strerror}): make {directory} writable "
                    "or set record_directory"
                ) from err
        h5file = None
        try:
            # The default (earliest) file format on purpose: a file left open by a
            # killed process with libver="latest" is refused until `h5clear -s`.
            h5file = h5py.File(guarded, "w")
            _write_layout(h5file, metadata, storage)
            h5file.flush()
            guarded.sync()
            if guarded.error is not None:
                raise RecordingError(describe_write_error(guarded.error, path))
            guarded.commit()
        except Exception:
            # A file without its layout is of no use to anyone.
            if h5file is not None:
                h5file.close()
            guarded.close()
            path.unlink()
            journal_path(path).unlink(missing_ok=True)
            raise
        return cls(path, h5file, guarded, storage, compression, flush_interval_s, min_free_mb)

    @property
    def frames_kept(self) -> int:
        """Frames appended so far."""
        return self._kept

    @property
    def frames_flushed(self) -> int:
        """Frames on disk at the last flush: what survives a crash now."""
        return self._flushed

    def append(self, image: bytes, timestamp: float, motors, frame_number: int) -> None:
        """Add one camera frame.

        Parameters
        ----------
        image : bytes or ndarray
            The camera frame as JPEG bytes (decoded to RGB for raw storage), or
            as an HxWx3 uint8 RGB array (encoded to JPEG for jpeg storage: the
            raw pixels of a Lima camera's stream).
        timestamp : float
            Wall-clock time the frame was received, unix s.
        motors : mapping or sequence
            Motor positions at that time, see :func:`motor_row`.
        frame_number : int
            The camera's frame counter, or a running index.

        Raises
        ------
        ValueError
            If the frame is not a JPEG, has another size than the first frame,
            or ``motors`` has the wrong length; nothing is written then.
        OSError
            If writing failed (disk full, file size limit); stop writing.
        RecordingError
            If free space fell below ``min_free_mb``; stop writing.
        """
        # Everything is checked before the first write, so that a refused frame
        # leaves all datasets the same length (and a first one sets no frame size).
        row = motor_row(motors)
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"camera frame of shape {image.shape} and type {image.dtype} is no RGB image")
            if self.storage == "jpeg":
                shape = self._checked_size(image.shape)
                pixels = np.frombuffer(encode_jpeg(image), np.uint8)
                images = self._frames["jpeg"]
            else:
                pixels = image
                images = self._rgb_dataset(pixels.shape)
        elif self.storage == "jpeg":
            if bytes(image[:2]) != JPEG_MAGIC:
                raise ValueError("camera frame is not a JPEG image (no JPEG start marker)")
            size = jpeg_size(image)
            # A damaged frame is kept as it came: reading it back says it is corrupt, as for any damaged frame.
            shape = self._jpeg_shape if size is None else self._checked_size((*size, 3))
            pixels = np.frombuffer(image, np.uint8)
            images = self._frames["jpeg"]
        else:
            pixels = decode_jpeg(image)
            images = self._rgb_dataset(pixels.shape)
        n = self._kept
        datasets = [self._frames[name] for name in ("timestamp", "motors", "camera_frame")]
        for dataset in [*datasets, images]:
            dataset.resize(n + 1, axis=0)
        self._frames["timestamp"][n] = timestamp
        self._frames["motors"][n] = row
        self._frames["camera_frame"][n] = frame_number
        images[n] = pixels
        self._kept = n + 1
        if self.storage == "jpeg":
            self._jpeg_shape = shape
        self._raise_write_error()
        self.flush_if_due()

    def _rgb_dataset(self, shape) -> h5py.Dataset:
        if "rgb" not in self._frames:
            # The frame size is known with the first frame only.
            return self._frames.create_dataset(
                "rgb",
                shape=(0, *shape),
                maxshape=(None, *shape),
                chunks=(1, *shape),
                dtype=np.uint8,
                compression=self._compression,
                compression_opts=1 if self._compression == "gzip" else None,
            )
        rgb = self._frames["rgb"]
        if shape != rgb.shape[1:]:
            raise FrameSizeChanged(f"camera frame is {shape}, the recording's frames {rgb.shape[1:]}")
        return rgb

    def _checked_size(self, shape) -> tuple:
        """Refuse a JPEG-stored frame of another size than the first (a zoom or binning change mid-collection):
        the recording's one pixels_per_mm and beam position would label it wrongly."""
        shape = tuple(int(n) for n in shape)
        if self._jpeg_shape is not None and shape != self._jpeg_shape:
            raise FrameSizeChanged(f"camera frame is {shape}, the recording's frames {self._jpeg_shape}")
        return shape

    def flush_if_due(self) -> None:
        """Flush if ``flush_interval_s`` has passed since the last flush, and check free space.

        Raises
        ------
        OSError, RecordingError
            As :meth:`append`.
        """
        if time.monotonic() - self._last_flush >= self._flush_interval_s:
            check_free_space(self.path.parent, self.min_free_mb, self.path)
            self.flush()

    def flush(self) -> None:
        """Write the frame counts and everything buffered to disk.

        Raises
        ------
        OSError
            If writing failed.
        """
        # Frames first, counts after: a process killed (or a power cut) in
        # between leaves counts that never promise a frame that is not on disk.
        self._h5.flush()
        self._guarded.sync()
        self._h5.attrs["frames_kept"] = self._kept
        self._h5.attrs["frames_dropped"] = self.frames_dropped
        self._h5.flush()
        self._guarded.sync()
        self._raise_write_error()
        self._guarded.commit()
        self._flushed = self._kept
        self._last_flush = time.monotonic()

    def close(self, status: str = "complete", error: str | None = None) -> None:
        """Record the final status and counts, and close the file.

        Parameters
        ----------
        status : {"complete", "failed", "aborted"}
            How the recording ended.
        error : str, optional
            What went wrong, stored as the ``error`` attribute.

        Raises
        ------
        OSError
            If the final write failed (the file is closed all the same and
            keeps status "recording").
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"status={status!r}: use one of {FINAL_STATUSES}")
        if self._closed:
            return
        self._closed = True
        failed_before = self._guarded.error is not None
        try:
            self._h5.attrs["status"] = status
            self._h5.attrs["finished"] = _now_iso()
            if error:
                self._h5.attrs["error"] = error
            self.flush()
        except OSError:
            if not failed_before:
                raise
        finally:
            self._h5.close()
            self._guarded.close()

    def _raise_write_error(self):
        if self._guarded.error is not None:
            raise self._guarded.error


def _write_layout(h5file: h5py.File, metadata: Mapping, storage: str) -> None:
    h5file.attrs["format_version"] = FORMAT_VERSION
    h5file.attrs["status"] = "recording"
    h5file.attrs["storage"] = storage
    h5file.attrs["frames_kept"] = 0
    h5file.attrs["frames_dropped"] = 0
    h5file.attrs["created"] = _now_iso()
    collection = h5file.create_group("collection")
    for key, value in metadata.items():
        if value is not None:
            collection.attrs[key] = _attr_value(key, value)
    frames = h5file.create_group("frames")
    growing = dict(maxshape=(None,), chunks=(_ROWS_PER_CHUNK,))
    timestamp = frames.create_dataset("timestamp", shape=(0,), dtype=np.float64, **growing)
    timestamp.attrs["units"] = "s since 1970-01-01 UTC (wall clock at reception)"
    motors = frames.create_dataset(
        "motors",
        shape=(0, len(MOTOR_NAMES)),
        maxshape=(None, len(MOTOR_NAMES)),
        chunks=(_ROWS_PER_CHUNK, len(MOTOR_NAMES)),
        dtype=np.float64,
    )
    motors.attrs["names"] = list(MOTOR_NAMES)
    motors.attrs["units"] = list(MOTOR_UNITS)
    frames.create_dataset("camera_frame", shape=(0,), dtype=np.int64, **growing)
    if storage == "jpeg":
        # Each element a reference into the file heap: a small chunk suffices.
        frames.create_dataset(
            "jpeg", shape=(0,), maxshape=(None,), chunks=(256,), dtype=h5py.vlen_dtype(np.uint8)
        )


@dataclasses.dataclass(frozen=True)
class RecordingSummary:
    """How a recording ended, as :meth:`RecordingWriter.close` reports it.

    Attributes
    ----------
    path : pathlib.Path or None
        The HDF5 file; None if it could not be created.
    status : str
        "complete", "failed" or "aborted"; "recording" if the writer thread
        did not finish in time and still holds the file.
    frames_kept, frames_dropped : int
        Frames in the file, and frames submitted but not in the file.
    error : str or None
        What went wrong, naming the file and the fix.
    """

    path: Path | None
    status: str
    frames_kept: int
    frames_dropped: int
    error: str | None


# Writers not yet closed: the program's exit closes them (_close_at_exit).
_OPEN_WRITERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_at_exit():
    """Close the recordings still open when the program ends (MXCuBE stopped during a collection, Ctrl-C).

    Left to HDF5's own exit handler, a file still open on a writer thread is
    closed after Python has gone, and the process crashes (SIGABRT or
    SIGSEGV), leaving the file "recording". Python's exit handlers run first.
    """
    for writer in list(_OPEN_WRITERS):
        writer.close("aborted", timeout_s=_EXIT_CLOSE_S, reason="the program ended during the recording")
        # One whose close() gave up earlier (a hung disk) is still writing: its thread gets the same time.
        _wait_for_thread(writer._thread, _EXIT_CLOSE_S)


class RecordingWriter:
    """Writes camera frames to a :class:`FrameStore` from its own thread.

    :meth:`submit` never blocks and never raises, so it can be called from
    the gevent event loop for every camera frame. A real daemon thread (gevent
    is patched with ``thread=False`` in MXCuBE) drains a bounded queue into
    the store. A frame that finds the queue full is dropped and counted. The
    first write error (disk full, file size limit, too little free space)
    stops the recording: the store is closed as "failed", ``on_error`` is
    called once, and later frames are dropped.

    Parameters
    ----------
    store : FrameStore or callable returning one
        A callable (such as ``lambda: FrameStore.create(...)``) is called on
        the writer thread, so that creating the file does not block the caller.
    max_queue : int
        Frames waiting to be written before new ones are dropped.
    max_frames : int, optional
        Frames kept at most; later ones are dropped and counted.
    on_error : callable, optional
        ``on_error(message)``, called once on the writer thread when the
        recording stops on an error; the message names the file, the cause and
        the fix. Hand it to the event loop yourself if it touches greenlets.
    log : logging.Logger, optional
        Where the writer's warnings and errors go (default: this module's
        logger). A hardware object gives its own: MXCuBE's log handlers are on
        the ``HWR`` logger, and records of other loggers never reach its log
        file or the web UI.
    """

    def __init__(
        self,
        store: FrameStore | Callable[[], FrameStore],
        max_queue: int = 50,
        max_frames: int | None = None,
        on_error: Callable[[str], None] | None = None,
        log: logging.Logger | None = None,
    ):
        self.log = log or globals()["log"]
        self._store_or_factory = store
        self._max_frames = max_frames
        self._on_error = on_error
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._store: FrameStore | None = None
        # Each counter is written by one thread only, so no lock is needed.
        self._submitted = 0
        self._queued = 0
        self._dropped_at_submit = 0
        self._dropped_by_writer = 0
        self._error: str | None = None
        self._drop_causes: dict[str, None] = {}  # in the order they happened
        self._submit_drop_cause = None  # the first cause given to drop()
        self._final_status = "complete"
        self._final_reason = None
        self._drain_deadline = float("inf")
        self._closing = threading.Event()
        self._summary: RecordingSummary | None = None
        self._thread = threading.Thread(target=self._run, name="frame-recording", daemon=True)
        _OPEN_WRITERS.add(self)
        self._thread.start()

    @property
    def error(self) -> str | None:
        """The error that stopped the recording, if any."""
        return self._error

    @property
    def frames_submitted(self) -> int:
        """Frames given to :meth:`submit`, and those counted by :meth:`drop`."""
        return self._submitted

    @property
    def frames_dropped(self) -> int:
        """Frames submitted that will not be written (so far)."""
        return self._dropped_at_submit + self._dropped_by_writer

    def submit(
        self, frame, timestamp: float, motors, frame_number: int | None = None
    ) -> bool:
        """Queue one camera frame for writing, without blocking.

        Parameters
        ----------
        frame : bytes, ndarray or callable
            The camera frame: JPEG bytes, an HxWx3 uint8 RGB array, or a
            function returning one of them, called on the writer thread (to
            decode a raw frame there rather than in the caller's event loop).
        timestamp : float
            Wall-clock time the frame was received, unix s.
        motors : mapping or sequence
            Motor positions at that time, see :func:`motor_row`.
        frame_number : int, optional
            The camera's frame counter; by default the number of frames
            submitted before this one.

        Returns
        -------
        bool
            True if queued; False if dropped (queue full, ``max_frames``
            reached, recording stopped or closed).
        """
        number = self._submitted if frame_number is None else frame_number
        self._submitted += 1
        if (
            self._error is not None
            or self._closing.is_set()
            or (self._max_frames is not None and self._queued >= self._max_frames)
        ):
            self._dropped_at_submit += 1
            return False
        try:
            self._queue.put_nowait((frame, timestamp, motors, number))
        except queue.Full:
            self._dropped_at_submit += 1
            return False
        self._queued += 1
        return True

    def drop(self, cause: str) -> None:
        """Count a frame the caller could not submit (its motors unreadable, say): ``cause`` says why, if none is
        kept."""
        self._submitted += 1
        self._dropped_at_submit += 1
        self._submit_drop_cause = self._submit_drop_cause or cause

    def close(self, status: str = "complete", timeout_s: float = 30.0, reason: str | None = None) -> RecordingSummary:
        """Write what is queued, close the file and stop the thread.

        Cooperative under gevent: it waits with ``time.sleep``, which the
        monkey-patched event loop turns into a yield.

        Parameters
        ----------
        status : {"complete", "failed", "aborted"}
            The final status, unless an error already made it "failed".
        timeout_s : float
            Time, in s, to write the queued frames; frames still queued then
            are dropped and counted.
        reason : str, optional
            Why a recording ends failed or aborted, stored as the file's
            ``error`` and given in the summary (a write error comes first).

        Returns
        -------
        RecordingSummary
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"status={status!r}: use one of {FINAL_STATUSES}")
        if self._summary is not None:
            return self._summary
        if not self._closing.is_set():
            # A second close() while the first waits (the program's exit and a recorder's own) changes nothing.
            self._final_status = status
            self._final_reason = reason
            self._drain_deadline = time.monotonic() + timeout_s
            self._closing.set()
        finished = _wait_for_thread(self._thread, timeout_s + _CLOSE_GRACE_S)
        # Frames queued after the thread stopped (a race with an error) are dropped.
        self._dropped_by_writer += self._queue.qsize() if finished else 0
        store = self._store
        # After a failed write the file holds the frames of its last flush only.
        kept = store.frames_flushed if store else 0
        lost = store.frames_kept - kept if store else 0
        error = self._error or self._final_reason
        if not finished:
            error = (
                f"the writer thread was still writing {store.path if store else 'the recording'} "
                f"after {timeout_s + _CLOSE_GRACE_S:.0f} s: check the disk"
            )
            self.log.error(error)
        self._summary = RecordingSummary(
            path=store.path if store else None,
            status=("failed" if self._error else self._final_status) if finished else "recording",
            frames_kept=kept,
            frames_dropped=self.frames_dropped + lost,
            error=error,
        )
        return self._summary

    def _run(self):
        try:
            store = self._store_or_factory
            self._store = store if isinstance(store, FrameStore) else store()
            self._write_frames(self._store)
            self._store.frames_dropped = self.frames_dropped
            if self._store.frames_kept == 0 and self._final_status == "complete":
                # Nothing to label: a "complete" recording of no frame would hide why.
                cause = self._submit_drop_cause or next(iter(self._drop_causes), None) or (
                    f"{self.frames_dropped} frames dropped (queue full, max_frames or the close's time-out)"
                    if self._submitted else "the camera sent none")
                self._final_status, self._final_reason = "failed", self._final_reason or f"no frame kept: {cause}"
            self._store.close(self._final_status, self._final_reason)
        except Exception as err:
            self._fail(err)
        finally:
            _OPEN_WRITERS.discard(self)  # only now: the program's exit waits for a writer whose close() gave up
        if self._summary is not None and self._summary.status == "recording":
            # close() gave up waiting and reported the recording unfinished: say how the file ended.
            self.log.warning("%s: the writer finished after close() gave up on it; the file is closed as %s",
                             self._summary.path, "failed" if self._error else self._final_status)

    def _write_frames(self, store: FrameStore):
        while True:
            try:
                frame, timestamp, motors, number = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closing.is_set():
                    return
                store.flush_if_due()
                continue
            if time.monotonic() > self._drain_deadline:
                self._dropped_by_writer += 1
                continue
            store.frames_dropped = self.frames_dropped
            try:
                store.append(frame() if callable(frame) else frame, timestamp, motors, number)
            except FrameSizeChanged as err:
                # Every later frame is of the new size: the recording ends, as at a zoom change, saying why in its file.
                raise RecordingError(
                    f"{err} from camera frame {number} on: the camera's image size changed during the collection "
                    "(binning, ROI or stream size), so later frames are not recorded; keep the camera's settings "
                    "while collecting"
                ) from err
            except ValueError as err:
                self._dropped_by_writer += 1
                # Once per cause: a camera that sends no JPEG sends none, and each would be a line of MXCuBE's log.
                if str(err) not in self._drop_causes:
                    self._drop_causes[str(err)] = None
                    self.log.warning("camera frame %s dropped from %s: %s (later frames dropped for this are only "
                                     "counted)", number, store.path, err)  # fmt: skip

    def _fail(self, err: Exception):
        path = self._store.path if self._store is not None else None
        if isinstance(err, RecordingError):
            message = str(err)
        elif isinstance(err, OSError):
            message = describe_write_error(err, path)
        else:
            message = f"unexpected error while writing {path} ({err!r}): please report it"
            self.log.exception(message)
        self._error = message
        self.log.error("camera recording stopped: %s", message)
        self._discard_queue()
        if self._store is not None:
            self._store.frames_dropped = self.frames_dropped
            try:
                self._store.close("failed", error=message)
            except Exception as close_err:
                self.log.warning("%s could not be marked failed: %s", path, close_err)
        if self._on_error is not None:
            try:
                self._on_error(message)
            except Exception:
                self.log.exception("on_error callback of the camera recording failed")

    def _discard_queue(self):
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._dropped_by_writer += 1


def _wait_for_thread(thread: threading.Thread, timeout_s: float) -> bool:
    # Polling with time.sleep rather than thread.join: under gevent's
    # monkey-patching time.sleep yields to the event loop, join would block it.
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not thread.is_alive()


@dataclasses.dataclass(frozen=True, eq=False)
class Recording:
    """A recording read back by :func:`read_recording`.

    Attributes
    ----------
    path : pathlib.Path
        The HDF5 file.
    status : str
        "complete", "failed", "aborted", or "recording" if the writer
        stopped without closing the file (killed, or a write failed).
    storage : {"jpeg", "raw"}
        How frames are stored.
    metadata : dict
        The collection's scan metadata (attributes of ``/collection``).
    frames_kept, frames_dropped : int
        The counts the writer last wrote.
    created, finished : str or None
        ISO 8601 local times the file was created and closed.
    error : str or None
        Why the recording failed, if it did.
    timestamps : ndarray of float64, shape (N,)
        Wall-clock reception time of each frame, unix s.
    motors : ndarray of float64, shape (N, 5)
        Motor positions of each frame, columns :data:`MOTOR_NAMES`.
    camera_frames : ndarray of int64, shape (N,)
        The camera's frame counter of each frame.
    """

    path: Path
    status: str
    storage: str
    metadata: dict
    frames_kept: int
    frames_dropped: int
    created: str | None
    finished: str | None
    error: str | None
    timestamps: np.ndarray
    motors: np.ndarray
    camera_frames: np.ndarray

    def __len__(self) -> int:
        return len(self.timestamps)

    def motor(self, name: str) -> np.ndarray:
        """Positions of one motor (``omega`` in deg, the others in mm), one per frame."""
        if name not in MOTOR_NAMES:
            raise KeyError(f"no motor {name!r} in a recording: use one of {MOTOR_NAMES}")
        return self.motors[:, MOTOR_NAMES.index(name)]

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as an RGB array of uint8, shape (H, W, 3).

        Opens the file for this frame alone: read many with :meth:`reader`.

        Raises
        ------
        CorruptFrameError
            If the frame cannot be read, or its stored image cannot be decoded.
        RecordingError
            If the file cannot be opened.
        """
        with self.reader() as frame:
            return frame(i)

    @contextlib.contextmanager
    def reader(self):
        """Keep the file open while reading frames: ``with rec.reader() as frame: frame(i)``.

        ``frame(i)`` returns and raises as :meth:`frame`. Reading every frame
        of a recording this way takes half the time of :meth:`frame`, which
        opens the file (and reads its heap of JPEG images) anew each time.
        """
        try:
            h5file = _open_recording(self.path)
        except OSError as err:
            raise RecordingError(f"{self.path} cannot be opened: {not_opened(self.path, err)}: check that the file is "
                                 "there") from err
        with h5file:
            yield lambda i: self._read_frame(h5file, i)

    def _read_frame(self, h5file: h5py.File, i: int) -> np.ndarray:
        i = range(len(self))[i]
        try:
            if self.storage == "raw":
                return h5file["frames/rgb"][i]
            data = h5file["frames/jpeg"][i]
        except DAMAGED_FILE_ERRORS as err:
            # One frame: a process killed while HDF5 rewrote the last frames' heap leaves those unreadable, and
            # the others are still a recording to label.
            raise CorruptFrameError(
                f"frame {i} of {self.path} cannot be read ({err}): the recording probably stopped before it "
                f"was written, or its writer was killed in a flush and {journal_path(self.path).name}, which "
                "would read it as at the flush before, is not beside it (copy it with the recording)"
            ) from err
        try:
            return decode_jpeg(data)
        except ValueError as err:
            raise CorruptFrameError(
                f"frame {i} of {self.path} is a corrupt image ({err}): the camera sent it so"
            ) from err


def _open_recording(path) -> h5py.File:
    """The recording at ``path`` opened to read, without HDF5's file lock; as at its last flush if its writer was
    killed in one (its undo journal holds records).

    The writer takes no lock, so it would guard nothing, and a file system
    without locks (NFS without lockd) would refuse every recording. A file
    being written can read as truncated for a moment (opened as the writer
    grows it, before its flush): it is tried again.
    """
    for attempt in range(_OPEN_TRIES):
        try:
            committed_size, records = _read_journal(journal_path(path))
            if records:
                return h5py.File(_AsLastFlushed(path, committed_size, records), "r")
            return h5py.File(path, "r", locking=False)
        except OSError as err:
            if "truncated file" not in str(err) or attempt == _OPEN_TRIES - 1:
                raise
            time.sleep(_OPEN_RETRY_S)


def read_recording(path) -> Recording:
    """Read a recording's metadata, counts, timestamps and motor positions.

    Frames are read one at a time with :meth:`Recording.frame`. Of a file
    left by a killed writer, only the frames flushed before are returned.

    Parameters
    ----------
    path : path
        A recording written by :class:`FrameStore`.

    Returns
    -------
    Recording

    Raises
    ------
    RecordingError
        If the file is missing, not HDF5, not a recording, of a newer
        format, or damaged.
    """
    path = Path(path)
    try:
        h5file = _open_recording(path)
    except OSError as err:
        raise RecordingError(
            f"cannot open the recording {path}: {not_opened(path, err)}: check the path (camera recordings are "
            "named <prefix>_<run>_camera.h5) and that the file is complete"
        ) from err
    fix = "copy it again if it was copied; a recording damaged where it was written cannot be labelled"
    with h5file, reading(path, "camera recording", RecordingError, fix):
        attrs = {key: _python_value(value) for key, value in h5file.attrs.items()}
        version = attrs.get("format_version")
        if version is None or "frames" not in h5file:
            kind = ("a training set: pass it to train or evaluate" if "rows" in h5file or "samples" in h5file else
                    "a region set: pass it to train-dense" if "regions" in h5file else
                    "no format_version attribute and no /frames group")  # fmt: skip
            raise RecordingError(f"{path} is not a camera recording ({kind})")
        if version > FORMAT_VERSION:
            raise RecordingError(
                f"{path} has recording format {version}, this mxcube-autocenter reads up to "
                f"{FORMAT_VERSION}: upgrade mxcube-autocenter"
            )
        missing = [name for name in ("status", "storage", "frames_kept", "frames_dropped") if name not in attrs]
        missing += [f"frames/{name}" for name in ("timestamp", "motors", "camera_frame") if name not in h5file["frames"]]
        missing += ["collection"] if "collection" not in h5file else []
        if missing:
            raise RecordingError(
                f"{path} is an incomplete camera recording (no {', '.join(missing)}): it was not written by "
                "mxcube-autocenter's recorder, or was changed since"
            )
        frames = h5file["frames"]
        # Rows appended after the last flush of a killed writer may be partial.
        n = min(attrs["frames_kept"], *(len(dataset) for dataset in frames.values()))
        return Recording(
            path=path,
            status=attrs["status"],
            storage=attrs["storage"],
            metadata={
                key: _python_value(value) for key, value in h5file["collection"].attrs.items()
            },
            frames_kept=attrs["frames_kept"],
            frames_dropped=attrs["frames_dropped"],
            created=attrs.get("created"),
            finished=attrs.get("finished"),
            error=attrs.get("error"),
            timestamps=frames["timestamp"][:n],
            motors=frames["motors"][:n],
            camera_frames=frames["camera_frame"][:n],
        )


def _clock(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%H:%M:%S.%f")[:-4]


def _as_heatmap_options(metadata: dict) -> str:
    """The camera's scale and beam position as `heatmap` takes them for a frame of this recording."""
    ppmm, beam = metadata.get("pixels_per_mm"), metadata.get("beam_position")
    try:
        x, y = (float(v) for v in ppmm)
        scale = f"--pixels-per-mm {x:g}" if x == y else f"pixels_per_mm {x:g}, {y:g} (not square)"
    except (TypeError, ValueError):
        scale = f"pixels_per_mm {ppmm}"
    try:
        bx, by = (float(v) for v in beam)
        where = f"--beam {bx:g},{by:g}"
    except (TypeError, ValueError):
        where = f"beam_position {beam}"
    return f"{scale} {where} (as the heatmap command takes them)"


def summarise(path) -> str:
    """A human-readable summary of a recording.

    Parameters
    ----------
    path : path
        A recording written by :class:`FrameStore`.

    Returns
    -------
    str
        Several lines: status, frames kept and dropped, time span and mean
        frame rate, experiment type, master file, the camera's zoom, scale
        and beam position, and each motor's range.
    """
    rec = read_recording(path)
    status = rec.status
    if status == "recording":
        status += " (still being written, or the writer stopped without closing the file)"
        if _read_journal(journal_path(path))[1]:
            status += f"; read as at its last flush through {journal_path(path).name}"
    submitted = rec.frames_kept + rec.frames_dropped
    dropped_pct = 100.0 * rec.frames_dropped / submitted if submitted else 0.0
    lines = [
        f"{rec.path}",
        f"  status       {status}",
        f"  frames       {len(rec)} readable, {rec.frames_kept} kept, "
        f"{rec.frames_dropped} dropped ({dropped_pct:.1f} %), {rec.storage} storage",
    ]
    if rec.error:
        lines.append(f"  error        {rec.error}")
    if len(rec):
        start, end = rec.timestamps[0], rec.timestamps[-1]
        span = end - start
        rate = f", {(len(rec) - 1) / span:.1f} frames/s" if span > 0 else ""
        day = datetime.datetime.fromtimestamp(start).date().isoformat()
        lines.append(f"  time         {day} {_clock(start)} to {_clock(end)}: {span:.2f} s{rate}")
    lines.append(f"  experiment   {rec.metadata.get('experiment_type', 'unknown')}")
    lines.append(f"  master file  {rec.metadata.get('master_file', 'unknown')}")
    lines.append(f"  camera       zoom {rec.metadata.get('zoom')}, " + _as_heatmap_options(rec.metadata))
    for name, unit in zip(MOTOR_NAMES, MOTOR_UNITS):
        positions = rec.motor(name)
        if np.isfinite(positions).any():
            low, high = np.nanmin(positions), np.nanmax(positions)
            lines.append(f"  {name:<12} {low:.3f} to {high:.3f} {unit}")
        else:
            lines.append(f"  {name:<12} not recorded")
    return "\n".join(lines)


def contact_sheet(path, out_png, n: int = 16, columns: int = 4, tile_width: int = 320) -> Path:
    """Write a PNG grid of evenly spaced frames of a recording.

    Each tile is a downscaled frame with the beam position marked by a red
    cross and the frame's index, reception time and omega written on it.

    Parameters
    ----------
    path : path
        A recording written by :class:`FrameStore`.
    out_png : path
        The PNG file to write.
    n : int
        Frames shown at most.
    columns : int
        Tiles per row.
    tile_width : int
        Width of a tile, in pixels.

    Returns
    -------
    pathlib.Path
        ``out_png``.

    Raises
    ------
    RecordingError
        If the recording holds no frame, or none of those picked can be
        decoded (a corrupt one among others is drawn grey, marked so).
    OSError
        If ``out_png`` cannot be written.
    """
    rec = read_recording(path)
    if not len(rec):
        raise RecordingError(f"{rec.path} holds no frames: nothing to show")
    indices = np.unique(np.linspace(0, len(rec) - 1, min(n, len(rec))).round().astype(int))
    tiles = {}
    for i in indices:
        try:
            tiles[i] = _tile(rec, i, tile_width)
        except CorruptFrameError:
            tiles[i] = None  # shown as such: one bad frame must not hide the others
    shown = [tile for tile in tiles.values() if tile is not None]
    if not shown:
        raise RecordingError(f"{rec.path}: none of the {len(indices)} frames picked for the sheet can be decoded")
    tiles = [tile if tile is not None else _corrupt_tile(shown[0].shape, rec, i) for i, tile in tiles.items()]
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[k : k + columns]) for k in range(0, len(tiles), columns)]
    out_png = Path(out_png)
    return write_png(out_png, np.vstack(rows))


def _tile(rec: Recording, i: int, width: int) -> np.ndarray:
    frame = rec.frame(i)
    scale = width / frame.shape[1]
    tile = cv2.resize(frame, (width, round(frame.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    try:
        beam = np.asarray(rec.metadata.get("beam_position"), dtype=np.float64).reshape(2)
    except (TypeError, ValueError):
        beam = np.full(2, np.nan)
    # A position that reads no number (not calibrated) is left unmarked: the frames are still worth a look.
    if np.isfinite(beam).all():
        centre = (round(beam[0] * scale), round(beam[1] * scale))
        cv2.drawMarker(tile, centre, (255, 0, 0), cv2.MARKER_CROSS, markerSize=16, thickness=2)
    return _caption(tile, rec, i, f"omega {rec.motor('omega')[i]:.2f} deg")


def _corrupt_tile(shape, rec: Recording, i: int) -> np.ndarray:
    return _caption(np.full(shape, 96, np.uint8), rec, i, "corrupt image")


def _caption(tile: np.ndarray, rec: Recording, i: int, second_line: str) -> np.ndarray:
    for line, text in enumerate((f"#{i}  {_clock(rec.timestamps[i])}", second_line)):
        origin = (6, 18 + 18 * line)
        # Dark outline under light text: readable on bright and dark images.
        for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            cv2.putText(
                tile, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, thickness, cv2.LINE_AA
            )
    return tile


def synthetic_frame(width: int = 1280, height: int = 1024, seed: int = 0) -> np.ndarray:
    """An on-axis camera-like RGB frame: lit background, sample pin, loop, crystal, noise.

    Parameters
    ----------
    width, height : int
        Frame size, in pixels.
    seed : int
        Seed of the sensor noise.

    Returns
    -------
    ndarray of uint8, shape (height, width, 3)
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    # Bright, slightly uneven back-light, as through the on-axis optics.
    light = 200 - 60 * ((x / width - 0.5) ** 2 + (y / height - 0.5) ** 2)
    image = np.dstack([light * 0.85, light * 0.92, light]).astype(np.float32)
    cx, cy = width // 2, height // 2
    cv2.rectangle(image, (0, cy - 25), (cx - 220, cy + 25), (60, 60, 70), -1)
    cv2.ellipse(image, (cx - 40, cy), (190, 140), 0, 0, 360, (40, 40, 50), 6)
    crystal = np.array([[-30, -40], [50, -20], [35, 45], [-45, 25]]) + (cx, cy)
    cv2.fillPoly(image, [crystal], (150, 170, 120))
    image = cv2.GaussianBlur(image, (0, 0), 1.5)
    image += np.random.default_rng(seed).normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def benchmark(quick: bool = False) -> dict:
    """Record 1280x1024 JPEG frames at 25 fps from a greenlet and time the event loop.

    gevent must already be monkey-patched (``patch_all(thread=False)``), as
    in MXCuBE and the command line.

    Parameters
    ----------
    quick : bool
        Record for about 3 s instead of 10 s.

    Returns
    -------
    dict
        ``record_fps`` (frames stored per second), ``record_dropped_pct``
        (percent of frames submitted that were dropped) and
        ``record_max_stall_ms`` (longest the event loop was held, ms).
    """
    if not monkey.is_module_patched("time"):
        raise RuntimeError(
            "the recording benchmark needs gevent's event loop: call "
            "gevent.monkey.patch_all(thread=False) first, as MXCuBE does"
        )
    duration_s, fps = (3.0 if quick else 10.0), 25.0
    jpeg = encode_jpeg(synthetic_frame())
    with tempfile.TemporaryDirectory() as directory:
        writer = RecordingWriter(
            lambda: FrameStore.create(directory, "benchmark", {"experiment_type": "OSC"})
        )
        start = time.monotonic()
        feeding = gevent.spawn(_feed, writer, jpeg, fps, duration_s)
        ticking = gevent.spawn(_max_stall_s, feeding)
        feeding.get()
        max_stall_s = ticking.get()
        # A writer slower than the camera still has frames queued: they count at
        # the rate they are written, so the time runs until the writer took the last.
        while not writer._queue.empty():
            gevent.sleep(0.005)
        elapsed_s = time.monotonic() - start
        summary = writer.close("complete")
    submitted = summary.frames_kept + summary.frames_dropped
    return {
        "record_fps": summary.frames_kept / elapsed_s,
        "record_dropped_pct": 100.0 * summary.frames_dropped / max(submitted, 1),
        "record_max_stall_ms": 1000.0 * max_stall_s,
    }


def _feed(writer: RecordingWriter, jpeg: bytes, fps: float, duration_s: float) -> float:
    """Submit ``jpeg`` at ``fps`` for ``duration_s``, as the camera does; return the time taken."""
    start = time.monotonic()
    k = 0
    while (now := time.monotonic()) - start < duration_s:
        omega = 36.0 * (now - start)  # a 10 s, 360 deg rotation
        writer.submit(jpeg, time.time(), (omega, 0.1, -0.2, 0.0, 0.0))
        k += 1
        gevent.sleep(max(0.0, start + k / fps - time.monotonic()))
    return time.monotonic() - start


def _max_stall_s(until) -> float:
    """Longest time, in s, a 5 ms sleep of this greenlet took while ``until`` runs."""
    longest = 0.0
    last = time.monotonic()
    while not until.ready():
        gevent.sleep(0.005)
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
    return longest
