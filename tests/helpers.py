"""Shared test helpers: signal recording and event-loop responsiveness."""

import time

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


def tick(gaps, period=0.005):
    """Measure the gevent loop's responsiveness: append each gap between wake-ups (s)."""
    last = time.monotonic()
    while True:
        gevent.sleep(period)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
