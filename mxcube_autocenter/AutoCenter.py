"""The AutoCenter hardware object: the plugin's single point of contact with MXCuBE.

It stays thin: it reads its XML configuration, finds the beamline objects it
works with through ``HWR.beamline`` and connects them to the plain modules of
this package.

Add it to a beamline with a role in ``beamline.yaml``::

    - auto_centring: auto_centring.xml

and an XML file such as ``hardware_objects_xml/auto_centring.xml``. Reach it
with ``HWR.beamline.get_object_by_role("auto_centring")``.

Recording: during the collections of the configured types, the camera frames
with the motor positions of the moment go to one HDF5 file per collection
(:mod:`mxcube_autocenter.collection_recorder`).

Centring: :meth:`AutoCenter.centre` runs the optical ML centring
(:mod:`mxcube_autocenter.centring.procedure`); with ``centring_enabled`` the
object also takes over ``SampleView.start_auto_centring``, which the web UI's
auto-centring button and the queue's auto loop centring on mount call,
and shows each centring's heatmap on SampleView as a grid result, which the
web UI draws over the camera image. One centring runs at a time: a call while
one is running, or while a centring by hand is open on SampleView, is refused,
and so are a click centring and clicks on the image while it runs.

Queue: the object registers the "Optical ML centring" queue task
(:mod:`mxcube_autocenter.queue_entry`); list it after ``queue_manager`` in
``beamline.yaml``.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import sys
import time
import weakref

import gevent
import gevent.event
import gevent.lock
import gevent.threadpool
from mxcubecore import HardwareRepository as HWR
from mxcubecore.BaseHardwareObjects import HardwareObject
from mxcubecore.queue_entry.base_queue_entry import SampleQueueEntry
from mxcubecore.queue_entry.data_collection import DataCollectionQueueEntry
from mxcubecore.TaskUtils import TaskException

from mxcube_autocenter.centring import procedure, report
from mxcube_autocenter.centring.predictor import PredictorError, load_predictor
from mxcube_autocenter.collection_recorder import COLLECTION_FAILED, CollectionRecorder, find_dc_params
from mxcube_autocenter.config import AutoCenterConfig, check_centring_angles, resolve_relative_paths
from mxcube_autocenter.geometry import CENTRING_MOTORS, TRANSLATION_MOTORS
from mxcube_autocenter.queue_entry import TASK_NAME, OpticalMLCentringQueueEntry, register_queue_entry


# The longest an MD3 phase change is waited for (its own wait is up to 600 s).
PHASE_TIMEOUT_S = 120.0
# The longest a press of the button waits for the diffractometer to be ready, s (SampleView's own wait).
READY_TIMEOUT_S = 60.0
# The longest a collection waits for a running optical ML centring to end, s (one takes seconds).
COLLECTION_WAIT_S = 120.0


def freeze_long_lived_objects() -> float:
    """Take the objects the process holds so far out of all future garbage collections; the seconds it took.

    TensorFlow and the model bring some 400 000 long-lived objects, and every
    full collection would walk them all, stalling MXCuBE's event loop for
    0.2 s or more (``bench``: ``full_gc_ms``). Garbage is collected once
    first, so that nothing unreachable is kept; what an earlier freeze holds
    is given back to that collection first: a replaced model, full of
    reference cycles, would otherwise stay frozen, never collected.

    That one collection holds every thread, the event loop included, on
    whichever thread it runs (0.2-0.7 s on 2 cores): the price of a model
    load, paid once instead of at every later full collection, mid-centring.
    """
    begun = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - begun


# Why the recording of a killed collection ended (its file's ``error``).
COLLECTION_STOPPED = "the collection was stopped"


def _predictor_or_error(*paths):
    """``load_predictor(*paths)``, or its error: raised on a pool's thread, gevent would print its traceback."""
    try:
        return load_predictor(*paths)
    except PredictorError as err:
        return err


def _collect_said(what: str, args) -> str:
    """``what`` happened, with the collect object's message where its signal carried one.

    Signals of more than one argument start with the collect object's owner ("mxcube" for the queue's, in
    AbstractMultiCollect and others; None in AbstractCollect), which is no message.
    """
    said = args[1:] if len(args) > 1 else args
    message = next((a for a in said if isinstance(a, str) and a.strip()), None)
    return f"{what}: {message}" if message else what


