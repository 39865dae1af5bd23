"""Camera recordings: real HDF5 files, a real writer thread, real crashes and full disks."""

import errno
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import gevent
import h5py
import numpy as np
import pytest

from mxcube_autocenter.recording import (
    MOTOR_NAMES,
    CorruptFrameError,
    FrameStore,
    RecordingError,
    RecordingWriter,
    contact_sheet,
    decode_jpeg,
    encode_jpeg,
    journal_path,
    read_recording,
    summarise,
    synthetic_frame,
    unique_path,
)
from tests.helpers import Gaps, assert_responsive, tick

METADATA = {
    "experiment_type": "Helical",
    "osc_start": 10.0,
    "osc_range": 0.1,
    "number_of_images": 3600,
    "exposure_time": 0.01,
    "helical_start": {"phiy": 0.1, "phiz": -0.2, "sampx": 0.0, "sampy": 0.05},
    "helical_end": {"phiy": 0.3, "phiz": -0.2, "sampx": 0.01, "sampy": 0.05},
    "file_template": "lyso1_1_%06d.h5",
    "master_file": "/data/visit/lyso1/lyso1_1_master.h5",
    "collection_start": 1.7e9,
    "sample_id": 42,
    "crystal_id": "lyso1-x1",
    "beamline": "VIRTUAL",
    "zoom": 4,
    "pixels_per_mm": [1480.5, 1480.5],
    "beam_position": [640, 512],
    "beam_size_um": [20.0, 5.0],
    "comment": None,
}


def _frames(count, width=160, height=128):
    """Small distinct RGB frames and their JPEG encodings."""
    rgbs = [synthetic_frame(width, height, seed=k) for k in range(count)]
    return rgbs, [encode_jpeg(rgb) for rgb in rgbs]


def _motors(k):
    return {"omega": 0.5 * k, "phiy": 0.1, "phiz": -0.2, "sampx": 0.001 * k, "sampy": None}


def _run_script(script, *args, **popen):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.mark.parametrize("storage", ["jpeg", "raw"])
def test_round_trip(tmp_path, storage):
    rgbs, jpegs = _frames(5)
    store = FrameStore.create(tmp_path / "new" / "dir", "lyso1_1", METADATA, storage=storage)
    start = time.time()
    for k, jpeg in enumerate(jpegs):
        store.append(jpeg, start + 0.04 * k, _motors(k), 1000 + k)
    store.frames_dropped = 2
    store.close("complete")

    rec = read_recording(store.path)
    assert store.path == tmp_path / "new" / "dir" / "lyso1_1.h5"
    assert os.listdir(store.path.parent) == ["lyso1_1.h5"]  # its undo journal gone with the writer
    assert (rec.status, rec.storage, len(rec)) == ("complete", storage, 5)
    assert (rec.frames_kept, rec.frames_dropped, rec.error) == (5, 2, None)
    assert rec.created and rec.finished
    expected = {key: value for key, value in METADATA.items() if value is not None}
    assert rec.metadata == expected
    np.testing.assert_array_equal(rec.timestamps, start + 0.04 * np.arange(5))
    np.testing.assert_array_equal(rec.camera_frames, 1000 + np.arange(5))
    np.testing.assert_array_equal(rec.motor("omega"), 0.5 * np.arange(5))
    assert np.isnan(rec.motor("sampy")).all()
    with h5py.File(store.path, "r") as h5file:
        assert list(h5file["frames/motors"].attrs["names"]) == list(MOTOR_NAMES)
        assert h5file["collection"].attrs["number_of_images"] == 3600
        assert json.loads(h5file["collection"].attrs["helical_start"])["phiy"] == 0.1
    for k, jpeg in enumerate(jpegs):
        decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(rec.frame(k), decoded)
    assert rec.frame(-1).shape == rgbs[-1].shape
    # Many frames through one open file: the same images.
    with rec.reader() as frame:
        for k in (4, 0, -1, 2):
            np.testing.assert_array_equal(frame(k), rec.frame(k))
        with pytest.raises(IndexError):
            frame(5)
    store.path.unlink()
    with pytest.raises(RecordingError, match=re.escape(f"{store.path} cannot be opened")):
        rec.frame(0)


