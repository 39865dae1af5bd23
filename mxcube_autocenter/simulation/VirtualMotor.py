"""A goniometer motor that moves in simulated time and can be told to fail."""

from __future__ import annotations

import gevent
from mxcubecore.HardwareObjects.mockup.MotorMockup import MotorMockup

FAULTS = ("fail", "timeout")


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
            ``"fail"`` raises after ``after_s`` of motion; ``"timeout"`` never
            arrives; None clears the fault.
        after_s : float
            Seconds of normal motion before the fault strikes.
        """
        if kind is not None and kind not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS} or None, not {kind!r}")
        self._fault = None if kind is None else (kind, after_s)

    def _move(self, value):
        if self._fault is None:
            return super()._move(value)
        kind, after_s = self._fault
        self._fault = None
        gevent.sleep(after_s)
        if kind == "timeout":
            gevent.sleep(1e9)
        # A stalled move: the motor stops where it is and reports the error.
        self.update_state(self.STATES.READY)
        raise RuntimeError(f"{self.username}: simulated motor fault")
