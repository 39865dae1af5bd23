"""Training the regressors and the classifier; self-describing model files.

Model files
-----------
A trained model is saved as one ``.keras`` file that says everything needed
to use it: its last layer is a :class:`ModelInfo` identity layer whose Keras
config holds the metadata as JSON text, so ``keras.saving.load_model``
restores it with the model (once this module is imported, which registers
the layer), and no side file can get lost. The metadata:

``format`` (``"mxcube_autocenter.model"``), ``format_version`` (1),
``package_version``; ``task`` (``"regression"`` or ``"classifier"``);
``input``: ``crop_um``, ``input_size``, ``colour``, ``normalisation`` (see
:mod:`.crops`); ``transform`` (regression: name and fitted parameters) or
``threshold`` (classifier: a crystal is ``rc >= threshold``); ``label``:
the counts learnt (:data:`LABELS`);
``architecture``: name, spec and parameter count; ``data``: the dataset's
path, sizes, label statistics and provenance; ``split``: seed, fractions and
the crystal ids of each subset; ``training``: epochs, batch size, learning
rate, augmentation, seed, strategy, time, library versions; ``metrics`` on
the validation and test subsets.

:func:`load_model` refuses, with an error naming the file and the fix, a
file with no metadata, an unknown format version, metadata lacking any of
the keys above but ``label`` (absent from files of versions before it was
stored, which learnt ``rc``) or holding one that does not parse (a split with a crystal
in two subsets), or a network whose input shape disagrees with its metadata.

Distribution
------------
``strategy=None`` picks :func:`default_strategy`: a
``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set (create it at the
start of the program, before other TensorFlow work), a
``MirroredStrategy`` on several GPUs, else TensorFlow's default strategy
(here: the CPU). ``batch_size`` is the global batch, split over replicas.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from mxcube_autocenter import __version__  # noqa: E402
from mxcube_autocenter.learning import architectures, crops  # noqa: E402
from mxcube_autocenter.labelling.dataset import DatasetError, RowReader, Table, read_table  # noqa: E402
from mxcube_autocenter.learning.data import check_crop_fits, make_dataset  # noqa: E402
from mxcube_autocenter.learning.split import DEFAULT_FRACTIONS, Split, extend_split, resolve_split  # noqa: E402
from mxcube_autocenter.learning.transforms import LabelTransform, get_transform, transform_from_config  # noqa: E402
from mxcube_autocenter.outputs import (  # noqa: E402
    first_missing,
    json_default,
    make_directory,
    remove_empty,
    write_json_whole,
    write_whole,
)

log = logging.getLogger(__name__)

MODEL_FORMAT = "mxcube_autocenter.model"
MODEL_FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 5.0
LEARNING_RATE = 1e-3
# Fine-tuning starts from weights that already work; a step ten times smaller keeps what they learnt. On the
# demo's recordings (12 crystals) the shipped regressor fine-tuned at 1e-3 fell from test Spearman 0.868 to 0.783,
# at 1e-4 to 0.849 only.
FINE_TUNE_LEARNING_RATE = 1e-4
DEFAULT_TRANSFORM = "log"
# The counts a model learns: "rc", the reflection count as recorded (on a beamline, and in the synthetic sets a
# Poisson draw of the expected count), or "rc_expected", the simulator's noise-free expected count (synthetic
# sets only), which spares the model the Poisson noise. Or a flag of the synthetic sets that a classifier learns:
# "on_ice", the beam on an ice ball and on no crystal (the ice network that vetoes a centring on ice).
COUNT_LABELS = ("rc", "rc_expected")
ICE_LABEL = "on_ice"
LABELS = (*COUNT_LABELS, ICE_LABEL)
DEFAULT_LABEL = "rc"


class ModelFileError(ValueError):
    """A model file that cannot be used, with what to do about it."""


@keras.saving.register_keras_serializable(package="mxcube_autocenter", name="ModelInfo")
class ModelInfo(keras.layers.Layer):
    """Identity layer carrying the model's metadata (JSON text) in its config."""

    def __init__(self, info="{}", **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.info_json = info if isinstance(info, str) else json.dumps(info, sort_keys=True)

    @property
    def info(self) -> dict:
        return json.loads(self.info_json)

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "info": self.info_json}


def attach_info(model: keras.Model, info: dict) -> keras.Model:
    """The same network (shared layers and weights) with ``info`` as its metadata.

    An existing :class:`ModelInfo` at the output is replaced.
    """
    output = model.outputs[0]
    last = model.layers[-1]
    if isinstance(last, ModelInfo):
        output = last.input
    tagged = ModelInfo(json.dumps(info, sort_keys=True, default=json_default), name="model_info")(output)
    return keras.Model(_single_input(model), tagged, name=model.name)


# The settings that make a layer compute what it does, beside its kind and weight shapes (a dropout rate only
# trains differently): an fcn and an fcn_classifier differ only by a final sigmoid.
_LAYOUT_SETTINGS = ("activation", "strides", "padding", "pool_size", "dilation_rate")


def _layout(model: keras.Model) -> list[str]:
    """Each computing layer's kind, settings and weight shapes: what makes two networks the same one."""
    layout = []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.InputLayer, ModelInfo)):
            continue
        config = layer.get_config()
        settings = [f"{name}={config[name]}" for name in _LAYOUT_SETTINGS if config.get(name) is not None]
        weights = [tuple(w.shape) for w in layer.weights]
        layout.append(" ".join([type(layer).__name__, *settings, *([str(weights)] if weights else [])]))
    return layout


