"""The main job on the virtual beamline: record, label, train, centre, score.

``mxcube-autocenter demo`` (what ``make demo`` runs) boots the virtual
beamline as a real mxcubecore HardwareRepository with the AutoCenter object
and runs the whole loop the plugin is made for:

1. **Record.** Mount training samples, run a helical and a rotational
   collection of each through the collect object; the AutoCenter object
   records the camera during both, as it would during user operation.
2. **Label.** Count the reflections of every EIGER frame with the spot
   finder and match the camera frames to them in time
   (:func:`labelling.pipeline.label_recordings`).
3. **Train.** A regressor of the reflection count (and the crystal/empty
   classifier) with quick settings, and the learning report on the
   held-out crystals of the split.
4. **Centre.** Mount held-out samples (other seeds, shapes and lighting,
   some empty loops), put each where a freshly mounted sample is (in view,
   not centred) and centre it with each method: the optical ML centring
   through ``SampleView.start_auto_centring`` exactly as the web UI's button
   runs it, MXCuBE's own lucid loop centring, a person clicking the loop's
   centre, an X-ray mesh scan and the optical oracle (the best point of the
   crystals' shapes, known exactly).
5. **Score** against the ground truth (:mod:`mxcube_autocenter.scorecard`)
   and write ``report.md`` with figures.

``run_demo`` takes every size as a parameter, so the tests run it small.
gevent must be monkey-patched before it is called (the command line and the
test suite do so first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from mxcube_autocenter import code_version, scorecard  # noqa: E402
from mxcube_autocenter.beamline import ZOOM_LEVEL, set_zoom  # noqa: E402
from mxcube_autocenter.geometry import CENTRING_MOTORS, TRANSLATION_MOTORS, centred_motors, sample_to_screen  # noqa: E402
from mxcube_autocenter.outputs import json_default, save_figure_whole, write_json_whole, write_text_whole  # noqa: E402
from mxcube_autocenter.scorecard import METHODS, TRAINED_IN_RUN, Outcome, format_cell, value_cell  # noqa: E402

log = logging.getLogger(__name__)

# Seeds of the training samples and of the held-out samples never overlap.
TRAIN_SEED0 = 10_000
HELDOUT_SEED0 = 50_000
CENTRING_TIMEOUT_S = 120.0
# Held-out samples cycle through these variations of make_sample's defaults.
HELDOUT_VARIANTS = (
    ("default", {}),
    ("ice", {"ice": True}),
    ("mesh loop", {"loop_kinds": ("mesh",)}),
    ("needles and rods", {"habits": ("needle", "rod")}),
    ("small loop", {"loop_size_um": (120.0, 300.0)}),
    ("plates", {"habits": ("plate",)}),
)
# A classifier trained in the run centres only if it separates crystals from empty crops on its validation
# crystals at least this well (balanced accuracy); a coin-flip classifier would refuse crystals at random.
CLASSIFIER_MIN_BALANCED_ACCURACY = 0.7
FULL = dict(n_train=20, n_heldout=20, n_empty=4)
QUICK = dict(n_train=0, n_heldout=10, n_empty=2)


class DemoError(RuntimeError):
    """The demo cannot run (no model to centre with, nothing labelled, ...); the message says what to do."""


@dataclass
class _Watcher:
    """Receives SampleView's centringAccepted (slots are weak references: keep this object alive)."""

    calls: list = field(default_factory=list)

    def accepted(self, *args):
        self.calls.append(args)


def _say(message: str):
    print(message, file=sys.stderr, flush=True)


# -- logging ------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_logging(log_path: Path):
    """Send the beamline's log to ``log_path`` instead of the terminal while the demo runs."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handler = logging.FileHandler(log_path, mode="w")
    except OSError as err:  # an --out that exists but may not be written (read-only, another user's)
        raise DemoError(f"cannot write {log_path} ({err.strerror or err}): choose another --out") from err
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    saved_root_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    silenced = []

    def silence():
        for name in [None, *logging.root.manager.loggerDict]:
            logger = logging.getLogger(name) if name else root
            if not isinstance(logger, logging.Logger):
                continue
            for h in logger.handlers:
                if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr,
                                                                                    sys.__stdout__, sys.__stderr__):
                    silenced.append((h, h.level))
                    h.setLevel(logging.CRITICAL + 1)

    silence()
    try:
        yield silence  # call again once the beamline has added its handlers
    finally:
        for h, level in silenced:
            h.setLevel(level)
        root.removeHandler(handler)
        root.setLevel(saved_root_level)
        handler.close()


# -- the beamline -------------------------------------------------------------------


def _positions(bl) -> dict:
    """Where the sample is, in the frame the ground truth and the scores use (not the raw readings)."""
    motors = bl.diffractometer.get_motors()
    return bl.diffractometer.sample_frame({name: float(motors[name].get_value()) for name in CENTRING_MOTORS})


def _move(bl, positions: dict, timeout: float = 30.0):
    """Move the sample to positions in that frame, whatever the configured directions and rotation axis."""
    readings = bl.diffractometer.readings(positions)
    bl.diffractometer.set_value_motors({k: float(v) for k, v in readings.items()}, timeout=timeout)


# -- 1. recording ---------------------------------------------------------------------


def _record_training_data(bl, ho, data_dir: Path, seeds, *, n_images, exposure_time, rng, progress) -> tuple:
    """Mount each training sample, collect helically and rotationally; ``(recordings, truth)``: the recordings and
    each crystal's diffraction model."""
    from tqdm import tqdm

    from mxcube_autocenter.simulation.experiments import aim_point, helical_and_rotation, recorded_collection
    from mxcube_autocenter.simulation.render import random_look
    from mxcube_autocenter.simulation.sample import make_sample

    recordings, failures, truth = [], [], {}
    bar = tqdm(seeds, desc="1/5 recording collections", unit="sample", disable=not progress)
    for seed in bar:
        bl.sample_view.camera.set_look(random_look(rng))
        mounted = bl.sample_changer.mount(make_sample(int(seed)), crystal_id=f"seed{seed}")
        truth[mounted.crystal_id] = mounted.diffraction
        # A person centres roughly: about 10 um off the best point along each axis.
        aim = aim_point(mounted) + rng.normal(0.0, 0.01, 3)
        scans = helical_and_rotation(bl, mounted, rng, helical_range=0.2, rotation_range=2.0)
        for run, (kind, extra) in enumerate(scans, start=1):
            # Start where the scan starts, so that the collection does not wait for omega to turn there
            # (osc_start, as the helical line's ends, is a reading).
            osc_start = float(rng.uniform(0, 360))
            first = extra["helical"][0] if kind == "Helical" else bl.diffractometer.readings(centred_motors(aim))
            bl.diffractometer.set_value_motors({**{m: first[m] for m in TRANSLATION_MOTORS}, "omega": osc_start},
                                               timeout=30.0)  # fmt: skip
            summary = recorded_collection(bl, ho.recorder, data_dir, f"train{seed}", experiment_type=kind,
                                          run_number=run, n_images=n_images, exposure_time=exposure_time,
                                          osc_start=osc_start, crystal_id=mounted.crystal_id, **extra)  # fmt: skip
            if summary is not None and summary.status == "complete":
                recordings.append(Path(summary.path))
            else:
                failures.append(f"seed {seed} {kind}: {summary}")
        bar.set_postfix_str(mounted.sample.describe()[:60])
    for failure in failures:
        log.warning("recording failed: %s", failure)
    return recordings, truth


