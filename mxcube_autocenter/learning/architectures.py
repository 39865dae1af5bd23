"""Model architectures: the thesis' a1-a10, its crystal/empty classifier, compact FCNs.

Thesis regressors a1-a10
------------------------
The thesis (Table 2.2) describes each regressor by six layer counts, in this
order: ``C8 / MPOOL / C16 / F256 / F128 / F64``. Here each architecture is a
:class:`ThesisSpec` of these counts, and one rule turns counts into layers:

1. the convolutions, all 3x3 with ``"same"`` padding and ReLU, the 8-filter
   ones first, then the 16-filter ones, each followed by 25 % dropout;
2. the 2x2 max poolings spread evenly over the convolutions: with ``n``
   convolutions and ``p`` poolings, pooling ``k`` (1-based) follows
   convolution ``ceil(k n / p)``, so the last pooling follows the last
   convolution (several poolings in a row when ``p > n``);
3. flatten, then the dense layers, widest first (256, 128, 64 units, ReLU),
   each followed by 50 % dropout;
4. one linear output unit.

``"same"`` padding makes the spatial size depend on the poolings only
(``input / 2**p``), so the parameter count follows from the spec by a short
formula (checked in the tests).

**The counts in** :data:`THESIS_SPECS` **are to be checked against the
thesis' Table 2.2: they are our reconstruction** (ten plausible specs of
increasing depth), not the thesis' numbers. Correct them there, in one
place; the docs' table (``docs/learning.md``) lists the same numbers.

Classifier
----------
``"classifier"``: C32-MPOOL-C32-MPOOL-C64-MPOOL-F64-DROPOUT50 and a sigmoid
output (the thesis' crystal/empty classifier), 3x3 ``"same"`` convolutions.
``"fcn_classifier"``: the ``"fcn"`` regressor below with a sigmoid on its
output, so that it can start from a trained regressor's weights: that
network has seen far more crystals than a site's recordings hold.

Compact fully convolutional regressors
--------------------------------------
``"fcn"``: four 3x3 convolutions with stride 2 and ``"valid"`` padding
(16, 32, 48, 64 filters, ReLU), 25 % dropout, a "centre head" convolution
whose kernel covers the whole remaining feature map (32 filters, ReLU) and a
1x1 convolution to the output. Every layer is a convolution without padding,
so the same weights evaluate a whole region at once:
:func:`dense_evaluator` returns a model that maps a region to a map of
predictions, one every :func:`output_stride` (16) input pixels, each *exactly*
equal to the prediction for the crop at that position. Strided convolutions
also train several times faster on a CPU than max pooling. Unlike global
pooling, the head keeps where in the crop things are: the count is that of
the crop's centre, where the beam is.

``"fcn_gap"``: the same trunk with global average pooling and a dense layer
(position-blind: it sees how much crystal is in the crop, not whether the
centre is on it), kept for comparison.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from keras import layers  # noqa: E402


@dataclass(frozen=True)
class ThesisSpec:
    """Layer counts of a thesis regressor: ``C8 / MPOOL / C16 / F256 / F128 / F64``."""

    c8: int
    mpool: int
    c16: int
    f256: int
    f128: int
    f64: int

    def __post_init__(self):
        if min(asdict(self).values()) < 0:
            raise ValueError(f"layer counts must be >= 0: {self}")
        if self.c8 + self.c16 == 0:
            raise ValueError(f"a spec needs at least one convolution: {self}")

    def layers(self) -> list[str]:
        """The layer sequence by the order rule: ``C8``, ``C16``, ``MPOOL``, ``F256``..., ``OUT``.

        Dropout layers are implied (25 % after each convolution, 50 % after
        each dense layer).
        """
        convs = ["C8"] * self.c8 + ["C16"] * self.c16
        n, p = len(convs), self.mpool
        after = [-(-k * n // p) for k in range(1, p + 1)]  # ceil(k n / p)
        seq = []
        for j, conv in enumerate(convs, start=1):
            seq.append(conv)
            seq.extend(["MPOOL"] * after.count(j))
        seq += ["F256"] * self.f256 + ["F128"] * self.f128 + ["F64"] * self.f64
        return seq + ["OUT"]

    def to_config(self) -> dict:
        return asdict(self)


# To be checked against the thesis' Table 2.2: the counts here are our reconstruction.
#                       C8 MPOOL C16 F256 F128 F64
THESIS_SPECS = {
    "a1": ThesisSpec(1, 1, 0, 0, 0, 1),
    "a2": ThesisSpec(1, 2, 1, 0, 0, 1),
    "a3": ThesisSpec(1, 2, 1, 0, 1, 1),
    "a4": ThesisSpec(2, 2, 1, 0, 1, 1),
    "a5": ThesisSpec(2, 3, 2, 0, 1, 1),
    "a6": ThesisSpec(2, 3, 2, 1, 1, 1),
    "a7": ThesisSpec(2, 4, 2, 1, 1, 1),
    "a8": ThesisSpec(2, 4, 3, 1, 1, 2),
    "a9": ThesisSpec(3, 5, 3, 1, 2, 2),
    "a10": ThesisSpec(3, 5, 4, 2, 2, 2),
}

CONV_DROPOUT = 0.25
DENSE_DROPOUT = 0.5
FCN_FILTERS = (16, 32, 48, 64)
FCN_HEAD = 32

REGRESSORS = (*THESIS_SPECS, "fcn", "fcn_gap")
CLASSIFIERS = ("classifier", "fcn_classifier")
ARCHITECTURES = (*REGRESSORS, *CLASSIFIERS)
DEFAULT_REGRESSOR = "fcn"


def task_of(name: str) -> str:
    """``"regression"`` or ``"classifier"``."""
    if name in REGRESSORS:
        return "regression"
    if name in CLASSIFIERS:
        return "classifier"
    raise ValueError(f"unknown architecture {name!r}: choose one of {ARCHITECTURES}")


def describe(name: str) -> dict:
    """The architecture's name, task and spec, as stored in a model's metadata."""
    task = task_of(name)
    if name in THESIS_SPECS:
        spec = {"kind": "thesis", **THESIS_SPECS[name].to_config(), "layers": THESIS_SPECS[name].layers(),
                "padding": "same", "conv_dropout": CONV_DROPOUT, "dense_dropout": DENSE_DROPOUT,
                "note": "counts to be checked against the thesis' Table 2.2 (our reconstruction)"}
    elif name == "classifier":
        spec = {"kind": "thesis-classifier", "layers": ["C32", "MPOOL", "C32", "MPOOL", "C64", "MPOOL", "F64", "DROPOUT50", "SIGMOID"],
                "padding": "same"}
    else:
        spec = {"kind": name, "filters": list(FCN_FILTERS), "strides": 2, "padding": "valid", "head": FCN_HEAD,
                "conv_dropout": CONV_DROPOUT}
        if name == "fcn_classifier":
            spec["output"] = "sigmoid"
    return {"name": name, "task": task, "spec": spec}


def _thesis(name, spec: ThesisSpec, input_shape):
    inputs = keras.Input(input_shape, name="crop")
    x = inputs
    for i, token in enumerate(spec.layers()):
        if token in ("C8", "C16"):
            x = layers.Conv2D(int(token[1:]), 3, padding="same", activation="relu", name=f"conv{i}")(x)
            x = layers.Dropout(CONV_DROPOUT, name=f"drop{i}")(x)
        elif token == "MPOOL":
            if x.shape[1] < 2 or x.shape[2] < 2:
                raise ValueError(f"{name}: input {input_shape} is too small for {spec.mpool} poolings")
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        elif token.startswith("F"):
            if len(x.shape) == 4:
                x = layers.Flatten(name="flatten")(x)
            x = layers.Dense(int(token[1:]), activation="relu", name=f"dense{i}")(x)
            x = layers.Dropout(DENSE_DROPOUT, name=f"drop{i}")(x)
        elif token == "OUT":
            if len(x.shape) == 4:
                x = layers.Flatten(name="flatten")(x)
            x = layers.Dense(1, name="rc")(x)
    return keras.Model(inputs, x, name=name)


def _classifier(input_shape):
    inputs = keras.Input(input_shape, name="crop")
    x = inputs
    for i, filters in enumerate((32, 32, 64)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense")(x)
    x = layers.Dropout(0.5, name="drop")(x)
    x = layers.Dense(1, activation="sigmoid", name="crystal")(x)
    return keras.Model(inputs, x, name="classifier")


def _fcn_trunk(x):
    # Each 3x3 'valid' convolution of stride 2 takes n pixels to (n - 1) // 2: 31 is the least that leaves one.
    smallest = 1
    for _ in FCN_FILTERS:
        smallest = 2 * smallest + 1
    if x.shape[1] < smallest or x.shape[2] < smallest:
        raise ValueError(f"input {tuple(x.shape[1:])} is too small for the fcn trunk: at least {smallest} x {smallest} (raise input_size)")
    for i, filters in enumerate(FCN_FILTERS):
        x = layers.Conv2D(filters, 3, strides=2, padding="valid", activation="relu", name=f"conv{i}")(x)
    return layers.Dropout(CONV_DROPOUT, name="drop")(x)


def _fcn(input_shape, name="fcn"):
    """The fcn regressor, or with ``name="fcn_classifier"`` the same network with a sigmoid on its output.

    Both have the same weights in the same order, so a classifier can start
    from a trained regressor (:func:`mxcube_autocenter.learning.training.transfer_regressor`).
    """
    inputs = keras.Input(input_shape, name="crop")
    x = _fcn_trunk(inputs)
    x = layers.Conv2D(FCN_HEAD, (x.shape[1], x.shape[2]), padding="valid", activation="relu", name="head")(x)
    x = layers.Conv2D(1, 1, name="rc_map")(x)
    x = layers.Flatten(name="rc")(x)
    if name == "fcn_classifier":
        x = layers.Activation("sigmoid", name="crystal")(x)
    return keras.Model(inputs, x, name=name)


def _fcn_gap(input_shape):
    inputs = keras.Input(input_shape, name="crop")
    x = _fcn_trunk(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(FCN_HEAD, activation="relu", name="head")(x)
    x = layers.Dense(1, name="rc")(x)
    return keras.Model(inputs, x, name="fcn_gap")


def build(name: str, input_shape=(128, 128, 3)) -> keras.Model:
    """A new, uncompiled model of the named architecture (one of :data:`ARCHITECTURES`)."""
    input_shape = tuple(int(v) for v in input_shape)
    if name in THESIS_SPECS:
        return _thesis(name, THESIS_SPECS[name], input_shape)
    if name == "classifier":
        return _classifier(input_shape)
    if name in ("fcn", "fcn_classifier"):
        return _fcn(input_shape, name)
    if name == "fcn_gap":
        return _fcn_gap(input_shape)
    raise ValueError(f"unknown architecture {name!r}: choose one of {ARCHITECTURES}")


def output_stride(name: str = "fcn") -> int:
    """Input pixels between neighbouring outputs of :func:`dense_evaluator`."""
    if name not in ("fcn", "fcn_classifier"):
        raise ValueError(f"only 'fcn' and 'fcn_classifier' evaluate densely, not {name!r}")
    return 2 ** len(FCN_FILTERS)


def dense_evaluator(model: keras.Model) -> keras.Model:
    """A model mapping a region (B, H, W, C) to predictions (B, H', W', 1), for an ``fcn`` or ``fcn_classifier``.

    Output ``[i, j]`` is the model's prediction for the input crop whose
    top-left corner is at ``(16 j, 16 i)`` (see :func:`output_stride`): the
    crops of a region on a 16-pixel grid, computed with shared convolutions.
    Denser grids: evaluate the region shifted by fractions of the stride.
    """
    # The same layers, so the same weights, without the Flatten; a classifier keeps its sigmoid.
    convs = [layer for layer in model.layers if isinstance(layer, (layers.Conv2D, layers.Dropout, layers.Activation))]
    if not any(layer.name == "head" for layer in convs) or not any(layer.name == "rc_map" for layer in convs):
        raise ValueError(f"model {model.name!r} is not an fcn: no 'head' and 'rc_map' convolutions")
    inputs = keras.Input((None, None, model.input_shape[-1]), name="region")
    x = inputs
    for layer in convs:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_dense")