def _single_input(model: keras.Model):
    """The model's one input tensor: a model built on the list of it wants a list at each call, and Keras warns
    ("The structure of `inputs` doesn't match") whenever it is given the array of crops alone."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


MIN_TEST_CRYSTALS = 3  # fewer in the test subset: a warning, its figures are anecdotes

# Beside checkpoint.keras while a training runs: the metadata its best epoch needs to be a model file.
RUN_INFO = "run.json"
# The running training's history, named history.csv once its model is saved: a run that fails or is stopped
# leaves the earlier run's history.csv beside the earlier run's model.keras.
HISTORY_PART = "history.part.csv"
INTERRUPTED = ("the training did not end: these are the best epoch's weights as checkpoint.keras kept them; the "
               "metrics are those of no test")


def _refuse(path, problem, fix):
    raise ModelFileError(f"{path}: {problem}. {fix}")


def _metadata_part(path, info: dict, key: str, parse, fix):
    """``parse(info[key])``, refused naming the part of the metadata and what it lacks."""
    try:
        return parse(info[key])
    except KeyError as err:
        _refuse(path, f"its metadata's {key} lacks {err.args[0]!r}", fix)
    except (AttributeError, TypeError, ValueError) as err:
        _refuse(path, f"its metadata's {key} is invalid ({err})", fix)


def load_model(path):
    """Load a model file written by :func:`train` or :func:`train_classifier`.

    Returns
    -------
    model : keras.Model
    info : dict
        Its metadata (see the module documentation).

    Raises
    ------
    ModelFileError
        No such file, not a Keras file, no metadata, an unknown format
        version, incomplete metadata, an input shape that disagrees with
        the metadata, or a network that is not the one its architecture's
        name builds in this version.
    """
    path = str(path)
    retrain = "Train a model with mxcube_autocenter.learning.training.train (the `train` command)"
    if not os.path.exists(path):
        _refuse(path, "no such model file", "Give the path of a .keras file written by mxcube_autocenter")
    if os.path.isdir(path):
        # `train --out DIR` writes DIR/model.keras: the folder is the easy mistake.
        inside = os.path.join(path, "model.keras")
        _refuse(path, "a folder, not a model file",
                f"Give the model file in it: {inside}" if os.path.isfile(inside)
                else "Give the path of a .keras file written by mxcube_autocenter")  # fmt: skip
    if not zipfile.is_zipfile(path):
        _refuse(path, "the file is not a .keras model (a .keras file is a zip archive)",
                "Give the path of a .keras file written by mxcube_autocenter")
    try:
        model = keras.saving.load_model(path, compile=False)
    except zipfile.BadZipFile as err:
        # A bad CRC: the archive's bytes changed since it was written (an interrupted copy, a bad disk).
        _refuse(path, f"the file is damaged ({err})", "Copy it again from where it was trained, or retrain")
    except Exception as err:  # Keras raises many kinds for a bad file
        _refuse(path, f"Keras could not read it as a model ({type(err).__name__}: {err})",
                f"It must be a .keras file written by mxcube_autocenter. {retrain}")
    tags = [layer for layer in model.layers if isinstance(layer, ModelInfo)]
    if not tags:
        _refuse(path, "the model has no mxcube_autocenter metadata (no ModelInfo layer)",
                f"{retrain}, or add the metadata with learning.training.attach_info(model, info) and save again "
                f"(the checkpoint.keras of an interrupted training: info from the {RUN_INFO} beside it)")
    try:
        info = tags[-1].info
    except ValueError as err:
        _refuse(path, f"its metadata is not valid JSON ({err})", retrain)
    if not isinstance(info, dict):
        _refuse(path, f"its metadata is a JSON {type(info).__name__}, not an object", retrain)
    if info.get("format") != MODEL_FORMAT:
        _refuse(path, f"its metadata has format {info.get('format')!r}, not {MODEL_FORMAT!r}", retrain)
    version = info.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        _refuse(
            path,
            f"model format_version {version!r} written by mxcube_autocenter {info.get('package_version')}; "
            f"this version ({__version__}) reads format_version {MODEL_FORMAT_VERSION}",
            f"Use the mxcube_autocenter version that wrote it, or retrain. {retrain}",
        )
    missing = [key for key in ("package_version", "created", "task", "input", "architecture", "data", "split",
                               "training", "metrics") if key not in info]  # fmt: skip
    # Files written before the label was stored (format_version 1 all the same) learnt the recorded counts.
    info.setdefault("label", DEFAULT_LABEL)
    task = info.get("task")
    if task == "regression" and "transform" not in info:
        missing.append("transform")
    if task == "classifier" and "threshold" not in info:
        missing.append("threshold")
    if missing:
        _refuse(path, f"its metadata lacks {missing}", retrain)
    if task not in ("regression", "classifier"):
        _refuse(path, f"unknown task {task!r} in its metadata", retrain)
    objects = ("input", "architecture", "data", "split", "training", "metrics", "transform")
    for key in objects if task == "regression" else objects[:-1]:
        if not isinstance(info[key], dict):
            _refuse(path, f"its metadata's {key} is a JSON {type(info[key]).__name__}, not an object", retrain)
    spec = _metadata_part(path, info, "input", crops.CropSpec.from_config, retrain)
    if task == "regression" and not _metadata_part(path, info, "transform", transform_from_config, retrain).fitted:
        _refuse(path, f"its metadata's {info['transform'].get('name')} transform has no fitted parameters", retrain)
    _metadata_part(path, info, "split", Split.from_config, retrain)  # a crystal in two subsets is refused there
    try:
        if task == "classifier" and not np.isfinite(float(info["threshold"])):
            raise ValueError(f"the threshold {info['threshold']!r} is not a number of spots")
        if not info["architecture"].get("name"):
            raise ValueError(f"the architecture {info['architecture']!r} has no name")
        arch = info["architecture"]["name"]
        if arch not in architectures.ARCHITECTURES:
            raise ValueError(f"the architecture {arch!r} is none of {architectures.ARCHITECTURES}")
        if architectures.task_of(arch) != task:
            # A regressor's counts read as probabilities, or a classifier's probabilities inverse-transformed.
            raise ValueError(f"the task {task!r} is not that of the architecture {arch!r} "
                             f"({architectures.task_of(arch)})")
        if info["label"] not in LABELS:
            raise ValueError(f"the label {info['label']!r} is none of {LABELS}")
        if task == "regression" and info["label"] not in COUNT_LABELS:
            raise ValueError(f"a regressor of the label {info['label']!r}, a flag: it is learnt by a classifier")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        _refuse(path, f"invalid metadata ({err})", retrain)
    if tuple(model.output_shape) != (None, 1):
        _refuse(path, f"the network gives outputs of shape {tuple(model.output_shape)[1:]}, not one number per crop",
                f"It must be a regressor or a classifier with a single output. {retrain}")  # fmt: skip
    expected = (None, *spec.input_shape)
    actual = tuple(model.input_shape)
    if actual != expected:
        _refuse(
            path,
            f"the network takes inputs of shape {actual[1:]} but its metadata describes "
            f"{spec.input_size} x {spec.input_size} {spec.colour} crops {expected[1:]}",
            f"The metadata does not belong to this network. {retrain}",
        )
    layout, registry = _layout(model), _layout(architectures.build(arch, spec.input_shape))
    if layout != registry:
        # A file written before its architecture changed, or metadata attached to another network: its weights
        # would not fit a network built from its metadata (fine-tuning), and its name would say what it is not.
        i = next(i for i in range(max(len(layout), len(registry))) if layout[i:i + 1] != registry[i:i + 1])
        seen, built = (part[i] if i < len(part) else "nothing" for part in (layout, registry))
        _refuse(path, f"its network is not the {arch} network this version builds for {spec.input_size} x "
                f"{spec.input_size} crops (layer {i + 1}: {seen} in the file, {built} built)",
                f"Use the mxcube_autocenter version that wrote it, or retrain. {retrain}")
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        # Every prediction would be NaN: a heatmap without a maximum, a classifier that never says crystal.
        _refuse(path, "its weights are not all finite numbers (NaN or infinity: the training that wrote them "
                "diverged)", "Retrain it with a lower learning rate (--learning-rate)")  # fmt: skip
    # Files written before attach_info took the single input: the same layers, called with the array alone.
    return keras.Model(_single_input(model), model.outputs[0], name=model.name), info


def info_spec(info: dict) -> crops.CropSpec:
    """The crop specification of a model's metadata."""
    return crops.CropSpec.from_config(info["input"])