def exposure_motors(scan_ids, timestamps, motors, latency_s: float) -> np.ndarray:
    """Each row's motor positions when its camera frame was exposed, ``latency_s`` before they were read.

    The recorder reads the motors when a frame arrives; the image shows the
    sample a camera latency earlier (a degree of omega in a fast rotation).
    Linear between the rows of one collection (the motors move at constant
    speed during it), held at its first row before it.

    Parameters
    ----------
    scan_ids : (N,) array_like of str
    timestamps : (N,) array_like of float
        Arrival times, s.
    motors : (N, M) array_like of float
        The positions read at arrival.
    latency_s : float

    Returns
    -------
    (N, M) ndarray
    """
    scan_ids, timestamps = np.asarray(scan_ids), np.asarray(timestamps, dtype=np.float64)
    motors = np.asarray(motors, dtype=np.float64)
    out = motors.copy()
    for scan in np.unique(scan_ids):
        rows = np.flatnonzero(scan_ids == scan)
        rows = rows[np.argsort(timestamps[rows], kind="stable")]
        for column in range(motors.shape[1]):
            out[rows, column] = np.interp(timestamps[rows] - latency_s, timestamps[rows], motors[rows, column])
    return out


def _add_ground_truth(dataset: Path, truth: dict, sample_frame, camera_latency_s: float) -> None:
    """Add ``rc_expected`` and ``rc_shapes`` to the labelled set: each row's true and shapes-only expected counts.

    The recorded count of a row is a Poisson draw of ``rc_expected``, found
    again by spot finding: the true count is what a perfect model would
    predict, and the learning report compares predictions with both.
    ``rc_shapes`` is what exact knowledge of the crystals' shapes predicts
    (``DiffractionModel.shapes_only``), the reference the report compares
    the models with. Both at the motors of the frame's exposure
    (:func:`exposure_motors`), the moment the image shows.

    Parameters
    ----------
    truth : dict
        Crystal id to the mounted sample's ``DiffractionModel``.
    sample_frame : callable
        The diffractometer's ``sample_frame``: the rows' motor readings as the
        simulated sample moves with them (``motor_directions``,
        ``rotation_axis_phiz``), as the camera and the detector see it.
    camera_latency_s : float
        The camera's delay from exposure to delivery, s.
    """
    import gevent

    from mxcube_autocenter.labelling.dataset import add_row_column, read_table
    from mxcube_autocenter.recording import MOTOR_NAMES

    def compute():
        shapes = {crystal: model.shapes_only() for crystal, model in truth.items()}
        rows = read_table(dataset)
        motors = exposure_motors(rows.scan_id, rows.timestamp, rows.extra["motors"], camera_latency_s)
        crystal_motors = [(c, sample_frame(dict(zip(MOTOR_NAMES, m)))) for c, m in zip(rows.crystal_id, motors)]
        add_row_column(dataset, "rc_expected", [truth[c].expected_rc(m) for c, m in crystal_motors],
                       "virtual beamline: expected reflection count at the row's motor positions (ground truth)")
        add_row_column(dataset, "rc_shapes", [shapes[c].expected_rc(m) for c, m in crystal_motors],
                       "virtual beamline: the expected count were every crystal of uniform quality and median "
                       "capacity, what exact knowledge of the crystals' shapes predicts")  # fmt: skip

    # Thousands of rows: off the event loop, which the beamline's greenlets share.
    gevent.get_hub().threadpool.apply(compute)


# -- 3. training ----------------------------------------------------------------------


def _train(dataset: Path, out: Path, *, epochs, classifier_epochs, input_size, crop_um, batch_size, patience, seed,
           classifier: bool, initial=None) -> dict:  # fmt: skip
    """Train (or, with ``initial = (model path, its metadata)``, fine-tune) the regressor, and the classifier."""
    from mxcube_autocenter.learning.evaluate import evaluate
    from mxcube_autocenter.learning.training import train, train_classifier

    common = dict(crop_um=crop_um, input_size=input_size, batch_size=batch_size, patience=patience, seed=seed,
                  verbose=2)  # fmt: skip
    initial_model = None if initial is None else initial[0]
    if initial is None:
        _say(f"3/5 training the regressor (fcn, log counts, {input_size} px input, up to {epochs} epochs)")
        reg = train(dataset, "fcn", "log", out / "regressor", epochs=epochs, **common)
    else:
        info = initial[1]
        crop_um, input_size = info["input"]["crop_um"], info["input"]["input_size"]
        common.update(crop_um=crop_um, input_size=input_size)  # the regressor's input, for the classifier too
        _say(f"3/5 fine-tuning {Path(initial_model).name} on the recordings ({input_size} px input, up to {epochs} "
             "epochs)")  # fmt: skip
        reg = train(dataset, info["architecture"]["name"], info["transform"]["name"], out / "regressor",
                    epochs=epochs, initial_model=initial_model, **common)
    split = reg.info["split"]
    # The test subset may be empty in tiny runs: then the report is on the validation crystals.
    subset = "test" if split["rows"].get("test") else "validation"
    learning = {
        "source": TRAINED_IN_RUN,
        "model": reg.model_path,
        "rows": dict(split["rows"]),
        "crystals": {k: len(split[k]) for k in ("train", "validation", "test")},
        "report_subset": subset,
        "regressor_s": round(reg.seconds, 1),
        "epochs_run": reg.info["training"]["epochs_run"],
        "best_epoch": reg.best_epoch,
        "params": reg.info["architecture"]["params"],
        "input_size": input_size,
        "crop_um": crop_um,
        "fine_tuned_from": None if initial_model is None else Path(initial_model).name,
    }
    metrics = evaluate(reg.model_path, dataset, out / "regressor_report", subset=subset)
    learning["spearman"] = metrics.get("spearman")
    learning["spearman_expected"] = metrics.get("spearman_expected")
    learning["spearman_expected_ci95"] = metrics.get("spearman_expected_ci95")
    learning["pearson"] = metrics.get("pearson")
    learning["regressor_report"] = str(out / "regressor_report" / "report.md")
    if initial_model is not None:
        # The model fine-tuned from never saw any of these crystals: all of them are held out for it.
        shipped = evaluate(initial_model, dataset, out / "initial_model_report", subset="all")
        learning.update(initial_spearman=shipped.get("spearman"), initial_spearman_expected=shipped.get(
            "spearman_expected"), initial_report=str(out / "initial_model_report" / "report.md"))  # fmt: skip
    learning.update(_shapes_reference(dataset, split, subset))
    learning["scatter"] = str(out / "regressor_report" / metrics["figures"]["scatter"]) if metrics.get(
        "figures", {}).get("scatter") else None
    learning["classifier"] = None
    learning["classifier_accuracy"] = None
    learning["classifier_s"] = 0.0
    if classifier:
        if initial_model is None:
            _say(f"3/5 training the crystal/empty classifier (up to {classifier_epochs} epochs)")
            clf = train_classifier(dataset, out / "classifier", epochs=classifier_epochs, split=split, **common)
        else:
            # A few thousand recorded crops teach the thesis' classifier little; the regressor has seen far more.
            _say(f"3/5 training the crystal/empty classifier from {Path(initial_model).name} (fcn_classifier, up to "
                 f"{classifier_epochs} epochs)")  # fmt: skip
            clf = train_classifier(dataset, out / "classifier", arch="fcn_classifier", epochs=classifier_epochs,
                                   split=split, initial_model=initial_model, **common)  # fmt: skip
        cm = evaluate(clf.model_path, dataset, out / "classifier_report", subset=subset)
        validation = (clf.metrics.get("validation") or {}).get("balanced_accuracy")
        used = validation is not None and validation >= CLASSIFIER_MIN_BALANCED_ACCURACY
        learning.update(classifier=clf.model_path, classifier_accuracy=cm.get("accuracy"),
                        classifier_accuracy_expected=cm.get("accuracy_expected"),
                        classifier_accuracy_expected_ci95=cm.get("accuracy_expected_ci95"),
                        classifier_balanced_accuracy=cm.get("balanced_accuracy"),
                        classifier_validation_balanced_accuracy=validation, classifier_used=used,
                        classifier_s=round(clf.seconds, 1),
                        classifier_report=str(out / "classifier_report" / "report.md"))  # fmt: skip
        if not used:
            _say("the classifier is not used for centring: validation balanced accuracy "
                 + (f"{validation:.3f} < {CLASSIFIER_MIN_BALANCED_ACCURACY}" if validation is not None else
                    "unknown (the validation crystals hold one class only)"))  # fmt: skip
    learning["train_s"] = round(learning["regressor_s"] + learning["classifier_s"], 1)
    return learning


