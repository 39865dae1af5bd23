"""The multi-angle optical centring procedure.

At each of several omega angles: find the loop (lucid3) and predict a dense
heatmap over the loop; fuse the heatmaps into the one sample point with the
best predicted count over the rotation; feed its projections to
mxcubecore's standard centring fit (``sample_centring.center``, exactly
what the three-click centring uses) and move there, refusing moves beyond
the configured limits; then look, in one more view between the fitted
ones, whether the beam is on a predicted crystal. Any failure, and an abort,
put the sample back where it was. Inference and lucid run on gevent's
thread pool, never on the event loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace

import gevent
import gevent.event
import numpy as np
from mxcubecore.HardwareObjects import sample_centring

from mxcube_autocenter.centring.loop import (
    Roi,
    ScaleError,
    consistent_tips,
    loop_roi,
    loop_tips,
    pin_entry_side,
    sample_mask,
)
from mxcube_autocenter.centring.fusion import View, fuse_views, outside, project, refine_on_image, triangulate, value_at
from mxcube_autocenter.centring.heatmap import within_frame
from mxcube_autocenter.centring.peak import find_peak
from mxcube_autocenter.collection_recorder import (listen_to_camera, payload_reference, same_payload,
                                                    stop_listening_to_camera)
from mxcube_autocenter.config import AutoCenterConfig, check_blind_views
from mxcube_autocenter.geometry import CENTRING_MOTORS, TRANSLATION_MOTORS, sample_frame

# Grid points nearer the frame's edge than this share of a crop are no candidates: more of
# their crop would be repeated edge pixels (heatmap.within_frame).
EDGE_MARGIN_CROPS = 0.25
TRANSLATION_TOLERANCE_MM = 1e-3
OMEGA_TOLERANCE_DEG = 0.05
# mxcubecore's sine fit (sample_centring.center, its omega_range) turns omega this far over its clicks.
FIT_TURN_DEG = 180.0
# How long motors may take to show their arrival after the diffractometer says the move is done, s.
ARRIVAL_SETTLE_S = 2.0
# How often a move's motors are checked for a fault, s; and how long one already in FAULT when the move begins
# (a stall of the last move, which a new move may clear) may stay so, s.
FAULT_POLL_S = 0.1
STALE_FAULT_S = 1.0


def outcome(call, *args, **kwargs):
    """``(call(*args, **kwargs), None)``, or ``(None, what it raised)``, gevent.Timeout included.

    For a greenlet whose outcome its spawner reads: one that dies of an
    exception has gevent print the traceback as well, and a gevent.Timeout
    raised in it is its own, never its spawner's.
    """
    try:
        return call(*args, **kwargs), None
    except (Exception, gevent.Timeout) as err:
        return None, err


class _FaultWatch:
    """Which of a move's motors read FAULT: ``watch(names)``; one already in FAULT when the move began has
    :data:`STALE_FAULT_S` to leave it (the last move's stall, which a new move may clear) unless ``grace`` is
    False. ``watch.failure(names, err)`` is the move's CentringFailed."""

    def __init__(self, motors: dict, begun: float):
        self.motors, self.begun = motors, begun
        self.stale = {name for name, motor in motors.items() if _in_fault(motor)}

    def __call__(self, names=None, grace: bool = True) -> list:
        grace_over = not grace or time.monotonic() - self.begun > STALE_FAULT_S
        names = self.motors if names is None else names
        return [name for name in names if _in_fault(self.motors[name]) and (grace_over or name not in self.stale)]

    def failure(self, names, err=None) -> CentringFailed:
        said = [f"{name} (in FAULT since before the move)" if name in self.stale else name for name in names]
        because = "" if err is None else f" ({err})"
        return CentringFailed(f"motor {', '.join(said)} reports a fault during the move{because}: check it in the "
                              "diffractometer's software")  # fmt: skip


def _whole_turns_away(omega: float, target: float) -> bool:
    """Whether omega at ``omega`` reads as at ``target`` only modulo a turn (degrees): a move of whole turns."""
    return abs(target - omega) >= 180.0 and _distance("omega", omega, target) <= _tolerance("omega")


def _in_fault(motor) -> bool:
    """Whether a motor object reads FAULT; False when it cannot tell."""
    try:
        return motor.get_state() == motor.STATES.FAULT
    except Exception:
        return False


def _distance(motor: str, position: float, target: float) -> float:
    """How far ``position`` is from ``target`` (degrees or mm); omega's modulo a turn, as some goniometers read it."""
    if motor == "omega":
        return abs((position - target + 180.0) % 360.0 - 180.0)
    return abs(position - target)


def _tolerance(motor: str) -> float:
    """How far from its target a motor may stop and count as arrived (degrees or mm)."""
    return OMEGA_TOLERANCE_DEG if motor == "omega" else TRANSLATION_TOLERANCE_MM


class CentringFailed(RuntimeError):
    """Centring stopped: no loop, no crystal, a refused move or a motor error."""


class NoCrystalFound(CentringFailed):
    """The heatmap found nothing worth shooting at."""


class NoLoopFound(CentringFailed):
    """lucid3 found no loop in view at any of the search rotations."""


@dataclass
class AngleResult:
    """What the procedure saw at one omega angle.

    ``point``, ``score`` and ``crystal_probability`` are the view's own
    heatmap peak until the views are fused, then the chosen sample point's
    projection in this view. ``mask`` marks the grid points inside the loop
    and clear of the frame's edge. ``motors`` are the motors' readings,
    ``sample_frame`` the same times their directions (geometry.sample_frame):
    what the views are fused with.
    """

    omega: float
    loop: tuple | None
    roi: Roi
    point: tuple
    score: float
    crystal_probability: float | None
    motors: dict | None = None
    # The ice network's word on the beam, asked in the verification view only.
    ice_probability: float | None = None
    # Whether lucid3 found ``loop`` in this view; if not, it is the previous view's, carried over.
    loop_seen: bool = True
    sample_frame: dict | None = None
    heatmap: object = field(repr=False, default=None)
    mask: np.ndarray = field(repr=False, default=None)
    frame: np.ndarray = field(repr=False, default=None)
    elapsed_s: float = 0.0

    def view(self) -> View:
        """This view's heatmap as :func:`.fusion.fuse_views` takes it."""
        return View(self.heatmap.values, self.heatmap.xs, self.heatmap.ys, self.sample_frame, self.mask)


@dataclass
class CentringResult:
    """Outcome of one centring (what ``AutoCenter.centre`` returns).

    Attributes
    ----------
    success : bool
    message : str
    method : str
        ``"ml"`` (fused heatmaps), ``"loop"`` (the fallback to loop centring) or ``"none"``.
    start_positions, centred_positions : dict
        Centring motor positions before and after (None when nothing moved).
    angles : list of AngleResult
    timings : dict
        Seconds spent in loop finding, inference, fusing, moves and the verification view
        (``loop_s``, ``inference_s``, ``fusion_s``, ``move_s``, ``verify_s``).
    elapsed_s : float
    point : tuple or None
        The chosen sample point ``(a, u, v)``, mm.
    verification : AngleResult or None
        The check after the move (``point``: the beam, ``score``: the
        prediction there); None when not made.
    verified : bool or None
        Whether that view confirms the chosen point (:func:`is_verified`).
    optics : tuple or None
        ``(pixels_per_mm, beam_position)`` the views were taken at (the zoom), pixels per mm and pixels; None
        when no view was.
    declined : bool
        The procedure's own verdict ended it (no loop, no crystal: :class:`NoLoopFound`,
        :class:`NoCrystalFound`), not an error, a refused move or an abort.
    """

    success: bool
    message: str
    method: str
    start_positions: dict
    centred_positions: dict | None = None
    angles: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    point: tuple | None = None
    verification: AngleResult | None = None
    verified: bool | None = None
    optics: tuple | None = None
    declined: bool = False

    def without_images(self) -> "CentringResult":
        """The same outcome without the views' camera frames, heatmaps and masks (megabytes per view).

        For what is kept long, a queue task's node: a night of queued samples would hold gigabytes.
        """
        def light(view):
            return None if view is None else replace(view, heatmap=None, mask=None, frame=None)

        return replace(self, angles=[light(view) for view in self.angles], verification=light(self.verification))


@dataclass(frozen=True)
class CentringSettings:
    """Parameters of the procedure: the AutoCenter XML properties (:meth:`from_config`) and fixed choices."""

    n_angles: int
    roi_width_um: float
    roi_height_um: float
    heatmap_stride_px: float
    heatmap_symmetries: str
    min_score: float
    blind_views: int
    verify_min_score: float
    min_crystal_probability: float
    max_ice_probability: float
    no_crystal_fallback: str
    pin_side: str
    max_displacement_mm: float
    move_timeout_s: float
    verify_centring: str
    refine_max_um: float
    snapshot_fresh_frames: int = 0
    loop_search_rotations: int = 4
    # The middle of the fused score's plateau, not its maximum (fuse_views): on the demo's held-out
    # crystals 0.8 of the peak did as well as 0.7 and better than 0.9 (docs/centring.md, step 4).
    plateau: float = 0.8

    @classmethod
    def from_config(cls, config: AutoCenterConfig, **overrides) -> CentringSettings:
        """The settings of validated XML properties, with ``overrides`` by field name (e.g. ``n_angles``).

        Each field is the XML property of its name; ``n_angles`` is ``centring_angles``.
        """
        properties = {f.name: getattr(config, f.name) for f in fields(cls) if f.name in AutoCenterConfig.model_fields}
        return cls(**{**properties, "n_angles": config.centring_angles, **overrides})

    def __post_init__(self):
        check_blind_views(self.blind_views, self.n_angles)


# Longest wait for a camera frame before a snapshot, s: a camera that streams sends several in that time.
FRESH_FRAME_TIMEOUT_S = 0.5


class CentringHardware:
    """The beamline objects the procedure drives, looked up through ``HWR.beamline``.

    ``fresh_frames``: new camera frames awaited before each snapshot (:meth:`snapshot`). ``log``: where its
    notes go, the hardware object's (MXCuBE's log handlers are on ``HWR``).
    """

    def __init__(self, hwr_beamline, fresh_frames: int = 0, log: logging.Logger | None = None):
        self.sample_view = hwr_beamline.sample_view
        self.diffractometer = hwr_beamline.diffractometer
        self.beam = hwr_beamline.beam
        self.fresh_frames = fresh_frames
        self.log = log or logging.getLogger("HWR")
        self._camera_streams = True

    def motors(self, names=CENTRING_MOTORS) -> dict:
        """The diffractometer's motors by role, refusing clearly when one of ``names`` is not among them.

        An MD3 (MicroDiffractometer.get_motors) leaves out the motors whose state reads Disable or Unknown.
        """
        motors = self.diffractometer.get_motors()
        missing = [name for name in names if name not in motors]
        if missing:
            raise CentringFailed(
                f"the diffractometer offers no motor {', '.join(missing)} (an MD3 leaves out motors whose state is "
                f"Disable or Unknown): enable or home it in the diffractometer's software, then centre again"
            )
        return motors

    def positions(self, names=CENTRING_MOTORS) -> dict:
        """The motors' readings, refusing clearly a reading that is no number.

        A NaN start would let any move of that motor pass ``max_displacement_mm``; mxcubecore's ExporterMotor
        (MD3) reads None until its first good reading.
        """
        motors = self.motors(names)
        readings = {}
        for name in names:
            value = motors[name].get_value()
            try:
                readings[name] = float(value)
            except (TypeError, ValueError):
                readings[name] = np.nan
            if not np.isfinite(readings[name]):
                raise CentringFailed(f"motor {name} reads {value!r}, no position: check it in the diffractometer's "
                                     "software, then centre again")  # fmt: skip
        return readings

    def directions(self) -> dict:
        """Each centring motor's direction (SampleView's ``motor_directions``): see geometry.sample_frame."""
        motors = self.sample_view.centring_motors
        return {name: float(motors[name].direction) for name in CENTRING_MOTORS if name in motors}

    def snapshot(self) -> np.ndarray:
        """The camera's image, once it has sent :attr:`fresh_frames` new frames (changed images, after the first heard).

        A camera's last frame may have been exposed before the motors stopped (a frame period and tens of ms of
        latency: a degree or more of an omega turn); mxcubecore's ``get_snapshot`` returns it as it is. A camera
        that sends no new frame within :data:`FRESH_FRAME_TIMEOUT_S` (no stream, or one image over and over) is
        not waited for again; a slow one is waited for as long as its frames keep coming.
        """
        camera = self.sample_view.camera
        if self.fresh_frames > 0 and self._camera_streams and camera is not None:
            arrived, progress = gevent.event.Event(), gevent.event.Event()
            heard = {"images": 0, "last": None}

            def frame_received(image=None, *args):
                # TangoLimaVideo sends its last image on every poll, new or not: only a changed one counts, and
                # the first one heard may be the old image itself.
                if heard["images"] and same_payload(image, heard["last"]):
                    return
                heard["images"] += 1
                heard["last"] = payload_reference(image)
                progress.set()
                if heard["images"] > self.fresh_frames:
                    arrived.set()

            listen_to_camera(camera, frame_received)
            try:
                # The time-out is per frame, not for all of them: a camera of 3 frames a second, whose first image
                # heard only sets the reference, took 0.5 s for one new frame and was no longer waited for.
                while not arrived.is_set():
                    progress.clear()
                    if not progress.wait(FRESH_FRAME_TIMEOUT_S):
                        break
                # Silent, or sending one image over and over (mxcubecore's MDCameraMockup): not waited for again.
                self._camera_streams = arrived.is_set() or heard["images"] > 1
            finally:
                stop_listening_to_camera(camera, frame_received)
            if not self._camera_streams:
                self.log.info(
                    "AutoCenter: the camera sent no new frame within %g s: its snapshots are taken at once",
                    FRESH_FRAME_TIMEOUT_S)  # fmt: skip
        return self.sample_view.get_snapshot(return_as_array=True)

    def pixels_per_mm(self):
        return tuple(self.diffractometer.get_pixels_per_mm())

    def beam_position(self):
        return tuple(self.beam.get_beam_position_on_screen())

    def rotation_axis_phiz(self) -> float:
        """Sample-frame phiz at which the rotation axis crosses the beam: phiz's ``centring_reference_position``
        times its direction (0 without one).

        On an MD3 it is the calibrated AlignmentZ (SampleView.set_rotation_axis_position), rarely 0;
        mxcubecore's sine fit parks phiz there.
        """
        motor = self.sample_view.centring_motors.get("phiz")
        reference = None if motor is None else motor.reference_position
        return 0.0 if reference is None else float(reference) * float(motor.direction)

    def axis_origin(self, pixels_per_mm, beam_position) -> tuple:
        """The ``beam_position`` of geometry.py's projection (rotation axis through it at phiz = 0).

        The real beam when the axis crosses it at phiz 0; otherwise the beam moved by that phiz, so that
        sample points project where the camera sees them. The beam itself (what the verification scores)
        stays :meth:`beam_position`.
        """
        return (float(beam_position[0]), float(beam_position[1]) + pixels_per_mm[1] * self.rotation_axis_phiz())

    def move(self, positions: dict, timeout: float):
        """Move and check arrival: a motor that fails in a simultaneous move does not raise.

        Arrival is awaited for up to :data:`ARRIVAL_SETTLE_S` after ``set_value_motors`` returns: an MD3's
        (MicroDiffractometer) returns once its state reads Ready, which it may still do just before the
        motors start, and its positions then arrive a moment later. A motor that then reports it is moving
        is waited for as long as the move's ``timeout`` allows.

        A motor that reads FAULT fails the move at once, named: one that stalls reads so (an MD3's
        ExporterMotor), and the diffractometer would wait out the whole ``timeout`` for a Ready that never
        comes. One already in FAULT when the move begins (the last move's stall, which a new move may clear)
        has :data:`STALE_FAULT_S` to leave it.
        """
        begun = time.monotonic()
        faulty = _FaultWatch(self.motors(tuple(positions)), begun)
        omega_before = self.positions(("omega",))["omega"] if "omega" in positions else None
        whole_turns = omega_before is not None and _whole_turns_away(omega_before, positions["omega"])
        mover = gevent.spawn(outcome, self.diffractometer.set_value_motors, positions, timeout=timeout)
        try:
            while not mover.ready():
                mover.join(FAULT_POLL_S)
                # A diffractometer that waits for its moves turns omega here: seen, it need not be seen again.
                whole_turns = whole_turns and not self._has_turned(omega_before)
                names = faulty()
                if names and not mover.ready():
                    # Stopped, an MD3 reads Ready and the diffractometer's wait returns: a greenlet killed in the
                    # middle of an exporter request could leave its reply to the next one.
                    _stop_motion(self, self.log)
                    mover.join(ARRIVAL_SETTLE_S)
                    raise faulty.failure(names)
        finally:
            mover.kill()
        _, err = mover.value
        if err is not None:
            names = faulty(grace=False)
            if names:
                raise faulty.failure(names, err) from err
            if isinstance(err, CentringFailed):
                raise err
            # mxcubecore's motor waits raise gevent.Timeout: the move's own failure, never the caller's time-out.
            raise self.move_failure(f"the move to {positions}", positions, err) from err
        self._await_arrival(positions, begun, timeout, faulty, whole_turns)

    def move_failure(self, what: str, positions: dict, err) -> CentringFailed:
        """``what`` failed with ``err`` (an exception in mxcubecore's own words, e.g. "Timeout waiting for status
        ready", or why in words), naming the motors not at their ``positions`` or still moving."""
        try:
            now = self.positions(tuple(positions))
            stuck = [name for name, target in positions.items()
                     if _distance(name, now[name], target) > _tolerance(name) or self._busy(name)]  # fmt: skip
        except CentringFailed:
            stuck = []
        which = f"; {', '.join(stuck)} not there" if stuck else ""
        because = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else err
        return CentringFailed(f"{what} failed ({because}){which}: check the motors in the diffractometer's "
                              "software")  # fmt: skip

    def _await_arrival(self, positions: dict, begun: float, timeout: float, faulty, whole_turns: bool = False):
        """Wait until the motors read ``positions``, up to :data:`ARRIVAL_SETTLE_S` after now, longer (to
        ``begun + timeout``) while one says it is moving; CentringFailed for one that stopped elsewhere.

        Omega is compared modulo a turn, so a move of ``whole_turns`` (the way back after the loop search's four
        quarter turns) reads as arrived before it starts: it has arrived only once omega has been seen turning
        (within :data:`ARRIVAL_SETTLE_S`; a goniometer that takes the target modulo a turn may not turn) and
        then stops, or the verdict would come with the goniometer still turning.
        """
        settled_by = time.monotonic() + ARRIVAL_SETTLE_S
        deadline = max(settled_by, begun + timeout) if timeout else settled_by  # the move's own time-out
        first_settle = settled_by
        while True:
            now = self.positions(tuple(positions))  # only these: another motor may have dropped out
            off = [name for name, target in positions.items() if _distance(name, now[name], target) > _tolerance(name)]
            if whole_turns and "omega" not in off:
                if self._busy("omega") or abs(now["omega"] - positions["omega"]) <= _tolerance("omega"):
                    whole_turns = False  # it has started, or is there by its reading itself: no turn ahead
                elif time.monotonic() < first_settle:
                    off.append("omega")
            turning = not off and "omega" in positions and self._busy("omega")
            if not off and not turning:
                return
            names = faulty(off)  # the diffractometer may read Ready with a motor in FAULT
            if names:
                raise faulty.failure(names)
            t = time.monotonic()
            if t < deadline and (turning or any(self._moving(name) for name in off)):
                # Started late and still on its way: a move that takes longer than the settle time is no stop.
                settled_by = max(settled_by, min(t + ARRIVAL_SETTLE_S, deadline))
            elif t >= settled_by and turning:
                raise CentringFailed(f"omega still turns at {now['omega']:.2f} degrees after {t - begun:.0f} s, on its "
                                     f"way to {positions['omega']:.2f}: check it in the diffractometer's software")
            elif t >= settled_by:
                name = off[0]
                raise CentringFailed(f"motor {name} stopped at {now[name]:.4f} instead of {positions[name]:.4f}")
            gevent.sleep(0.05)

    def _has_turned(self, omega_before: float) -> bool:
        """Whether omega reads BUSY or away from ``omega_before`` (degrees, its reading before a move)."""
        try:
            return self._busy("omega") or abs(self.positions(("omega",))["omega"] - omega_before) > _tolerance("omega")
        except CentringFailed:
            return False

    def _busy(self, name: str) -> bool:
        """Whether motor ``name`` reads BUSY (moving); False when it cannot tell."""
        try:
            motor = self.motors((name,))[name]
            return motor.get_state() == motor.STATES.BUSY
        except Exception:
            return False

    def _moving(self, name: str) -> bool:
        """Whether motor ``name`` says it is moving (not ready, nor in fault); False when it cannot tell."""
        try:
            motor = self.motors((name,))[name]
            return not motor.is_ready() and not _in_fault(motor)
        except Exception:
            return False

    def reference_positions(self) -> dict:
        """Where mxcubecore's sine fit first moves the motors that have one (``centring_reference_position``)."""
        motors = self.sample_view.centring_motors
        return {
            name: float(motors[name].reference_position)
            for name in CENTRING_MOTORS
            if name in motors and motors[name].reference_position is not None
        }

    def rotate(self, degrees: float, timeout: float):
        """Turn omega by ``degrees`` within its limits, and check that it arrived."""
        target = {"omega": self.check_turn(degrees)}  # the target checked, not a second reading's
        begun = time.monotonic()
        motors = self.motors(("omega",))
        faulty = _FaultWatch(motors, begun)
        try:
            motors["omega"].set_value(target["omega"], timeout=timeout)
        except CentringFailed:
            raise
        except Exception as err:  # a motor that stalls or hangs: mxcubecore's words name neither it nor a fix
            names = faulty(grace=False)
            if names:
                raise faulty.failure(names, err) from err
            raise self.move_failure(f"turning omega by {degrees:g} degrees", target, err) from err
        # An MD3's motor reads BUSY once told to move (ExporterMotor sets it), and the state the exporter sent
        # before may still arrive and read Ready: the view would be taken, and its omega read, mid-turn.
        self._await_arrival(target, begun, timeout, faulty)

    def check_turn(self, degrees: float, start: float | None = None) -> float:
        """Refuse a turn of omega by ``degrees`` beyond its limits; the omega it turns to.

        From ``start`` (degrees) where the turn starts elsewhere than where omega is now.
        """
        omega = self.motors(("omega",))["omega"]
        target = (float(omega.get_value()) if start is None else start) + degrees
        # Checked here: mxcubecore's own check (validate_value) takes any value when a limit is None, and an MD3's
        # cached limits as they were last read; its refusal names the value alone ("Invalid value ...").
        _check_limits("omega", omega, target, f"omega cannot turn by {degrees:g} to {target:g} degrees",
                      "the centring turns omega through about a full turn: widen omega's limits in the "
                      "diffractometer's configuration")  # fmt: skip
        return target

    def check_move(self, start: dict, target: dict, max_displacement_mm: float):
        """Refuse a move beyond the displacement limit or a motor's limits."""
        motors = self.motors(tuple(target))
        for name, value in target.items():
            if not np.isfinite(value):
                raise CentringFailed(f"refusing to move {name} to {value}: not a number")
            if name != "omega" and abs(value - start[name]) > max_displacement_mm:
                raise CentringFailed(
                    f"refusing to move {name} by {value - start[name]:+.3f} mm: more than "
                    f"max_displacement_mm = {max_displacement_mm} (raise it in the AutoCenter XML if the loop is far off)"
                )
            _check_limits(name, motors[name], value, f"refusing to move {name} to {value:.4f}")


def _check_limits(name: str, motor, value: float, refusal: str, fix: str = "") -> None:
    """Raise CentringFailed, ``refusal`` first, if ``value`` lies outside the limits ``motor`` reads now."""
    low, high = motor.get_limits()
    # None (or an infinity) is no limit; NaN is a limit that could not be read, not the absence of one.
    if any(limit is not None and np.isnan(limit) for limit in (low, high)):
        raise CentringFailed(f"{refusal}: the limits of {name} read ({low}, {high}), not numbers: check the motor in "
                             "the diffractometer's software")  # fmt: skip
    if (low is not None and value < low) or (high is not None and value > high):
        raise CentringFailed(f"{refusal}: outside its limits ({low}, {high})" + (f"; {fix}" if fix else ""))


def _in_thread(func, *args):
    return gevent.get_hub().threadpool.apply(func, args)


def _loop_tip(bl: CentringHardware, frame, settings: CentringSettings, timings, log):
    """The loop tip on ``frame``: lucid3's, moved out to the loop's end when lucid3 stopped on the stem."""
    start = time.perf_counter()
    try:
        found, tip = _in_thread(loop_tips, frame, bl.pixels_per_mm(), settings.pin_side)
    except ScaleError as err:
        raise CentringFailed(f"the camera's scale: {err}; check the zoom's calibration in the diffractometer's "
                             "configuration") from err  # fmt: skip
    timings["loop_s"] = timings.get("loop_s", 0.0) + time.perf_counter() - start
    if tip != found:
        log.info("AutoCenter: lucid3's loop tip (%.0f, %.0f) lies on a dark object that reaches (%.0f, %.0f): "
                 "taking that as the tip", *found, *tip)  # fmt: skip
    return tip


def _find_loop_rotating(bl: CentringHardware, settings: CentringSettings, timings, log):
    """Look for the loop, rotating by 90 degrees between tries as MXCuBE's auto_center does."""
    for attempt in range(settings.loop_search_rotations + 1):
        frame = bl.snapshot()
        tip = _loop_tip(bl, frame, settings, timings, log)
        if tip is not None:
            return frame, tip
        if attempt < settings.loop_search_rotations:
            log.info("AutoCenter: no loop in view, rotating omega by 90 degrees (%d/%d)", attempt + 1, settings.loop_search_rotations)
            bl.rotate(90.0, settings.move_timeout_s)
    raise NoLoopFound(
        f"no loop found by lucid3 after {settings.loop_search_rotations} rotations of 90 degrees: "
        "check that a sample is mounted and in the field of view"
    )


def centre(bl: CentringHardware, predictor, settings: CentringSettings, log=None) -> CentringResult:
    """Run the procedure; on any failure or abort the sample goes back to where it was.

    The views are taken first (omega turning by ``180 / n_angles`` degrees
    between them: each sees the sample from a direction of its own), their
    heatmaps fused into one sample point (:func:`.fusion.fuse_views`), and
    that point's projections clicked into mxcubecore's sine fit as it turns
    on through its own steps (``180 / (n_angles - 1)`` degrees). Unless
    ``settings.verify_centring`` is ``"off"``, a last view half a view step past the
    fit's end (a direction none of the views saw) is scored at the beam
    (:func:`verify`): ``"report"`` logs a miss, ``"require"`` fails on it
    (or, with ``no_crystal_fallback = "loop"``, centres the loop tip instead).

    Parameters
    ----------
    bl : CentringHardware
    predictor : Predictor
        ``predict(frame, roi, pixels_per_mm, stride_px, symmetries) -> Heatmap`` of
        reflection counts, and ``crystal_probability`` and ``ice_probability``,
        each ``(frame, point, roi, pixels_per_mm) -> float or None``.
    settings : CentringSettings
    log : logging.Logger, optional

    Returns
    -------
    CentringResult
        ``success`` False with the reason in ``message`` when no crystal is
        found or the centring fails; the motors are then where they started.
    """
    log = log or logging.getLogger("HWR")
    t0 = time.perf_counter()
    try:
        start = bl.positions()
    except CentringFailed as err:  # a motor that cannot be read: nothing to read again for not_started
        return CentringResult(success=False, message=str(err), method="none", start_positions={})
    result = CentringResult(success=False, message="", method="none", start_positions=start)
    timings = result.timings
    # Views over half a turn, not to 180 degrees: the view at 180 would see the line the first one saw.
    step_deg = 180.0 / settings.n_angles
    try:
        ppmm, beam_on_screen = _optics(bl)
        result.optics = (tuple(ppmm), tuple(beam_on_screen))
        frame, tip = _find_loop_rotating(bl, settings, timings, log)
        _same_optics(bl, ppmm, beam_on_screen)
        beam = bl.axis_origin(ppmm, beam_on_screen)  # projections and fit; the verification takes the beam's own
        for i in range(settings.n_angles):
            if i > 0:
                bl.rotate(step_deg, settings.move_timeout_s)
                frame = bl.snapshot()
                _same_optics(bl, ppmm, beam_on_screen)  # the views are fused at one scale and beam position
                seen = _loop_tip(bl, frame, settings, timings, log)
                tip = seen or tip
            angle = _score_angle(predictor, settings, frame, tip, ppmm, bl.positions(), bl.directions(), timings)
            angle.loop_seen = i == 0 or seen is not None
            result.angles.append(angle)
            log.info("AutoCenter: omega %.1f: heatmap peak (%.0f, %.0f), score %.1f", angle.omega, *angle.point, angle.score)
        _same_optics(bl, ppmm, beam_on_screen)  # a zoom that began moving at the last frame reads changed by now
        _align_tips(predictor, settings, result.angles, ppmm, bl.directions(), timings, log)
        t = time.perf_counter()
        point = _in_thread(_choose_point, predictor, result.angles, ppmm, beam, settings)
        timings["fusion_s"] = time.perf_counter() - t
        if point is None:
            if settings.no_crystal_fallback != "loop":
                raise NoCrystalFound(f"no crystal found ({_why_not(result.angles, settings)}): the loop looks empty"
                                     + _pin_side_hint(frame, settings))  # fmt: skip
            point = _loop_fallback(result, settings, ppmm, beam, log, "no crystal found")
        _centre_on(bl, result, point, settings, start, ppmm, beam)
        if settings.verify_centring != "off" and result.method == "none":
            # Where lucid3 finds no loop in the verification view, the views' loop tip moved as the sample did
            # (their last tip on screen lies where the loop was before the move).
            tip_point = _loop_point(result.angles, ppmm, beam)
            turn = verification_turn(result.angles[0].omega, bl.positions(("omega",))["omega"], step_deg)
            check = result.verification = verify(bl, predictor, settings, turn, tip_point, timings, log)
            result.verified = is_verified(result.angles, check, settings)
            if not result.verified:
                _unverified(bl, result, settings, start, ppmm, beam, log)
            elif check.score < settings.verify_min_score:
                log.warning("AutoCenter: the verification view at omega %.1f sees almost nothing at the beam (score "
                            "%.1f < verify_min_score %s), accepted as the blind view: the fitted views all saw the "
                            "crystal", check.omega, check.score, settings.verify_min_score)  # fmt: skip
        # Read before success is said: a motor unreadable now fails the centring, which puts the sample back.
        centred_positions = bl.positions()
        result.method = "ml" if result.method == "none" else result.method
        result.centred_positions, result.success = centred_positions, True
        result.message = f"centred ({result.method}) in {time.perf_counter() - t0:.1f} s"
        return result
    except (Exception, gevent.GreenletExit, gevent.Timeout) as err:
        # GreenletExit (an abort) and a caller's gevent.Timeout are no Exception,
        # but the sample goes back all the same before they go on.
        result.message = str(err) or type(err).__name__
        result.declined = isinstance(err, (NoLoopFound, NoCrystalFound))
        if isinstance(err, Exception) and not isinstance(err, CentringFailed):
            log.exception("AutoCenter: centring failed")  # first: an abort during the way back ends this greenlet
        not_returned = restore(bl, start, settings.move_timeout_s, log)
        if not_returned:
            result.message += f"; the sample was NOT returned to its starting position: {not_returned}"
        if not isinstance(err, Exception):
            raise
        return result
    finally:
        result.elapsed_s = time.perf_counter() - t0


def _pin_side_hint(frame, settings: CentringSettings) -> str:
    """What to check where the sample seems to enter from the side ``pin_side`` does not say ("" elsewhere).

    With ``pin_side`` the wrong way, lucid3 and the regions look at the pin's end: every centring reads as an
    empty loop.
    """
    side = pin_entry_side(frame)
    if side is None or side == settings.pin_side:
        return ""
    return (f"; but the sample seems to enter from the {side}, and pin_side is {settings.pin_side}: check pin_side "
            "in the AutoCenter XML")


def _optics(bl: CentringHardware) -> tuple:
    """``(pixels_per_mm, beam_position)`` as read now, refused unless they are usable numbers."""
    ppmm, beam = bl.pixels_per_mm(), bl.beam_position()
    try:
        values = np.asarray([*ppmm, *beam], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if values.shape != (4,) or not np.isfinite(values).all() or values[:2].min() <= 0:
        raise CentringFailed(f"the camera's scale reads pixels_per_mm {ppmm} and the beam on screen {beam}: not usable "
                             f"(a zoom still moving, or not calibrated): centre again once the zoom is set")  # fmt: skip
    return tuple(float(v) for v in values[:2]), tuple(float(v) for v in values[2:])


def same_optics(a, b) -> bool:
    """Whether two ``(pixels_per_mm, beam_position)`` are the same zoom (to float rounding, and half a pixel)."""
    return bool(np.allclose(a[0], b[0], rtol=1e-6, atol=0) and np.allclose(a[1], b[1], rtol=0, atol=0.5))


def _same_optics(bl: CentringHardware, pixels_per_mm, beam_position):
    """Refuse a frame taken at another zoom than ``pixels_per_mm`` and ``beam_position`` (read before it).

    A zoom changed in the web UI during a centring changes both on an MD3: a view analysed or
    fused at the old scale would place the sample point wrong, silently.
    """
    ppmm, beam = _optics(bl)
    if not same_optics((ppmm, beam), (pixels_per_mm, beam_position)):
        raise CentringFailed(f"the zoom changed during the centring (pixels_per_mm {tuple(pixels_per_mm)} -> {ppmm}, "
                             f"beam on screen {tuple(beam_position)} -> {beam}): centre again at one zoom")  # fmt: skip


def not_started(bl: CentringHardware, why: str) -> CentringResult:
    """A centring refused before anything moved; ``start_positions`` empty when they cannot be read."""
    try:
        start = bl.positions()
    except CentringFailed:
        start = {}
    return CentringResult(success=False, message=why, method="none", start_positions=start)


def _choose_point(predictor, angles, pixels_per_mm, beam_position, settings: CentringSettings):
    """Fuse the views into one sample point; None when it is not worth shooting at.

    The fused point is then moved onto the crystal's dark mass in the
    images, by at most ``refine_max_um`` (:func:`.fusion.refine_on_image`).
    Each angle's ``point`` and ``crystal_probability`` become those of the
    final point's projection in that view, its ``score`` the fused point's
    prediction there (what decides whether it is a crystal).
    """
    fused, point = fuse_and_refine(angles, pixels_per_mm, beam_position, settings)
    for angle, score in zip(angles, fused.scores):
        angle.point = project(point, angle.sample_frame, pixels_per_mm, beam_position)
        angle.score = score
        angle.crystal_probability = predictor.crystal_probability(angle.frame, angle.point, angle.roi, pixels_per_mm)
    return point if is_crystal(angles, settings) else None


def fuse_and_refine(angles, pixels_per_mm, beam_position, settings: CentringSettings):
    """The views' fused point (:func:`.fusion.fuse_views`), then moved onto the crystal's dark mass in the images.

    Returns
    -------
    fused : FusedPoint
        The fusion's result (its ``scores`` per view).
    point : ndarray, shape (3,)
        The refined sample point (:func:`.fusion.refine_on_image`).
    """
    views = [a.view() for a in angles]
    fused = fuse_views(views, pixels_per_mm, beam_position, floor=settings.min_score, blind=settings.blind_views,
                       plateau=settings.plateau)  # fmt: skip
    point = refine_on_image(fused.point, views, [a.frame for a in angles], pixels_per_mm, beam_position,
                            max_um=settings.refine_max_um)  # fmt: skip
    return fused, point


def _loop_fallback(result: CentringResult, settings: CentringSettings, pixels_per_mm, beam_position, log, why: str):
    """The configured fallback: the loop tip seen in the views, as a sample point.

    Refused where the sample seems to enter from the side ``pin_side`` does not say: the "tip" is the pin's end.
    """
    hint = _pin_side_hint(result.angles[0].frame, settings)
    if hint:
        raise CentringFailed(f"{why}: not centring the loop tip{hint}")
    result.method = "loop"
    log.warning("AutoCenter: %s: centring the loop tip instead", why)
    return _loop_point(result.angles, pixels_per_mm, beam_position)


def _loop_point(angles, pixels_per_mm, beam_position):
    """The loop tip seen in the views, triangulated into a sample point, mm.

    A view where lucid3 found no tip carries the previous view's, seen from
    another angle: triangulated as if seen there, it moved the point by
    17-31 um. Such views are left out while two others saw the tip.
    """
    seen = [a for a in angles if a.loop_seen]
    angles = seen if len(seen) >= 2 else angles
    return triangulate([a.loop for a in angles], [a.sample_frame for a in angles], pixels_per_mm, beam_position)


def _centre_on(bl: CentringHardware, result: CentringResult, point, settings: CentringSettings, start: dict, pixels_per_mm,
               beam_position):  # fmt: skip
    """Fit the point's projections as omega turns and move it to the beam, within the limits."""
    result.point = tuple(float(v) for v in point)
    # The fit's first move, to the reference positions, and its half turn of omega come before its result can be
    # checked.
    references = bl.reference_positions()
    bl.check_move(start, references, settings.max_displacement_mm)
    # From omega's reference position where it has one: the fit moves it there first.
    bl.check_turn(bl.directions().get("omega", 1.0) * FIT_TURN_DEG, start=references.get("omega"))
    fitted = _fit_point(bl, point, pixels_per_mm, beam_position, settings.n_angles, settings.move_timeout_s)
    target = {name: fitted[name] for name in TRANSLATION_MOTORS}
    bl.check_move(start, target, settings.max_displacement_mm)
    t = time.perf_counter()
    bl.move(target, settings.move_timeout_s)
    result.timings["move_s"] = result.timings.get("move_s", 0.0) + time.perf_counter() - t


def _fit_point(bl: CentringHardware, point, pixels_per_mm, beam_position, n_angles: int, move_timeout_s: float) -> dict:
    """Click the point's projections into mxcubecore's sine fit as it turns omega; its centred positions.

    The fit is the one the three-click centring uses: it turns omega and
    computes the final motor positions exactly as for clicks by hand. Each
    click waits at most ``move_timeout_s`` (s) for the fit's omega turn:
    ``user_click(wait=True)`` would wait for ever when the fit dies without
    setting its event (an omega move that times out) or when another click
    (by hand in the web UI) ends it early.
    """
    # start() first moves motors with a reference position and waits for them with a gevent.Timeout of its
    # own: run in a greenlet of its own, whatever it dies of is the fit's failure, never the caller's time-out.
    # The fit decodes the clicks with the X-ray beam they were projected from (axis_origin undone), not the
    # beam read now: a zoom change since the views moves it on screen (phiy and phiz would come out off).
    beam = (beam_position[0], beam_position[1] - pixels_per_mm[1] * bl.rotation_axis_phiz())
    starting = gevent.spawn(
        sample_centring.start,
        bl.sample_view.centring_motors, pixels_per_mm[0], pixels_per_mm[1], *beam,
        chi_angle=bl.sample_view.chi_angle, n_points=n_angles,
    )
    try:
        try:
            # Its move to the reference positions waits 60 s of its own for them.
            starting.join(move_timeout_s)
            if not starting.ready():
                references = bl.reference_positions()
                raise bl.move_failure(f"the sine fit's first move, to {references}", references,
                                      f"not done within move_timeout_s = {move_timeout_s} s")  # fmt: skip
            fit = _outcome(starting, "preparing the sine fit")
        finally:
            starting.kill(block=True)  # an abort while it prepares stops that too
        for i in range(n_angles):
            sample_centring.user_click(*project(point, sample_frame(bl.positions(), bl.directions()), pixels_per_mm,
                                                beam_position))
            _await_fit_turn(bl, fit, move_timeout_s)
            if fit.ready() and i < n_angles - 1:
                _outcome(fit, "the sine fit")  # the fit gave up (a motor failed): raise its error
                raise CentringFailed("the sine fit ended before all its points were clicked (a click by hand?)")
        return _by_role(bl, _outcome(fit, "the sine fit"))
    finally:
        # Whatever ends the clicks (an abort, a time-out) stops this fit, which may be turning omega, also when the
        # abort came just as it was made; only this one: mxcubecore's current centring may by now be a click
        # centring someone started.
        made = starting.value if starting.successful() else None
        if isinstance(made, gevent.Greenlet) and not made.ready():
            made.kill(block=True)


def _await_fit_turn(bl: CentringHardware, fit: gevent.Greenlet, move_timeout_s: float):
    """Wait for the sine fit to turn omega to its next point (or to end), ``move_timeout_s`` at most.

    Omega in FAULT fails it at once, named: the fit's own way out of an error
    moves the motors back first and waits 30 s on omega, so its error would come
    after the time-out, as if omega were merely slow.
    """
    watch = _FaultWatch(bl.motors(("omega",)), time.monotonic())
    deadline = time.monotonic() + move_timeout_s
    while not gevent.wait([sample_centring.READY_FOR_NEXT_POINT, fit], timeout=FAULT_POLL_S, count=1):
        if watch():
            raise watch.failure(["omega"])
        if time.monotonic() > deadline:
            raise CentringFailed(f"the sine fit did not turn omega within move_timeout_s = {move_timeout_s} s")


def _outcome(greenlet: gevent.Greenlet, what: str):
    """The value of mxcubecore's ``greenlet`` (``what`` it does), or its failure as CentringFailed.

    Whatever it died of is its own failure, never the caller's abort or
    time-out: mxcubecore's motor waits raise ``gevent.Timeout``, which would
    otherwise pass for the caller's and skip the verdict. Its own error is
    often a generic one raised while handling the real cause, which is
    named too.
    """
    greenlet.join()
    if not greenlet.successful():
        err = greenlet.exception
        cause = err.__cause__ or err.__context__
        because = f"; cause: {type(cause).__name__}: {cause}" if cause is not None else ""
        raise CentringFailed(f"{what} failed ({type(err).__name__}: {err}{because})") from err
    if isinstance(greenlet.value, gevent.GreenletExit):
        raise CentringFailed(f"{what} was stopped (another centring started?)")
    return greenlet.value


def verification_turn(first_view_omega: float, omega: float, step_deg: float) -> float:
    """The turn of omega, degrees (0 to ``step_deg``), from ``omega`` to a direction midway between two views.

    The views lie ``step_deg`` apart from ``first_view_omega`` over half a turn: the verification's direction is
    one none of them saw, wherever the fit left omega (from omega's ``centring_reference_position`` where it has
    one, not from the last view).
    """
    return float((first_view_omega + step_deg / 2 - omega) % step_deg)


def verify(bl: CentringHardware, predictor, settings: CentringSettings, turn_deg: float, tip_point, timings: dict,
           log) -> AngleResult:  # fmt: skip
    """Turn omega by ``turn_deg`` and score the beam position in a new view.

    The view's heatmap is predicted as in the fitted views; its smoothed
    prediction at the beam (and the classifier's and the ice network's
    probabilities there) is what :func:`is_verified` then judges.

    Parameters
    ----------
    turn_deg : float
        Omega turn from where the fit left it, degrees.
    tip_point : (3,) array_like
        The views' loop tip as a sample point, mm: projected into this view
        where lucid finds no loop here.

    Returns
    -------
    AngleResult
        ``point`` is the beam, ``score`` the prediction there.
    """
    t = time.perf_counter()
    bl.rotate(turn_deg, settings.move_timeout_s)
    ppmm, beam = _optics(bl)
    frame = bl.snapshot()
    _same_optics(bl, ppmm, beam)  # the frame is analysed at that scale
    motors, directions = bl.positions(), bl.directions()
    tip = _loop_tip(bl, frame, settings, {}, log)  # timed within verify_s
    if tip is None:
        tip = project(tip_point, sample_frame(motors, directions), ppmm, bl.axis_origin(ppmm, beam))
    angle = _score_angle(predictor, settings, frame, tip, ppmm, motors, directions, timings)
    peak = angle.point
    angle.point = tuple(float(v) for v in beam)
    angle.score, angle.crystal_probability, angle.ice_probability = _in_thread(_scores_at, predictor, angle, ppmm)
    timings["verify_s"] = time.perf_counter() - t
    off_um = 1000.0 * np.hypot((peak[0] - beam[0]) / ppmm[0], (peak[1] - beam[1]) / ppmm[1])
    at_beam = "the beam outside the sample" if outside(angle.score) else f"score {angle.score:.1f} at the beam"
    log.info("AutoCenter: verification at omega %.1f: %s, heatmap peak %.0f um away", angle.omega, at_beam, off_um)
    return angle


def _scores_at(predictor, angle: AngleResult, pixels_per_mm) -> tuple:
    """A view's smoothed prediction, crystal probability and ice probability at its ``point``."""
    at = (angle.frame, angle.point, angle.roi, pixels_per_mm)
    return value_at(angle.view(), angle.point), predictor.crystal_probability(*at), predictor.ice_probability(*at)


def _unverified(bl: CentringHardware, result: CentringResult, settings: CentringSettings, start: dict, pixels_per_mm,
                beam_position, log):  # fmt: skip
    """A verification view without a crystal at the beam: log it, fall back to the loop or fail (``settings.verify_centring``)."""
    check = result.verification
    why = (f"no crystal found at the beam in the verification view at omega {check.omega:.1f} "
           f"({_why_not_verified(result.angles, check, settings)})")  # fmt: skip
    if settings.verify_centring == "report":
        log.warning("AutoCenter: %s; centred all the same (verify_centring = report)", why)
    elif settings.no_crystal_fallback == "loop":
        point = _loop_fallback(result, settings, pixels_per_mm, beam_position, log, why)
        _centre_on(bl, result, point, settings, start, pixels_per_mm, beam_position)
    else:
        raise NoCrystalFound(why)


def _by_role(bl: CentringHardware, fitted: dict) -> dict:
    """sample_centring returns positions keyed by motor object; key them by role."""
    roles = {id(m.motor): name for name, m in bl.sample_view.centring_motors.items()}
    return {roles[id(motor)]: float(pos) for motor, pos in fitted.items() if id(motor) in roles}


def analyse_frame(predictor, frame, tip, pixels_per_mm, settings: CentringSettings, motors=None,
                  classify=True) -> AngleResult:  # fmt: skip
    """Steps 2-4 on one frame: region around the loop tip, heatmap, peak, crystal check.

    Runs where it is called (the procedure calls it on a worker thread).

    Parameters
    ----------
    motors : dict, optional
        Centring motor positions of the frame (kept with the result for fusing views).
    classify : bool
        Ask the classifier about the peak; the procedure asks about the fused
        point instead, once the views are fused.
    """
    start = time.perf_counter()
    roi = loop_roi(
        tip, frame.shape, pixels_per_mm, width_um=settings.roi_width_um, height_um=settings.roi_height_um,
        pin_side=settings.pin_side,
    )
    counts = predictor.predict(frame, roi, pixels_per_mm, settings.heatmap_stride_px, settings.heatmap_symmetries)
    inside = sample_mask(frame, roi, tip, pixels_per_mm, settings.pin_side)
    cols = np.clip(np.round(counts.xs - roi.x0).astype(int), 0, roi.width - 1)
    rows = np.clip(np.round(counts.ys - roi.y0).astype(int), 0, roi.height - 1)
    inside = inside[np.ix_(rows, cols)]
    mask = inside & within_frame(counts, frame.shape, EDGE_MARGIN_CROPS * np.asarray(predictor.crop_px(pixels_per_mm)))
    # A loop wholly in the edge band (a tip at the frame's edge, a high zoom) keeps its sample mask.
    mask = mask if mask.any() else inside
    peak = find_peak(counts, mask=mask if mask.any() else None)
    prob = predictor.crystal_probability(frame, (peak.x, peak.y), roi, pixels_per_mm) if classify else None
    return AngleResult(
        omega=float("nan") if motors is None else motors["omega"], loop=tip, roi=roi, point=(peak.x, peak.y),
        score=peak.score, crystal_probability=prob, motors=motors, heatmap=counts, mask=mask, frame=frame,
        elapsed_s=time.perf_counter() - start,
    )


def _score_angle(predictor, settings, frame, tip, ppmm, motors, directions, timings) -> AngleResult:
    angle = _in_thread(analyse_frame, predictor, frame, tip, ppmm, settings, motors, False)
    angle.sample_frame = sample_frame(motors, directions)
    timings["inference_s"] = timings.get("inference_s", 0.0) + angle.elapsed_s
    return angle


def _align_tips(predictor, settings, angles, ppmm, directions, timings, log):
    """Score again, from the farthest view's tip, a view whose loop tip lucid3 found short of it along the spindle."""
    tips = consistent_tips([a.loop for a in angles], ppmm, settings.pin_side)
    for k, (angle, tip) in enumerate(zip(angles, tips)):
        if tip != tuple(angle.loop):
            log.info("AutoCenter: omega %.1f: loop tip at x %.0f, another view's at %.0f: scoring its region from there",
                     angle.omega, angle.loop[0], tip[0])  # fmt: skip
            angles[k] = _score_angle(predictor, settings, angle.frame, tip, ppmm, angle.motors, directions, timings)
            angles[k].loop_seen = angle.loop_seen


def is_crystal(angles, settings: CentringSettings) -> bool:
    """Whether the chosen point is good enough to shoot at.

    Its predicted count must reach ``min_score`` in every view but
    ``blind_views`` of them (the beam has to meet the crystal at every
    angle, but a plate or needle seen edge-on hardly shows on camera; a
    single view has none to spare) and, with a classifier, its mean crystal
    probability over the views that saw it (the blind ones left out)
    ``min_crystal_probability``.

    Parameters
    ----------
    angles : AngleResult or sequence of AngleResult
        The views, each scored at the chosen point's projection.
    """
    return _why_not(angles, settings) is None


def is_verified(angles, check: AngleResult, settings: CentringSettings) -> bool:
    """Whether the verification view confirms the point the fitted views chose.

    It is one more view of the point, from a direction none of them saw, so
    it counts with them against ``blind_views``: the point fails when it
    scores below ``min_score`` in as many fitted views as ``blind_views``
    allows and the verification view misses it too. The fitted views' scores
    are those of the point chosen as their best, so they read high; the
    verification's, read at the beam, is not chosen, so it misses the point
    only below the lower ``verify_min_score``. With a classifier, its
    probability at the beam must reach ``min_crystal_probability``, and with
    an ice network, its probability of ice at the beam must not exceed
    ``max_ice_probability`` (the point centred is in focus here, where an ice
    ball looks least like a crystal; 1 turns this off), unless the view is
    taken as the blind view.

    Parameters
    ----------
    angles : sequence of AngleResult
        The fitted views, each scored at the chosen point's projection.
    check : AngleResult
        The verification view, scored at the beam.
    """
    return _why_not_verified(angles, check, settings) is None


def _stop_motion(bl: CentringHardware, log):
    """Stop every centring motor that moves: before moving back (the fit has stopped: :func:`_fit_point`), or
    after a motor's fault (:meth:`CentringHardware.move`).

    Motors at rest are left alone: an MD3 motor's abort is the diffractometer's global abort.
    """
    motors = bl.diffractometer.get_motors()
    for name in CENTRING_MOTORS:
        try:
            if motors[name].get_state() != motors[name].STATES.READY:
                motors[name].abort()
        except Exception:
            # The other motors still stop, and the sample still goes back.
            log.exception("AutoCenter: could not stop %s", name)


def _why_not(angles, settings: CentringSettings) -> str | None:
    """Why the point is not good enough to shoot at (:func:`is_crystal`), or None when it is."""
    angles = [angles] if isinstance(angles, AngleResult) else list(angles)
    scores = [a.score for a in angles]
    if not np.isfinite(scores).all():
        return "score NaN (no usable prediction) in at least one view"
    if any(outside(score) for score in scores):
        return "the point lies outside the sample in at least one view"
    blind = min(settings.blind_views, max(len(angles) - 2, 0))
    score = sorted(scores)[blind]
    if score < settings.min_score:
        where = f" in more than {blind} of {len(angles)} views" if blind else " in at least one view"
        where = where if len(angles) > 1 else ""
        return f"score {score:.1f} < min_score {settings.min_score}{where}"
    # The blind views saw no crystal there: the classifier agreeing with them is no reason to refuse.
    probs = [a.crystal_probability for a in angles if a.crystal_probability is not None and a.score >= settings.min_score]
    return _not_a_crystal(float(np.mean(probs)), settings, "in the views that saw the point") if probs else None


def _not_a_crystal(probability, settings: CentringSettings, where: str) -> str | None:
    """Why the classifier's crystal probability refuses the point, or None: below ``min_crystal_probability``,
    or NaN; at 0 the veto is off, NaN included (as the ice network's at ``max_ice_probability`` 1)."""
    if probability is None or settings.min_crystal_probability <= 0:
        return None
    if not np.isfinite(probability):
        return f"crystal probability NaN (no usable prediction) {where}"
    if probability < settings.min_crystal_probability:
        return f"crystal probability {probability:.2f} < min_crystal_probability {settings.min_crystal_probability}"
    return None


def _why_not_verified(angles, check: AngleResult, settings: CentringSettings) -> str | None:
    """Why the verification view does not confirm the point (:func:`is_verified`), or None when it does."""
    if not np.isfinite(check.score):
        return "score NaN (no usable prediction) at the beam"
    if outside(check.score):
        return "the beam lies outside the sample in this view"
    missed = sum(a.score < settings.min_score for a in angles)
    if check.score < settings.verify_min_score:
        if missed < settings.blind_views:
            return None  # the blind view, the classifier's word on it included
        already = (f", and below min_score {settings.min_score} in {missed} of the {len(angles)} centring views "
                   f"(blind_views = {settings.blind_views})" if missed else "")  # fmt: skip
        return f"score {check.score:.1f} < verify_min_score {settings.verify_min_score}{already}"
    not_a_crystal = _not_a_crystal(check.crystal_probability, settings, "at the beam")
    if not_a_crystal:
        return not_a_crystal
    if check.ice_probability is not None and settings.max_ice_probability < 1:  # 1: the veto is off
        if not np.isfinite(check.ice_probability):
            return "ice probability NaN (no usable prediction) at the beam"
        if check.ice_probability > settings.max_ice_probability:
            return f"ice probability {check.ice_probability:.2f} > max_ice_probability {settings.max_ice_probability}"
    return None


def restore(bl: CentringHardware, start: dict, timeout: float, log) -> str | None:
    """Stop what moves and put the sample back; a way back that fails is logged and returned, not raised.

    The work runs in a greenlet of its own and is waited for to its end: an
    abort (Stop pressed, or pressed twice) or a caller's time-out arriving now
    must not leave the sample half-way back. It is raised once the sample is
    back (the first, if several came): the caller's abort or time-out still
    ends the caller.

    Returns
    -------
    str or None
        The motors that did not go back, and why; None when all did.

    Raises
    ------
    gevent.GreenletExit, gevent.Timeout
        What interrupted the wait, once the sample is back.
    """
    moving = gevent.spawn(_stop_and_move_back, bl, start, timeout, log)
    interruption = None
    while not moving.ready():
        try:
            moving.join()
        except (gevent.GreenletExit, gevent.Timeout) as err:
            interruption = interruption or err
            log.warning("AutoCenter: abort while the sample goes back to its starting position: finishing that first")
    failure = None
    if not moving.successful():
        failure = f"the way back failed ({type(moving.exception).__name__}: {moving.exception})"
        log.error("AutoCenter: %s", failure)
    if interruption is not None:
        raise interruption
    return failure or moving.value


def _stop_and_move_back(bl: CentringHardware, start: dict, timeout: float, log) -> str | None:
    _stop_motion(bl, log)
    try:
        bl.move(start, timeout)
    except (Exception, gevent.Timeout) as err:
        # A simultaneous move may stop at the first motor that refuses: the others go back one by one.
        log.warning("AutoCenter: moving back to %s failed (%s): moving the motors one by one", start, err)
        failures = []
        for name in sorted(start, key=lambda name: name == "omega"):  # translations first: they matter most
            try:
                bl.move({name: start[name]}, timeout)
            except (Exception, gevent.Timeout) as motor_err:
                failures.append(f"{name} ({motor_err})")
        if failures:
            log.error("AutoCenter: could not return the sample to its starting position %s: %s", start, "; ".join(failures))
            return "; ".join(failures)
    log.info("AutoCenter: sample returned to its starting position")
    return None
