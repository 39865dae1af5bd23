"""A goniometer motor that moves in simulated time and can be told to fail."""

from __future__ import annotations

import time

import gevent
from mxcubecore.HardwareObjects.mockup.MotorMockup import MotorMockup

FAULTS = ("fail", "timeout")
_STEP_S = 0.02  # between reported positions, as MotorMockup


class VirtualMotor(MotorMockup):
    """MotorMockup with a configured speed and injectable faults.

    XML properties: ``velocity`` (units/s, MD3-like: a few mm/s for the
    centring table, ~100 deg/s for omega), ``default_limits`` and the usual
    actuator properties.
    """

    def __init__(self, name):
        super().__init__(name)
        self._fault = None
        # MotorMockup.__init__ skips ActuatorMockup.__init__, which creates the
        # move task that abort() reads: without it, aborting a motor that has
        # not yet moved without waiting raises AttributeError (as a failed
        # centring straight after boot did).
        self._ActuatorMockup__move_task = None

    def init(self):
        super().init()
        velocity = self.get_property("velocity")
        if velocity:
            self.set_velocity(float(velocity))

    def inject_fault(self, kind: str | None, after_s: float = 0.0):
        """Make the next move fail or hang, for fault tests.

        Parameters
        ----------
        kind : {"fail", "timeout"} or None
            ``"fail"`` stops and raises after ``after_s`` of motion (at the
            target if the move is shorter); ``"timeout"`` stops there and
            never reports arrival; None clears the fault.
        after_s : float
            Seconds of normal motion before the fault strikes.
        """
        if kind is not None and kind not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS} or None, not {kind!r}")
        self._fault = None if kind is None else (kind, after_s)

    def _move(self, value):
        if self._fault is None:
            self._ramp(value)
            return super()._move(value)  # already there: only its end-of-move states
        kind, after_s = self._fault
        self._fault = None
        # Normal motion first: the fault strikes part-way (a move shorter than after_s gets there first).
        self._ramp(value, stop_after_s=after_s)
        if kind == "timeout":
            gevent.sleep(1e9)
        # A stalled move: the motor stops where it is and reports the error.
        self.update_state(self.STATES.READY)
        raise RuntimeError(f"{self.username}: simulated motor fault")

    def _ramp(self, target: float, stop_after_s: float = float("inf")):
        """Move at the configured velocity, reporting positions on the way.

        MotorMockup's own loop computes each position after its sleep, so it
        reports (and the camera films) up to a step beyond the target, and so
        beyond a limit; here no position leaves the segment to the target.
        ``stop_after_s`` stops the motion where it is after that many seconds.
        """
        start = self.get_value()
        duration = abs(target - start) / self.get_velocity()
        stop = min(stop_after_s, duration)  # a late wake-up must not carry a stopped move on to the target
        self.update_specific_state(self.SPECIFIC_STATES.MOVING)
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < stop:
            self.update_value(start + (target - start) * elapsed / duration)
            gevent.sleep(_STEP_S)
        self.update_value(target if stop >= duration else start + (target - start) * stop / duration)