def _shapes_reference(dataset: Path, split: dict, subset: str) -> dict:
    """``scorecard.shapes_reference`` on the report's rows, its count threshold fitted on the training rows."""
    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.split import Split
    from mxcube_autocenter.learning.training import DEFAULT_THRESHOLD

    table = read_table(dataset)
    rows = Split.from_config(split).indices(table.crystal_id)
    reference = scorecard.shapes_reference(table.extra["rc_shapes"], table.extra["rc_expected"], rows["train"],
                                           rows[subset], DEFAULT_THRESHOLD)  # fmt: skip
    return {f"shapes_{k}": v for k, v in reference.items()}


def training_seconds(info: dict) -> float | None:
    """Seconds a model file's training took, its earlier stages included (``training.initial_model``, nested).

    A fine-tuned model records its own stage in ``training.seconds`` and the
    model it started from under ``training.initial_model``: the shipped
    regressor's 526 s are its second stage, after 1583 s of the first.
    """
    total, seen = None, 0
    while isinstance(info, dict) and seen < 32:
        training = info.get("training") or {}
        if training.get("seconds") is not None:
            total = (total or 0.0) + float(training["seconds"])
        info, seen = training.get("initial_model"), seen + 1
    return total


def _model_file_learning(predictor) -> dict:
    """The learning figures a model file carries in its metadata (a model not trained in this run)."""
    from mxcube_autocenter.learning.training import load_model

    info = predictor.info
    test = info["metrics"].get("test") or {}
    learning = {
        "source": "model file metadata",
        "model": str(predictor.regressor_path),
        "rows": info["split"].get("rows"),
        "report_subset": "test",
        "spearman": test.get("spearman"),
        "spearman_expected": test.get("spearman_expected"),
        "pearson": test.get("pearson"),
        "regressor_s": training_seconds(info),
        "params": (info.get("architecture") or {}).get("params"),
        "input_size": predictor.spec.input_size,
        "crop_um": predictor.spec.crop_um,
        "classifier": None,
        "classifier_accuracy": None,
        "classifier_s": None,
    }
    if predictor.classifier is not None:
        path = predictor.classifier[0]
        _, cinfo = load_model(path)
        ctest = (cinfo.get("metrics") or {}).get("test") or {}
        learning.update(classifier=str(path), classifier_accuracy=ctest.get("accuracy"),
                        classifier_accuracy_expected=ctest.get("accuracy_expected"),
                        classifier_s=training_seconds(cinfo))  # fmt: skip
    times = [t for t in (learning["regressor_s"], learning["classifier_s"]) if t is not None]
    learning["train_s"] = round(sum(times), 1) if times else None
    return learning


# -- 4. centring ----------------------------------------------------------------------


def _run_sample_view_centring(bl, watcher: _Watcher, start_call, timeout: float = CENTRING_TIMEOUT_S):
    """Start a SampleView centring and wait for centringAccepted; ``(accepted, seconds, message)`` (the message
    empty unless no outcome came in time)."""
    import gevent

    watcher.calls.clear()
    t0 = time.perf_counter()
    start_call()
    deadline = time.monotonic() + timeout
    while not watcher.calls:
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                bl.sample_view.cancel_centring()
            return False, time.perf_counter() - t0, f"no centringAccepted within {timeout} s"
        gevent.sleep(0.02)
    elapsed = time.perf_counter() - t0
    accepted = bool(watcher.calls[0][0]) if watcher.calls[0] else False
    # Let SampleView finish its bookkeeping (current_centring_procedure reset) before the next one.
    while bl.sample_view.current_centring_procedure is not None and time.monotonic() < deadline:
        gevent.sleep(0.02)
    return accepted, elapsed, ""