def info_transform(info: dict) -> LabelTransform:
    """The fitted label transform of a regression model's metadata."""
    return transform_from_config(info["transform"])


def default_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored with ``TF_CONFIG``, Mirrored on several GPUs, else the default strategy."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


@dataclass
class TrainResult:
    """What :func:`train` and :func:`train_classifier` return.

    Attributes
    ----------
    model_path : str
        The saved ``.keras`` file (with metadata).
    info : dict
        Its metadata.
    history : dict
        Per-epoch losses and metrics (Keras' ``History.history``).
    metrics : dict
        Validation and test figures.
    seconds : float
        Wall time of ``fit``.
    best_epoch : int
        1-based epoch whose weights were kept.
    out_dir : str
        The folder written: model.keras, info.json, history.csv and the checkpoint.
    model : keras.Model
        The trained network as saved (best weights), to predict without loading the file again.
    """

    model_path: str
    info: dict
    history: dict
    metrics: dict
    seconds: float
    best_epoch: int
    out_dir: str = ""
    model: object = field(default=None, repr=False)


def regression_metrics(rc_true, rc_pred, y_true=None, y_pred=None) -> dict:
    """MSE (transformed and in counts), Spearman and Pearson correlations of predicted counts."""
    rc_true = np.asarray(rc_true, dtype=np.float64)
    rc_pred = np.asarray(rc_pred, dtype=np.float64)
    out = {"n": int(len(rc_true)), "mse_counts": float(np.mean((rc_true - rc_pred) ** 2)) if len(rc_true) else None}
    if y_true is not None:
        out["mse"] = float(np.mean((np.asarray(y_true) - np.asarray(y_pred)) ** 2)) if len(rc_true) else None
    varied = len(rc_true) > 2 and np.ptp(rc_true) > 0 and np.ptp(rc_pred) > 0
    out["spearman"] = float(scipy_stats.spearmanr(rc_true, rc_pred).statistic) if varied else None
    out["pearson"] = float(scipy_stats.pearsonr(rc_true, rc_pred).statistic) if varied else None
    return out


def classifier_metrics(truth, probability, threshold=0.5) -> dict:
    """Accuracy, balanced accuracy and the confusion matrix ``[[TN, FP], [FN, TP]]`` (rows real, columns predicted).

    The balanced accuracy, the mean of the two recalls, is None when a class
    is missing from ``truth``: one recall alone says nothing of the other
    class (a constant classifier would score 1). ``recall_crystal`` and
    ``recall_empty`` give each recall (None for a missing class).
    """
    truth = np.asarray(truth).astype(bool).ravel()
    pred = np.asarray(probability).ravel() >= threshold
    tn = int(np.sum(~truth & ~pred))
    fp = int(np.sum(~truth & pred))
    fn = int(np.sum(truth & ~pred))
    tp = int(np.sum(truth & pred))
    recall_crystal = tp / (tp + fn) if tp + fn else None
    recall_empty = tn / (tn + fp) if tn + fp else None
    both = recall_crystal is not None and recall_empty is not None
    return {
        "n": int(len(truth)),
        "accuracy": float(np.mean(truth == pred)) if len(truth) else None,
        "balanced_accuracy": (recall_crystal + recall_empty) / 2 if both else None,
        "recall_crystal": recall_crystal,
        "recall_empty": recall_empty,
        "confusion": [[tn, fp], [fn, tp]],
        "positive_fraction": float(np.mean(truth)) if len(truth) else None,
    }


def expected_count_metrics(table: Table, rows, prediction, threshold=None) -> dict:
    """Figures against the simulator's noise-free counts, where the dataset has them (else empty).

    Parameters
    ----------
    prediction : (N,) ndarray
        Predicted counts (regressor: gives ``spearman_expected``) or, with
        ``threshold``, crystal probabilities (classifier: ``accuracy_expected``).
    threshold : float, optional
        The classifier's crystal threshold on the counts.
    """
    if "rc_expected" not in table.extra or len(rows) == 0:
        return {}
    expected = table.extra["rc_expected"][rows]
    if threshold is None:
        return {"spearman_expected": regression_metrics(expected, prediction)["spearman"]}
    return {"accuracy_expected": classifier_metrics(expected >= threshold, prediction)["accuracy"]}