def test_never_overwrites(tmp_path):
    first = FrameStore.create(tmp_path, "run", METADATA)
    second = FrameStore.create(tmp_path, "run", METADATA)
    assert (first.path.name, second.path.name) == ("run.h5", "run_2.h5")
    assert unique_path(tmp_path, "run") == tmp_path / "run_3.h5"
    first.close()
    second.close()


def test_a_dangling_link_holds_its_name(tmp_path):
    """A link to a moved file refuses O_EXCL like a file: the name must be skipped, not tried forever."""
    (tmp_path / "run.h5").symlink_to(tmp_path / "moved" / "run.h5")
    assert unique_path(tmp_path, "run") == tmp_path / "run_2.h5"
    store = FrameStore.create(tmp_path, "run", METADATA)
    assert store.path.name == "run_2.h5"
    store.close()


@pytest.mark.parametrize("status", ["complete", "failed", "aborted"])
def test_status_and_counts_at_close(tmp_path, status):
    _, jpegs = _frames(3)
    store = FrameStore.create(tmp_path, "run", {}, storage="raw", compression="gzip")
    for k, jpeg in enumerate(jpegs):
        store.append(jpeg, time.time(), _motors(k), k)
    assert read_recording(store.path).status == "recording"
    store.frames_dropped = 7
    store.close(status, error="beam lost" if status == "failed" else None)
    rec = read_recording(store.path)
    assert (rec.status, rec.frames_kept, rec.frames_dropped) == (status, 3, 7)
    assert rec.error == ("beam lost" if status == "failed" else None)


@pytest.mark.parametrize("storage", ["jpeg", "raw"])
def test_bad_frames_are_refused_without_writing(tmp_path, storage):
    rgbs, jpegs = _frames(1)
    store = FrameStore.create(tmp_path, "run", {}, storage=storage)
    with pytest.raises(ValueError, match="motor positions"):  # refused before it sets the recording's frame size
        store.append(encode_jpeg(synthetic_frame(64, 64)), time.time(), [0.0, 1.0], 0)
    store.append(jpegs[0], time.time(), _motors(0), 0)
    if storage == "raw":
        with pytest.raises(ValueError, match="JPEG"):
            store.append(b"\xff\xd8 truncated", time.time(), _motors(1), 1)
    # A zoom or binning change mid-collection: the recording's one pixels_per_mm would label it wrongly. JPEG
    # storage kept such frames.
    with pytest.raises(ValueError, match="frames"):
        store.append(encode_jpeg(synthetic_frame(64, 64)), time.time(), _motors(1), 1)
    with pytest.raises(ValueError, match="frames"):
        store.append(synthetic_frame(64, 64), time.time(), _motors(1), 1)
    with pytest.raises(ValueError, match="motor positions"):
        store.append(jpegs[0], time.time(), [0.0, 1.0], 1)
    store.append(rgbs[0], time.time(), _motors(1), 1)
    store.close()
    assert len(read_recording(store.path)) == 2