def _thumbnail(angle, motors, mounted, ppmm, beam, label, width=400):
    """The ML overlay of one angle with the ground truth drawn on: crystal outlines and the best point (yellow)."""
    import cv2

    from mxcube_autocenter.centring import report

    image = report.overlay(angle, beam)
    view = {**motors, "omega": float(angle.omega)}
    for hull in mounted.diffraction.crystal_outlines(view, ppmm, beam):
        cv2.polylines(image, [np.round(hull).astype(np.int32)], True, (255, 230, 0), 2, cv2.LINE_AA)
    point, _ = mounted.best_point()
    if point is not None:
        xy, _ = sample_to_screen(point[None], view, ppmm, beam)
        cv2.circle(image, tuple(int(round(v)) for v in xy[0]), 7, (255, 230, 0), 2, cv2.LINE_AA)
    height = int(round(image.shape[0] * width / image.shape[1]))
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    cv2.putText(small, label, (6, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return small


def _centre_heldout(bl, ho, samples, *, methods, mesh_step_um, mesh_threshold, seed, progress):
    """Centre every held-out sample with every method; returns outcomes, per-sample rows and ML thumbnails."""
    from tqdm import tqdm

    from mxcube_autocenter.simulation.render import random_look
    from mxcube_autocenter.simulation.sample import make_sample

    sv = bl.sample_view
    watcher = _Watcher()
    sv.connect("centringAccepted", watcher.accepted)
    ppmm = tuple(bl.diffractometer.get_pixels_per_mm())
    beam = tuple(bl.beam.get_beam_position_on_screen())
    outcomes, rows, thumbs = [], [], []
    bar = tqdm(samples, desc="4/5 centring held-out samples", unit="sample", disable=not progress)
    for spec in bar:
        # Each sample's look and start come from the run's seed and its own: the same in every run of that
        # seed, whether it trained or not, so that `compare` pairs like with like.
        rng = np.random.default_rng([seed, spec["seed"]])
        bl.sample_view.camera.set_look(random_look(rng))
        sample = make_sample(spec["seed"], **spec["kwargs"])
        name = f"seed{spec['seed']}"
        mounted = bl.sample_changer.mount(sample, crystal_id=name)
        best, best_rc = mounted.best_point()
        has_crystal = best is not None
        centre = sample.loop_centre
        # Just mounted: the loop in view but not centred, at any omega.
        start = {"omega": float(rng.uniform(0, 360)), "phiy": float(centre[0] + rng.uniform(-0.08, 0.08)),
                 "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}  # fmt: skip
        row = {"sample": name, "seed": spec["seed"], "variant": spec["variant"], "has_crystal": has_crystal,
               "description": sample.describe(), "best_rc": best_rc, "start": start}  # fmt: skip
        for method in methods:
            _move(bl, start)
            wall, exposures, message, accepted, declined = None, 0, "", None, False
            if method == "ml":
                ho.last_result = None
                accepted, wall, message = _run_sample_view_centring(bl, watcher, sv.start_auto_centring)
                final = _positions(bl)
                result = ho.last_result
                declined = not message and result is not None and result.declined  # a message: no outcome in time
                if result is not None:
                    message = message or result.message
                    if result.angles:
                        label = f"{name} ({spec['variant']}): {'centred' if accepted else 'not centred'}"
                        thumbs.append(_thumbnail(result.angles[0], start, mounted, ppmm, beam, label))
            elif method == "lucid":
                accepted, wall, message = _run_sample_view_centring(bl, watcher, lambda: type(sv).start_auto_centring(sv))
                final = _positions(bl)
                declined = not message  # a message: no centringAccepted in time, a time-out and no refusal
                message = message or ("accepted" if accepted else "rejected")
            elif method == "loop_centre":
                final = centred_motors(centre, start["omega"])
                refused = False
                message = "loop centre (ground truth)"
            elif method == "mesh_oracle":
                mesh = scorecard.mesh_scan(mounted.diffraction.expected_rc, sample.film_points(), centre,
                                           step_um=mesh_step_um, threshold=mesh_threshold)  # fmt: skip
                exposures = mesh.exposures
                refused = mesh.refused
                final = dict(start) if mesh.refused else centred_motors(mesh.point, start["omega"])
                message = f"best RC {mesh.best_rc:.1f} in {mesh.exposures} exposures"
            elif method == "optical_oracle":
                point = scorecard.optical_oracle(mounted.diffraction)
                refused = point is None
                final = dict(start) if refused else centred_motors(point, start["omega"])
                message = "best point of the crystals' shapes (ground truth)"
            else:
                raise ValueError(f"unknown method {method!r}: choose from {METHODS}")
            failed = False
            if method in ("ml", "lucid"):
                refused, failed = declined_or_failed(accepted, scorecard.moved(start, final), declined)
            score = scorecard.score_position(mounted.diffraction, best, best_rc, final,
                                             nothing_shot=bool(refused or failed))  # fmt: skip
            outcome = Outcome(method=method, sample=name, has_crystal=has_crystal, refused=bool(refused),
                              final_motors=final, wall_s=wall, exposures=int(exposures), message=str(message),
                              failed=bool(failed), **score)  # fmt: skip
            outcomes.append(outcome)
            row[method] = outcome.to_dict()
        rows.append(row)
        ml = row.get("ml")
        if ml:
            bar.set_postfix_str(
                f"ML: {scorecard.verdict(ml, has_crystal)}"
                + (f" {ml['dist_um']:.0f} um" if ml["dist_um"] is not None else "") + f", {ml['wall_s']:.1f} s"
            )
    sv.disconnect("centringAccepted", watcher.accepted)
    return outcomes, rows, thumbs


def declined_or_failed(accepted: bool, moved: bool, declined: bool) -> tuple:
    """``(refused, failed)`` of a SampleView centring that ended ``accepted`` or not.

    A centring not accepted shoots nothing. It is a refusal when the method
    ``declined`` (the ML centring's ``CentringResult.declined``: no loop, no
    crystal; lucid says no more than accepted or not) and left the sample
    where it was. Anything else not accepted failed: an error, a time-out or
    a failed move, after which the ML centring puts the sample back as well.
    """
    if accepted:
        return False, False
    declined = declined and not moved
    return declined, not declined


def heldout_samples(n: int, n_empty: int, seed: int = 0) -> list:
    """The held-out samples: seeds, empty or not, and a variation of shape each."""
    rng = np.random.default_rng(seed + 7)
    n_empty = min(max(n_empty, 0), n)
    empty = set(rng.choice(n, size=n_empty, replace=False).tolist()) if n_empty else set()
    specs = []
    for k in range(n):
        variant, kwargs = HELDOUT_VARIANTS[k % len(HELDOUT_VARIANTS)]
        kwargs = dict(kwargs)
        if k in empty:
            kwargs["n_crystals"] = 0
            variant = f"empty, {variant}"
        else:
            kwargs["n_crystals"] = int(rng.choice([1, 1, 1, 2]))
        specs.append({"seed": HELDOUT_SEED0 + 1000 * seed + k, "variant": variant, "kwargs": kwargs})
    return specs


# -- 5. figures and the report -------------------------------------------------------


def _error_figures(outcomes, figures: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    colours = {"ml": "tab:red", "lucid": "tab:blue", "loop_centre": "tab:green", "mesh_oracle": "tab:purple",
               "optical_oracle": "tab:orange"}
    by_method = {}
    for o in outcomes:
        if o.has_crystal and o.dist_um is not None:
            by_method.setdefault(o.method, []).append(o)
    out = {}
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.logspace(-0.3, 3.3, 28)
    for method, items in by_method.items():
        d = np.clip([o.dist_um for o in items], bins[0], bins[-1])
        ax_h.hist(d, bins=bins, histtype="step", lw=2, color=colours.get(method), label=method)
        s = np.sort(d)
        ax_c.step(np.r_[bins[0], s, bins[-1]], np.r_[0.0, np.arange(1, len(s) + 1) / len(s), 1.0], where="post",
                  lw=2, color=colours.get(method), label=method)
    for ax in (ax_h, ax_c):
        ax.set_xscale("log")
        ax.set_xlim(bins[0], bins[-1])
        ax.axvline(10, color="grey", ls="--", lw=1)
        ax.set_xlabel("distance from the best point, um (3D)")
    ax_h.set_ylabel("samples")
    ax_h.set_title("centring error (samples with crystals)", fontsize=10)
    ax_c.set_ylabel("fraction of samples within")
    ax_c.set_ylim(0, 1.02)
    ax_c.set_title("cumulative; dashed: the 10 um target", fontsize=10)
    ax_c.legend(loc="lower right")
    fig.tight_layout()
    save_figure_whole(fig, figures / "centring_errors.png", dpi=100)
    plt.close(fig)
    out["centring_errors"] = "figures/centring_errors.png"

    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [m for m in METHODS if m in by_method]
    for i, method in enumerate(names):
        fr = [o.rc_fraction for o in by_method[method] if o.rc_fraction is not None]
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(fr))
        ax.scatter(np.full(len(fr), i) + jitter, fr, s=18, alpha=0.7, color=colours.get(method))
        if fr:
            ax.plot([i - 0.3, i + 0.3], [np.median(fr)] * 2, color="black", lw=2)
    ax.axhline(0.8, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("mean RC over a rotation / best point's")
    ax.set_ylim(-0.05, 1.1)
    ax.set_title("reflections reached (bar: median; dashed: the 0.8 target)", fontsize=10)
    fig.tight_layout()
    save_figure_whole(fig, figures / "rc_fraction.png", dpi=100)
    plt.close(fig)
    out["rc_fraction"] = "figures/rc_fraction.png"
    return out


def _thumbnail_sheet(thumbs, path: Path, columns: int = 4):
    from mxcube_autocenter.imagefiles import write_png

    if not thumbs:
        return None
    h, w = thumbs[0].shape[:2]
    n_rows = int(np.ceil(len(thumbs) / columns))
    sheet = np.full((n_rows * (h + 4), columns * (w + 4), 3), 255, np.uint8)
    for k, t in enumerate(thumbs):
        r, c = divmod(k, columns)
        t = t[:h, :w]
        sheet[r * (h + 4) : r * (h + 4) + t.shape[0], c * (w + 4) : c * (w + 4) + t.shape[1]] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(path, sheet)


def _interval_text(interval) -> str:
    """The crystal-bootstrap interval of a held-out figure, in words (learning.evaluate.crystal_interval)."""
    if interval is None:
        return "no interval: fewer than two crystals"
    return f"95 % interval over the held-out crystals {interval[0]:.3f}-{interval[1]:.3f}"


def _rel(path, root: Path):
    if not path:
        return None
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)


def _method_legend(methods: dict, settings: dict) -> list:
    """The report's lines saying what each method is and how the scorecard's figures are taken."""
    return [
        "- **ml**: this plugin, through `SampleView.start_auto_centring()` as the web UI's button runs it.",
        "- **lucid**: MXCuBE's default automatic centring (lucid3 finds the loop tip; three angles).",
        "- **loop_centre**: the loop's true centre centred, what a person clicking the middle of the loop gets "
        "(ground truth, not timed).",
        f"- **mesh_oracle**: an X-ray mesh scan of the loop at omega 0 and 90 degrees in {settings['mesh_step_um']:g} um "
        f"steps on the noise-free count model, refusing below {settings['mesh_threshold']:g} reflections: the X-ray "
        "way, paid for in dose; no upper bound (its two scans may pick points on different crystals, and its step "
        "is coarse for a beam 5 um high), so the ML centring can beat it (not timed; at 100 exposures/s a scan "
        "would take about "
        f"{format_cell(((methods.get('mesh_oracle') or {}).get('exposures') or 0) / 100.0, '{:.0f}')} s).",
        "- **optical_oracle**: the best point of the crystals' shapes alone (uniform quality, the median capacity): "
        "what exact knowledge of the crystals' shapes and positions gives, a reference for camera-based methods, "
        "not a strict bound (the camera shows nothing of a crystal's inner quality or capacity; ground truth, "
        "not timed; its empty loops are refused from the ground truth).",
        "",
        "Hit rate: the beam centre line passes through one crystal at every 2 degrees of a full turn of omega. "
        "Distance: 3D, from the point in the beam and in focus to the ground-truth best point (for a crystal "
        "refused, where the sample was left). RC fraction: mean reflection count over a turn of omega (every 2 "
        "degrees) with the motors where the centring left them, over the best point's (0 for a crystal refused, or a centring failed: nothing is shot). "
        "Empty refused: the method declined and left the sample where it was (a failed centring is no refusal). Hit rates and the medians of distance and RC fraction are over the samples with crystals "
        "(s/centring and exposures: over every sample); each rate with "
        "its 95 % (Wilson) interval in brackets: a few samples leave it wide, so judge the targets over several "
        "seeds (`mxcube-autocenter scorecard RUN ...` pools runs).", "",
    ]


def _per_sample_table(rows: list, methods) -> list:
    """The report's table of every held-out sample: each method's distance and verdict."""
    lines = ["## Per sample", "",
             "| sample | variant | contents | best RC | " + " | ".join(f"{m} um" for m in methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]  # fmt: skip
    for row in rows:
        cells = []
        for m in methods:
            o = row.get(m)
            word = "-" if o is None else scorecard.verdict(o, row["has_crystal"])
            cells.append(f"{format_cell(o['dist_um'], '{:.0f}')} {word}" if word in ("hit", "miss") else word)
        lines.append(f"| {row['sample']} | {row['variant']} | {row['description']} | {format_cell(row['best_rc'], '{:.0f}')} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return lines


def _learning_section(result: dict, out: Path) -> list:
    """The report's lines on the models: the run's training and figures, or the centring model's own metadata."""
    learning = result["learning"]
    lines = []
    if learning["source"] == TRAINED_IN_RUN:
        data = result["data"]
        another = _centred_with_another(result)
        lines += [
            *([f"- these are the figures of the model this run trained{another}."] if another else []),
            f"- training data: {data['n_train_samples']} samples, {data['n_recordings']} recordings of helical and "
            f"rotational collections ({data['n_images']} images of {data['exposure_time']:g} s each, camera recorded "
            f"at {data['frame_rate']:g} frames/s), labelled into {data['rows']} rows in {data['label_s']:.0f} s "
            f"(reflection counts: mean {format_cell(data['rc_stats'].get('mean'))}, "
            f"{format_cell(100 * (data['rc_stats'].get('zero_fraction') or 0), '{:.0f}')} % zero).",
            f"- split by crystal: {learning['crystals']} crystals, {learning['rows']} rows.",
            f"- regressor: fcn, log counts, {learning['crop_um']:g} um crops at {learning['input_size']} px, {learning['params']} "
            f"parameters; {learning['epochs_run']} epochs ("
            + (f"best {learning['best_epoch']}" if learning["best_epoch"] else "none better than the starting weights, kept")
            + f") in {learning['regressor_s']:.0f} s"
            + (f", fine-tuned from the shipped `{learning['fine_tuned_from']}`." if learning.get("fine_tuned_from") else
               ", trained from scratch."),
            f"- **{learning['report_subset']} Spearman**, held-out crystals: predicted vs true counts (the virtual "
            f"beamline's expected counts) **{format_cell(learning.get('spearman_expected'), '{:.3f}')}** "
            f"({_interval_text(learning.get('spearman_expected_ci95'))}), predicted vs recorded "
            f"counts (spot finding on the EIGER frames) {format_cell(learning['spearman'], '{:.3f}')}; classifier accuracy "
            f"{format_cell(learning.get('classifier_accuracy_expected'), '{:.3f}')} "
            f"({_interval_text(learning.get('classifier_accuracy_expected_ci95'))}) against the true counts, "
            f"{format_cell(learning['classifier_accuracy'], '{:.3f}')} against the recorded ones ({format_cell(learning['classifier_s'], '{:.0f}')}"
            f" s); training time {format_cell(learning['train_s'], '{:.0f}')} s.",
            f"- the same rows predicted from the crystals' shapes alone (exact shapes and positions, uniform "
            f"quality, median capacity: the camera shows neither quality nor capacity), a reference for any model: "
            f"Spearman {format_cell(learning.get('shapes_spearman_expected'), '{:.3f}')} against the true counts, classifier "
            f"accuracy {format_cell(learning.get('shapes_classifier_accuracy_expected'), '{:.3f}')} (a crystal from "
            f"{format_cell(learning.get('shapes_count_threshold'), '{:.1f}')} shapes-only spots, the best threshold on the "
            f"training rows).",
            *([f"- the model it was fine-tuned from (`{learning['fine_tuned_from']}`, which saw none of these crystals), "
               f"on every recorded crystal: Spearman {format_cell(learning.get('initial_spearman_expected'), '{:.3f}')} against "
               f"the true counts, {format_cell(learning.get('initial_spearman'), '{:.3f}')} against the recorded ones "
               f"([report]({_rel(learning.get('initial_report'), out)}))."] if learning.get("fine_tuned_from") else []),
            ((f"- the classifier centres only if its validation balanced accuracy reaches "
              f"{CLASSIFIER_MIN_BALANCED_ACCURACY}: {format_cell(learning.get('classifier_validation_balanced_accuracy'), '{:.3f}')}"
              f", so it is {'used' if learning.get('classifier_used') else '**not used**'}.")
             if learning.get("classifier") else "- no classifier trained."),
            f"- labelling details: `{_rel(data.get('labelling'), out)}`.",
            f"- reports: [regressor]({_rel(learning['regressor_report'], out)})"
            + (f", [classifier]({_rel(learning.get('classifier_report'), out)})" if learning.get("classifier_report") else "")
            + ".",
        ]
        if data.get("histogram"):
            lines += ["", f"![reflection counts of the training set]({_rel(data['histogram'], out)})"]
        if learning.get("scatter"):
            lines += ["", f"![regressor scatter]({_rel(learning['scatter'], out)})"]
        if data.get("contact_sheet"):
            lines += ["", "A training recording (the camera during a helical collection):", "",
                      f"![recording]({_rel(data['contact_sheet'], out)})"]  # fmt: skip
    else:
        lines += [
            f"No training in this run: the centring model's own metadata says test Spearman "
            f"{format_cell(learning.get('spearman_expected'), '{:.3f}')} against the true counts, {format_cell(learning['spearman'], '{:.3f}')} "
            f"against the drawn ones, classifier accuracy {format_cell(learning['classifier_accuracy'], '{:.3f}')}, "
            f"training time {format_cell(learning['train_s'], '{:.0f}')} s.",
        ]
    return lines


def _write_report(out: Path, result: dict, rows: list, figures: dict, settings: dict):
    methods = result["methods"]
    lines = [
        "# mxcube-autocenter demo on the virtual beamline", "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {settings['mode']}; {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}); {result['timings_s']['total']:.0f} s in all; "
        f"mxcube-autocenter {result['code']}.", "",
        f"Centring model: `{_rel(result['model']['regressor'], out)}`"
        + (f" with classifier `{_rel(result['model']['classifier'], out)}`" if result["model"]["classifier"] else
           " (no classifier)") + f" ({result['model']['source']}).", "",
        "## Scorecard", "",
        f"{result['n_samples']} held-out samples ({result['n_samples'] - result['n_empty']} with crystals, "
        f"{result['n_empty']} empty loops), each centred by every method from the same start: the loop in view "
        "but not centred, at a random omega.", "",
        scorecard.markdown_table(methods), "",
        *_method_legend(methods, settings),
        "## Targets of the optical ML centring", "",
        scorecard.format_targets(result["targets"]), "",
        "## Centring errors", "",
        *([f"![centring errors]({figures['centring_errors']})", "", f"![RC fraction]({figures['rc_fraction']})", ""]
          if "centring_errors" in figures else ["The figures could not be written (see the demo's log).", ""]),
    ]
    if figures.get("ml_heatmaps"):
        lines += ["## ML heatmaps", "",
                  "First angle of each ML centring: the predicted reflection counts over the searched region, the "
                  "loop tip (diamond), the chosen point (green circle), the beam (red cross); the ground truth in "
                  "yellow (crystal outlines, best point). The plugin's own overlays of every angle, with a JSON "
                  f"record of each centring, are in `{_rel(settings['centring_dir'], out)}/`.", "",
                  f"![ML heatmaps]({figures['ml_heatmaps']})", ""]  # fmt: skip
    lines += _per_sample_table(rows, settings["methods"])
    lines += ["", "## Learning", "", *_learning_section(result, out)]
    lines += ["", "## Timings", "", "| phase | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    lines += ["", f"Log of the beamline: `{_rel(settings['log'], out)}`; scorecard as JSON: `scorecard.json`.", ""]
    write_text_whole(out / "report.md", "\n".join(lines))


# -- the whole job ---------------------------------------------------------------------


@contextlib.contextmanager
def _booted(config_dir, log_path: Path):
    """:func:`hardware_repository`, a configuration that does not boot refused as a DemoError naming ``--config``."""
    from mxcube_autocenter.beamline import hardware_repository, virtual_beamline_dir

    booted = False
    try:
        with hardware_repository(config_dir) as bl:
            booted = True
            yield bl
    except Exception as err:
        if booted:
            raise
        said = " ".join(str(err).split())  # a YAML parser's message spans lines
        raise DemoError(f"--config {config_dir or virtual_beamline_dir()}: the beamline does not boot "
                        f"({type(err).__name__}: {said}): fix its configuration ({log_path} has the beamline's "
                        "log)") from err  # fmt: skip


def _check_gevent():
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        raise DemoError("gevent is not monkey-patched: call gevent.monkey.patch_all(thread=False) before anything "
                        "else, as MXCuBE and the mxcube-autocenter command do")  # fmt: skip


_OWN_DIRECTORIES = ("data", "learning", "centring", "figures")
# Where an earlier demo's report waits while this run writes its own: removed once this one's is whole.
PREVIOUS = "previous"


def _is_shipped(predictor) -> bool:
    """Whether ``predictor`` holds the models the plugin centres with when none is configured."""
    from mxcube_autocenter.centring.predictor import SHIPPED_CLASSIFIER, SHIPPED_ICE_MODEL, SHIPPED_REGRESSOR

    def same(slot, shipped):
        return (slot[0].resolve() if slot else None) == (shipped.resolve() if shipped.exists() else None)

    return (predictor.regressor_path.resolve() == SHIPPED_REGRESSOR.resolve()
            and same(predictor.classifier, SHIPPED_CLASSIFIER) and same(predictor.ice, SHIPPED_ICE_MODEL))


_OWN_FILES = ("report.md", "scorecard.json", "samples.json")


def _check_own(out: Path):
    """Refuse an ``out`` whose files of the demo's names are not an earlier demo's.

    Raises
    ------
    DemoError
        If ``out`` holds folders or files of those names but no ``demo.log``:
        not an earlier demo's report, so someone else's.
    """
    found = [name for name in (*_OWN_DIRECTORIES, *_OWN_FILES, PREVIOUS) if (out / name).exists()]
    if found and not (out / "demo.log").exists():
        raise DemoError(f"{out} holds {', '.join(found)} but no demo.log, so no earlier demo report: the demo would "
                        "remove them; choose another --out")


def _set_aside(out: Path):
    """Move what an earlier demo left in ``out`` to ``out/previous`` (only the demo's own files; ``demo.log`` is
    this run's already), replacing what an earlier run left there.

    Kept until this run's report is whole (:func:`_drop_previous`): a run interrupted or failed leaves the last
    report there, not only its own parts.
    """
    shutil.rmtree(out / "data", ignore_errors=True)  # the recordings: no part of a report, and large
    found = [out / name for name in (*_OWN_DIRECTORIES, *_OWN_FILES) if (out / name).exists()]
    if not (out / "samples.json").exists():
        # A run cut short before its report: its parts must not replace the report kept from before it.
        for path in found:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)
    for path in found:
        (out / PREVIOUS).mkdir(exist_ok=True)
        os.replace(path, out / PREVIOUS / path.name)


@contextlib.contextmanager
def _saying_where_the_last_report_is(out: Path):
    """Say where the earlier report waits when this run ends before its own is whole (an error, Ctrl-C)."""
    try:
        yield
    except BaseException:
        if (out / PREVIOUS).is_dir():
            _say(f"the earlier demo's report is kept in {out / PREVIOUS}")
        raise


def _drop_previous(out: Path, result: dict):
    """Remove the earlier report set aside, once this run's is whole (every file of it written)."""
    if not result["write_errors"]:
        shutil.rmtree(out / PREVIOUS, ignore_errors=True)


def run_demo(
    out="out/demo",
    *,
    quick: bool = False,
    use_shipped_model: bool = False,
    fine_tune: bool = True,
    model=None,
    classifier_model=None,
    ice_model=None,
    n_train: int | None = None,
    n_heldout: int | None = None,
    n_empty: int | None = None,
    n_images: int = 80,
    exposure_time: float = 0.04,
    frame_rate: float = 25.0,
    epochs: int = 12,
    classifier_epochs: int = 8,
    classifier: bool = True,
    input_size: int = 64,
    crop_um: float = 160.0,
    batch_size: int = 32,
    patience: int = 4,
    nproc: int | None = None,
    methods=METHODS,
    mesh_step_um: float = 10.0,
    mesh_threshold: float = 5.0,
    keep_data: bool = False,
    seed: int = 0,
    config_dir=None,
    progress: bool = True,
) -> dict:
    """Run the demo into directory ``out``; returns the scorecard (what ``--json`` prints).

    Parameters
    ----------
    out : path
        Report directory: ``report.md``, ``scorecard.json``, ``figures/``,
        ``centring/`` (the plugin's overlays), ``learning/``, ``demo.log``.
    quick : bool
        No recording or training: centre fewer samples with the shipped
        model (or ``model``).
    use_shipped_model : bool
        Centre with the shipped model (``models/``) even after training.
    fine_tune : bool
        Train the regressor by fine-tuning the shipped one on the recordings
        (its input: 240 um crops at 128 px), as a beamline starting out
        would; False trains one from scratch with ``input_size`` and
        ``crop_um``. The classifier takes the regressor's input either way.
    model, classifier_model : path, optional
        Centre with these model files instead (no training).
    ice_model : path, optional
        The ice network the centring asks in the verification view (default:
        the shipped one, as the plugin's).
    n_train, n_heldout, n_empty : int, optional
        Training samples, held-out samples, of which empty loops; defaults
        :data:`FULL` or :data:`QUICK`.
    n_images, exposure_time : int, float
        Images and seconds per image of each training collection.
    frame_rate : float
        Camera frames recorded per second (the ``record_frame_rate`` property).
    epochs, classifier_epochs, input_size, crop_um, batch_size, patience
        Training settings; ``classifier`` False trains no classifier.
    nproc : int, optional
        Spot-finding processes (default: up to 2).
    methods : sequence of str
        Centring methods to compare, from :data:`scorecard.METHODS`.
    mesh_step_um, mesh_threshold : float
        The mesh scan's grid step and the count below which it refuses.
    keep_data : bool
        Keep the EIGER files and camera recordings (``data/``, large).
    seed : int
        Seeds the looks, start positions and samples (with fixed offsets).
    config_dir : path, optional
        Beamline configuration (default: the virtual beamline).
    progress : bool
        tqdm progress bars on stderr.

    Returns
    -------
    dict
        ``methods`` (figures per method), ``learning`` (``spearman``,
        ``classifier_accuracy``, ``train_s``, ...), ``n_samples``,
        ``n_empty``, plus ``targets``, ``timings_s``, ``model``, ``data``
        (the training data: its contact sheet, labelling summary and sizes), ``report`` and ``write_errors``
        (the report's files that could not be written, as messages).
    """
    _check_gevent()
    from mxcube_autocenter.beamline import auto_centring
    from mxcube_autocenter.centring.predictor import SHIPPED_REGRESSOR, PredictorError, check_ice_model, load_predictor
    from mxcube_autocenter.learning.training import load_model

    t_start = time.perf_counter()
    # Absolute: the paths in the result stay true wherever the caller goes next, and a relative path a script
    # gives the AutoCenter object starts at its XML file's folder (the package's here).
    out = Path(out).resolve()
    defaults = QUICK if quick else FULL
    n_train = defaults["n_train"] if n_train is None else n_train
    n_heldout = defaults["n_heldout"] if n_heldout is None else n_heldout
    if n_empty is None:
        # The default share of empty loops (1 in 5), not the count: a small run keeps its crystals.
        n_empty = min(defaults["n_empty"], n_heldout * defaults["n_empty"] // defaults["n_heldout"])
    elif n_empty > n_heldout:
        raise DemoError(f"n_empty = {n_empty} empty loops (--n-empty) among n_heldout = {n_heldout} held-out samples "
                        "(--n-heldout): give at most as many empty loops as samples")
    nproc = nproc or max(1, min(2, os.cpu_count() or 1))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DemoError(f"unknown methods {unknown}: choose from {list(METHODS)}")
    train_here = not (quick or model)
    if train_here and n_train < 3:
        raise DemoError(f"--n-train {n_train}: training needs at least 3 samples (the split is by crystal): give at "
                        "least 3, or centre without training (--quick or --model)")
    if config_dir is not None and not (Path(config_dir) / "beamline.yaml").is_file():
        raise DemoError(f"{config_dir} holds no beamline.yaml: give the directory of an mxcubecore beamline configuration")
    # Checked before the previous report is removed: a wrong file name must not cost it.
    for path in (model, classifier_model, ice_model):
        if path and any(Path(path).resolve().is_relative_to((out / name).resolve())
                        for name in (*_OWN_DIRECTORIES, PREVIOUS)):  # fmt: skip
            raise DemoError(f"{path} lies in {out}, whose earlier results the demo removes: copy it elsewhere first")
    given = None
    if model or ice_model:
        try:
            if model:
                given = load_predictor(model, classifier_model, ice_model)
            else:
                check_ice_model(ice_model)  # now, not once the training is over
        except PredictorError as err:
            raise DemoError(f"{err}\n(the model given with --model / --classifier / --ice-model)") from err
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DemoError(f"cannot create the report directory {out} ({err}): choose another --out") from err
    _check_own(out)
    rng = np.random.default_rng(seed)
    timings = {}
    learning_dir, centring_dir = out / "learning", out / "centring"
    mode = ("quick: no training, centring with the shipped model" if quick and not model else
            "no training, centring with the given model" if model else
            "full: record, label, train, centre with the shipped model" if use_shipped_model else
            "full: record, label, fine-tune the shipped model, centre with it" if fine_tune else
            "full: record, label, train, centre with the model trained here")  # fmt: skip
    settings = {"mode": mode, "methods": list(methods), "mesh_step_um": mesh_step_um,
                "mesh_threshold": mesh_threshold, "centring_dir": centring_dir, "log": out / "demo.log"}  # fmt: skip
    result = {}

    with _saying_where_the_last_report_is(out), _quiet_logging(out / "demo.log") as silence:
        t = time.perf_counter()
        with _booted(config_dir, out / "demo.log") as bl:
            silence()
            try:
                ho = auto_centring(bl)
                set_zoom(bl, ZOOM_LEVEL)
            except (LookupError, TimeoutError) as err:
                raise DemoError(f"{err} ({out / 'demo.log'} has the beamline's log)") from err
            # Only now, the beamline up: a configuration it refuses must not move the earlier report (its log is
            # this run's from the start, which says why the run failed).
            _set_aside(out)
            timings["boot"] = time.perf_counter() - t
            _say(f"virtual beamline booted in {timings['boot']:.1f} s; zoom {ZOOM_LEVEL} "
                 f"({bl.diffractometer.get_pixels_per_mm()[0] / 1000:g} px/um); {mode}")  # fmt: skip

            data = {}
            learning = None
            trained = None
            if train_here:
                initial = (SHIPPED_REGRESSOR, load_model(SHIPPED_REGRESSOR)[1]) if fine_tune else None
                regressor_crop_um = initial[1]["input"]["crop_um"] if fine_tune else crop_um
                dataset, data = _record_and_label(
                    bl, ho, out, seed=seed, rng=rng, n_train=n_train, n_images=n_images, exposure_time=exposure_time,
                    frame_rate=frame_rate, nproc=nproc, stored_crop_um=max(240.0, 1.5 * max(crop_um, regressor_crop_um)),
                    keep_data=keep_data, progress=progress, timings=timings,
                )
                # 3. train
                t = time.perf_counter()
                learning = _train(dataset, learning_dir, epochs=epochs, classifier_epochs=classifier_epochs,
                                  input_size=input_size, crop_um=crop_um, batch_size=batch_size, patience=patience,
                                  seed=seed, classifier=classifier, initial=initial)  # fmt: skip
                timings["train"] = time.perf_counter() - t
                trained = (learning["model"], learning["classifier"] if learning.get("classifier_used") else None)

            # The model the plugin centres with.
            t = time.perf_counter()
            predictor, source = _choose_predictor(given, None if use_shipped_model else trained, ice_model)
            ho.config.centring_enabled = True  # the button's centring is what the demo scores, whatever --config says
            ho.use_predictor(predictor)
            if ho.centring_error:
                raise DemoError(ho.centring_error)
            ho.config.centring_save_directory = str(centring_dir)
            if learning is None:
                learning = _model_file_learning(predictor)
            timings["load_model"] = time.perf_counter() - t
            _say(f"centring with {predictor.describe()} ({source})")
            # What made the ML row, beside its models: `scorecard` pools only runs that centred alike.
            provenance = {"centring": asdict(ho.centring_settings()), "code": code_version()}

            # 4. centre the held-out samples
            t = time.perf_counter()
            specs = heldout_samples(n_heldout, n_empty, seed)
            outcomes, rows, thumbs = _centre_heldout(bl, ho, specs, methods=methods, mesh_step_um=mesh_step_um,
                                                     mesh_threshold=mesh_threshold, seed=seed, progress=progress)  # fmt: skip
            timings["centre"] = time.perf_counter() - t
            unsaved = _await_centring_records(ho, centring_dir, sum(o.method == "ml" for o in outcomes))

        # 5. score and report
        result = _score_and_report(out, outcomes, rows, thumbs, learning=learning, predictor=predictor, source=source,
                                   provenance=provenance, data=data, settings=settings, timings=timings,
                                   t_start=t_start, progress=progress, write_errors=unsaved)  # fmt: skip
        _drop_previous(out, result)
    return json.loads(json.dumps(result, default=json_default))


def _record_and_label(bl, ho, out: Path, *, seed, rng, n_train, n_images, exposure_time, frame_rate, nproc,
                      stored_crop_um, keep_data, progress, timings) -> tuple:
    """Steps 1 and 2: record the training samples' collections, label them into ``out/learning/dataset.h5``.

    Returns ``(dataset, data)``: the training set's path and what the report says of it. The crops are stored
    a little larger than the models' (``stored_crop_um``, not the labelling default of 600 um): 6 times less disk.
    """
    data = {}
    data_dir, learning_dir = out / "data", out / "learning"
    # 1. record
    t = time.perf_counter()
    ho.config.recording_enabled = True
    ho.config.record_frame_rate = float(frame_rate)
    ho.config.record_min_free_mb = 0.0
    seeds = [TRAIN_SEED0 + 1000 * seed + i for i in range(n_train)]
    recordings, truth = _record_training_data(bl, ho, data_dir, seeds, n_images=n_images,
                                       exposure_time=exposure_time, rng=rng, progress=progress)  # fmt: skip
    timings["record"] = time.perf_counter() - t
    if not recordings:
        raise DemoError(f"no camera recording was made (see {out / 'demo.log'})")
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):
        from mxcube_autocenter.recording import contact_sheet

        data["contact_sheet"] = str(contact_sheet(recordings[0], figures_dir / "training_recording.png",
                                                  n=8, columns=4, tile_width=240))  # fmt: skip
    # 2. label
    from mxcube_autocenter.labelling.pipeline import format_summary, label_recordings

    t = time.perf_counter()
    _say(f"2/5 labelling {len(recordings)} recordings (spot finding in {nproc} processes)")
    dataset = learning_dir / "dataset.h5"
    learning_dir.mkdir(parents=True, exist_ok=True)
    latency = bl.sample_view.camera.get_latency()  # the virtual camera's, known here
    summary = label_recordings(recordings, dataset, nproc=nproc, progress=progress, camera_latency=latency,
                               stored_crop_um=stored_crop_um)
    timings["label"] = time.perf_counter() - t
    write_text_whole(learning_dir / "labelling.txt", format_summary(summary) + "\n")
    if summary.rows_added == 0:
        raise DemoError(f"labelling produced no rows: {[e.message for e in summary.recordings][:3]}")
    _add_ground_truth(dataset, truth, bl.diffractometer.sample_frame, latency)
    data.update(labelling=str(learning_dir / "labelling.txt"), n_train_samples=n_train,
                n_recordings=len(recordings), n_images=n_images, exposure_time=exposure_time,
                frame_rate=frame_rate, rows=summary.rows_added,
                label_errors=summary.n_errors, rc_stats=summary.rc_stats,
                histogram=str(summary.histogram) if summary.histogram else None,
                label_s=timings["label"])  # fmt: skip
    if not keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    return dataset, data


def _choose_predictor(given, trained, ice_model) -> tuple:
    """The model the plugin centres with, and where it comes from: ``given`` (a Predictor of --model), else the
    run's own (``trained``: regressor and classifier paths), else the shipped one; each with ``ice_model`` (or
    the shipped ice network)."""
    from mxcube_autocenter.centring.predictor import PredictorError, load_predictor

    try:
        if given is None and trained:
            return load_predictor(*trained, ice_model), TRAINED_IN_RUN
        # The shipped regressor with another ice network is not the shipped models.
        predictor = given if given is not None else load_predictor(ice_path=ice_model)
        return predictor, (scorecard.SHIPPED_MODEL if _is_shipped(predictor) else "given model file")
    except PredictorError as err:
        raise DemoError(f"{err}\nThe demo needs a model to centre with: run it without --quick to train one, or pass "
                        "--model MODEL.keras") from err


def _await_centring_records(ho, centring_dir: Path, n: int, timeout_s: float = 30.0) -> list:
    """Wait until the plugin has saved its last centring's record (on a worker thread), ``timeout_s`` at most.

    Returns what is missing of ``n`` records then, as ``write_errors``: the plugin only logs a record it could not
    save (a full disk), which the report's reader would otherwise find missing unannounced.
    """
    ho.wait_for_records(timeout_s)
    saved = len(list(centring_dir.glob("*.json")))
    if saved >= n:
        return []
    return [f"{n - saved} of the {n} ML centrings' overlays and records were not saved in {centring_dir} (demo.log "
            "says why)"]


def _score_and_report(out: Path, outcomes, rows, thumbs, *, learning, predictor, source, provenance, data, settings,
                      timings, t_start, progress, write_errors) -> dict:
    """Step 5: the scorecard of the centrings, and the report's files (``write_errors``, those not written so far,
    gains those not written here)."""
    from tqdm import tqdm

    t = time.perf_counter()
    with tqdm(total=1, desc="5/5 scoring and report", disable=not progress) as bar:
        methods_figures = scorecard.summarise(outcomes)  # every method, run or not (n = 0)
        # A write that fails (a full disk) is noted and the rest still written: the scorecard is returned
        # and printed whatever, rather than lost after the whole run.
        write_errors = list(write_errors)
        figures = _written(write_errors, out / "figures", lambda: _error_figures(outcomes, out / "figures")) or {}
        sheet = out / "figures" / "ml_heatmaps.png"
        if _written(write_errors, sheet, lambda: _thumbnail_sheet(thumbs[:16], sheet)):
            figures["ml_heatmaps"] = "figures/ml_heatmaps.png"
        learning_out = {k: learning.get(k) for k in ("spearman", "spearman_expected", "classifier_accuracy",
                                                     "classifier_accuracy_expected", "train_s")}  # fmt: skip
        learning_out.update({k: v for k, v in learning.items() if k not in learning_out})
        result = {
            "methods": methods_figures,
            "learning": learning_out,
            "n_samples": len(rows),
            "n_empty": sum(not r["has_crystal"] for r in rows),
            "targets": scorecard.check_targets(methods_figures.get("ml", {})),
            # Absolute: `scorecard` tells runs of one model by these, whatever folder each ran in.
            "model": {"regressor": str(predictor.regressor_path.resolve()),
                      "classifier": str(predictor.classifier[0].resolve()) if predictor.classifier else None,
                      "ice": str(predictor.ice[0].resolve()) if predictor.ice else None,
                      "source": source},  # fmt: skip
            **provenance,
            "data": data,
            "timings_s": {},
            "report": str(out / "report.md"),
        }
        timings["report"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
        _written(write_errors, out / "samples.json", lambda: write_json_whole(out / "samples.json", rows, indent=1))
        _written(write_errors, out / "scorecard.json", lambda: write_json_whole(out / "scorecard.json", result, indent=2))
        _written(write_errors, out / "report.md", lambda: _write_report(out, result, rows, figures, settings))
        result["write_errors"] = write_errors
        bar.update(1)
    return result


def _written(errors: list, path: Path, write):
    """``write()``'s value, or None with why ``path`` (a file or folder of the report) was not written, and what to
    do, added to ``errors``."""
    try:
        return write()
    except OSError as err:
        said = f"cannot write {err.filename or path} ({err.strerror or err}): free space there or give another --out"
        log.error("demo: %s", said)
        errors.append(said)
        return None


def _centred_with_another(result: dict) -> str:
    """``"; the centring used the shipped model, not this one"`` where the run trained one and centred with another."""
    centred_with = (result.get("model") or {}).get("source")
    if result["learning"].get("source") != TRAINED_IN_RUN or centred_with in (None, TRAINED_IN_RUN):
        return ""
    return f"; the centring used the {centred_with}, not this one"


def format_scorecard(result: dict) -> str:
    """The scorecard table and the learning line, for the terminal."""
    learning = result["learning"]
    lines = [
        f"Scorecard: {result['n_samples']} held-out samples ({result['n_empty']} empty loops)",
        "",
        scorecard.format_table(result["methods"]),
        "",
        f"Learning ({learning.get('source')}{_centred_with_another(result)}): Spearman "
        f"{value_cell(learning.get('spearman_expected'), learning.get('spearman_expected_ci95'), '{:.3f}')} against the true "
        f"counts, {format_cell(learning.get('spearman'), '{:.3f}')} against the recorded ones; classifier accuracy "
        f"{value_cell(learning.get('classifier_accuracy_expected'), learning.get('classifier_accuracy_expected_ci95'), '{:.3f}')} / "
        f"{format_cell(learning.get('classifier_accuracy'), '{:.3f}')}; "
        f"training {format_cell(learning.get('train_s'), '{:.0f}')} s"
        + (f"; from the crystals' shapes alone: Spearman {format_cell(learning.get('shapes_spearman_expected'), '{:.3f}')}, "
           f"classifier accuracy {format_cell(learning.get('shapes_classifier_accuracy_expected'), '{:.3f}')}"
           if "shapes_spearman_expected" in learning else "")
        + (f"; before fine-tuning ({learning['fine_tuned_from']}, every recorded crystal): Spearman "
           f"{format_cell(learning.get('initial_spearman_expected'), '{:.3f}')} / {format_cell(learning.get('initial_spearman'), '{:.3f}')}"
           if learning.get("fine_tuned_from") else ""),
        "ML targets: " + ", ".join(
            f"{c['figure']} {'met' if c['met'] else 'NOT met' if c['met'] is False else 'n/a'}" for c in result["targets"]
        ),
        f"Report: {result['report']} ({result['timings_s']['total']:.0f} s)",
    ]
    return "\n".join(lines)