def predict_rows(model, table: Table, rows, spec: crops.CropSpec, batch_size=64) -> np.ndarray:
    """The model's raw outputs for dataset rows, in row order, (N,)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0)
    ds = make_dataset(table, rows, np.zeros(len(rows)), spec, batch_size=batch_size, shuffle=False)
    return np.asarray(model.predict(ds.map(lambda x, y: x), verbose=0), dtype=np.float64).reshape(-1)


def label_counts(table: Table, label: str, dataset_path) -> np.ndarray:
    """The values a model learns from: ``table.rc``, or the ground-truth ``rc_expected`` or ``on_ice`` column."""
    if label == "rc":
        return table.rc
    if label not in table.extra:
        what = "expected counts" if label == "rc_expected" else "flags of the beam on ice"
        instead = ": use the label rc (--label rc)" if label == "rc_expected" else \
            ": write the set again with `mxcube-autocenter synthesize`"
        raise DatasetError(f"{dataset_path}: the label {label} needs the ground-truth {what} (the {label} column "
                           f"that `mxcube-autocenter synthesize` writes), and this dataset has none{instead}")
    return _checked_counts(table.extra[label], label, dataset_path)


def _checked_counts(counts, column: str, dataset_path) -> np.ndarray:
    """``counts`` as floats, refused unless finite and at least 0 (as ``read_table`` checks ``rc``).

    Raises
    ------
    DatasetError
        Naming the file, the column, how many rows are bad and the first of them.
    """
    counts = np.asarray(counts, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(counts) | (counts < 0))
    if len(bad):
        # Unchecked, a NaN showed up as a diverged training ("give a lower learning rate"), a negative count as
        # the log transform's complaint about its offset.
        raise DatasetError(f"{dataset_path}: {column} has {len(bad)} values that are not finite counts >= 0 (first at "
                         f"row {int(bad[0])}: {counts[bad[0]]!r}): write "
                         "the set again")  # fmt: skip
    return counts


def _fit(
    task,
    dataset_path,
    arch,
    out,
    *,
    transform_name,
    threshold,
    label,
    crop_um,
    input_size,
    colour,
    normalisation,
    epochs,
    batch_size,
    patience,
    seed,
    strategy,
    augment,
    jitter,
    learning_rate,
    cache,
    fractions,
    verbose,
    split,
    initial_model=None,
) -> TrainResult:
    if label not in LABELS:
        raise ValueError(f"label {label!r}: choose one of {LABELS} (rc_expected and on_ice only for synthetic "
                         "datasets)")
    if label not in COUNT_LABELS:
        if task != "classifier":
            raise ValueError(f"label {label!r} is a flag (0 or 1), not a count: train a classifier (--arch "
                             "classifier) on it")
        # A flag is set at 1: the crystal threshold's default of 5 spots would make every row negative. Fine-tuning
        # keeps the initial model's.
        threshold = 1.0 if threshold is None and initial_model is None else threshold
    # Before the initial model loads: loading draws from the random streams the new network's weights and
    # dropout take theirs from.
    keras.utils.set_random_seed(int(seed))
    check_out(out, initial_model)
    initial = initial_info = None
    if initial_model is not None:
        initial, initial_info = load_model(initial_model)
    options = initial_or_default(task, initial_info, arch=arch, crop_um=crop_um, input_size=input_size, colour=colour,
                                 normalisation=normalisation, **({"transform_name": transform_name}
                                                                 if task == "regression" else {"threshold": threshold}))
    arch, transform_name, threshold = options["arch"], options.get("transform_name"), options.get("threshold")
    if architectures.task_of(arch) != task:
        raise ValueError(f"architecture {arch!r} is a {architectures.task_of(arch)} model, not a {task} one")
    spec = crops.CropSpec(**{k: options[k] for k in ("crop_um", "input_size", "colour", "normalisation")})
    if initial is not None:
        check_initial(initial_model, initial_info, task=task, arch=arch, spec=spec, transform_name=transform_name,
                      threshold=threshold, label=label)  # fmt: skip
        if verbose:
            print(f"{'Starting from' if arch != initial_info['architecture']['name'] else 'Fine-tuning'} "
                  f"{initial_model}: {arch}, {spec.input_size} px crops of {spec.crop_um:g} um"
                  + (f", transform {transform_name}" if task == "regression" else ""))
    learning_rate = learning_rate_for(learning_rate, initial_model)
    out = str(out)
    table = read_table(dataset_path)
    if initial is not None and table.stored_crop_um is not None:  # the crop side is the initial model's
        check_crop_fits(table, spec, initial_model, f"fine-tune it on a set stored with at least {spec.crop_um:g} um, "
                        f"or train a new model with --crop-um {table.stored_crop_um:g} or less")  # fmt: skip
    try:
        split = split_for(split, table.crystal_id, seed, fractions, initial_model, initial_info)
    except ValueError as err:
        # The dataset's, as the next ones: a sweep stops at the first (DatasetError), not at each combination.
        raise DatasetError(f"{dataset_path}: {err}: label recordings of more crystals (or, from Python, give split: "
                           "a Split naming the crystals of each subset)") from err
    idx = split.indices(table.crystal_id)
    for name in ("train", "validation"):
        if len(idx[name]) == 0:
            held = "none of its validation crystals and" if name == "validation" else "only its held-out crystals,"
            raise DatasetError(f"{dataset_path}: the {name} subset has no rows" + (
                f": fine-tuning keeps the initial model's split, and this data holds {held} no crystal it has not "
                "seen; label recordings of a new crystal" if initial is not None else ""))
    if not split.test:
        log.warning("%s: the test subset holds no crystal: the model is saved without test figures; label "
                    "recordings of more crystals (%d or more in the test subset)", dataset_path, MIN_TEST_CRYSTALS)
    elif len(split.test) < MIN_TEST_CRYSTALS:
        # One crystal's rows are one scan's worth of counts: its figures say little about the next crystal.
        log.warning("%s: the test subset holds %d crystal(s): its figures say little about other crystals; label "
                    "recordings of more crystals (%d or more in the test subset)", dataset_path, len(split.test),
                    MIN_TEST_CRYSTALS)

    counts = label_counts(table, label, dataset_path)
    learnt = (counts[idx["train"]] >= threshold).astype(np.int8) if task == "classifier" else counts[idx["train"]]
    if np.ptp(learnt) == 0:
        raise DatasetError(
            f"{dataset_path}: every one of the {len(learnt)} training rows has the same "
            f"{'class' if task == 'classifier' else 'count'} ({float(learnt[0]):g}): a model would learn a constant; "
            "label recordings of crystals that diffract (and of empty crops)")
    transform = None
    if task == "regression":
        # Fine-tuning keeps the initial model's fitted transform: the output scale its weights learnt.
        transform = info_transform(initial_info) if initial is not None else get_transform(transform_name).fit(counts[idx["train"]])
        targets = transform.forward(counts)
        loss, metrics = "mse", []
    else:
        targets = (counts >= threshold).astype(np.float64)
        loss, metrics = "binary_crossentropy", ["accuracy"]

    strategy = strategy or default_strategy()
    train_batch, val_batch = (replica_batch(batch_size, len(idx[name]), strategy, name, dataset_path)
                              for name in ("train", "validation"))
    with strategy.scope():
        model = architectures.build(arch, spec.input_shape)
        if initial is not None and initial_info.get("task") != task:
            transfer_regressor(model, initial, initial_info, threshold)
        elif initial is not None:
            model.set_weights(initial.get_weights())
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)

    common = dict(spec=spec, cache=cache)
    train_ds = make_dataset(table, idx["train"], targets[idx["train"]], shuffle=True, seed=seed,
                            augment=augment, jitter=jitter, batch_size=train_batch, **common)
    val_ds = make_dataset(table, idx["validation"], targets[idx["validation"]], shuffle=False, batch_size=val_batch,
                          **common)

    # The test rows are read only once the training is over: a damaged one must not cost the run.
    with RowReader(table.path, table.image_dataset) as reader:
        reader.check(idx["test"])
    made = first_missing(out)
    make_directory(out)  # only once the inputs and the network are checked: a refused run leaves nothing
    work = work_dir(out, strategy)
    settings = {
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "optimizer": "adam",
        "loss": loss,
        "label": label,
        "patience": int(patience),
        "seed": int(seed),
        "augment": augment,
        "jitter": float(jitter),
    }

    def describe(training, metrics):
        return model_info(
            task, model, spec=spec, arch=arch, label=label, data=table.summary(), split=split, training=training,
            metrics=metrics, strategy=strategy, transform=transform, threshold=threshold,
            initial=None if initial is None else (initial_model, initial_info),
            normalisation_region="the stored crop (dataset) / the region of interest (centring)",
        )

    hist, seconds, cpu_seconds, best_epoch = fit_leaving_run_info(
        model, train_ds, val_ds, work, out, strategy, describe({**settings, "interrupted": INTERRUPTED}, {}), made,
        epochs=epochs, patience=patience, verbose=verbose, keep_start=initial is not None)

    results = {}
    for name in ("validation", "test"):
        rows = idx[name]
        raw = predict_rows(model, table, rows, spec)
        # Figures against the drawn counts (what a beamline measures) whatever count the model learnt, and
        # against the expected counts where the dataset has them; a flag's against the flag.
        if task == "regression":
            pred = transform.inverse(raw)
            results[name] = regression_metrics(table.rc[rows], pred, targets[rows], raw)
            results[name].update(expected_count_metrics(table, rows, pred))
        elif label in COUNT_LABELS:
            results[name] = classifier_metrics(table.rc[rows] >= threshold, raw)
            results[name].update(expected_count_metrics(table, rows, raw, threshold))
        else:
            results[name] = classifier_metrics(counts[rows] >= threshold, raw)

    training = {**settings, "epochs_run": len(hist.get("loss", [])), "best_epoch": best_epoch,
                "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2)}
    info = describe(training, results)
    final, model_path = save_model(model, info, work, out, strategy)
    remove_run_info(out, strategy)
    return TrainResult(model_path=model_path, info=info, history=hist, metrics=results, seconds=seconds,
                       best_epoch=best_epoch, out_dir=out, model=final)


def replica_batch(batch_size, n_rows, strategy, subset, dataset_path) -> int:
    """The batch size of a subset's pipeline under ``strategy``: every replica's share of its first batch equal.

    Keras (3.x, tf.distribute) builds the model on the replicas' first batch averaged across them, which fails
    (an AddN error) when its shards differ in size: the batch must split evenly, and so must a subset smaller
    than one batch (its batch is then the largest multiple of the replicas it holds).
    """
    replicas = int(strategy.num_replicas_in_sync)
    if replicas == 1:
        return int(batch_size)
    if batch_size % replicas:
        raise ValueError(f"batch_size {batch_size} does not split over the {replicas} replicas of "
                         f"{type(strategy).__name__}: use batch_size={-(-batch_size // replicas) * replicas}")
    if n_rows >= batch_size:
        return int(batch_size)
    if n_rows < replicas:
        raise ValueError(f"{dataset_path}: the {subset} subset has {n_rows} rows, fewer than the {replicas} replicas "
                         f"of {type(strategy).__name__}: label more crystals or train on fewer devices")
    return int(n_rows - n_rows % replicas)


def learning_rate_for(learning_rate, initial_model) -> float:
    """Adam's learning rate: the one given, else :data:`FINE_TUNE_LEARNING_RATE` from an initial model.

    Without either, :data:`LEARNING_RATE`.
    """
    if learning_rate is not None:
        return float(learning_rate)
    return FINE_TUNE_LEARNING_RATE if initial_model is not None else LEARNING_RATE




def check_out(out, initial_model=None) -> None:
    """Refuse an ``out`` whose files a run would replace and that cannot be had again.

    The initial model itself (fine-tuning into its own folder), or an interrupted run's best epoch
    (``checkpoint.keras`` with its ``run.json``: the next run removes both).

    Raises
    ------
    ModelFileError
        Naming the folder, the file and what to do.
    """
    model = os.path.join(out, "model.keras")
    try:
        own = initial_model is not None and os.path.samefile(model, initial_model)
    except OSError:  # either is missing
        own = False
    if own:
        raise ModelFileError(f"--out {out}: holds the initial model {initial_model}, which this run would replace: "
                             "choose another --out")  # fmt: skip
    if os.path.exists(os.path.join(out, RUN_INFO)) and os.path.exists(os.path.join(out, "checkpoint.keras")):
        raise ModelFileError(f"--out {out}: holds an interrupted training's best epoch (checkpoint.keras with its "
                             f"{RUN_INFO}), which this run would remove: make it a model file (attach_info, "
                             "docs/learning.md), move the two away, or choose another --out")  # fmt: skip


def work_dir(out, strategy) -> str:
    """Where this process writes checkpoints and the model: ``out`` on the chief, a scratch directory elsewhere."""
    return str(out) if _is_chief(strategy) else tempfile.mkdtemp(prefix="autocenter-worker-")


def fit_leaving_run_info(model, train_ds, val_ds, work, out, strategy, run_info: dict, made_out=None, **fit_options):
    """:func:`fit_with_early_stopping`, with ``run_info`` in ``out``/``run.json`` while it runs.

    ``run_info`` is what ``checkpoint.keras`` lacks to be a model file (the
    fitted transform, the split, the input): an interrupted run (Ctrl-C, a
    killed job) leaves its best epoch usable with :func:`attach_info`. The
    caller removes it (:func:`remove_run_info`) once ``model.keras`` is
    saved; a run that ends without a checkpoint (diverged, refused, or
    failed or stopped before its first epoch ended), here, and ``out`` too,
    with the folders above it up to ``made_out`` (the outermost the run
    made), where they are left empty.
    """
    if _is_chief(strategy):
        write_json_whole(os.path.join(out, RUN_INFO), run_info)
        if os.path.exists(os.path.join(work, "model.keras")):
            # Kept whole until this run's replaces it: said now, so that a run that then stops is not taken for it.
            log.warning("%s is an earlier run's model: it stays until this run ends and replaces it",
                        os.path.join(work, "model.keras"))
    try:
        return fit_with_early_stopping(model, train_ds, val_ds, work, **fit_options)
    except BaseException:
        # Kept beside a checkpoint (an interrupted run's best epoch), not alone (a run refused or failed before one).
        if not os.path.exists(os.path.join(work, "checkpoint.keras")):
            remove_run_info(out, strategy)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(work, HISTORY_PART))
            if made_out is not None:
                remove_empty(out, made_out)
        raise


def remove_run_info(out, strategy):
    """Remove ``out``/``run.json`` (on the chief, which wrote it)."""
    # The chief's alone: other workers would remove it under the chief on shared storage.
    if _is_chief(strategy):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, RUN_INFO))


class _Checkpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves ``saved`` instead of the model being fitted (which shares its weights), whole.

    Keras writes the file in place: a Ctrl-C or a full disk during an epoch's
    save emptied the last best epoch's checkpoint, the one ``run.json``
    promises to recover. It is written under a temporary name and renamed.
    """

    def __init__(self, saved, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._saved = _SavedWhole(saved)

    def set_model(self, model):
        super().set_model(self._saved)


class _SavedWhole:
    """What ModelCheckpoint saves (it calls ``save`` alone): ``model``, through :func:`.outputs.write_whole`."""

    def __init__(self, model):
        self._model = model

    def save(self, filepath, overwrite=True):
        write_whole(filepath, self._model.save, partial=filepath.removesuffix(".keras") + ".part.keras")


def fit_with_early_stopping(model, train_ds, val_ds, work, *, epochs, patience, verbose, monitor="val_loss",
                            keep_start=False, checkpointed=None):  # fmt: skip
    """``model.fit`` with early stopping (best weights restored), a checkpoint and a CSV history in ``work``.

    ``checkpointed`` is the network ``checkpoint.keras`` holds (default
    ``model``): the crop network of a region model, whose layers it shares,
    so that the checkpoint becomes a model file as any other's.

    With ``keep_start`` (fine-tuning) the starting weights compete too: if
    no epoch improves the validation loss on theirs, they are restored.
    A few epochs on a site's recordings can otherwise leave a model worse
    than the one it started from, and early stopping alone would keep the
    least bad of those epochs.

    Returns
    -------
    history : dict
        Per-epoch figures.
    seconds, cpu_seconds : float
        Wall time and CPU time (all threads) of the fit.
    best_epoch : int
        1-based epoch whose weights were kept; 0 for the starting weights
        (then no ``checkpoint.keras`` is written).
    """
    if epochs < 1:
        raise ValueError(f"epochs = {epochs}: give at least 1 epoch")
    start_loss = None
    checkpoint = os.path.join(work, "checkpoint.keras")
    if os.path.exists(checkpoint):
        # An earlier run's, in the same output: this run may write none (no epoch beats the starting weights).
        os.remove(checkpoint)
    if keep_start:
        start_weights = model.get_weights()
        start_loss = float(model.evaluate(val_ds, verbose=0, return_dict=True)[monitor.removeprefix("val_")])
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True, verbose=min(verbose, 1)),
        # Only epochs better than the starting weights are checkpointed when those compete; never an epoch whose
        # loss is NaN (Keras saves the first epoch whatever its loss without a threshold).
        _Checkpoint(checkpointed or model, checkpoint, monitor=monitor, mode="min", save_best_only=True,
                    initial_value_threshold=start_loss if keep_start else np.inf),
        keras.callbacks.CSVLogger(os.path.join(work, HISTORY_PART)),
        keras.callbacks.TerminateOnNaN(),
    ]
    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=verbose,
                        shuffle=False)  # the dataset shuffles itself
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads: wall time on a machine shared with others overstates
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    # An epoch whose loss is NaN (a diverged run) is never the best one.
    losses = [v if np.isfinite(v) else np.inf for v in hist.get(monitor, [])]
    best_epoch = int(np.argmin(losses)) + 1 if losses else len(hist.get("loss", []))
    if keep_start and not min(losses, default=np.inf) < start_loss:
        model.set_weights(start_weights)
        best_epoch = 0
        if verbose:
            print(f"No epoch improved on the starting weights ({monitor} {start_loss:.4g}): they are kept.")
    elif not (losses and np.isfinite(min(losses))) or not all(np.isfinite(w).all() for w in model.get_weights()):
        # Early stopping restores no weights when no epoch had a finite loss: the diverged ones would be saved.
        raise ValueError(f"training diverged ({monitor} per epoch: {hist.get(monitor)}): give a lower learning "
                         "rate (--learning-rate); no model was saved")
    return hist, seconds, cpu_seconds, best_epoch


