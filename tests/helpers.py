"""Shared test helpers: signal recording, event-loop responsiveness and damaged HDF5 files."""

import time
from pathlib import Path

import gevent


class SignalLog:
    """Records the signals of a hardware object (slots are held by weak reference)."""

    def __init__(self, hwobj, *signals):
        self.calls = []
        self.times = []
        self._slots = {}
        for name in signals:
            self._slots[name] = self._make_slot(name)
            hwobj.connect(name, self._slots[name])

    def _make_slot(self, name):
        def slot(*args, **kwargs):
            self.calls.append((name, args))
            self.times.append(time.time())

        return slot

    def names(self):
        return [name for name, _ in self.calls]

    def wait_for(self, name, timeout=30):
        with gevent.Timeout(timeout, AssertionError(f"no {name} signal within {timeout} s")):
            while name not in self.names():
                gevent.sleep(0.02)


class Gaps:
    """Gaps between the event loop's wake-ups (s): on the wall clock, and in CPU time of the loop's thread."""

    def __init__(self):
        self.wall = []
        self.cpu = []


def tick(gaps, period=0.005):
    """Measure the gevent loop's responsiveness: append each gap between wake-ups to ``gaps`` (a :class:`Gaps`)."""
    last, last_cpu = time.monotonic(), time.thread_time()
    while True:
        gevent.sleep(period)
        now, cpu = time.monotonic(), time.thread_time()
        gaps.wall.append(now - last)
        gaps.cpu.append(cpu - last_cpu)
        last, last_cpu = now, cpu


def assert_responsive(gaps, limit=0.1, wall_limit=0.5):
    """The event loop never stalled: no work on it took ``limit`` seconds between two wake-ups.

    Work on the loop (rendering, encoding, a full garbage collection) is CPU
    time of the loop's thread, whatever else the machine runs; a wall-clock
    gap also counts the time the OS gave to other processes, and on a loaded
    2-core machine that alone passed 0.1 s (107 ms with 2 ms of CPU). The
    wall clock is still held to ``wall_limit``: a loop kept waiting (for the
    GIL, a lock) for that long is no scheduling noise.
    """
    assert gaps.cpu and max(gaps.cpu) < limit, f"the event loop worked {max(gaps.cpu) * 1000:.0f} ms without a break"
    assert max(gaps.wall) < wall_limit, f"the event loop stalled {max(gaps.wall) * 1000:.0f} ms"


# Signatures of HDF5 structures that hold a group together: its B-tree, local heap and symbol table nodes.
# h5py reports a damaged one as RuntimeError or KeyError, not OSError.
GROUP_SIGNATURES = (b"TREE", b"HEAP", b"SNOD")


def damaged_copy(path, signature: bytes, out) -> Path:
    """A copy of the HDF5 file ``path`` at ``out`` whose first ``signature`` is overwritten (a bit flip, a bad copy)."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(signature)
    data[at : at + len(signature)] = b"X" * len(signature)
    Path(out).write_bytes(bytes(data))
    return Path(out)
