"""The ``mxcube-autocenter`` command line."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path


def _patch_gevent():
    # As MXCuBE does, before mxcubecore is imported; real threads stay real so
    # heavy work can leave the event loop.
    from gevent import monkey

    monkey.patch_all(thread=False)


def cmd_demo(args) -> int:
    """The main job on the virtual beamline: record, label, train, centre held-out samples, score."""
    _patch_gevent()
    import contextlib

    from mxcube_autocenter.demo import DemoError, format_scorecard, run_demo

    # Options that would be silently ignored are refused: the run would not be the one asked for.
    refusal = _demo_options_ignored(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    options = {
        name: getattr(args, name)
        for name in ("n_train", "n_heldout", "n_empty", "epochs", "input_size", "nproc", "seed")
        if getattr(args, name) is not None
    }
    try:
        # Only the scorecard goes to stdout: the beamline's messages and progress go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = run_demo(
                args.out, quick=args.quick, use_shipped_model=args.use_shipped_model, fine_tune=not args.from_scratch,
                model=args.model,
                classifier_model=args.classifier, ice_model=args.ice_model, classifier=not args.no_classifier,
                keep_data=args.keep_data,
                config_dir=args.config, progress=not args.no_progress, **options,
            )
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: result[k] for k in ("methods", "learning", "n_samples", "n_empty")} | {
            k: result[k] for k in ("targets", "timings_s", "model", "report")}))
    else:
        print(format_scorecard(result))
    if result["write_errors"]:
        print(f"error: the report in {args.out} is not whole: " + "; ".join(result["write_errors"]), file=sys.stderr)
        return 1
    return 0


def _demo_options_ignored(args) -> str | None:
    """Why the demo's options ask for something the run would not do, or None."""
    if args.classifier and not args.model:
        return "--classifier goes with --model (otherwise the demo centres with the models it trains, or with --quick the shipped one)"
    if args.model and args.use_shipped_model:
        return "--model and --use-shipped-model: give one model to centre with"
    if args.quick or args.model:
        training_only = {"--from-scratch": args.from_scratch, "--no-classifier": args.no_classifier,
                         "--n-train": args.n_train is not None, "--epochs": args.epochs is not None,
                         "--input-size": args.input_size is not None, "--nproc": args.nproc is not None,
                         "--keep-data": args.keep_data}  # fmt: skip
        given = [option for option, used in training_only.items() if used]
        if given:
            return f"{', '.join(given)}: no recording or training with {'--quick' if args.quick else '--model'}, so nothing to apply them to"
    elif args.input_size is not None and not args.from_scratch:
        return "--input-size goes with --from-scratch (fine-tuning keeps the shipped model's input, 128 px)"
    return None


def cmd_web(args) -> int:
    """Start the MXCuBE web server (mxcubeweb) on the virtual beamline, with the plugin's centring."""
    from mxcube_autocenter.web import API, DEFAULT_PORT, LOGIN_PROPOSAL, WebSetupError, server_command

    try:
        command = server_command(args.state_dir, host=args.host, port=args.port, config_dir=args.config,
                                 ui_build=args.ui_build)
    except WebSetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}"
    print(f"MXCuBE web server: {url} (API {url}{API}), the virtual beamline with the optical ML centring")
    print(f"Log in with proposal {LOGIN_PROPOSAL} and any password but 'wrong' (the LIMS mockup)")
    if not args.ui_build:
        print(f"No UI is served: start mxcubeweb's UI development server (it proxies to 127.0.0.1:{DEFAULT_PORT}) "
              "or pass --ui-build; see docs/web.md")
    print("Stop with Ctrl-C", flush=True)
    # The server replaces this process: Ctrl-C and the exit status are its own.
    os.execv(command[0], command)


def cmd_bench(args) -> int:
    """Run the benchmarks and print their figures."""
    _patch_gevent()
    from mxcube_autocenter.bench import run_all

    if args.json:
        # Only the JSON object goes to stdout: hardware-object logs and
        # progress, wherever their handlers write, go to stderr meanwhile.
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            figures = run_all(quick=args.quick, only=args.only, progress=print)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        print(json.dumps(figures, sort_keys=True, allow_nan=False))
        return 0
    figures = run_all(quick=args.quick, only=args.only, progress=print)
    width = max(map(len, figures), default=0)
    for name, value in figures.items():
        # None: a figure this machine cannot measure (e.g. memory where the kernel's peak cannot be reset).
        print(f"{name:<{width}}  {'-' if value is None else format(value, '.4g')}")
    return 0


def cmd_inspect(args) -> int:
    """Summarise a camera recording and write a contact sheet of its frames."""
    from mxcube_autocenter.recording import RecordingError, contact_sheet, summarise

    if args.png and len(args.recordings) > 1:
        print(f"error: --png names one contact sheet, and {len(args.recordings)} recordings were given: give one "
              "recording, or leave --png out to write each sheet next to its recording", file=sys.stderr)  # fmt: skip
        return 2
    status = 0
    for path in args.recordings:
        try:
            print(summarise(path))
            png = Path(args.png) if args.png else Path(path).with_suffix(".png")
            contact_sheet(path, png, n=args.frames)
            print(f"  contact sheet {png}")
        except BrokenPipeError:
            raise
        except (OSError, RecordingError) as err:
            print(f"{path}: {err}", file=sys.stderr)
            status = 1
    return status