def model_info(task, model, *, spec, arch, label, data, split, training, metrics, strategy, transform=None,
               threshold=None, initial=None, normalisation_region) -> dict:
    """A model file's metadata (see the module documentation).

    ``training`` holds the run's settings and times; the strategy, machine
    and library versions and the initial model (``(path, info)`` when
    fine-tuning) are added to it here.
    """
    initial_model, initial_info = initial if initial is not None else (None, None)
    info = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "label": label,
        "input": {**spec.to_config(), "channels": spec.channels, "normalisation_region": normalisation_region},
        "architecture": {**architectures.describe(arch), "params": int(model.count_params())},
        "data": data,
        "split": split.to_config(),
        "training": {
            **training,
            "strategy": type(strategy).__name__,
            "replicas": int(strategy.num_replicas_in_sync),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "initial_model": None if initial_info is None else {
                "file": os.path.basename(str(initial_model)), "created": initial_info.get("created"),
                "task": initial_info.get("task"), "architecture": initial_info.get("architecture", {}).get("name"),
                "data": initial_info.get("data"), "training": initial_info.get("training"),
            },
        },
        "metrics": metrics,
    }
    if task == "regression":
        info["transform"] = transform.to_config()
    else:
        info["threshold"] = float(threshold)
    return info


def save_model(model, info, work, out, strategy):
    """Write ``work/model.keras`` with ``info`` attached (and ``out/info.json`` on the chief), and name the run's
    history ``history.csv``; ``(model, path)``.

    Each file is written under a temporary name and renamed: a save cut short
    (Ctrl-C, a full disk) leaves an earlier run's model in ``out`` whole,
    where Keras, writing in place, had already emptied it.
    """
    final = attach_info(model, info)
    model_path = os.path.join(work, "model.keras")
    write_whole(model_path, final.save, partial=os.path.join(work, "model.part.keras"))  # Keras wants .keras
    if _is_chief(strategy):
        write_json_whole(os.path.join(out, "info.json"), info)
    with contextlib.suppress(FileNotFoundError):  # the run's history, now its model's
        os.replace(os.path.join(work, HISTORY_PART), os.path.join(work, "history.csv"))
    return final, model_path