def test_jpeg_size_reads_the_frame_header():
    from mxcube_autocenter.recording import jpeg_size

    assert jpeg_size(encode_jpeg(synthetic_frame(160, 128))) == (128, 160)
    ok, progressive = cv2.imencode(".jpg", np.zeros((30, 70, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and jpeg_size(progressive) == (30, 70)
    whole = encode_jpeg(synthetic_frame(160, 128))
    assert jpeg_size(b"\xff\xd8") is None and jpeg_size(whole[:12]) is None and jpeg_size(b"\0\0" + whole[2:]) is None


def test_the_writer_logs_to_the_logger_it_is_given(tmp_path, caplog):
    # MXCuBE's log handlers are on HWR: a hardware object gives its own logger, or the writer's warnings reach
    # neither the log file nor the web UI.
    _, jpegs = _frames(1)
    writer = RecordingWriter(lambda: FrameStore.create(tmp_path, "run", METADATA),
                             log=logging.getLogger("HWR.AutoCenter"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="HWR"):
        writer.submit(b"no jpeg", time.time(), _motors(0), 7)
        writer.submit(jpegs[0], time.time(), _motors(1), 8)
        summary = writer.close("complete")
    assert summary.frames_kept == 1
    assert [r.name for r in caplog.records if "camera frame 7 dropped" in r.message] == ["HWR.AutoCenter"]


def test_a_cause_of_dropped_frames_is_logged_once(tmp_path, caplog):
    # A camera that sends no JPEG sends none: each frame was a warning in MXCuBE's log. (No logger given: the module's.)
    _, jpegs = _frames(2)
    writer = RecordingWriter(lambda: FrameStore.create(tmp_path, "run", METADATA), max_queue=100, log=None)
    with caplog.at_level(logging.WARNING, logger="mxcube_autocenter.recording"):
        for k, frame in enumerate([jpegs[0], *[b"no jpeg"] * 40, jpegs[1], jpegs[1]]):
            writer.submit(frame, time.time(), _motors(k) if k < 41 else [0.0, 1.0], k)
        summary = writer.close("complete")
    assert (summary.status, summary.frames_kept, summary.frames_dropped) == ("complete", 1, 42)
    drops = [r.message for r in caplog.records if "dropped from" in r.message]
    assert len(drops) == 2 and "camera frame 1 dropped" in drops[0] and "camera frame 41 dropped" in drops[1]
    assert all("later frames dropped for this are only counted" in message for message in drops)


@pytest.mark.parametrize("storage", ["jpeg", "raw"])
def test_a_frame_size_change_ends_the_recording_failed_keeping_the_frames_before(tmp_path, storage):
    # A binning change mid-collection dropped every later frame, and the file said "complete" with no cause.
    rgbs, jpegs = _frames(3)
    smaller = synthetic_frame(64, 64)
    frames = [*jpegs[:2], encode_jpeg(smaller), jpegs[2]] if storage == "jpeg" else [*rgbs[:2], smaller, rgbs[2]]
    writer = RecordingWriter(lambda: FrameStore.create(tmp_path, "run", METADATA, storage=storage), log=None)
    for k, frame in enumerate(frames):
        writer.submit(frame, time.time(), _motors(k), k)
    summary = writer.close("complete")
    assert (summary.status, summary.frames_kept) == ("failed", 2)
    assert summary.error.startswith("camera frame is (64, 64, 3), the recording's frames (128, 160, 3) from camera "
                                    "frame 2 on: the camera's image size changed during the collection")
    recording = read_recording(summary.path)
    assert (recording.status, recording.error, len(recording.timestamps)) == ("failed", summary.error, 2)


def test_a_recording_that_keeps_no_frame_ends_failed_saying_why(tmp_path):
    # It ended "complete", of nothing to label, and nobody said why.
    causes = {
        "none": ([], None, "no frame kept: the camera sent none"),
        "refused": ([b"no jpeg"] * 3, None, "no frame kept: "),
        "dropped": ([], "reading the centring motors failed", "no frame kept: reading the centring motors failed"),
    }
    for name, (frames, dropped, error) in causes.items():
        writer = RecordingWriter(lambda name=name: FrameStore.create(tmp_path, name, METADATA), log=None)
        for k, frame in enumerate(frames):
            writer.submit(frame, time.time(), _motors(k), k)
        if dropped:
            writer.drop(dropped)
        summary = writer.close("complete")
        rec = read_recording(summary.path)
        assert (summary.status, summary.frames_kept, rec.status) == ("failed", 0, "failed"), name
        assert summary.error.startswith(error) and rec.error == summary.error, name
        assert summary.frames_dropped == len(frames) + bool(dropped), name


def test_a_writer_that_finishes_after_close_gave_up_says_how_the_file_ended(tmp_path, monkeypatch, caplog):
    import mxcube_autocenter.recording as recording

    class StuckStore(FrameStore):
        def append(self, *args):
            time.sleep(0.6)  # a hung network disk
            super().append(*args)

    monkeypatch.setattr(recording, "_CLOSE_GRACE_S", 0.0)
    _, jpegs = _frames(1)
    writer = RecordingWriter(lambda: StuckStore.create(tmp_path, "run", METADATA))
    writer.submit(jpegs[0], time.time(), _motors(0))
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="mxcube_autocenter.recording"):
        summary = writer.close("complete", timeout_s=0.1)
        assert summary.status == "recording" and "still writing" in summary.error
        writer._thread.join(5)
    assert not writer._thread.is_alive()
    assert f"{summary.path}: the writer finished after close() gave up on it; the file is closed as complete" in caplog.text
    assert read_recording(summary.path).status == "complete"


def test_writer_counts_dropped_frames(tmp_path):
    class SlowStore(FrameStore):
        def append(self, *args):
            time.sleep(0.02)
            super().append(*args)

    _, jpegs = _frames(1)
    writer = RecordingWriter(
        lambda: SlowStore.create(tmp_path, "run", METADATA), max_queue=2, max_frames=30
    )
    accepted = [writer.submit(jpegs[0], time.time(), _motors(k)) for k in range(200)]
    summary = writer.close("complete")
    assert summary.status == "complete" and summary.error is None
    assert summary.frames_kept == sum(accepted) <= 30
    assert summary.frames_dropped > 100
    assert summary.frames_kept + summary.frames_dropped == writer.frames_submitted == 200
    rec = read_recording(summary.path)
    assert (rec.frames_kept, rec.frames_dropped) == (summary.frames_kept, summary.frames_dropped)
    # Without a camera counter, frames are numbered in submission order: gaps are drops.
    assert list(rec.camera_frames) == [k for k, ok in enumerate(accepted) if ok]
    assert writer.submit(jpegs[0], time.time(), _motors(0)) is False


KILLED_WRITER = """
    import sys, time
    from mxcube_autocenter.recording import FrameStore, encode_jpeg, synthetic_frame
    directory, storage = sys.argv[1:]
    jpegs = [encode_jpeg(synthetic_frame(640, 512, seed=k)) for k in range(4)]
    store = FrameStore.create(directory, "killed", {"experiment_type": "OSC"},
                              storage=storage, flush_interval_s=0.1)
    print(store.path, flush=True)
    flushed = 0
    for k in range(100000):
        store.append(jpegs[k % 4], time.time(), [k, 0, 0, 0, 0], k)
        if store.frames_flushed != flushed:
            flushed = store.frames_flushed
            print(flushed, flush=True)
        time.sleep(0.005)
"""


@pytest.mark.parametrize("storage", ["jpeg", "raw"])
def test_killed_writer_leaves_a_readable_file(tmp_path, storage):
    process = _run_script(KILLED_WRITER, tmp_path, storage)
    path = process.stdout.readline().strip()
    flushed = [int(process.stdout.readline()) for _ in range(5)]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()

    rec = read_recording(path)
    assert rec.status == "recording" and rec.finished is None
    assert len(rec) >= flushed[-1] > flushed[0] > 0
    np.testing.assert_array_equal(rec.motor("omega"), np.arange(len(rec)))
    assert rec.frame(len(rec) - 1).shape == (512, 640, 3)
    assert "the writer stopped without closing the file" in summarise(path)


KILLED_IN_A_FLUSH = """
    import os, sys, time
    from mxcube_autocenter import recording
    directory, storage, flushed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jpegs = [recording.encode_jpeg(recording.synthetic_frame(160, 128, seed=k)) for k in range(8)]
    written = recording._GuardedFile.write
    for kill_at in range(1, 100):
        child = os.fork()
        if child == 0:
            store = recording.FrameStore.create(directory, f"killed_{kill_at}", {"experiment_type": "OSC"},
                                                storage=storage, flush_interval_s=1e9)
            for k in range(flushed + 1):
                if k == flushed:
                    store.flush()
                store.append(jpegs[k % 8], time.time(), [k, 0, 0, 0, 0], k)
            writes = []

            def write(self, data):  # the process killed at this write of the next flush
                writes.append(len(data))
                if len(writes) == kill_at:
                    os._exit(0)
                return written(self, data)

            recording._GuardedFile.write = write
            store.flush()
            os._exit(3)  # that flush had fewer writes: done
        if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 3:
            break
    print(kill_at - 1)
"""


def _killed_in_every_write_of_a_flush(directory, storage, flushed):
    """Recordings of ``flushed`` frames flushed, then one more, each killed at another write of the next flush."""
    process = _run_script(KILLED_IN_A_FLUSH, directory, storage, flushed)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    writes = int(process.stdout.read())
    assert writes >= 5
    return [directory / f"killed_{k}.h5" for k in range(1, writes + 1)]


# Raw storage: the 65th frame's flush splits HDF5's index of the frames, which it rewrites in place; JPEG
# storage: every flush rewrites the heap of the last frames' images.
@pytest.mark.parametrize(("storage", "flushed"), [("raw", 64), ("jpeg", 350)])
def test_a_writer_killed_anywhere_in_a_flush_leaves_the_recording_as_at_the_flush_before(tmp_path, storage, flushed):
    # Without the undo journal, killed in 3 of the raw flush's 10 writes, not one frame could be read.
    _, jpegs = _frames(8)
    for path in _killed_in_every_write_of_a_flush(tmp_path, storage, flushed):
        assert journal_path(path).exists()
        rec = read_recording(path)
        assert rec.status == "recording" and len(rec) == flushed, path
        np.testing.assert_array_equal(rec.motor("omega"), np.arange(flushed))
        with rec.reader() as frame:
            for i in range(flushed):
                np.testing.assert_array_equal(frame(i), decode_jpeg(jpegs[i % 8]))
        assert rec.frame(flushed - 1).shape == (128, 160, 3)
        assert f"read as at its last flush through {path.name}.undo" in summarise(path)


def test_the_undo_journal_keeps_each_place_once_per_flush(tmp_path):
    # Every frame rewrites the chunks of the per-frame datasets: journaled at each write, they made a journal
    # four times the size of the recording, which a full disk or a quota then hit first.
    _, jpegs = _frames(8)
    store = FrameStore.create(tmp_path, "run", METADATA, flush_interval_s=1e9)
    journal = journal_path(store.path)
    sizes = []
    for k in range(200):
        store.append(jpegs[k % 8], time.time(), _motors(k), k)
        if k % 50 == 49:
            sizes.append(journal.stat().st_size)
            store.flush()
            assert journal.stat().st_size == 16  # its header alone
        elif k % 50 == 9:
            sizes.append(journal.stat().st_size)
    store.close()
    assert not journal.exists()
    assert sizes[1] == sizes[0] and sizes[3] == sizes[2]  # 40 frames more, no byte more
    assert max(sizes) < 0.5 * store.path.stat().st_size


def test_a_killed_writer_s_recording_copied_without_its_journal_loses_frames_not_the_recording(tmp_path):
    # HDF5 rewrites the last flushed frames' heap before it moves the file's end: those read "actual len exceeds
    # EOA", which was a RecordingError of the whole recording, and labelling and the contact sheet gave up on it.
    damaged = []
    for path in _killed_in_every_write_of_a_flush(tmp_path, "jpeg", 350):
        journal_path(path).unlink()
        rec = read_recording(path)
        assert rec.status == "recording" and len(rec) == 350
        unreadable = []
        with rec.reader() as frame:
            for i in range(len(rec)):
                try:
                    frame(i)
                except CorruptFrameError as err:
                    unreadable.append(i)
                    assert "cannot be read" in str(err)
        assert not unreadable or min(unreadable) >= 340  # some of the last frames flushed before
        if unreadable:
            damaged.append(path)
            contact_sheet(path, tmp_path / "sheet.png")
            assert (tmp_path / "sheet.png").stat().st_size > 0
    assert damaged


def test_a_recording_reads_without_a_file_lock(tmp_path):
    """NFS without lock support refuses every lock; the writer takes none, so readers need none either."""
    _, jpegs = _frames(1)
    store = FrameStore.create(tmp_path, "run", METADATA)
    store.append(jpegs[0], time.time(), _motors(0), 0)
    store.close()
    with open(store.path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # no shared lock can be had now, as on such a file system
        rec = read_recording(store.path)
        assert (rec.status, len(rec)) == ("complete", 1)
        assert rec.frame(0).shape == (128, 160, 3)


def test_unwritable_directory(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    directory = tmp_path / "afile" / "sub"
    with pytest.raises(RecordingError, match=f"{re.escape(str(directory))}.*record_directory"):
        FrameStore.create(directory, "run", METADATA)

    messages = []
    writer = RecordingWriter(
        lambda: FrameStore.create(directory, "run", METADATA), on_error=messages.append
    )
    deadline = time.monotonic() + 10
    while writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.submit(b"\xff\xd8", time.time(), _motors(0)) is False
    summary = writer.close()
    assert len(messages) == 1 and str(directory) in messages[0]
    assert (summary.path, summary.status, summary.error) == (None, "failed", messages[0])
    assert summary.frames_dropped == 1


def test_too_little_free_space(tmp_path):
    with pytest.raises(RecordingError, match=f"disk almost full.*{re.escape(str(tmp_path))}"):
        FrameStore.create(tmp_path, "run", METADATA, min_free_mb=1e12)

    _, jpegs = _frames(1)
    messages = []
    store = FrameStore.create(tmp_path, "run", METADATA, flush_interval_s=0.05)
    writer = RecordingWriter(store, on_error=messages.append)
    writer.submit(jpegs[0], time.time(), _motors(0))
    store.min_free_mb = 1e12  # the disk fills up during the collection
    deadline = time.monotonic() + 10
    while writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    summary = writer.close()
    assert len(messages) == 1 and str(store.path) in messages[0]
    assert "free space or set record_directory" in messages[0]
    rec = read_recording(store.path)
    assert (rec.status, rec.error, summary.status) == ("failed", messages[0], "failed")


def test_a_full_disk_reported_only_at_fsync_stops_the_recording(tmp_path, monkeypatch):
    """NFS reports a full disk or quota at fsync (or close), not at the write: each flush must ask."""
    _, jpegs = _frames(2)
    store = FrameStore.create(tmp_path, "run", METADATA, flush_interval_s=0.05)
    store.append(jpegs[0], time.time(), _motors(0), 0)
    store.flush()

    def quota_exceeded(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", quota_exceeded)
    messages = []
    writer = RecordingWriter(store, on_error=messages.append)
    writer.submit(jpegs[1], time.time(), _motors(1))
    deadline = time.monotonic() + 5
    while writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    summary = writer.close()
    monkeypatch.undo()
    assert messages == [f"disk quota exceeded while writing {store.path}: free space or set record_directory"]
    assert (summary.status, summary.frames_kept, summary.frames_dropped) == ("failed", 1, 1)
    rec = read_recording(store.path)
    assert (rec.status, len(rec)) == ("recording", 1)
    assert rec.frame(0).shape == (128, 160, 3)


FULL_DISK_WRITER = """
    import json, resource, signal, sys, time
    from mxcube_autocenter.recording import (
        FrameStore, RecordingWriter, encode_jpeg, synthetic_frame)
    directory = sys.argv[1]
    jpeg = encode_jpeg(synthetic_frame())
    messages = []
    writer = RecordingWriter(
        lambda: FrameStore.create(directory, "full", {"experiment_type": "OSC"},
                                  flush_interval_s=0.05),
        on_error=messages.append)
    # The file may grow to 2 MB; past that, writes fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
    for k in range(40):
        writer.submit(jpeg, time.time(), [k, 0, 0, 0, 0])
        time.sleep(0.02)
    after = writer.submit(jpeg, time.time(), [40, 0, 0, 0, 0])
    summary = writer.close()
    print(json.dumps({"messages": messages, "after": after, "path": str(summary.path),
                      "status": summary.status, "error": summary.error,
                      "kept": summary.frames_kept, "dropped": summary.frames_dropped}))
"""


def test_full_disk_stops_the_recording(tmp_path):
    process = _run_script(FULL_DISK_WRITER, tmp_path)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    result = json.loads(out)
    assert len(result["messages"]) == 1
    assert "file size limit reached while writing" in result["messages"][0]
    assert result["path"] in result["messages"][0]
    assert result["after"] is False
    assert (result["status"], result["error"]) == ("failed", result["messages"][0])
    assert result["kept"] + result["dropped"] == 41
    assert 0 < result["kept"] < 15
    # The file is put back as at its last flush, and that stays readable, with no journal left to read it so.
    assert not journal_path(result["path"]).exists()
    rec = read_recording(result["path"])
    assert rec.status == "recording" and len(rec) == result["kept"] > 0
    assert rec.frame(len(rec) - 1).shape == (1024, 1280, 3)


@pytest.mark.parametrize("storage", ["jpeg", "raw"])
def test_event_loop_stays_responsive(tmp_path, storage):
    jpeg = encode_jpeg(synthetic_frame())
    writer = RecordingWriter(lambda: FrameStore.create(tmp_path, "run", METADATA, storage=storage))

    def camera():
        start = time.monotonic()
        for k in range(50):  # 2 s at 25 fps
            writer.submit(jpeg, time.time(), _motors(k))
            gevent.sleep(max(0.0, start + (k + 1) / 25 - time.monotonic()))

    gaps = Gaps()
    ticker = gevent.spawn(tick, gaps)
    gevent.spawn(camera).join()
    ticker.kill()
    summary = writer.close()
    assert_responsive(gaps)
    assert summary.status == "complete" and summary.frames_kept > 0
    assert summary.frames_kept + summary.frames_dropped == 50


def test_benchmark_counts_the_frames_a_slow_writer_writes_at_the_rate_it_writes_them(monkeypatch):
    # A writer at about 12 frames/s under a 25 fps camera: the queue (50) takes the
    # backlog of a 1 s feed, and close writes it; record_fps must not read 25.
    from gevent import monkey

    from mxcube_autocenter import recording

    real_sleep, real_append, real_feed = monkey.get_original("time", "sleep"), FrameStore.append, recording._feed

    def slow_append(self, *args):
        real_sleep(0.08)
        return real_append(self, *args)

    monkeypatch.setattr(FrameStore, "append", slow_append)
    monkeypatch.setattr(recording, "_feed", lambda writer, jpeg, fps, duration_s: real_feed(writer, jpeg, fps, 1.0))
    figures = recording.benchmark(quick=True)
    assert figures["record_dropped_pct"] == 0.0
    assert figures["record_fps"] < 16


def test_summary_and_contact_sheet(tmp_path):
    _, jpegs = _frames(6, width=640, height=512)
    metadata = dict(METADATA, beam_position=[320, 256])
    store = FrameStore.create(tmp_path, "run", metadata)
    for k in range(20):
        store.append(jpegs[k % 6], 1.7e9 + 0.1 * k, _motors(k), k)
    store.frames_dropped = 5
    store.close("complete")

    text = summarise(store.path)
    for expected in (
        "complete",
        "20 kept, 5 dropped (20.0 %)",
        "1.90 s, 10.0 frames/s",
        "Helical",
        METADATA["master_file"],
        "omega        0.000 to 9.500 deg",
        "sampy        not recorded",
        "camera       zoom ",  # the scale and beam as `heatmap` takes them: "[320, 256]" was refused there
        "--pixels-per-mm 1480.5 --beam 320,256 (as the heatmap command takes them)",
    ):
        assert expected in text

    sheet = contact_sheet(store.path, tmp_path / "sheet.png", n=6, columns=4, tile_width=160)
    image = cv2.imread(str(sheet))
    assert image.shape == (2 * 128, 4 * 160, 3)
    # The red beam cross (BGR) at the beam position of the first tile.
    assert tuple(image[64, 80]) == (0, 0, 255)
    assert not image[128:, 320:].any()  # the two unused tiles stay black

    # A corrupt frame is drawn as such; the others are still shown.
    damaged = FrameStore.create(tmp_path, "damaged", metadata)
    corrupt = b"\xff\xd8" + bytes(100)
    for k, jpeg in enumerate([jpegs[0], corrupt, jpegs[1]]):
        damaged.append(jpeg, 1.7e9 + 0.1 * k, _motors(k), k)
    damaged.close("complete")
    image = cv2.imread(str(contact_sheet(damaged.path, tmp_path / "damaged.png", n=3, columns=3, tile_width=160)))
    assert image.shape == (128, 3 * 160, 3)
    assert tuple(image[100, 240]) == (96, 96, 96) and tuple(image[64, 80]) == (0, 0, 255)
    hopeless = FrameStore.create(tmp_path, "hopeless", metadata)
    hopeless.append(corrupt, 1.7e9, _motors(0), 0)
    hopeless.close("complete")
    with pytest.raises(RecordingError, match="none of the 1 frames picked for the sheet can be decoded"):
        contact_sheet(hopeless.path, tmp_path / "hopeless.png")

    # A beam position that reads no number (an uncalibrated zoom) is not marked; it was a traceback.
    uncalibrated = FrameStore.create(tmp_path, "uncalibrated", dict(metadata, beam_position=[np.nan, np.nan]))
    uncalibrated.append(jpegs[0], 1.7e9, _motors(0), 0)
    uncalibrated.close("complete")
    image = cv2.imread(str(contact_sheet(uncalibrated.path, tmp_path / "uncalibrated.png", n=1, columns=1,
                                         tile_width=160)))  # fmt: skip
    assert image.shape == (128, 160, 3) and tuple(image[64, 80]) != (0, 0, 255)


def test_unreadable_inputs(tmp_path):
    h5py.File(tmp_path / "other.h5", "w").close()
    with pytest.raises(RecordingError, match="other.h5 is not a camera recording"):
        read_recording(tmp_path / "other.h5")
    with pytest.raises(RecordingError, match="missing.h5.*check the path"):
        read_recording(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "set.h5", "w") as h5file:
        h5file.attrs["format_version"] = 1
        h5file.create_group("rows")
    with pytest.raises(RecordingError, match="set.h5 is not a camera recording \\(a training set: pass it to train"):
        read_recording(tmp_path / "set.h5")
    with h5py.File(tmp_path / "partial.h5", "w") as h5file:  # a recording's outline without its bookkeeping
        h5file.attrs["format_version"] = 1
        h5file.create_group("frames")
    with pytest.raises(RecordingError, match="partial.h5 is an incomplete camera recording \\(no status, storage"):
        read_recording(tmp_path / "partial.h5")
    with pytest.raises(ValueError, match="JPEG"):
        decode_jpeg(b"not a jpeg")


def test_a_recording_still_open_when_the_program_ends_is_closed_as_aborted(tmp_path):
    # MXCuBE stopped during a collection: HDF5's own exit handler closed the file after Python had gone, and the
    # process crashed (SIGSEGV, exit 139), leaving the file "recording".
    script = textwrap.dedent(f"""
        import time
        from gevent import monkey; monkey.patch_all(thread=False)
        import gevent
        from mxcube_autocenter.recording import FrameStore, RecordingWriter, encode_jpeg, synthetic_frame
        jpeg = encode_jpeg(synthetic_frame())
        writer = RecordingWriter(lambda: FrameStore.create({str(tmp_path)!r}, "run", {{"experiment_type": "OSC"}}))
        for k in range(10):
            writer.submit(jpeg, time.time(), (k, 0, 0, 0, 0))
            gevent.sleep(0.02)
    """)
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 0, ended.stderr[-2000:]
    (path,) = tmp_path.glob("*.h5")
    recording = read_recording(path)
    assert recording.status == "aborted" and len(recording.timestamps) == 10


def test_a_recording_read_as_its_writer_grows_it_is_tried_again(tmp_path, monkeypatch):
    # `inspect` during a collection: an open between the writer's growth of the file and its flush failed with
    # "truncated file: eof=... stored_eof=..." (1 of 3150 reads).
    from mxcube_autocenter import recording

    store = FrameStore.create(tmp_path, "run", METADATA)
    _, jpegs = _frames(2)
    store.append(jpegs[0], 1.7e9, _motors(0), 0)
    store.close("complete")
    real, failures = h5py.File, []

    def growing(*args, **kwargs):
        if len(failures) < 2:
            failures.append(args[0])
            raise OSError("Unable to synchronously open file (truncated file: eof = 23003136, sblock->base_addr = 0, "
                          "stored_eof = 23025328)")  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(recording.h5py, "File", growing)
    assert len(read_recording(store.path).timestamps) == 1 and len(failures) == 2
    failures.clear()
    with read_recording(store.path).reader() as frame:
        assert frame(0).shape[2] == 3