class AutoCenter(HardwareObject):
    """Optical crystal centring and training-frame recording for MXCuBE."""

    HOConfig = AutoCenterConfig

    def init(self):
        super().init()
        resolve_relative_paths(self.config, self._config_folder())
        self.log.info(
            "AutoCenter configured: %s",
            ", ".join(f"{k}={v!r}" for k, v in self.settings().items()),
        )
        self._helical_positions = None
        self.recorder = None
        self.predictor = None
        self.centring_error = None
        self.last_result = None
        self._heatmap_grid = None
        self._record_writer = gevent.threadpool.ThreadPool(1)
        self._record_saving = None  # the last record's save (AsyncResult)
        self._centring_lock = gevent.lock.Semaphore()
        self._button_pressed = False
        self._cancelled_while_readying = False
        self._pressed_procedure = None  # the greenlet the last press of the button put on SampleView
        # Procedure -> set once its verdict is out: claimed before any wait, so that it is given once however late
        # its link runs; forgotten with the procedure.
        self._verdicts = weakref.WeakKeyDictionary()
        self._took_over = False
        self._holding_queue = 0  # queue entries waiting for a centring to end (_queue_entry_starting)
        self._connect_collect()
        self._hold_collections_while_centring()
        self._load_models()
        self._check_geometry()
        self._note_rotation_axis()
        # Whatever centring_enabled says: the queue task and scripts centre all the same.
        self._guard_sample_view()
        if self.config.centring_enabled and self.centring_error is None:
            self._take_over_auto_centring()
        self._register_queue_task()
        self.update_state(self.STATES.READY)

    def _config_folder(self) -> str:
        """The folder of this object's XML file, where its relative paths start (MXCuBE's working directory without one)."""
        xml = HWR.get_hardware_repository().find_in_repository(f"{self.load_name}.xml")
        return os.path.dirname(xml) if xml else os.getcwd()

    def settings(self) -> dict:
        """The validated XML properties, by name."""
        return {name: getattr(self.config, name) for name in AutoCenterConfig.model_fields}

    # -- recording ------------------------------------------------------------

    def _connect_collect(self):
        bl = HWR.beamline
        collect, sample_view = bl.collect, bl.sample_view
        if collect is None or sample_view is None or sample_view.camera is None:
            self.log.warning("AutoCenter: no collect object or sample-view camera; recording is off")
            return
        self.recorder = CollectionRecorder(
            settings=lambda: self.config,
            camera=sample_view.camera,
            snapshot=lambda: sample_view.get_snapshot(return_as_array=True),
            read_motors=self._read_motors,
            context=self._recording_context,
            log=self.log,
            make_data_directory=lambda path: collect.create_directories(path),
        )
        self.connect(collect, "collectOscillationStarted", self._collection_started)
        # Collect objects may send both, or either, and some send them twice.
        self.connect(collect, "collectOscillationFinished", self._collection_finished)
        self.connect(collect, "collectEnded", self._collection_finished)
        self.connect(collect, "collectOscillationFailed", self._collection_failed)
        # Either may come first (GenericDiffractometer updates its scale on the zoom's predefinedPositionChanged):
        # each is compared with the recording's scale.
        zoom = getattr(bl.diffractometer, "zoom", None)
        if zoom is not None:
            self.connect(zoom, "valueChanged", self._zoom_changed)
        self.connect(bl.diffractometer, "pixelsPerMmChanged", self._scale_changed)
        # Helical end points reach the collect object only through set_helical_pos.
        original = collect.set_helical_pos

        def set_helical_pos(arg):
            self._helical_positions = arg
            return original(arg)

        collect.set_helical_pos = set_helical_pos

    def _zoom_changed(self, value):
        self.recorder.end_if_rescaled(HWR.beamline.diffractometer.get_pixels_per_mm(), getattr(value, "name", value))

    def _scale_changed(self, *pair):
        # GenericDiffractometer emits ((x, y)), which mxcubecore's emit passes as two arguments; others (EMBLMiniDiff,
        # PX2Diffractometer...) emit (((x, y),)), one.
        zoom = getattr(HWR.beamline.diffractometer, "zoom", None)
        self.recorder.end_if_rescaled(pair[0] if len(pair) == 1 else pair,
                                      getattr(zoom.get_value(), "name", None) if zoom else None)

    def _hold_collections_while_centring(self):
        """Make a collection, or the queue's next entry, started during an optical ML centring wait for it to end.

        Nothing in mxcubeweb or the queue keeps a collection from starting while a centring moves the sample: it
        exposed a turning, moving crystal, and a failed centring's move back moved it during the collection. The
        queue's data collection reads the sample's position (its centred point) before it calls the collect
        object, so the queue's entries wait before they start.
        """
        if HWR.beamline.queue_manager is not None:
            self.connect(HWR.beamline.queue_manager, "queue_entry_execute_started", self._queue_entry_starting)
        collect = HWR.beamline.collect
        if collect is None:
            return
        original = collect.collect

        @functools.wraps(original)
        def collect_once_centred(*args, **kwargs):
            if self._await_centring("Collection"):
                raise RuntimeError(f"an optical ML centring still moves the sample after {COLLECTION_WAIT_S:g} s: "
                                   "collection not started; stop the centring, then collect")  # fmt: skip
            return original(*args, **kwargs)

        collect.collect = collect_once_centred

    def _await_centring(self, waiting: str, given_up=lambda: False) -> bool:
        """Wait, up to :data:`COLLECTION_WAIT_S` or until ``given_up()``, while an optical ML centring holds the
        sample; whether it still does. ``waiting`` (who waits) is told to the user."""
        if self._centring_holds_sample():
            self.user_log.warning(f"{waiting} waits for the optical ML centring that is moving the sample to end")
            deadline = time.monotonic() + COLLECTION_WAIT_S
            while self._centring_holds_sample() and time.monotonic() < deadline and not given_up():
                gevent.sleep(0.05)
        return self._centring_holds_sample()

    def _queue_entry_starting(self, entry):
        # mxcubecore's signals are plain calls: this runs in the queue's greenlet before the entry, so waiting
        # here holds the entry back.
        queue = HWR.beamline.queue_manager
        name = entry.get_type_str() or type(entry).__name__  # a task group's is ""
        self._holding_queue += 1
        try:
            held = self._await_centring(f"Queue entry {name!r}", given_up=lambda: not queue.is_executing())
        finally:
            self._holding_queue -= 1
        if held and queue.is_executing():
            self.user_log.error(f"Queue stopped: an optical ML centring still moves the sample after "
                                f"{COLLECTION_WAIT_S:g} s; stop the centring, then run the queue again")  # fmt: skip
            queue.stop()
        if not queue.is_executing():
            # Stopped meanwhile: the entry must not start. A receiver's exceptions are printed and ignored, all but
            # the one that ends a greenlet, as the queue's own Stop ends it (it kills no single entry run alone).
            raise gevent.GreenletExit

    def _centring_holds_sample(self) -> bool:
        """Whether an optical ML centring moves the sample, or a press of the button readies the diffractometer
        for one (seconds on an MD3; not once cancelled: mxcubeweb cancels before it starts a click centring)."""
        return self._centring_lock.locked() or (self._button_pressed and not self._cancelled_while_readying)

    def _read_motors(self) -> dict:
        motors = HWR.beamline.diffractometer.get_motors()
        return {name: motors[name].get_value() for name in CENTRING_MOTORS if name in motors}

    def _recording_context(self) -> dict:
        bl = HWR.beamline
        diffr = bl.diffractometer
        zoom = diffr.zoom.get_value() if getattr(diffr, "zoom", None) else None
        loaded = bl.sample_changer.get_loaded_sample() if bl.sample_changer else None
        width, height = bl.beam.get_beam_size()  # the beam is required: the beam position places every crop
        return {
            "beamline": getattr(bl.session, "beamline_name", None),
            "zoom": getattr(zoom, "name", zoom),
            "pixels_per_mm": list(diffr.get_pixels_per_mm()),
            "beam_position": list(bl.beam.get_beam_position_on_screen()),
            "beam_size_um": [1000 * width, 1000 * height] if width else None,
            "loaded_sample": loaded.get_address() if loaded is not None else None,
        }

    def _collection_started(self, *args):
        # Helical end points belong to the collection they were set for.
        helical, self._helical_positions = self._helical_positions, None
        collect = HWR.beamline.collect
        try:
            # AbstractMultiCollect-based objects have no current_dc_parameters.
            dc_params = find_dc_params(args, getattr(collect, "current_dc_parameters", None))
            if dc_params is None:
                self.log.warning("AutoCenter: collection started without parameters; not recording")
                return
            self.recorder.start(dc_params, helical)
        except Exception:
            # Recording must never disturb the collection.
            self.log.exception("AutoCenter: could not start recording")
            return
        # The collection's own greenlet, if the signal comes from it (AbstractCollect):
        # its end tells a killed or failed collection apart.
        task = getattr(collect, "data_collect_task", None)
        if self.recorder.recording and task is gevent.getcurrent():
            task.link(functools.partial(self._collection_task_ended, self.recorder.current))

    def _collection_task_ended(self, recording, task):
        # AbstractCollect.stop_collect kills the collection's greenlet, and a
        # killed collection sends none of the signals that end a recording.
        reason = None
        if isinstance(task.value, gevent.GreenletExit):
            status, reason = "aborted", COLLECTION_STOPPED
        elif task.exception is not None or isinstance(task.value, TaskException):
            # TaskException: what mxcubecore's @task makes of an error
            status, reason = "failed", f"{COLLECTION_FAILED} ({task.exception or task.value})"
        else:
            status = "complete"
        self.recorder.stop_later(status, only=recording, reason=reason)

    def _stop_recording(self, status, args=(), reason=None):
        # The recording ends now; its file closes in the background, not on the collect object's greenlet.
        if self.recorder is not None:
            self.recorder.stop_later(status, dc_params=find_dc_params(args), reason=reason)

    def _collection_finished(self, *args):
        # AbstractMultiCollect sends collectEnded(owner, success, message), also from
        # the finally of a collection being killed.
        reason = None
        if isinstance(sys.exc_info()[1], gevent.GreenletExit):
            status, reason = "aborted", COLLECTION_STOPPED
        elif len(args) > 1 and args[1] is False:
            status, reason = "failed", _collect_said("the collection ended unsuccessfully", args)
        else:
            status = "complete"
        self._stop_recording(status, args, reason)

    def _collection_failed(self, *args):
        self._stop_recording("failed", args, _collect_said(f"{COLLECTION_FAILED}, as the collect object signalled", args))

    # -- centring -------------------------------------------------------------

    def _load_models(self):
        """Load the models now, so that a missing or wrong model shows at start-up, not at the first click."""
        try:
            # On a thread: TensorFlow and the models take seconds to load, which the other hardware objects'
            # greenlets (channel polls, camera streams) would otherwise wait out.
            loader = gevent.threadpool.ThreadPool(1)
            try:
                loaded = loader.apply(
                    _predictor_or_error,
                    (self.config.centring_model, self.config.centring_classifier, self.config.centring_ice_model),
                )
            finally:
                loader.kill()
            if isinstance(loaded, PredictorError):
                raise loaded
            self.predictor = loaded
        except PredictorError as err:
            self.centring_error = str(err)
            self.log.error("AutoCenter: optical ML centring unavailable: %s", err)
        else:
            self.log.info("AutoCenter: centring with %s", self.predictor.describe())
            self._freeze_the_model()

    def use_predictor(self, predictor):
        """Centre with ``predictor`` from now on (a model loaded after start-up), unless the geometry forbids it."""
        self.predictor = predictor
        self.centring_error = None
        self._freeze_the_model()  # as at start-up: the new model out of full garbage collections
        self._check_geometry()
        # A model that failed at start-up left the button running lucid.
        if self.config.centring_enabled and self.centring_error is None:
            self._take_over_auto_centring()

    def _freeze_the_model(self):
        self.log.info("AutoCenter: the model's objects frozen out of garbage collection (the event loop paused "
                      "%.2f s for one full collection)", freeze_long_lived_objects())  # fmt: skip

    def _check_geometry(self):
        """Refuse to centre on a goniometer set up unlike the projection the centring uses (geometry.py).

        Motor directions of -1 are taken into account (geometry.sample_frame); a motor direction other than
        +1 or -1, or a chi angle, is not.
        """
        sample_view = HWR.beamline.sample_view
        if sample_view is None:
            return
        odd_motors = sorted(
            name for name, motor in sample_view.centring_motors.items()
            if name in CENTRING_MOTORS and motor.direction not in (1, -1)
        )  # fmt: skip
        problems = []
        if odd_motors:
            problems.append(f"motor_directions of {', '.join(odd_motors)} are not 1 or -1")
        if sample_view.chi_angle:
            problems.append(f"chi_angle is {sample_view.chi_angle}, not 0")
        if problems:
            self.centring_error = (
                f"the sample view's {' and '.join(problems)} (SampleView XML): the optical ML centring projects "
                "sample points with motor directions of +1 or -1 and chi 0 (mxcube_autocenter/geometry.py), so it "
                "would centre the wrong point; keep MXCuBE's own centring on this goniometer (centring_enabled False)"
            )
            # An error only where the button would run it: once centring_enabled is False, as the fix says, a note.
            (self.log.error if self.config.centring_enabled else self.log.info)(
                "AutoCenter: optical ML centring unavailable: %s", self.centring_error)

    def _note_rotation_axis(self):
        """Warn where phiz has no ``centring_reference_position``: the centring then takes the axis at phiz 0.

        mxcubecore's sine fit finds the axis from the clicks, so a click centring works without it; the
        optical ML centring projects its views with the axis where the reference says, and a centring with
        the axis 30 um off lay some 60 um off the crystal, which the verification view did not catch.
        """
        sample_view = HWR.beamline.sample_view
        phiz = None if sample_view is None else sample_view.centring_motors.get("phiz")
        if phiz is not None and phiz.reference_position is None and self.config.centring_enabled \
                and self.centring_error is None:  # fmt: skip
            self.log.warning(
                "AutoCenter: phiz has no centring_reference_position (SampleView XML), so the optical ML centring "
                "takes the rotation axis to cross the beam at phiz 0; where it does not (an MD3's calibrated "
                "AlignmentZ), centred points are off by about twice the difference: give phiz its reference position")

    def _register_queue_task(self):
        if HWR.beamline.queue_manager is None:
            # QueueManager.init replaces the mapping that registration writes into.
            self.log.warning(
                "AutoCenter: loaded before queue_manager, so the '%s' queue task is unavailable and the queue "
                "does not wait for a centring; list auto_centring after queue_manager in beamline.yaml", TASK_NAME
            )
            return
        register_queue_entry()

    def centring_settings(self, n_angles=None) -> procedure.CentringSettings:
        """The procedure's settings from the XML properties; ``n_angles`` overrides ``centring_angles``.

        Raises
        ------
        ValueError
            If ``n_angles`` is outside the ``centring_angles`` property's range.
        """
        if n_angles is None:
            overrides = {}
        else:
            # The property's blind_views, as far as fewer views allow: two must see the crystal.
            n_angles = check_centring_angles(n_angles)
            overrides = {"n_angles": n_angles, "blind_views": min(self.config.blind_views, n_angles - 2)}
        return procedure.CentringSettings.from_config(self.config, **overrides)

    def centre(self, n_angles: int | None = None, save: bool = True, keep=None) -> procedure.CentringResult:
        """Centre the crystal in the beam (blocking; call it from a greenlet or a script).

        Parameters
        ----------
        n_angles : int, optional
            Views over half a turn of omega; default: the ``centring_angles`` property.
            Of fewer than ``blind_views`` + 2, at most ``n_angles`` - 2 may be blind.
        save : bool
            Save the heatmap overlays and a JSON record to ``centring_save_directory``.
        keep : callable, optional
            Called once centred, before anyone is told: what makes the centred
            position the caller's (the button's: read it and save it on the
            diffractometer). If it raises, the centring fails and the sample
            goes back; a ``gevent.Timeout`` (a caller's deadline, or the
            hardware's) is then raised again.

        Returns
        -------
        CentringResult
            ``success`` False, with the reason, when no crystal was found or the
            centring failed; the sample is then where it started. Also False,
            with nothing moved, when a centring is already running.

        Raises
        ------
        ValueError
            If ``n_angles`` is outside the ``centring_angles`` property's range.
        gevent.Timeout
            One that reached the centring after the move (in ``keep`` or
            while the heatmap is published), raised once the sample is back.
        """
        settings = self.centring_settings(n_angles)
        bl = procedure.CentringHardware(HWR.beamline, settings.snapshot_fresh_frames, self.log)
        refusal = self.centring_error or self._centring_running()
        if refusal:
            self.user_log.warning(f"Optical ML centring not started: {refusal}")
            return procedure.not_started(bl, refusal)
        with self._centring_lock:
            self.emit("centringProgress", ("Optical ML centring started",))
            refusal = self._enter_centring_phase()
            if refusal:
                self.user_log.warning(f"Optical ML centring: {refusal}")
                return procedure.not_started(bl, refusal)
            result = procedure.centre(bl, self.predictor, settings, self.log)
            self.last_result = result
            try:
                self._publish_heatmap(result)  # reads motors: on an MD3 it waits on the network
                # Last before it is said: a Stop during the reads above must not leave this position saved.
                if result.success and keep is not None:
                    try:
                        keep()
                    except (Exception, gevent.Timeout) as err:
                        self.log.exception("AutoCenter: the centred position could not be kept")
                        self._put_back(bl, result, settings, f"the centred position could not be read or saved ({err})")
                        if isinstance(err, gevent.Timeout):
                            raise  # perhaps a script's deadline: it must still end the script, the sample now back
                (self.user_log.info if result.success else self.user_log.warning)(
                    f"Optical ML centring: {result.message}"
                )
                self.emit("centringProgress", (result.message,))
            except (gevent.GreenletExit, gevent.Timeout):
                # Aborted after the move but before anyone was told: it ends as an aborted
                # centring, so the sample goes back as on any abort.
                if result.success:
                    self._put_back(bl, result, settings, "aborted after the move")
                raise
        if save and self.config.centring_save_directory:
            self._save_in_background(result, self.config.centring_save_directory, bl.beam_position())
        return result

    def _save_in_background(self, result, directory, beam_position):
        """Save a centring's record on a thread of its own, one at a time; never waits."""
        # Saves that hang (a stalled network file system) must not take the hub's pool threads, which every
        # centring's loop finding and inference wait for, nor make the end of a centring wait for a free one.
        if self._record_saving is not None and not self._record_saving.ready():
            self.log.error("AutoCenter: centring record not saved in %s: the previous one is still being written "
                           "(check the file system of centring_save_directory)", directory)  # fmt: skip
            return
        self._record_saving = self._record_writer.spawn(self._save_record, result, directory, beam_position)

    def wait_for_records(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the last centring's record to be saved (or to fail); whether it ended."""
        saving = self._record_saving
        if saving is None:
            return True
        saving.wait(timeout_s)
        return saving.ready()

    def _put_back(self, bl, result, settings, why: str):
        """Fail a centring that had moved the sample, and put the sample back where it started."""
        result.success = False
        # As it stands should the way back be interrupted (an abort, a caller's time-out): restore then raises.
        result.message = f"{why}: the way back was interrupted; the log says whether the sample got there"
        not_returned = procedure.restore(bl, result.start_positions, settings.move_timeout_s, self.log)
        result.message = f"{why}: " + (
            f"the sample was NOT returned to its starting position: {not_returned}" if not_returned
            else "the sample went back"
        )  # fmt: skip

    def _enter_centring_phase(self) -> str | None:
        """Put the diffractometer in its Centring phase unless it is there; why not, or None.

        The queue's task and scripts reach :meth:`centre` without SampleView's button, which sets
        the phase: an MD3 left in DataCollection (after a collection) or Transfer (after a mount)
        has its backlight out, so no loop is seen. A diffractometer in that phase already is left
        alone: mxcubecore's set_phase waits for a state change that a phase it is in may never bring.
        """
        diffr = HWR.beamline.diffractometer
        try:
            centring = diffr.get_phase_enum.CENTRE
            phase = diffr.get_phase()
            if phase == centring:
                return None
            self.log.info("AutoCenter: diffractometer phase %s: moving to %s", phase, centring.value)
            # An MD3's own set_phase waits up to 600 s before its timeout applies: the bound is kept here.
            with gevent.Timeout(PHASE_TIMEOUT_S, RuntimeError(f"no Centring phase within {PHASE_TIMEOUT_S:.0f} s")):
                # As the button does: an MD3 still busy (after a mount) refuses a phase change.
                diffr.wait_status_ready(PHASE_TIMEOUT_S)
                diffr.set_phase(centring, timeout=PHASE_TIMEOUT_S)
        except Exception as err:
            return f"the diffractometer did not reach its Centring phase ({type(err).__name__}: {err}); nothing moved"
        return None

    def _save_record(self, result, directory, beam_position):
        # On a pool thread: nobody waits for it, so a failure is only logged.
        try:
            report.save(result, directory, beam_position)
        except OSError as err:
            self.log.error("AutoCenter: centring record not saved (check centring_save_directory): %s", err)
        except Exception:
            # Nothing collects the thread's result: unlogged here, the failure would reach only stderr.
            self.log.exception("AutoCenter: centring record not saved in %s: please report it", directory)

    def _centring_running(self) -> str | None:
        """Why a centring may not start now, or None."""
        # The press's own procedure may start before the press is over (a listener of centringStarted yields).
        pressed = self._button_pressed and gevent.getcurrent() is not HWR.beamline.sample_view.current_centring_procedure
        if self._centring_lock.locked() or pressed:
            return "an optical ML centring is already running: wait for it to end, or cancel it"
        # SampleView's own procedure: a centring by hand, or the one whose greenlet calls centre().
        procedure_running = HWR.beamline.sample_view.current_centring_procedure
        if procedure_running and procedure_running is not gevent.getcurrent():
            return "a centring is open in the sample view: accept or cancel it first"
        # The collection's greenlet (AbstractCollect's; other collect objects have none to look at): nothing in
        # mxcubeweb keeps the button from turning and moving the sample under a running collection.
        collecting = getattr(HWR.beamline.collect, "data_collect_task", None)
        if collecting is not None and not collecting.dead:
            return "a collection is running: centre once it has ended"
        return None

    def _publish_heatmap(self, result: procedure.CentringResult):
        """Show the heatmap of the view on screen now as a grid result, where the web UI draws it.

        The grid covers the heatmap's points in the view taken at the omega
        the goniometer is at now (after a failure, which puts the sample
        back, the first view) and moves with the sample like any shape; its
        result is a PNG of the heatmap (MXCuBE's default
        ``mesh_result_format``). The previous centring's grid is replaced.
        Nothing is shown when no view was taken within SampleView's
        ``hide_grid_threshold`` of the current omega, or at another zoom than
        the current one (the grid's place and cells come from the current
        scale). Never raises: the centring's outcome stands whatever happens
        here.
        """
        sample_view = HWR.beamline.sample_view
        try:
            grid = self._heatmap_grid
            # Only our grid: mounting a sample clears the shapes and restarts their ids, so a grid the user has
            # drawn since may have our grid's id.
            if grid is not None and sample_view.get_shape(grid.id) is grid:
                sample_view.delete_shape(grid.id)
                sample_view.emit("shapesChanged")  # the web UI drops it now, even when no new grid follows
            self._heatmap_grid = None
            now = sample_view.get_positions()
            views = result.angles + ([result.verification] if result.verification else [])
            angle = report.nearest_view(views, now["omega"], sample_view.hide_grid_threshold)
            if angle is None:
                return
            ppmm = HWR.beamline.diffractometer.get_pixels_per_mm()
            beam_now = HWR.beamline.beam.get_beam_position_on_screen()
            if result.optics is None or not procedure.same_optics(result.optics, (ppmm, beam_now)):
                self.log.info("AutoCenter: the zoom changed since the centring's views: no heatmap shown")
                return
            cells = report.grid_cells(angle.heatmap, ppmm, self.config.heatmap_stride_px)
            # get_centred_point_from_coord works from the motors as they are now: shift
            # it back to the translations the view was taken at (the fitted views' are
            # where the centring started, the verification view's where it ended).
            corner = sample_view.get_centred_point_from_coord(*cells.corner, return_by_names=True)
            for name in TRANSLATION_MOTORS:
                corner[name] += angle.motors[name] - now[name]
            grid = sample_view.add_shape_from_mpos([corner], cells.corner, "G")
            self._heatmap_grid = grid  # on SampleView now: the next centring deletes it, even if this one fails below
            grid.label = "ML heatmap"
            grid.name = f"ML heatmap omega {angle.omega % 360:.0f}"
            grid.num_cols, grid.num_rows = cells.columns, cells.rows
            grid.cell_width, grid.cell_height = cells.cell_um
            grid.cell_h_space = grid.cell_v_space = 0
            grid.width, grid.height = cells.step[0] * cells.columns, cells.step[1] * cells.rows
            grid.pixels_per_mm = list(ppmm)
            grid.beam_pos = list(beam_now)
            grid.update_position(sample_view.motor_positions_to_screen)
            sample_view.emit("shapesChanged")
            sample_view.set_grid_data(grid.id, report.heatmap_png_base64(angle.heatmap.values), "")
        except Exception:
            self.log.exception("AutoCenter: could not publish the centring heatmap")

    def _guard_sample_view(self):
        """Refuse SampleView's own centrings, image clicks and moves to the beam while an optical ML centring runs.

        mxcubeweb only checks ``current_centring_procedure``, which a script's or queue task's centring does
        not set, so a click centring (or lucid's, from the button while it is not taken over) would move the
        sample under it; a click on the image during a centring from the button would reach the sine fit as
        one of its points; and mxcubeweb's "move to beam" checks nothing, so it would move the sample between
        the views, whose projections the fusion takes for those of one sample position. mxcubeweb's "accept
        centring" would say ``centringAccepted(True)`` mid-centring: mxcubeweb saves a point there, and the queue's
        mount step goes on with the sample still turning.
        """
        sample_view = HWR.beamline.sample_view
        if sample_view is None:
            self.log.error("AutoCenter: loaded before sample_view, so nothing keeps SampleView's centrings from "
                           "moving the sample during an optical ML centring, and the auto-centring button keeps "
                           "lucid's centring: list auto_centring after sample_view in beamline.yaml")  # fmt: skip
            return
        sample_view.start_auto_centring = self._refused_while_centring(
            sample_view.start_auto_centring, "Automatic centring not started", verdict="Automatic")
        sample_view.start_manual_centring = self._refused_while_centring(
            sample_view.start_manual_centring, "Click centring not started", verdict="Manual")
        sample_view.image_clicked = self._refused_while_centring(sample_view.image_clicked, "Click ignored")
        sample_view.move_to_beam = self._refused_while_centring(sample_view.move_to_beam, "Move to beam refused")
        sample_view.accept_centring = self._refused_while_centring(sample_view.accept_centring, "Centring not accepted")

    def _take_over_auto_centring(self):
        """Make SampleView's automatic centring run :meth:`centre`, with its usual signals."""
        sample_view = HWR.beamline.sample_view
        if self._took_over or sample_view is None:  # the latter said by _guard_sample_view
            return
        self._took_over = True
        sample_view.start_auto_centring = self.start_auto_centring
        sample_view.cancel_centring = self._noting_cancel(sample_view.cancel_centring)
        sample_view.reject_centring = self._ending_the_press(sample_view.reject_centring)
        self.log.info("AutoCenter: SampleView automatic centring now runs the optical ML centring")

    def _refused_while_centring(self, method, refusal: str, verdict: str | None = None):
        """``method``, refused with ``refusal`` said to the user while an optical ML centring holds the sample.

        A refused centring method (``verdict``) also ends as failed, for whoever waits for its outcome.
        """

        @functools.wraps(method)
        def unless_centring(*args, **kwargs):
            # Cancelling a centring from the button ends it before mxcubeweb starts a click centring: a centring
            # still running here is a script's or the queue's, or the click landed in the middle of one.
            if self._centring_holds_sample():
                self.user_log.warning(f"{refusal}: an optical ML centring is moving the sample; wait for it to end")
                if verdict:
                    self._refused_verdict(HWR.beamline.sample_view, verdict)
                return None
            return method(*args, **kwargs)

        return unless_centring

    def _noting_cancel(self, method):
        """SampleView's ``cancel_centring``, which also cancels a press of the button still readying the diffractometer.

        mxcubeweb's Stop (and a click on the image) cancels through SampleView, which has no procedure to kill
        until the diffractometer is ready: the press must not start the centring after that.
        """

        @functools.wraps(method)
        def cancel(*args, **kwargs):
            if self._button_pressed:
                self._cancelled_while_readying = True
            if self._end_press():
                # Its verdict said centringFailed and centringAccepted(False); SampleView's own cancel would say
                # centringFailed once more, after the verdict.
                return None
            if self._centring_lock.locked():
                # A script's or the queue's, which runs in its caller's greenlet: SampleView's cancel would say
                # centringFailed while it goes on moving the sample.
                self.user_log.warning("Stop: the optical ML centring running is the queue's or a script's: stop "
                                      "the queue (or the script) to stop it")  # fmt: skip
                return None
            return method(*args, **kwargs)

        return cancel

    def _ending_the_press(self, method):
        """SampleView's ``reject_centring``, which ends a centring from the button with its own verdict first.

        mxcubeweb's mount step rejects the running centring, then starts the new sample's.
        """

        @functools.wraps(method)
        def reject(*args, **kwargs):
            if self._end_press():
                return None  # the verdict said centringAccepted(False), as SampleView's would
            return method(*args, **kwargs)

        return reject

    def _end_press(self) -> bool:
        """Kill the centring from the button, if it is SampleView's running one, and give its verdict now.

        Now, not from its link: that runs in a greenlet of its own, which reads the motors (a network
        wait on an MD3), and mxcubeweb starts its next centring as soon as the cancel returns: a verdict
        after that would fail the next centring in the web UI, or clear SampleView's hold on it.
        """
        running = HWR.beamline.sample_view.current_centring_procedure
        # Ended on its own, it is a dead (falsy) greenlet whose verdict may still be on its way.
        if running is None or running is not self._pressed_procedure:
            return False
        # Its link stays: a caller that gives up waiting for the way back (its own gevent.Timeout) would leave no
        # verdict at all. It gives none twice: each is given once (_give_verdict).
        try:
            running.kill(block=True)
        except Exception:
            self.log.exception("AutoCenter: problem aborting the optical ML centring")
        self._give_verdict(running, cancelled=True)
        return True

    def start_auto_centring(self):
        """What SampleView.start_auto_centring does, with the ML procedure instead of lucid's loop centring."""
        sample_view = HWR.beamline.sample_view
        ended = self._pressed_procedure
        if ended is not None and ended.dead:
            # Just ended on its own: its link, a greenlet of its own, gives its verdict a few turns of the loop
            # later, and mxcubeweb lets a press through a dead procedure. Given (or waited for) now, before this
            # press's centringStarted.
            self._give_verdict(ended)
        # The last centring's verdict, still reading the motors, would come after this one's start.
        self._await_verdicts()
        # A dead procedure is left there when a manual centring is killed
        # (SampleView.manual_centring_done does not catch GreenletExit): only a
        # running one refuses.
        if self._clicks_hold_the_sample_view(sample_view) and self._mounting():
            # The queue's mount step waits for this centring's verdict without a time-out, and a click centring
            # ends without one unless the user saves its point: it gives way, as lucid's centring takes over.
            self.user_log.warning("Click centring cancelled: the queue centres the sample it mounted")
            sample_view.cancel_centring()
        refusal = self._centring_running()
        if refusal:
            self._refuse_auto_centring(sample_view, refusal)
            return
        # Until the procedure is on SampleView, a second press (while the
        # diffractometer gets ready, which may take seconds) must see this one.
        self._button_pressed = True
        self._cancelled_while_readying = False
        try:
            diffr = HWR.beamline.diffractometer
            diffr.wait_status_ready(READY_TIMEOUT_S)
            # A cancel is looked for after each wait: no phase change (an MD3 moves its backlight and more) and
            # no centring after Stop.
            if self._press_cancelled(sample_view):
                return
            diffr.set_phase(diffr.get_phase_enum.CENTRE)
            if self._press_cancelled(sample_view):
                return
            # On SampleView before centringStarted goes out: a Stop while mxcubeweb handles that signal (it
            # yields) kills it as any running centring.
            sample_view.current_centring_method = "Automatic"
            sample_view.current_centring_procedure = self._pressed_procedure = gevent.spawn(self._auto_centring)
            sample_view.current_centring_procedure.link(self._give_verdict)
            sample_view.emit("centringStarted", ("Automatic",))
        except Exception:
            # The diffractometer not ready in time, a phase it refuses: whoever waits hears that the press failed.
            self.log.exception("AutoCenter: the automatic centring could not start")
            self._button_pressed = False
            self._refused_verdict(sample_view, "Automatic", refused=False)
            raise
        finally:
            self._button_pressed = False

    def _clicks_hold_the_sample_view(self, sample_view) -> bool:
        """Whether SampleView's running procedure is another's than this object's: a click centring, mostly."""
        running = sample_view.current_centring_procedure
        return bool(running) and running is not self._pressed_procedure and not self._button_pressed \
            and not self._centring_lock.locked()

    def _press_cancelled(self, sample_view) -> bool:
        """Whether a cancel came while the press readied the diffractometer; if so, the press ends here."""
        if not self._cancelled_while_readying:
            return False
        self.user_log.info("Optical ML centring cancelled before it started")
        self._button_pressed = False
        # The cancel said centringFailed; whoever waits for the press's outcome waits for centringAccepted.
        self._refused_verdict(sample_view, "Automatic", failed_said=True, refused=False)
        return True

    def _give_verdict(self, procedure, cancelled: bool = False):
        """The verdict of a centring from the button: SampleView's signals, its state if still this centring's.

        What SampleView.auto_centring_done does, but given once however many ask for it (its link, a cancel,
        a reject; the later ones wait for it), and with every wait (motor readings: network requests on an
        MD3) before anything changes: a centring started meanwhile keeps SampleView's procedure and method,
        which SampleView's own would clear.
        """
        done = self._verdicts.get(procedure)
        if done is not None:
            done.wait()
            return
        done = self._verdicts[procedure] = gevent.event.Event()
        try:
            self._judge(procedure, cancelled)
        finally:
            done.set()  # kept: a cancel, a press or the link after the verdict must not give another

    def _judge(self, procedure, cancelled: bool):
        sample_view = HWR.beamline.sample_view
        # A centring cancelled before its first instruction never reached _auto_centring's except: its value is
        # the GreenletExit, which SampleView would accept as centred positions.
        centred = (procedure.successful() and procedure.value is not None
                   and not isinstance(procedure.value, gevent.GreenletExit))  # fmt: skip
        if centred:
            # Read and saved by the procedure itself (_auto_centring), which put the sample back had either failed.
            status = {**sample_view.get_centring_status(), "method": "Automatic", "motors": procedure.value,
                      "valid": True, "accepted": True}  # fmt: skip
        else:
            status = self._status_here(sample_view, "Automatic")  # where it went back
        if sample_view.current_centring_procedure is procedure:
            sample_view.centring_status = copy.deepcopy(status)
            sample_view.current_centring_procedure = None
            sample_view.current_centring_method = None
        # Copies, as SampleView emits: its listeners (mxcubeweb, the queue) keep or change what they get.
        if centred:
            sample_view.emit("centringSuccessful", ("Automatic", copy.deepcopy(status)))
            sample_view.emit("centringAccepted", (True, copy.deepcopy(status)))
            self.user_log.info("Centring successful")
        else:
            sample_view.emit("centringFailed", ("Automatic", copy.deepcopy(status)))
            sample_view.emit("centringAccepted", (False, copy.deepcopy(status)))
            # SampleView's words, which the web UI's log shows.
            cancelled = cancelled or isinstance(procedure.value, gevent.GreenletExit)
            self.user_log.info("Centring cancelled" if cancelled else "Automatic loop centring failed")

    def _await_verdicts(self, timeout: float = 60.0):
        """Wait for the verdicts still on their way: a centring must not start before the last one's is out."""
        for done in list(self._verdicts.values()):
            done.wait(timeout)

    def _refuse_auto_centring(self, sample_view, reason):
        self.user_log.error(f"Optical ML centring not started: {reason}")
        self._refused_verdict(sample_view, "Automatic")

    def _status_here(self, sample_view, method: str) -> dict:
        """The centring status of ``method``, not valid, with the motors where they are now (if they can be read).

        mxcubeweb saves a point at the status's motors on any centringAccepted: the sample's place, not the
        last centring's positions (or none at all before the first one); those only if unreadable.
        """
        status = {**sample_view.get_centring_status(), "method": method, "valid": False, "accepted": False}
        # Read in a greenlet of its own: a gevent.Timeout of the reading's (no Exception) stays there, while the
        # caller's own, which may strike during the wait, goes on up to the caller.
        reader = gevent.spawn(procedure.outcome, sample_view.get_positions)
        try:
            positions, error = reader.get()
        finally:
            reader.kill(block=False)
        if error is None:
            status["motors"] = positions
        else:
            self.log.error("AutoCenter: could not read the motors for the centring status", exc_info=error)
        return status

    def _refused_verdict(self, sample_view, method: str, failed_said: bool = False, refused: bool = True):
        # Whoever waits for the outcome of the refused centring must hear of it (the queue's mount step waits
        # for centringAccepted, without a time-out); SampleView's own state belongs to the centring that is
        # running and is left alone.
        if self._button_pressed or sample_view.current_centring_procedure:
            # A centring started through SampleView (a press still getting the diffractometer ready, or a
            # running automatic centring) ends with its own centringAccepted, which every waiter hears, the
            # refused caller included; a verdict now would end the wait of that centring's own caller (the
            # queue's mount step) while the sample is still being moved. A click centring says it only once its
            # point is saved: the queue's mount step cancels one (start_auto_centring).
            return
        status = self._status_here(sample_view, method)
        if not failed_said:
            sample_view.emit("centringFailed", (method, status))
        # A press that failed or was cancelled ends as SampleView's own failed centring does. A centring refused
        # (``refused``: another one runs, or a collection) is waited for only by the queue's mount step; a press
        # or a click by the user waits for nothing, and mxcubeweb would save a point at the sample's place in the
        # middle of the other centring (a script's or the queue's), and select it for the next collection.
        if not refused or self._mount_step_may_wait():
            sample_view.emit("centringAccepted", (False, status))

    @staticmethod
    def _mounting() -> bool:
        """Whether the queue is mounting a sample (its mount step centres it after loading it)."""
        queue = HWR.beamline.queue_manager
        return queue is not None and queue.is_executing() and isinstance(queue.get_current_entry(), SampleQueueEntry)

    def _mount_step_may_wait(self) -> bool:
        """Whether the queue's mount step may be the caller just refused, waiting for its verdict.

        The queue runs one entry at a time: while it runs an optical ML centring or a collection, or holds its
        next entry back for a centring, no mount step of it waits, and the caller refused is the user.
        """
        queue = HWR.beamline.queue_manager
        if queue is None or not queue.is_executing() or self._holding_queue:
            return False
        return not isinstance(queue.get_current_entry(), (OpticalMLCentringQueueEntry, DataCollectionQueueEntry))

    def _auto_centring(self):
        # SampleView.auto_centring_done accepts the centring unless this returns None,
        # and a killed greenlet returns its GreenletExit: a cancelled centring
        # (the sample already back where it started) must end as a failed one.
        sample_view = HWR.beamline.sample_view
        kept = {}

        def keep():
            # Before the verdict, in this greenlet: a position that cannot be read or saved is put back here, and
            # mxcubeweb saves its point (the next collection's place) at the status's motors.
            kept["motors"] = sample_view.get_positions()
            HWR.beamline.diffractometer.save_centring_positions()

        try:
            result = self.centre(keep=keep)
        except gevent.GreenletExit:
            return None
        except gevent.Timeout:
            # No Exception, so SampleView's link callback would die on it and no verdict would reach the queue.
            self.log.exception("AutoCenter: centring timed out")
            return None
        return kept["motors"] if result.success else None