# Logit per unit of an fcn regressor's transformed output (a z-score) when a classifier starts from it. With the
# shipped regressor's transform (std 1.75 of log(1 + count)) the start is p = 0.14 at 1.7 spots, 0.5 at 5 and
# 0.9 at 15: confident, yet far from saturated, so training can still move it.
TRANSFER_LOGIT_SLOPE = 4.0


def transfer_regressor(classifier, regressor, regressor_info, threshold):
    """Start an ``fcn_classifier`` from a trained ``fcn`` regressor: set its weights in place.

    The networks differ only by the classifier's sigmoid, so every weight is
    copied, and the last (1x1) convolution is rescaled from the transformed
    count ``z`` to the logit ``TRANSFER_LOGIT_SLOPE (z - z(threshold))``: the
    classifier starts by calling a crystal exactly where the regressor
    predicts at least ``threshold`` spots, and training refines that.
    """
    weights = regressor.get_weights()
    z_threshold = float(info_transform(regressor_info).forward(np.array([float(threshold)]))[0])
    kernel, bias = weights[-2:]
    weights[-2:] = [kernel * TRANSFER_LOGIT_SLOPE, (bias - z_threshold) * TRANSFER_LOGIT_SLOPE]
    classifier.set_weights(weights)


# The command-line options that set check_initial's keys, for its hints.
_OPTIONS = {"arch": "--arch", "crop_um": "--crop-um", "input_size": "--input-size",
            "transform": "--transform", "threshold": "--threshold"}  # fmt: skip


