"""A goniometer motor that moves in simulated time and can be told to fail."""

from __future__ import annotations

import time

import gevent
from mxcubecore.HardwareObjects.mockup.MotorMockup import MotorMockup

from mxcube_autocenter.simulation import properties

FAULTS = ("fail", "timeout", "unreadable")
_STEP_S = 0.02  # between reported positions, as MotorMockup


class VirtualMotor(MotorMockup):
    """MotorMockup with a configured speed, an MD3's read latency and injectable faults.

    XML properties: ``velocity`` (units/s, MD3-like: a few mm/s for the
    centring table, ~100 deg/s for omega), ``default_limits`` and the usual
    actuator properties.
    """

    def __init__(self, name):
        super().__init__(name)
        self._fault = None
        self._move_task = None
        self._unreadable = False
        self.read_latency_s = 0.0

    def set_read_latency(self, seconds: float):
        """Make each :meth:`get_value` wait ``seconds`` first, as an MD3's does.

        mxcubecore's ExporterMotor reads its position with a request to the
        MD3 server: a network wait, during which other greenlets run. The
        camera and the simulation see the motor where it is
        (:meth:`reading`), without it.
        """
        self.read_latency_s = float(seconds)

    def init(self):
        super().init()
        if self.get_property("velocity") is not None:
            self.set_velocity(properties.number(self, "velocity", None, low=1e-6, unit="units/s"))

    def inject_fault(self, kind: str | None, after_s: float = 0.0):
        """Make the next move fail, hang or leave the motor unreadable, for fault tests.

        Parameters
        ----------
        kind : {"fail", "timeout", "unreadable"} or None
            ``"fail"`` stops and raises after ``after_s`` of motion (at the
            target if the move is shorter); ``"timeout"`` stops there and
            never reports arrival; ``"unreadable"`` ends the move normally,
            then the motor reads None until another move begins (as
            mxcubecore's ExporterMotor does until its next good reading from
            an MD3); None clears the fault.
        after_s : float
            Seconds of normal motion before a "fail" or "timeout" strikes.
        """
        if kind is not None and kind not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS} or None, not {kind!r}")
        self._fault = None if kind is None else (kind, after_s)
        self._unreadable = self._unreadable and kind is not None

    def set_value(self, value, timeout=0):
        """Move to ``value``; as on an MD3, a new move replaces the one under way.

        ActuatorMockup moves in the caller's greenlet when it waits, and keeps
        an earlier move running beside a new one: the motor reported ready at
        the new target, then the old move carried it on, and ``abort`` could
        not stop either. Here every move is the motor's own task, waited for
        unless ``timeout`` is 0, and ``abort`` stops it whoever started it.

        Parameters
        ----------
        value : float
            Target position.
        timeout : float or None
            Seconds to wait for the end of the move (None: no limit; 0: do not
            wait). A move that times out goes on, as a real motor's would.

        Raises
        ------
        ValueError
            Outside the limits, or the motor is read-only.
        RuntimeError
            Time-out, or an injected fault.
        """
        if self.read_only:
            raise ValueError("Attempt to set value for read-only Actuator")
        if not self.validate_value(value):
            raise ValueError(f"Invalid value {value}; limits are {self.get_limits()}")
        if self._move_task is not None:
            self._move_task.kill()
        self._unreadable = False
        self.update_state(self.STATES.BUSY)
        task = self._move_task = gevent.spawn(self._move, value)
        task.link(self._move_ended)
        if timeout == 0:
            return
        with gevent.Timeout(timeout, RuntimeError(f"Motor {self.username} timed out")):
            task.join()
        if task.exception is not None:
            raise task.exception

    def abort(self):
        """Stop the move where the motor is."""
        if self._move_task is not None:
            self._move_task.kill()
        self.update_state(self.STATES.READY)

    def get_value(self):
        # A client's read waits; the move's own task (MotorMockup's code reads the position) sees where it is.
        if self.read_latency_s and gevent.getcurrent() is not self._move_task:
            gevent.sleep(self.read_latency_s)
        return self.reading()

    def reading(self):
        """The position now, without a request's latency (None while the "unreadable" fault lasts)."""
        return None if self._unreadable else super().get_value()

    def _move_ended(self, task):
        # A failed move raised to whoever waits for it (or logged by gevent); a killed one was replaced or aborted.
        if task.successful() and not isinstance(task.value, gevent.GreenletExit):
            self._set_value(task.value)
            if self._fault is not None and self._fault[0] == "unreadable":
                self._fault, self._unreadable = None, True

    def _move(self, value):
        if self._fault is None or self._fault[0] == "unreadable":
            self._ramp(value)
            return super()._move(value)  # already there: only its end-of-move states
        kind, after_s = self._fault
        self._fault = None
        # Normal motion first: the fault strikes part-way (a move shorter than after_s gets there first).
        self._ramp(value, stop_after_s=after_s)
        if kind == "timeout":
            gevent.sleep(1e9)
        # A stalled move: the motor stops where it is, in FAULT as an MD3's (ExporterMotor) reads, until the next
        # move or an abort; READY here let a simultaneous move (no caller waiting on this motor) end as a success.
        self.update_state(self.STATES.FAULT)
        raise RuntimeError(f"{self.username}: simulated motor fault")

    def _ramp(self, target: float, stop_after_s: float = float("inf")):
        """Move at the configured velocity, reporting positions on the way.

        MotorMockup's own loop computes each position after its sleep, so it
        reports (and the camera films) up to a step beyond the target, and so
        beyond a limit; here no position leaves the segment to the target.
        ``stop_after_s`` stops the motion where it is after that many seconds.
        """
        start = self.reading()
        duration = abs(target - start) / self.get_velocity()
        stop = min(stop_after_s, duration)  # a late wake-up must not carry a stopped move on to the target
        self.update_specific_state(self.SPECIFIC_STATES.MOVING)
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < stop:
            self.update_value(start + (target - start) * elapsed / duration)
            gevent.sleep(_STEP_S)
        end = target if stop >= duration else start + (target - start) * stop / duration
        # Exactly there, even within the tolerance of the last report (update_value would skip it, and
        # MotorMockup._move would then cover the rest at full speed in one 20 ms step, far past it).
        if end != self._nominal_value:
            self._nominal_value = end
            self.emit("valueChanged", (end,))
