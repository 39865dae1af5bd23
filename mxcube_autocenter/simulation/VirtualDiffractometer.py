"""An MD3-like diffractometer whose image scale follows the zoom."""

from __future__ import annotations

import ast
import contextlib
import math

import gevent
import gevent.event
from mxcubecore.HardwareObjects.abstract.AbstractDiffractometer import (
    AbstractDiffractometer,
    DiffractometerConstraint,
    DiffractometerHead,
    DiffractometerPhase,
)
from mxcubecore.HardwareObjects.mockup.DiffractometerMockup import DiffractometerMockup

from mxcube_autocenter.geometry import sample_frame
from mxcube_autocenter.simulation import properties
from mxcube_autocenter.simulation.VirtualMotor import VirtualMotor

# MD3 on-axis camera scales at its zoom levels, pixels per micrometre.
DEFAULT_PIXELS_PER_UM = (0.5, 0.8, 1.3, 2.0, 3.0, 4.2, 6.0)


class VirtualDiffractometer(DiffractometerMockup):
    """DiffractometerMockup with zoom-dependent pixels_per_mm and motors at rest.

    XML properties: ``pixels_per_um``, the scale at each zoom level (level 1
    first), pixels per micrometre; ``motor_directions``, how each centring
    motor's reading runs against the simulated sample (+1 or -1 by role,
    default +1: a goniometer wired like SampleView's ``motor_directions`` of a
    real one); ``rotation_axis_phiz`` (mm, default 0), the phiz reading at
    which the rotation axis crosses the beam, as an MD3's calibrated
    AlignmentZ (SampleView's ``centring_reference_position`` of phiz on a
    real beamline).

    Attribute ``ready_before_arrival`` (False): :meth:`set_value_motors`
    returns once the moves are started, before the motors arrive, as an MD3
    (mxcubecore's MicroDiffractometer) may: its state can read Ready just
    before its motors start; with ``start_latency_s`` (0) the motors start
    that long after it has returned, still reading Ready meanwhile. ``phase_change_s`` (0): how long a phase change
    takes, :meth:`set_phase` blocking meanwhile, as an MD3's does (its own
    time-out is 600 s). :meth:`busy_for` makes it busy with a task of its own
    for a while, as an MD3 after a mount, and :meth:`wait_status_ready` waits
    it out as an MD3's does (DiffractometerMockup's returns at once).
    """

    ready_before_arrival = False
    start_latency_s = 0.0
    phase_change_s = 0.0

    def init(self):
        # The mockup parks every motor at a random position; a virtual MD3 starts at rest.
        AbstractDiffractometer.init(self)
        self.head_type = DiffractometerHead.MINI_KAPPA
        self.current_phase = DiffractometerPhase.CENTRE
        self.current_constraint = DiffractometerConstraint.RELEASE
        self.pixels_per_um = self._zoom_scales()
        directions = self.get_property("motor_directions", {})
        self.motor_directions = ast.literal_eval(directions) if isinstance(directions, str) else dict(directions)
        self.rotation_axis_phiz = properties.number(self, "rotation_axis_phiz", 0.0, unit="mm")
        self._idle, self._task = gevent.event.Event(), None  # not busy with a task of its own (busy_for)
        self._late_start = None  # a move waiting out start_latency_s
        self._idle.set()
        self.update_state(self.STATES.READY)

    def _zoom_scales(self) -> tuple:
        scales = self.get_property("pixels_per_um", DEFAULT_PIXELS_PER_UM)
        try:
            scales = tuple(float(s) for s in (ast.literal_eval(scales) if isinstance(scales, str) else scales))
        except (SyntaxError, TypeError, ValueError):
            scales = ()
        # An on-axis camera shows 0.01 to 100 pixels per um: a scale in px/mm (500000) would pass otherwise.
        if not scales or not all(0.01 <= s <= 100.0 for s in scales):
            raise ValueError(f"{self.load_name}: pixels_per_um = {self.get_property('pixels_per_um')!r}: give the "
                             "scale of each zoom level, pixels per micrometre (0.01 to 100), e.g. [0.5, 1.0, 2.0], "
                             "in its XML file")  # fmt: skip
        return scales

    def busy_for(self, seconds: float):
        """Busy with a task of its own for ``seconds`` (``math.inf``: until :meth:`abort`), then Ready again."""
        if self._task is not None:
            self._task.kill()
        self._idle.clear()
        self.update_state(self.STATES.BUSY)
        self._task = gevent.spawn_later(seconds, self._task_done) if math.isfinite(seconds) else None

    def _task_done(self):
        self._task = None
        self._idle.set()
        self.update_state(self.STATES.READY)

    def abort(self):
        self._cancel_late_start()
        if self._task is not None:
            self._task.kill()
        self._task_done()

    def wait_status_ready(self, timeout: float | None = None):
        """Wait while busy with a task of its own (:meth:`busy_for`); ``RuntimeError`` after ``timeout`` s.

        Motor moves are not waited for here: DiffractometerMockup's state stays Busy after a move, and
        SampleView waits for Ready inside the motors' own signals, so the move would wait for itself.
        """
        if not self._idle.wait(timeout):
            raise RuntimeError("Timeout waiting for status ready")

    def _set_phase(self, value: DiffractometerPhase):
        gevent.sleep(self.phase_change_s)
        super()._set_phase(value)

    def set_value_motors(self, motors_positions_dict: dict, simultaneous: bool = True, timeout: float | None = None):
        if not self.ready_before_arrival:
            return super().set_value_motors(motors_positions_dict, simultaneous=simultaneous, timeout=timeout)
        motors = self.get_motors()
        for name, value in motors_positions_dict.items():
            if not motors[name].validate_value(value):  # refused now, as without a latency
                raise ValueError(f"Invalid value {value}; limits are {motors[name].get_limits()}")

        def start():
            for name, value in motors_positions_dict.items():
                motors[name].set_value(value, timeout=0)

        self._cancel_late_start()
        if self.start_latency_s > 0:
            self._late_start = gevent.spawn_later(self.start_latency_s, start)
        else:
            start()
        return None

    def _cancel_late_start(self):
        """A move still waiting out ``start_latency_s`` never starts: a stop, or the next move, replaces it."""
        if self._late_start is not None:
            self._late_start.kill()
            self._late_start = None

    def get_motors(self):
        """The motors by role, as an MD3 gives them: without those whose state is UNKNOWN or OFF.

        mxcubecore's MicroDiffractometer leaves out the motors its server reports Unknown or Disable.
        """
        return {role: motor for role, motor in self.all_motors().items()
                if motor.get_state() not in (motor.STATES.UNKNOWN, motor.STATES.OFF)}  # fmt: skip

    def all_motors(self):
        """Every motor by role, whatever its state: where the simulated sample is."""
        return super().get_motors()

    @contextlib.contextmanager
    def read_latency(self, seconds: float):
        """Every motor read over a network that answers in ``seconds`` while the context lasts, as an MD3's
        exporter requests (``VirtualMotor.set_read_latency``)."""
        motors = [motor for motor in self.all_motors().values() if isinstance(motor, VirtualMotor)]
        for motor in motors:
            motor.set_read_latency(seconds)
        try:
            yield
        finally:
            for motor in motors:
                motor.set_read_latency(0.0)

    def sample_frame(self, readings: dict) -> dict:
        """Motor readings as the simulated sample moves with them (geometry.py), for the camera and collections.

        phiz is counted from ``rotation_axis_phiz``, then each reading is taken times its ``motor_directions``.
        """
        if "phiz" in readings:
            readings = {**readings, "phiz": readings["phiz"] - self.rotation_axis_phiz}
        return sample_frame(readings, self.motor_directions)

    def readings(self, positions: dict) -> dict:
        """The motor readings that put the simulated sample at these positions: :meth:`sample_frame` undone."""
        readings = sample_frame(positions, self.motor_directions)  # a direction of -1 undoes itself
        if "phiz" in readings:
            readings["phiz"] += self.rotation_axis_phiz
        return readings

    def get_pixels_per_mm(self):
        """Horizontal and vertical image scale at the current zoom, pixels per mm."""
        level = self.zoom.get_value().value
        scale = self.pixels_per_um[min(max(int(level), 1), len(self.pixels_per_um)) - 1] * 1000.0
        return scale, scale