def split_for(split, crystal_ids, seed, fractions, initial_model=None, initial_info=None) -> Split:
    """The split of a training run: ``split`` if given, else a new one by crystal, or, when fine-tuning, the
    initial model's extended to the new crystals (:func:`.split.extend_split`).

    A fine-tuned model's split records every crystal its initial weights were trained on (``trained_before``);
    a given split that holds some of them out is warned about (:func:`held_out_seen`) and they are left out.
    """
    if initial_info is None:
        return resolve_split(split, crystal_ids, seed, fractions)
    initial = Split.from_config(initial_info["split"])
    if split is None:
        return extend_split(initial, crystal_ids, seed, fractions)
    split = resolve_split(split, crystal_ids, seed, fractions)
    seen = held_out_seen(initial_model, initial_info, split)
    held_out = {name: tuple(c for c in getattr(split, name) if c not in seen) for name in ("validation", "test")}
    return Split(split.train, held_out["validation"], held_out["test"], split.seed, split.fractions,
                 trained_before=tuple(sorted(initial.trained_on()))).with_rows(crystal_ids)


def held_out_seen(path, info, split) -> list:
    """The crystals held out here (validation, test) that the initial model at ``path``, or the models it was
    fine-tuned from, were trained on.

    Warns when there are any: their figures would read too high (they are not held out from these weights).
    """
    trained = Split.from_config(info["split"]).trained_on()
    seen = sorted(c for c in (*split.validation, *split.test) if c in trained)
    if seen:
        named = ", ".join(seen[:3]) + (", ..." if len(seen) > 3 else "")
        log.warning(
            "%s was trained on %d of the %d crystals held out in the given split (%s): they are left out of "
            "validation and test; leave the split out to extend that model's own to the new crystals",
            path, len(seen), len(split.validation) + len(split.test), named,
        )  # fmt: skip
    return seen


# What an option left None is when there is no initial model to take it from.
_DEFAULTS = {"crop_um": crops.DEFAULT_CROP_UM, "input_size": crops.DEFAULT_INPUT_SIZE, "colour": "rgb",
             "normalisation": "backlight", "transform_name": DEFAULT_TRANSFORM, "threshold": DEFAULT_THRESHOLD}
_DEFAULT_ARCH = {"regression": architectures.DEFAULT_REGRESSOR, "classifier": "classifier"}


def initial_or_default(task, initial_info, **options) -> dict:
    """``options`` (``arch``, ``crop_um``, ``input_size``, ``colour``, ``normalisation``, ``transform_name``,
    ``threshold``), each given as None taken from the initial model where there is one, else the default.

    Fine-tuning keeps the initial model's architecture, input, label transform
    and threshold; a model of the other task (an ``fcn`` regressor an
    ``fcn_classifier`` starts from) lends its input alone. An option given
    otherwise is refused by :func:`check_initial`.
    """
    own = {}
    if initial_info is not None:
        own = {key: initial_info.get("input", {}).get(key)
               for key in ("crop_um", "input_size", "colour", "normalisation")}  # fmt: skip
        # A model of the other task lends no architecture, transform or threshold: check_initial names the mismatch.
        if initial_info.get("task") == task:
            own.update(arch=initial_info.get("architecture", {}).get("name"),
                       transform_name=initial_info.get("transform", {}).get("name"),
                       threshold=initial_info.get("threshold"))  # fmt: skip
    defaults = {**_DEFAULTS, "arch": _DEFAULT_ARCH[task]}
    return {key: next(v for v in (value, own.get(key), defaults[key]) if v is not None)
            for key, value in options.items()}  # fmt: skip


def check_initial(path, info, *, task, arch, spec, transform_name, threshold, label):
    """Refuse to fine-tune a model whose task, architecture, input, label transform or kind of label differ.

    A count label may replace the other: recorded counts and the simulator's expected counts have the same mean.
    A classifier of a flag (the ice network) and one of counts (crystal/empty) are not each other's start: their
    thresholds mean different things. An ``fcn_classifier`` may also start from an ``fcn`` regressor with the
    same input (:func:`transfer_regressor`), whatever it is to learn.
    """
    theirs_flag, ours_flag = info.get("label") not in COUNT_LABELS, label not in COUNT_LABELS
    if task == "classifier" and info.get("task") == "classifier" and theirs_flag != ours_flag:
        raise ValueError(f"{path}: the initial model is a classifier of the label {info.get('label')!r}, this one "
                         f"learns {label!r}: give an initial classifier of "
                         f"{repr(label) if ours_flag else 'counts (rc or rc_expected)'} (or an fcn regressor, for an "
                         "fcn_classifier), or none")  # fmt: skip
    if arch == "fcn_classifier" and info.get("task") == "regression":
        if info.get("architecture", {}).get("name") != "fcn":
            raise ValueError(f"{path}: an fcn_classifier starts from an fcn regressor, not from "
                             f"{info.get('architecture', {}).get('name')!r}: pass an fcn regressor or no initial model")
        task, arch = "regression", "fcn"
        transform_name, threshold = info.get("transform", {}).get("name"), None
    theirs = {
        "task": info.get("task"),
        "arch": info.get("architecture", {}).get("name"),
        **{k: info.get("input", {}).get(k) for k in ("crop_um", "input_size", "colour", "normalisation")},
        "transform": info.get("transform", {}).get("name") if task == "regression" else None,
        "threshold": info.get("threshold") if task == "classifier" else None,
    }
    ours = {"task": task, "arch": arch, **spec.to_config(),
            "transform": transform_name if task == "regression" else None,
            "threshold": float(threshold) if task == "classifier" else None}
    kept = "(fine-tuning keeps the initial model's task, architecture, input and label transform)"
    if (theirs["task"], theirs["arch"]) != (task, arch):
        # Nothing to set otherwise: this training makes one kind of model (train-dense: an fcn regressor).
        raise ValueError(f"{path}: the initial model has task {theirs['task']!r} and architecture "
                         f"{theirs['arch']!r}, not {task!r} and {arch!r}: give an initial {task} {arch!r} model, "
                         f"or none {kept}")  # fmt: skip
    for key, value in ours.items():
        if theirs[key] != value:
            option = _OPTIONS.get(key)
            where = f"train with {key}={theirs[key]!r}" + ("" if option is None else
                                                           f"; on the command line {option} {theirs[key]}")
            if key in ("crop_um", "input_size"):
                where += f" (train-dense: a region set written with synthesize-regions {option} {theirs[key]})"
            raise ValueError(f"{path}: the initial model has {key} {theirs[key]!r}, not {value!r}: {where} {kept}")