def cmd_label(args) -> int:
    """Label camera recordings with reflection counts into a training set."""
    from mxcube_autocenter.labelling.dataset import DatasetError
    from mxcube_autocenter.labelling.pipeline import LabellingError, format_summary, label_recordings
    from mxcube_autocenter.labelling.spots_file import SpotsFileError

    unused = ("--max-clock-offset goes with an estimated clock offset, not with --clock-offset"
              if args.clock_offset is not None and args.max_clock_offset is not None else
              "--nproc goes with our spot finder, not with --spots-from (the counts are read, not found)"
              if args.spots_from and args.nproc is not None else None)
    if unused:
        print(f"error: {unused}", file=sys.stderr)
        return 2
    chosen = {key: value for key, value in (("nproc", args.nproc), ("max_clock_offset", args.max_clock_offset),
                                            ("camera_latency", args.camera_latency)) if value is not None}
    try:
        summary = label_recordings(
            args.recordings, args.out, spots_from=args.spots_from, clock_offset=args.clock_offset, **chosen
        )
    except (DatasetError, LabellingError, SpotsFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 1 if summary.n_errors else 0


def _train_options(args) -> dict:
    return {
        "crop_um": args.crop_um,
        "input_size": args.input_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "patience": args.patience,
        "seed": args.seed,
        "label": args.label,
        "cache": _CACHES[args.cache],
    }


# --cache: where the decoded crops are kept between epochs (learning.data.make_dataset's cache).
_CACHES = {"auto": "auto", "memory": True, "file": "file", "none": False}


def _input_errors_exit_2(command):
    """Run a command; a bad input ends it with its message and exit code 2, not a traceback.

    For the learning and simulation commands, whose modules report bad files
    and arguments (a missing or wrong model, a dataset without the needed
    crystals, an unknown architecture, an output that cannot be written) as
    ValueError or OSError, with the file and the fix in the message.
    """

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except BrokenPipeError:
            raise
        except (ValueError, OSError) as err:
            print(f"error: {_naming_the_output(err, getattr(args, 'out', None))}", file=sys.stderr)
            return 2
        except Exception as err:
            from mxcube_autocenter.labelling.dataset import raised_inside_tensorflow

            inside = raised_inside_tensorflow(err)
            if inside is None:
                raise
            print(f"error: {inside}", file=sys.stderr)
            return 2

    return run


# What to do about a disk that takes no more.
_NO_ROOM = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there", errno.EROFS: "it is read-only"}


def _naming_the_output(err, out) -> str:
    """The message of ``err``; for a disk that takes no more, with the fix, and with the command's output where
    the error names no file (Keras' checkpoint names none)."""
    message = str(err)
    if not (isinstance(err, OSError) and err.errno in _NO_ROOM):
        return message
    if out and err.filename is None and str(out) not in message:
        message += f" (writing {out})"
    return f"{message}: {_NO_ROOM[err.errno]}, choose another output"


def _refuse_to_overwrite(args):
    # A folder is refused before any sample is rendered: --overwrite cannot replace it with the file.
    if Path(args.out).is_dir():
        raise IsADirectoryError(f"{args.out or '.'} is a folder: give the file to write, e.g. "
                                f"{Path(args.out) / 'dataset.h5'}")
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists: choose another name, or pass --overwrite to replace it")


@_input_errors_exit_2
def cmd_synthesize(args) -> int:
    """A training set made straight from the virtual beamline's ground truth (domain-randomised)."""
    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    _refuse_to_overwrite(args)
    summary = synthetic_dataset(
        args.out, n_samples=args.samples, seed=args.seed, crops_per_sample=args.crops_per_sample,
        random_looks=not args.fixed_look, line_fraction=args.line_fraction, hit_fraction=args.hit_fraction,
        near_fraction=args.near_fraction, ice_hit_fraction=args.ice_hit_fraction, region_fraction=args.region_fraction,
        empty_fraction=args.empty_fraction, ice_fraction=args.ice_fraction, workers=args.workers,
    )
    print(", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


@_input_errors_exit_2
def cmd_synthesize_regions(args) -> int:
    """A region set: whole regions of virtual-beamline frames, labelled on the grid of an fcn's crops."""
    from mxcube_autocenter.learning.dense import synthetic_regions

    _refuse_to_overwrite(args)
    summary = synthetic_regions(
        args.out, n_samples=args.samples, seed=args.seed, views_per_sample=args.views_per_sample,
        regions_per_view=args.regions_per_view, cells=args.cells, crop_um=args.crop_um, input_size=args.input_size,
        random_looks=not args.fixed_look, crystal_fraction=args.crystal_fraction, empty_fraction=args.empty_fraction,
        ice_fraction=args.ice_fraction, workers=args.workers,
    )
    print(", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


@_input_errors_exit_2
def cmd_train_dense(args) -> int:
    """Train the fcn regressor on a region set, every grid crop of a region at once."""
    from mxcube_autocenter.learning.dense import train_dense

    # Fine-tuning keeps the initial model's input and label transform (train_dense takes them from it).
    result = train_dense(args.regions, args.out, transform=args.transform, label=args.label, epochs=args.epochs,
                         batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                         learning_rate=args.learning_rate, initial_model=args.initial_model,
                         peak_weight=args.peak_weight, peak_sharpness=args.peak_sharpness)
    _print_training(result)
    return 0


def _print_training(result):
    best = f"best epoch {result.best_epoch}" if result.best_epoch else "no epoch improved on the initial model: kept"
    print(f"Model: {result.model_path} ({result.seconds:.0f} s, {best})")
    for subset, metrics in result.metrics.items():
        print(f"  {subset}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))


@_input_errors_exit_2
def cmd_train(args) -> int:
    """Train a reflection-count regressor (or the crystal/empty classifier)."""
    from mxcube_autocenter.learning.architectures import task_of
    from mxcube_autocenter.learning.training import load_model, train, train_classifier

    # Options left out are the initial model's (fine-tuning keeps them; the library refuses others), else the
    # defaults; without --arch the initial model's task decides which is trained.
    if args.arch:
        task = task_of(args.arch)
    else:
        task = load_model(args.initial_model)[1].get("task", "regression") if args.initial_model else "regression"
    ignored = "--transform" if task == "classifier" and args.transform is not None else (
        "--threshold" if task == "regression" and args.threshold is not None else None)
    if ignored:
        which = args.arch or ("the initial model" if args.initial_model else "fcn")
        raise ValueError(f"{ignored} does not apply to a {task} model ({which}): leave it out, or train an "
                         "architecture it applies to (a regressor learns transformed counts, a classifier "
                         "count >= --threshold)")
    options = dict(_train_options(args), initial_model=args.initial_model, learning_rate=args.learning_rate)
    out = args.out or ("out/classifier" if task == "classifier" else "out/model")
    if task == "classifier":
        result = train_classifier(args.dataset, out, threshold=args.threshold, arch=args.arch, **options)
    else:
        result = train(args.dataset, args.arch, args.transform, out, **options)
    _print_training(result)
    return 0


@_input_errors_exit_2
def cmd_sweep(args) -> int:
    """Train every architecture with every label transform into one report."""
    from mxcube_autocenter.learning.evaluate import sweep, sweep_failures

    failures = sweep_failures(sweep(args.dataset, args.out, archs=args.archs, **_train_options(args)))
    print(f"Sweep report: {Path(args.out) / 'sweep.md'}")
    for combo, message in failures.items():
        print(f"  {combo} failed: {message}")
    # The others are in the report, but a script running the sweep must see that it is incomplete.
    return 1 if failures else 0


@_input_errors_exit_2
def cmd_evaluate(args) -> int:
    """Evaluation report of a model on a training set's test split."""
    from mxcube_autocenter.learning.evaluate import evaluate

    metrics = evaluate(args.model, args.dataset, args.out, subset=args.subset)
    print(f"Report: {Path(args.out) / 'report.md'}")
    print(", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return 0


def _samples_path(run) -> Path:
    """A demo report's samples.json (``run``: the report directory or the file)."""
    path = Path(run)
    return path / "samples.json" if path.is_dir() else path


def _demo_samples(run) -> list:
    """The per-sample rows of a demo report (its directory or its samples.json)."""
    path = _samples_path(run)
    # Another file of a good run (its report.md, scorecard.json): "run the demo again" would be wrong.
    fix = (f"give the run folder {path.parent} or its samples.json" if path.name != "samples.json"
           and (path.parent / "samples.json").is_file() else "run the demo again")  # fmt: skip
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        if (path.parent / "demo.log").is_file():
            # A demo's folder whose run ended before its report: interrupted, or failed.
            from mxcube_autocenter.demo import PREVIOUS

            previous = path.parent / PREVIOUS / "samples.json"
            raise FileNotFoundError(
                f"{path} not found: the demo in {path.parent} did not finish (interrupted or failed: its demo.log "
                "says); run it again" + (f", or give {previous.parent}, the earlier run's report it kept"
                                         if previous.is_file() else "")) from None  # fmt: skip
        raise FileNotFoundError(f"{path} not found: give a demo report directory (mxcube-autocenter demo --out DIR)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a demo's samples.json ({err}): {fix}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("sample"), str) for r in rows):
        raise ValueError(f"{path} is not a demo's samples.json (no list of samples): {fix}")
    from mxcube_autocenter.scorecard import METHODS, outcome_of

    for row in rows:
        for method in (m for m in METHODS if m in row):
            try:
                outcome_of(row, method)
            except ValueError as err:
                # Here, where the file is known: of several runs pooled, the one to run again.
                raise ValueError(f"{path}: {err}") from None
    return rows


@_input_errors_exit_2
def cmd_compare(args) -> int:
    """Compare one method's outcomes in two demo runs, sample by sample."""
    from mxcube_autocenter.scorecard import compare_runs, format_comparison

    if len(args.runs) % 2:
        raise ValueError(f"{len(args.runs)} runs given: give pairs, RUN_A RUN_B [RUN_A RUN_B ...]")
    pair_of = {}
    for i, run in enumerate(args.runs):
        if pair_of.setdefault(_samples_path(run).resolve(), i // 2) != i // 2:
            raise ValueError(f"{run} is in more than one pair: its crystals would count twice; give each run once")
    rows = [_demo_samples(run) for run in args.runs]
    comparison = compare_runs(list(zip(rows[0::2], rows[1::2])), method=args.method)
    print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
    return 0


@_input_errors_exit_2
def cmd_scorecard(args) -> int:
    """One scorecard over the held-out samples of several demo runs (other seeds)."""
    from mxcube_autocenter import scorecard

    runs = [_demo_samples(run) for run in args.runs]
    cards = [_demo_scorecard(run) for run in args.runs]
    scorecard.check_one_centring_model(cards, args.runs)
    scorecard.check_one_centring_setup(cards, args.runs)
    methods = scorecard.summarise(scorecard.pool_outcomes(runs))
    methods = {name: figures for name, figures in methods.items() if figures["n"]}
    n = sum(len(rows) for rows in runs)
    n_empty = sum(not r.get("has_crystal") for rows in runs for r in rows)
    learning = scorecard.pool_learning(cards)
    code = scorecard.code_versions(cards, args.runs)
    result = {"methods": methods, "learning": learning, "n_runs": len(runs), "n_samples": n, "n_empty": n_empty,
              "targets": scorecard.check_targets(methods.get("ml", {})), "code": code}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"Scorecard: {n} held-out samples, {n_empty} of them empty loops, from {len(runs)} demo run(s); rates "
              f"with their 95 % interval\n\n{scorecard.format_table(methods)}\n\n"
              f"{scorecard.format_targets(result['targets'])}")
        if not learning["source"]:
            print("\nLearning: no figures stand for all these runs (their models' figures differ, or a run has no "
                  "scorecard.json); `--json` gives each run's")
        else:
            print(f"\nLearning ({learning['source']}): Spearman {scorecard.format_cell(learning['spearman_expected'], '{:.3f}')} "
                  f"against the true counts, classifier accuracy "
                  f"{scorecard.format_cell(learning['classifier_accuracy_expected'], '{:.3f}')}, training "
                  f"{scorecard.format_cell(learning['train_s'], '{:.0f}')} s")
        print("\nCode: " + "; ".join(f"{version} ({len(names)} run(s))" for version, names in code.items()))
    return 0


def _demo_scorecard(run) -> dict | None:
    """The scorecard.json beside a demo report's samples.json, or None where there is none."""
    path = _samples_path(run).with_name("scorecard.json")
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a demo's scorecard.json ({err}): run the demo again, or move it away") from None
    if not isinstance(card, dict) or not isinstance(card.get("learning", {}), dict) \
            or not isinstance(card.get("model", {}), dict):
        raise ValueError(f"{path} is not a demo's scorecard.json: run the demo again, or move it away")
    return card


def _number(kind, low=None, high=None, low_inclusive=True):
    """An argparse type: a finite number of ``kind`` within bounds, or a usage error saying what is allowed."""
    wanted = "a whole number" if kind is int else "a finite number"
    if low is not None and high is not None:
        wanted += f" from {low} to {high}" if low_inclusive else f" greater than {low} and at most {high}"
    elif low is not None:
        wanted += f" of at least {low}" if low_inclusive else f" greater than {low}"

    def parse(text):
        try:
            value = kind(text)
            finite = math.isfinite(value)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {wanted}") from None
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        if not finite or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {wanted}")
        return value

    return parse


COUNT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
POSITIVE = _number(float, 0, low_inclusive=False)
NON_NEGATIVE = _number(float, 0)
FRACTION = _number(float, 0, 1)
FINITE = _number(float)
# As the heatmap_stride_px property takes it.
STRIDE_PX = _number(float, 0, 64, low_inclusive=False)
# A camera's delay from exposure to delivery, s: tens of ms; a second would be a stalled camera, not a delay.
CAMERA_LATENCY_S = _number(float, 0, 1)
# A model's input side, pixels: the thesis' 128 and room above; a larger one would not fit in memory.
INPUT_SIZE = _number(int, 8, 512)


def _beam_position(text: str) -> tuple[float, float]:
    """``--beam X,Y``: two numbers, pixels."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected the beam position as X,Y in pixels, e.g. 640,512")
    return x, y


def cmd_heatmap(args) -> int:
    """Loop, heatmap and best point of camera images (steps 1-4 of the centring)."""
    import time

    if args.beam is not None and not args.png:
        print("error: --beam marks the beam on the --png overlay; give --png too", file=sys.stderr)
        return 2
    # A folder of overlays for several images, for an existing folder or a name ending in "/", whatever the count:
    # a shell pattern matching one image must not change what --png means.
    png_folder = bool(args.png) and (len(args.images) > 1 or Path(args.png).is_dir() or args.png.endswith(os.sep))
    if args.png and not png_folder and not args.png.lower().endswith(".png"):
        print(f"error: --png {args.png}: give a file name ending in .png, or a folder (an existing one, or a name "
              "ending in /)", file=sys.stderr)  # fmt: skip
        return 2
    if png_folder and args.png.lower().endswith(".png") and not Path(args.png).is_dir():
        print(f"error: --png {args.png}: {len(args.images)} images give one overlay each: give a folder",
              file=sys.stderr)  # fmt: skip
        return 2

    from mxcube_autocenter.centring import report
    from mxcube_autocenter.centring.predictor import PredictorError, load_predictor
    from mxcube_autocenter.centring.procedure import CentringSettings
    from mxcube_autocenter.config import AutoCenterConfig
    from mxcube_autocenter.imagefiles import write_png

    try:
        predictor = load_predictor(args.model, args.classifier, args.ice_model)
    except PredictorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = CentringSettings.from_config(AutoCenterConfig(), heatmap_stride_px=args.stride,
                                            heatmap_symmetries=args.symmetries, min_score=args.min_score,
                                            pin_side=args.pin_side)  # fmt: skip
    ppmm = (args.pixels_per_mm, args.pixels_per_mm)
    status = 0
    overlay_names = set()
    for path in args.images:
        start = time.perf_counter()
        entry, angle, frame = _heatmap_entry(path, predictor, settings, ppmm)
        if angle is not None and args.png:
            beam = args.beam or (frame.shape[1] / 2, frame.shape[0] / 2)
            try:
                out = _overlay_path(Path(args.png), png_folder, path, overlay_names)
                write_png(out, report.overlay(angle, beam, crystal_found=entry["crystal_found"]))
            except OSError as err:
                entry["error"] = str(err)
        status = 1 if "error" in entry else status
        entry["elapsed_s"] = round(time.perf_counter() - start, 3)
        print(json.dumps(entry) if args.json else f"{path}: " + (entry.get("error") or (
            "no loop found" if entry["loop"] is None else
            f"loop {entry['loop']}, best {entry['best']}, score {entry['score']}, "
            f"crystal {'found' if entry['crystal_found'] else 'not found'} ({entry['elapsed_s']} s)")))  # fmt: skip
    return status


def _heatmap_entry(path, predictor, settings, pixels_per_mm) -> tuple:
    """``(entry, angle, frame)`` of one image: its loop, best point and scores (or its ``error``); ``angle``
    is the analysed view, None where the image could not be read or shows no loop."""
    from mxcube_autocenter.centring.loop import ScaleError, loop_tips
    from mxcube_autocenter.centring.procedure import analyse_frame, is_crystal
    from mxcube_autocenter.imagefiles import read_rgb

    entry = {"image": path, "loop": None, "best": None, "crystal_found": False, "score": None,
             "crystal_probability": None, "ice_probability": None}  # fmt: skip
    try:
        frame = read_rgb(path)
    except OSError as err:
        return {**entry, "error": str(err)}, None, None
    try:
        _, tip = loop_tips(frame, pixels_per_mm, settings.pin_side)
    except ScaleError as err:
        return {**entry, "error": f"--pixels-per-mm: {err}"}, None, frame
    if tip is None:
        return entry, None, frame
    angle = analyse_frame(predictor, frame, tip, pixels_per_mm, settings)
    found = is_crystal(angle, settings)
    entry.update(loop=[round(v, 1) for v in tip], score=round(angle.score, 2), crystal_found=found,
                 crystal_probability=angle.crystal_probability,
                 # What the centring asks in its verification view, here at the best point (in focus or not).
                 ice_probability=predictor.ice_probability(frame, angle.point, angle.roi, pixels_per_mm),
                 best=[round(v, 1) for v in angle.point] if found else None)  # fmt: skip
    return entry, angle, frame


def _overlay_path(png: Path, folder: bool, image, taken: set) -> Path:
    """Where an image's overlay goes: ``png`` itself, or in the folder ``png`` (made if missing) a name of the
    image's own not in ``taken`` (added to it): images of the same name from other folders (snapshot.png, ...)
    get one each."""
    from mxcube_autocenter.outputs import make_directory

    if not folder:
        return png
    make_directory(png, "--png")
    name, k = f"{Path(image).stem}_heatmap.png", 1
    while name in taken:
        k += 1
        name = f"{Path(image).stem}_{k}_heatmap.png"
    taken.add(name)
    return png / name


class _ImageProgress:
    """A tqdm bar advanced by the collect object's ``collectImageTaken`` signal."""

    def __init__(self, collect, total, desc):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="image")
        self._collect = collect
        collect.connect("collectImageTaken", self.image_taken)

    def image_taken(self, *args):
        self.bar.update(1)

    def close(self):
        self._collect.disconnect("collectImageTaken", self.image_taken)
        self.bar.close()


@_input_errors_exit_2
def cmd_simulate(args) -> int:
    """Gallery of one virtual sample and a helical + rotational collection of it."""
    _patch_gevent()
    import numpy as np

    from mxcube_autocenter.beamline import auto_centring, hardware_repository
    from mxcube_autocenter.geometry import TRANSLATION_MOTORS, centred_motors
    from mxcube_autocenter.imagefiles import write_png
    from mxcube_autocenter.outputs import make_directory
    from mxcube_autocenter.simulation.experiments import aim_point, helical_and_rotation, recorded_collection
    from mxcube_autocenter.simulation.gallery import sample_gallery
    from mxcube_autocenter.simulation.render import Renderer
    from mxcube_autocenter.simulation.sample import make_sample

    out = Path(args.out)
    with hardware_repository(args.config) as beamline:
        try:
            # An AutoCenter XML that mxcubecore refused (a wrong property value) leaves no object: say so here,
            # not with a traceback after the gallery is written.
            recorder_object = auto_centring(beamline)
        except LookupError as err:
            raise ValueError(str(err)) from None
        make_directory(out)  # once the configuration has loaded: a refused run leaves nothing
        mounted = beamline.sample_changer.mount(make_sample(args.seed), crystal_id=f"seed{args.seed}")
        sample = mounted.sample
        print(f"Sample {args.seed}: {sample.describe()}")
        gallery = out / f"sample{args.seed}_gallery.png"  # one per sample: several seeds may share --out
        write_png(gallery, sample_gallery(sample, mounted.diffraction, Renderer()))
        print(f"Gallery (crystal outlines yellow, beam red cross, best point red circle): {gallery}")
        rng = np.random.default_rng(args.seed)
        centre = centred_motors(aim_point(mounted))
        scans = helical_and_rotation(beamline, mounted, rng, helical_range=0.1, rotation_range=1.0)
        # As MXCuBE's queue does, a run number whose files exist is not used again: a second simulate into the same
        # --out replaced the first one's EIGER files, and its camera recordings were then labelled with the new
        # collection's counts.
        first_run = _next_run_number(out / "data", f"sample{args.seed}")
        if first_run > 1:
            print(f"{out / 'data'} holds earlier collections of sample {args.seed}: these are runs {first_run} and "
                  f"{first_run + 1}")
        for run, (kind, extra) in enumerate(scans, start=first_run):
            beamline.diffractometer.set_value_motors(
                beamline.diffractometer.readings({m: centre[m] for m in TRANSLATION_MOTORS}), timeout=30
            )
            progress = _ImageProgress(beamline.collect, args.images, f"{kind} collection")
            try:
                # The recording's file closes in the background: the beamline must not be torn down before.
                summary = recorded_collection(
                    beamline, recorder_object.recorder, out / "data", f"sample{args.seed}", experiment_type=kind,
                    run_number=run, n_images=args.images, exposure_time=args.exposure, crystal_id=mounted.crystal_id,
                    **extra,
                )
            finally:
                progress.close()
            counts = beamline.collect.last_collection["reflection_counts"]
            print(
                f"{kind}: {len(counts)} frames, reflection counts {min(counts)}-{max(counts)} "
                f"(mean {np.mean(counts):.1f}), master file {beamline.collect.last_collection['master_file']}"
            )
            if recorder_object.recorder is None:  # a configuration that records nothing
                continue
            if summary is None or summary.status != "complete":
                print(f"error: the {kind} collection's camera recording did not close: {summary}", file=sys.stderr)
                return 1
            print(f"{kind}: camera recording of {summary.frames_kept} frames: {summary.path}")
    return 0


def _next_run_number(directory: Path, prefix: str) -> int:
    """The run number after the highest of the ``<prefix>_<run>_master.h5`` files in ``directory`` (1 if none)."""
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_master\.h5")
    runs = [int(found.group(1)) for path in directory.glob(f"{prefix}_*_master.h5")
            if (found := pattern.fullmatch(path.name))]  # fmt: skip
    return max(runs, default=0) + 1


def _model_or_shipped(text: str) -> str:
    """A model file, or ``shipped`` for the shipped regressor (wherever the package is installed)."""
    if text != "shipped":
        return text
    from mxcube_autocenter.centring.predictor import SHIPPED_REGRESSOR

    return str(SHIPPED_REGRESSOR)


def build_parser() -> argparse.ArgumentParser:
    from mxcube_autocenter.learning.crops import DEFAULT_CROP_UM, DEFAULT_INPUT_SIZE

    parser = argparse.ArgumentParser(
        prog="mxcube-autocenter",
        description=(
            "Optical crystal centring for MXCuBE: record training frames, label them "
            "with reflection counts, train, centre, and score on the virtual beamline."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="the main job on the virtual beamline: record, label, train, centre held-out samples, score",
        description=(
            "Record helical and rotational collections of training samples through the AutoCenter object, label "
            "them with reflection counts, train a model, centre held-out samples with the optical ML centring, "
            "MXCuBE's lucid centring, the loop centre, an X-ray mesh scan and the optical oracle, and score them "
            "against the ground truth. Writes report.md with figures; prints the scorecard."
        ),
    )
    demo.add_argument("--out", default="out/demo", help="report directory (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="no recording or training: centre 10 samples with the shipped model (under 3 minutes); "
                           "the learning figures are those its model file records")
    demo.add_argument("--use-shipped-model", action="store_true",
                      help="centre with the shipped model (models/) instead of the one trained in this run")
    demo.add_argument("--from-scratch", action="store_true",
                      help="train the regressor from scratch (64 px input, 160 um crops) instead of fine-tuning the "
                           "shipped one on the recordings")
    demo.add_argument("--model", help="centre with this regressor .keras file (no training)")
    demo.add_argument("--classifier", help="with --model: this crystal/empty classifier .keras file")
    demo.add_argument("--no-classifier", action="store_true", help="train no crystal/empty classifier")
    demo.add_argument("--ice-model", help="the ice network .keras file the centring asks in the verification view "
                                          "(default: the shipped one)")
    demo.add_argument("--json", action="store_true", help="print the scorecard as JSON only (progress on stderr)")
    demo.add_argument("--n-train", type=NON_NEGATIVE_INT, help="training samples (default: 20; --quick: none)")
    demo.add_argument("--n-heldout", type=COUNT, help="held-out samples to centre (default: 20; --quick: 10)")
    demo.add_argument("--n-empty", type=NON_NEGATIVE_INT, help="of which empty loops (default: one in five, at most 4; --quick: 2)")
    demo.add_argument("--epochs", type=COUNT, help="most training epochs (default: 12)")
    demo.add_argument("--input-size", type=INPUT_SIZE, help="with --from-scratch: model input side, pixels (default: 64)")
    demo.add_argument("--nproc", type=COUNT, help="spot-finding processes (default: up to 2)")
    demo.add_argument("--seed", type=NON_NEGATIVE_INT, help="seeds looks, start positions and samples (default: 0)")
    demo.add_argument("--keep-data", action="store_true", help="keep the EIGER files and camera recordings (large)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--config", help="beamline configuration directory (default: virtual beamline)")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser("simulate", help="virtual beamline: sample gallery and a helical + rotational collection")
    sim.add_argument("--seed", type=NON_NEGATIVE_INT, default=16, help="virtual sample seed (default: %(default)s)")
    sim.add_argument("--images", type=COUNT, default=80, help="images per collection (default: %(default)s)")
    sim.add_argument("--exposure", type=POSITIVE, default=0.05, help="exposure per image, s (default: %(default)s)")
    sim.add_argument("--config", help="beamline configuration directory (default: virtual beamline)")
    sim.add_argument("--out", default="out/simulate", help="output directory (default: %(default)s)")
    sim.set_defaults(func=cmd_simulate)
    label = sub.add_parser("label", help="label camera recordings with reflection counts into a training set")
    label.add_argument("recordings", nargs="+", metavar="RECORDING.h5")
    label.add_argument("--out", required=True, help="training set HDF5 (created or appended to)")
    label.add_argument("--spots-from", help="per-image spot counts (CSV/JSON from DIALS, dozor, ...) instead of our spot finder")
    label.add_argument("--nproc", type=COUNT, help="processes for spot finding, at most the cores (default: 1)")
    label.add_argument("--clock-offset", type=FINITE, help="detector clock minus camera clock, s (default: estimated)")
    # No defaults for --nproc and --max-clock-offset (pipeline.MAX_CLOCK_OFFSET_S, 60; not imported here: the
    # parser loads no HDF5 or OpenCV): cmd_label refuses them where the other options leave them unused.
    label.add_argument("--max-clock-offset", type=POSITIVE,
                       help="largest estimated clock offset, s: a larger one means another collection's master file "
                            "(default: 60)")
    label.add_argument("--camera-latency", type=CAMERA_LATENCY_S,
                       help="camera delay from a frame's exposure to its delivery, s: the estimated clock offset "
                            "(from omega, read on delivery) cannot see it (default: 0.02, the virtual camera's)")
    label.set_defaults(func=cmd_label)

    # training.LEARNING_RATE and FINE_TUNE_LEARNING_RATE (not imported here: the parser loads no TensorFlow).
    learning_rate_help = "Adam's (default: 1e-3, or 1e-4 when fine-tuning with --initial-model)"

    def add_train_options(p, fine_tuning=False, sweep=False):
        # With fine_tuning no defaults: training takes the initial model's input and refuses a different one.
        p.add_argument("--crop-um", type=POSITIVE, default=None if fine_tuning else DEFAULT_CROP_UM,
                       help=f"crop side on the sample, um (default: {DEFAULT_CROP_UM}"
                            + (", or the initial model's)" if fine_tuning else ")"))
        p.add_argument("--input-size", type=INPUT_SIZE, default=None if fine_tuning else DEFAULT_INPUT_SIZE,
                       help=f"model input side, pixels (default: {DEFAULT_INPUT_SIZE}"
                            + (", or the initial model's)" if fine_tuning else ")"))
        p.add_argument("--epochs", type=COUNT, default=30, help="most epochs (early stopping) (default: %(default)s)")
        p.add_argument("--batch-size", type=COUNT, default=32)
        p.add_argument("--patience", type=NON_NEGATIVE_INT, default=5, help="early-stopping patience, epochs (default: %(default)s)")
        p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
        # A sweep trains regressors: the ice flag is only for `train --arch classifier`.
        p.add_argument("--label", default="rc", choices=["rc", "rc_expected"] + ([] if sweep else ["on_ice"]),
                       help="counts to learn: recorded (rc) or, in a synthetic set, noise-free expected "
                            "(rc_expected)" + ("" if sweep else "; or, for a classifier, a synthetic set's flag of "
                                                                 "the beam on ice (on_ice: the ice network)")
                            + " (default: %(default)s)")  # fmt: skip
        p.add_argument("--cache", default="auto", choices=list(_CACHES),
                       help="where decoded crops are kept between epochs: memory, a temporary file (in TMPDIR), "
                            "none (read again every epoch), or auto: memory if they take at most a quarter of "
                            "it, else a file (default: %(default)s)")

    def add_sample_options(p):
        p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
        p.add_argument("--fixed-look", action="store_true", help="no lighting/optics randomisation")
        p.add_argument("--empty-fraction", type=FRACTION, default=0.15,
                       help="share of samples with an empty loop (default: %(default)s)")
        p.add_argument("--ice-fraction", type=FRACTION, default=0.3,
                       help="share of samples with ice balls, which give no Bragg spots (default: %(default)s)")
        p.add_argument("--workers", type=COUNT, default=1, help="rendering processes (default: %(default)s)")
        p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")

    synth = sub.add_parser("synthesize", help="a training set straight from the virtual beamline (domain-randomised)")
    synth.add_argument("out", metavar="DATASET.h5")
    synth.add_argument("--samples", type=COUNT, default=150, help="virtual samples (default: %(default)s)")
    synth.add_argument("--crops-per-sample", type=COUNT, default=96, help="rows per sample (default: %(default)s)")
    add_sample_options(synth)
    synth.add_argument("--line-fraction", type=FRACTION, default=0.4,
                       help="share of positions on a line through a crystal (default: %(default)s)")
    synth.add_argument("--hit-fraction", type=FRACTION, default=0.35,
                       help="share of positions on the crystals (default: %(default)s)")
    synth.add_argument("--near-fraction", type=FRACTION, default=0.0,
                       help="share of positions near the crystals' edges (default: %(default)s)")
    synth.add_argument("--ice-hit-fraction", type=FRACTION, default=0.0,
                       help="share of positions on ice balls, where there are some (default: %(default)s)")
    synth.add_argument("--region-fraction", type=FRACTION, default=0.0,
                       help="share of positions anywhere in the region a centring searches, stem and background "
                            "included (default: %(default)s)")
    synth.set_defaults(func=cmd_synthesize)

    train = sub.add_parser("train", help="train a reflection-count regressor or the crystal/empty classifier")
    train.add_argument("dataset", metavar="DATASET.h5")
    # No defaults here: cmd_train refuses the option that does not apply to the architecture's task, training
    # one that differs from the initial model's (left out, it is the initial model's, else the default).
    train.add_argument("--arch", help="a1..a10, fcn, fcn_gap, classifier or fcn_classifier (default: fcn, or the "
                                      "initial model's)")
    train.add_argument("--transform", choices=["vanilla", "log", "tanh"], help="regressor: label transform (default: log, or the initial model's)")
    train.add_argument("--out", help="output directory (default: out/model, or out/classifier for a classifier, so "
                                     "that one does not replace the other)")
    train.add_argument("--threshold", type=POSITIVE,
                       help="classifier: the count from which a crop is a crystal (default: 5, 1 with --label "
                            "on_ice, or the initial model's)")
    train.add_argument("--initial-model", metavar="MODEL.keras", type=_model_or_shipped,
                       help="fine-tune this model (`shipped`: the shipped regressor, e.g. on site data): its "
                            "architecture, input, label transform and threshold are used; with --arch "
                            "fcn_classifier, an fcn regressor to start the classifier from")
    train.add_argument("--learning-rate", type=POSITIVE, help=learning_rate_help)
    add_train_options(train, fine_tuning=True)
    train.set_defaults(func=cmd_train)

    regions = sub.add_parser("synthesize-regions",
                             help="whole regions of virtual-beamline frames labelled on an fcn's crop grid (dense training)")
    regions.add_argument("out", metavar="REGIONS.h5")
    regions.add_argument("--samples", type=COUNT, default=300, help="virtual samples (default: %(default)s)")
    regions.add_argument("--views-per-sample", type=COUNT, default=4, help="random omega/zoom views (default: %(default)s)")
    regions.add_argument("--regions-per-view", type=COUNT, default=2, help="(default: %(default)s)")
    regions.add_argument("--cells", type=COUNT, default=9, help="grid crops per region side (default: %(default)s)")
    regions.add_argument("--crop-um", type=POSITIVE, default=DEFAULT_CROP_UM, help="crop side on the sample, um (default: %(default)s)")
    regions.add_argument("--input-size", type=INPUT_SIZE, default=DEFAULT_INPUT_SIZE, help="model input side, pixels (default: %(default)s)")
    regions.add_argument("--crystal-fraction", type=FRACTION, default=0.5,
                         help="share of regions centred near a crystal, the rest anywhere in the centring region "
                              "(default: %(default)s)")
    add_sample_options(regions)
    regions.set_defaults(func=cmd_synthesize_regions)

    dense = sub.add_parser("train-dense", help="train the fcn regressor on a region set (every grid crop at once)")
    dense.add_argument("regions", metavar="REGIONS.h5")
    dense.add_argument("--out", default="out/dense_model", help="output directory (default: %(default)s)")
    dense.add_argument("--transform", choices=["vanilla", "log", "tanh"],
                       help="label transform (default: log, or the initial model's)")
    dense.add_argument("--label", default="rc_expected", choices=["rc", "rc_expected"], help="(default: %(default)s)")
    dense.add_argument("--epochs", type=COUNT, default=20, help="most epochs (early stopping) (default: %(default)s)")
    dense.add_argument("--batch-size", type=COUNT, default=16, help="regions per batch (default: %(default)s)")
    dense.add_argument("--patience", type=NON_NEGATIVE_INT, default=4, help="early-stopping patience, epochs (default: %(default)s)")
    dense.add_argument("--learning-rate", type=POSITIVE, help=learning_rate_help)
    dense.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    dense.add_argument("--initial-model", metavar="MODEL.keras", type=_model_or_shipped,
                       help="start from this fcn model (`shipped`: the shipped regressor) and keep its transform")
    dense.add_argument("--peak-weight", type=NON_NEGATIVE, default=0.0,
                       help="weight of the loss term on where each crystal region's counts peak (default: %(default)s: MSE alone)")
    dense.add_argument("--peak-sharpness", type=POSITIVE, default=4.0,
                       help="inverse temperature of that term's softmax, per unit of the transformed label (default: %(default)s)")
    dense.set_defaults(func=cmd_train_dense)

    sweep = sub.add_parser("sweep", help="all architectures x label transforms into one report")
    sweep.add_argument("dataset", metavar="DATASET.h5")
    sweep.add_argument("--out", required=True, help="report directory")
    sweep.add_argument("--archs", nargs="+", default=[f"a{i}" for i in range(1, 11)], help="architectures (default: a1..a10)")
    add_train_options(sweep, sweep=True)
    sweep.set_defaults(func=cmd_sweep)

    evaluate = sub.add_parser("evaluate", help="evaluation report of a model on a training set")
    evaluate.add_argument("model", metavar="MODEL.keras")
    evaluate.add_argument("dataset", metavar="DATASET.h5")
    evaluate.add_argument("--out", required=True, help="report directory")
    evaluate.add_argument("--subset", default="test", choices=["test", "validation", "train", "all"])
    evaluate.set_defaults(func=cmd_evaluate)

    heatmap = sub.add_parser("heatmap", help="loop, heatmap and best point of OAV camera images")
    heatmap.add_argument("images", nargs="+", metavar="IMAGE")
    heatmap.add_argument("--pixels-per-mm", type=POSITIVE, required=True, help="image scale, pixels per mm")
    heatmap.add_argument("--beam", type=_beam_position,
                         help="beam position X,Y in pixels, marked on the --png overlay (default: image centre)")
    heatmap.add_argument("--model", help="regressor .keras (default: the shipped model)")
    heatmap.add_argument("--classifier", help="crystal/empty classifier .keras (default: the shipped one, if any)")
    heatmap.add_argument("--ice-model", help="ice network .keras, asked at the best point (default: the shipped one, "
                                             "if any)")
    # The XML properties' defaults (AutoCenterConfig, not imported here: it loads mxcubecore; a test holds them equal).
    heatmap.add_argument("--pin-side", default="left", choices=["left", "right"])
    heatmap.add_argument("--stride", type=STRIDE_PX, default=6.0, help="grid step, pixels (default: %(default)s)")
    heatmap.add_argument("--min-score", type=NON_NEGATIVE, default=5.0,
                         help="smallest predicted reflection count of a crystal")
    heatmap.add_argument("--symmetries", default="none", choices=["none", "flips", "dihedral"],
                         help="average the heatmap over the region's flips (and quarter turns), as the "
                         "heatmap_symmetries property (default: %(default)s)")
    heatmap.add_argument("--json", action="store_true", help="one JSON object per image")
    heatmap.add_argument("--png", metavar="OUT", help="overlay PNG (a folder for several images, or for one: an "
                                                      "existing folder or a name ending in /)")
    heatmap.set_defaults(func=cmd_heatmap)

    from mxcube_autocenter.scorecard import METHODS  # light: numpy and the geometry

    compare = sub.add_parser(
        "compare", help="one centring method's outcomes in two demo runs, sample by sample",
        description="Pair the held-out samples of two demo runs (the same --seed and --n-heldout, e.g. with "
        "two models or two AutoCenter configurations) and print each sample's outcome in both, the hits gained "
        "and lost and the mean change of the RC fraction per crystal with its standard error. Several pairs "
        "(runs of other seeds) are pooled.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN",
                         help="demo report directories (or their samples.json) in pairs: RUN_A RUN_B [RUN_A RUN_B "
                         "...], A the reference")  # fmt: skip
    compare.add_argument("--method", default="ml", choices=list(METHODS), help="method compared (default: %(default)s)")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.set_defaults(func=cmd_compare)

    scorecard_parser = sub.add_parser(
        "scorecard", help="one scorecard over the held-out samples of several demo runs",
        description="Pool the per-sample outcomes of demo runs of different --seed into one scorecard, with the "
        "95 % (Wilson) intervals of the hit rate and the empty-loop rate: one run's 16 crystals leave a hit rate uncertain by about +-20 "
        "points, so judge the targets over several seeds.",
    )
    scorecard_parser.add_argument("runs", nargs="+", metavar="RUN", help="demo report directories (or their samples.json)")
    scorecard_parser.add_argument("--json", action="store_true", help="print the pooled scorecard as JSON")
    scorecard_parser.set_defaults(func=cmd_scorecard)

    inspect = sub.add_parser("inspect", help="summarise camera recordings and write contact sheets")
    inspect.add_argument("recordings", nargs="+", metavar="RECORDING.h5")
    inspect.add_argument("--png", help="contact sheet path (one recording; default: next to it)")
    inspect.add_argument("--frames", type=COUNT, default=16, help="frames on the sheet (default: %(default)s)")
    inspect.set_defaults(func=cmd_inspect)

    from mxcube_autocenter import web  # light: mxcubeweb itself is only needed to run the server
    from mxcube_autocenter.bench import NAMES as BENCHMARK_NAMES  # light: the benchmarks load when run

    webp = sub.add_parser("web", help="the MXCuBE web server (mxcubeweb) on the virtual beamline, with the plugin")
    webp.add_argument("--host", default=web.DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    webp.add_argument("--port", type=_number(int, 1, 65535), default=web.DEFAULT_PORT,
                      help="port (default: %(default)s, where mxcubeweb's UI development server expects it)")
    webp.add_argument("--state-dir", default="out/web", help="run-time configuration and user database (default: %(default)s)")
    webp.add_argument("--ui-build", help="a built mxcubeweb UI (its ui/build folder) to serve")
    webp.add_argument("--config", help="beamline configuration directory with mxcube-web/ (default: virtual beamline)")
    webp.set_defaults(func=cmd_web)

    bench = sub.add_parser("bench", help="speed and memory benchmarks, printed as figures")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions (under 5 minutes)")
    bench.add_argument("--only", nargs="+", metavar="NAME", choices=BENCHMARK_NAMES,
                       help=f"run only these benchmarks, of {', '.join(BENCHMARK_NAMES)}")
    bench.set_defaults(func=cmd_bench)
    return parser


def _log_warnings_to_stderr():
    """One stderr handler on the root logger, for this package's warnings and the beamline's log alike.

    mxcubecore adds its own (stdout) handler to ``HWR`` only when the root logger has none; without ours,
    it did, and then its first module-level ``logging.debug`` call (``TaskUtils``) ran
    ``logging.basicConfig``, whose handler printed every beamline log line a second time. Should a
    beamline's configuration give ``HWR`` a handler of its own, its records are left to that one.
    """
    root = logging.getLogger()
    if root.handlers:  # configured by whoever runs us (pytest, a script)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    hwr = logging.getLogger("HWR")
    handler.addFilter(lambda record: not (record.name.split(".")[0] == "HWR" and hwr.handlers))
    root.addHandler(handler)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, systemd, a batch system's stop), ended as Ctrl-C ends a command: its worker
    processes stopped and its part files removed, where Python's default would leave them."""


def _terminated(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`_Terminated` while the context lasts (Python's handlers belong to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _log_warnings_to_stderr()
    try:
        with _sigterm_as_interrupt():
            status = args.func(args)
        sys.stdout.flush()  # a reader gone shows here, not in Python's own flush at exit
        return status
    except _Terminated:
        print(f"mxcube-autocenter {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        # The user's own stop, not a fault: one line instead of a traceback.
        print(f"mxcube-autocenter {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped (`| head`): end quietly, as other command-line tools do; stdout goes
        # to /dev/null so that Python's flush at exit does not fail on the closed pipe once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