def train(
    dataset_path,
    arch: str | None = None,
    transform: str | None = None,
    out="out/model",
    *,
    label: str = DEFAULT_LABEL,
    crop_um: float | None = None,
    input_size: int | None = None,
    colour: str | None = None,
    normalisation: str | None = None,
    epochs: int = 30,
    batch_size: int = 32,
    patience: int = 5,
    seed: int = 0,
    strategy=None,
    augment: str = "dihedral",
    jitter: float = 0.0,
    learning_rate: float | None = None,
    cache="auto",
    fractions=DEFAULT_FRACTIONS,
    split=None,
    verbose: int = 2,
    initial_model=None,
) -> TrainResult:
    """Train a reflection-count regressor (Adam + MSE, early stopping on validation MSE).

    Parameters
    ----------
    dataset_path : str
        A ``dataset.h5`` (see :mod:`.data`).
    arch : str, optional
        One of :data:`architectures.REGRESSORS` (default ``fcn``).
    transform : {"vanilla", "log", "tanh"}, optional
        Label transform (:mod:`.transforms`), fitted on the training subset
        (default ``log``).
    out : str
        Output directory: ``model.keras`` (with metadata), ``checkpoint.keras``
        (best epoch so far, without metadata), ``history.csv``, ``info.json``.
    label : {"rc", "rc_expected"}
        The counts to learn: ``"rc"``, the recorded reflection counts (all a
        beamline dataset has), or ``"rc_expected"``, the noise-free expected
        counts a synthetic dataset also stores (the simulator's ground truth).
        Stored in the metadata; the test figures are given against both.
    crop_um, input_size, colour, normalisation : optional
        The model input (:class:`crops.CropSpec`; defaults 240 um, 128 px,
        RGB, backlight).
    epochs, batch_size, patience : int
        Maximum epochs, global batch size, epochs without improvement of the
        validation loss before stopping (the best weights are restored).
    seed : int
        Seeds the split, the weights, the shuffling and the augmentation.
    strategy : tf.distribute.Strategy, optional
        :func:`default_strategy` when None.
    augment : {"dihedral", "flips", "none"}
    jitter : float
        Brightness/contrast/blur jitter strength, 0 for none.
    learning_rate : float, optional
        Adam's; by default :data:`LEARNING_RATE`, or :data:`FINE_TUNE_LEARNING_RATE`
        with ``initial_model``.
    cache : bool or str
        Keep decoded crops in memory (True), in memory where they fit and
        else in a temporary file (``"auto"``), in a file (a path or
        ``"file"``), or re-read them every epoch (False).
    fractions : (float, float, float)
        Train/validation/test shares of crystals.
    split : Split or dict, optional
        A given split instead of a new one (e.g. a previous model's).
    verbose : int
        Keras ``fit`` verbosity (1: progress bar, 2: a line per epoch).
    initial_model : path, optional
        Fine-tune: start from this model file's weights and keep its fitted
        label transform (e.g. the shipped model on a site's own recordings).
        The architecture, input and transform left None are its own; any
        given must be its own too (a clear error names the difference). The
        label may differ (a model trained on synthetic expected counts,
        tuned on recorded ones).
        The starting weights are kept if no epoch improves their validation
        loss (``best_epoch`` 0).
    """
    return _fit("regression", dataset_path, arch, out, transform_name=transform, threshold=None, label=label,
                crop_um=crop_um,
                input_size=input_size, colour=colour, normalisation=normalisation, epochs=epochs,
                batch_size=batch_size, patience=patience, seed=seed, strategy=strategy, augment=augment,
                jitter=jitter, learning_rate=learning_rate, cache=cache, fractions=fractions, verbose=verbose,
                split=split, initial_model=initial_model)


def train_classifier(
    dataset_path,
    out="out/classifier",
    *,
    threshold: float | None = None,
    label: str = DEFAULT_LABEL,
    arch: str | None = None,
    crop_um: float | None = None,
    input_size: int | None = None,
    colour: str | None = None,
    normalisation: str | None = None,
    epochs: int = 30,
    batch_size: int = 32,
    patience: int = 5,
    seed: int = 0,
    strategy=None,
    augment: str = "dihedral",
    jitter: float = 0.0,
    learning_rate: float | None = None,
    cache="auto",
    fractions=DEFAULT_FRACTIONS,
    split=None,
    verbose: int = 2,
    initial_model=None,
) -> TrainResult:
    """Train the crystal/empty classifier: label ``counts >= threshold``, binary cross-entropy, accuracy.

    Parameters as :func:`train`; ``arch`` is ``classifier`` by default (or
    the initial model's), and ``threshold`` the reflection count from which
    a crop counts as a crystal (default 5 spots, or the initial model's), applied to the
    counts ``label`` names (``"rc"``: the recorded ones; ``"rc_expected"``:
    the noise-free expected ones of a synthetic dataset). The metrics give
    the accuracy against the recorded counts, and (``accuracy_expected``)
    against the expected ones where the dataset has them. With ``label``
    ``"on_ice"`` (a synthetic dataset's flag of the beam on ice, threshold 1
    by default) it is the ice network that vetoes a centring on ice, and
    its metrics are against that flag. ``initial_model``
    fine-tunes a classifier file with the same threshold and input, or, with
    ``arch="fcn_classifier"``, starts from an ``fcn`` regressor with the same
    input (:func:`transfer_regressor`).
    """
    return _fit("classifier", dataset_path, arch, out, transform_name=None, threshold=threshold, label=label,
                crop_um=crop_um,
                input_size=input_size, colour=colour, normalisation=normalisation, epochs=epochs,
                batch_size=batch_size, patience=patience, seed=seed, strategy=strategy, augment=augment,
                jitter=jitter, learning_rate=learning_rate, cache=cache, fractions=fractions, verbose=verbose,
                split=split, initial_model=initial_model)
