"""Dense heatmaps of a crop regressor, computed once over a whole region.

A crop model (convolutions, max pooling, then dense layers or global
pooling) evaluated on every crop of a grid repeats almost all of its work:
neighbouring crops share most pixels. Rewritten as a fully convolutional
network, it runs once over the region and yields every grid point at once:

- a 'valid' convolution or pooling is the same layer on a larger input;
- ``Flatten`` + the first ``Dense`` is a convolution whose kernel covers the
  whole final feature map of one crop; later ``Dense`` layers are 1x1
  convolutions;
- ``GlobalAveragePooling2D`` is an average pooling with the same window;
- dropout and the metadata layer do nothing at inference.

Outputs then come on a grid whose step is the network's total pooling
factor; shifting the input by fractions of that step and interleaving the
results gives finer grids. The result equals cropping each grid point and
calling the model (:func:`reference_heatmap`), up to float rounding, because
the crops are cut from the same resized and normalised region.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from mxcube_autocenter.learning.crops import crop_middle, per_axis, resample


class HeatmapError(ValueError):
    """A model that cannot be evaluated densely, or a region too small for it."""


@dataclass
class Heatmap:
    """Model predictions on a grid of crop centres.

    Attributes
    ----------
    values : (H, W) ndarray
        The model's output at each grid point (in the model's label space).
    xs, ys : ndarray
        Screen x of each column and y of each row, pixels.
    """

    values: np.ndarray
    xs: np.ndarray
    ys: np.ndarray


def _layer_kind(layer) -> str:
    return type(layer).__name__


def _downsampling(layer) -> int:
    """The stride of a convolution or pooling layer (1 for anything else)."""
    kind = _layer_kind(layer)
    if kind == "Conv2D":
        return int(layer.get_config()["strides"][0])
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        return int(layer.get_config()["pool_size"][0])
    return 1


def fully_convolutional(model, subdivision: int = 1):
    """The fully convolutional twin of a crop model, sharing its weights.

    Parameters
    ----------
    model : keras.Model
        A chain of Conv2D ('valid', equal strides), MaxPooling2D /
        AveragePooling2D, Dropout, Activation, then Flatten + Dense layers or
        GlobalAveragePooling2D (+ Dense).
    subdivision : int
        Make the output grid this many times denser, in one pass: the last
        strided convolutions lose their stride and every later layer is
        dilated instead (the "a trous" algorithm), which gives exactly the
        outputs of the shifted crops. Pooling cannot be dilated here: a model
        that would need it raises :class:`HeatmapError` (use input shifts).

    Returns
    -------
    fcn : keras.Model
        Takes images of any size (at least the crop size).
    step : int
        Input pixels between neighbouring outputs.
    """
    import keras

    layers = list(model.layers)
    destrided, remaining = set(), subdivision
    for index in reversed(range(len(layers))):
        factor = _downsampling(layers[index])
        if remaining == 1 or factor == 1:
            continue
        if remaining % factor:
            break
        destrided.add(index)
        remaining //= factor
    if remaining != 1:
        raise HeatmapError(f"{model.name}: the output grid cannot be subdivided by {subdivision}")

    inputs = keras.Input((None, None, model.input_shape[3]))
    x = inputs
    step, dilation = 1, 1
    feature = np.array(model.input_shape[1:3])  # spatial size of one crop's feature map
    flattened = False
    for index, layer in enumerate(layers):
        kind = _layer_kind(layer)
        if kind in ("InputLayer", "Dropout", "SpatialDropout2D", "ModelInfo"):
            continue
        if kind == "Conv2D":
            cfg = layer.get_config()
            stride = int(cfg["strides"][0])
            if cfg["padding"] != "valid" or tuple(cfg["dilation_rate"]) != (1, 1) or len(set(cfg["strides"])) != 1:
                raise HeatmapError(
                    f"layer {layer.name}: dense heatmaps need 'valid' convolutions "
                    "(a 'same' convolution pads each crop differently from the whole region); "
                    "retrain with a fully convolutional architecture such as 'fcn'"
                )
            feature = (feature - np.array(cfg["kernel_size"])) // stride + 1
            step *= stride
            if index in destrided:
                cfg.update(strides=(1, 1), dilation_rate=(dilation, dilation))
                dilation *= stride
            elif dilation > 1:
                cfg.update(dilation_rate=(dilation, dilation))
            conv = keras.layers.Conv2D.from_config(cfg)
            x = conv(x)
            conv.set_weights(layer.get_weights())
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            cfg = layer.get_config()
            pool = tuple(cfg["pool_size"])
            if tuple(cfg["strides"] or pool) != pool or cfg["padding"] != "valid":
                raise HeatmapError(f"layer {layer.name}: only non-overlapping 'valid' pooling is supported")
            if dilation > 1 or index in destrided:
                raise HeatmapError(f"layer {layer.name}: pooling cannot be subdivided; use input shifts")
            x = type(layer).from_config(cfg)(x)
            step *= pool[0]
            feature = feature // np.array(pool)
        elif kind == "GlobalAveragePooling2D":
            if dilation > 1:
                raise HeatmapError(f"layer {layer.name}: global pooling cannot be subdivided; use input shifts")
            x = keras.layers.AveragePooling2D(pool_size=tuple(int(v) for v in feature), strides=1)(x)
            feature = np.array([1, 1])
            flattened = True
        elif kind == "Flatten":
            flattened = True
        elif kind == "Dense":
            if not flattened:
                raise HeatmapError(f"layer {layer.name}: Dense before Flatten or global pooling")
            kernel, bias = layer.get_weights()
            kh, kw = (int(v) for v in feature)
            conv = keras.layers.Conv2D(
                kernel.shape[1], (kh, kw), dilation_rate=dilation,
                activation=layer.get_config()["activation"], name=f"{layer.name}_conv",
            )
            x = conv(x)
            conv.set_weights([kernel.reshape(kh, kw, -1, kernel.shape[1]), bias])
            feature = np.array([1, 1])
        elif kind in ("Activation", "ReLU"):
            x = type(layer).from_config(layer.get_config())(x)
        else:
            raise HeatmapError(f"layer {layer.name} ({kind}) cannot be evaluated densely")
    return keras.Model(inputs, x, name=f"{model.name}_dense"), step // subdivision


class DenseEvaluator:
    """A crop model evaluated densely, on grids as fine as asked.

    Builds (and keeps) the fully convolutional twin for each subdivision it
    needs; a model whose grid cannot be subdivided in one pass (pooling after
    the subdivided layers) is evaluated on shifted copies of the input.
    """

    def __init__(self, model):
        self.model = model
        self.input_size = int(model.input_shape[1])
        self._twins = {1: fully_convolutional(model)}
        # A centring's inference thread outlives its aborted greenlet: the next centring's may build a twin meanwhile.
        self._building = threading.Lock()

    @property
    def step(self) -> int:
        """Model pixels between outputs without subdivision."""
        return self._twins[1][1]

    def twin(self, stride_model_px: float):
        """``(fcn, out_step, shifts)`` for a grid no coarser than ``stride_model_px`` (model pixels)."""
        # The subdivision must divide the step: shifted inputs (or dilated outputs) then fall evenly between
        # the outputs; a step of 6 split in 8 would repeat grid points.
        n = next((d for d in range(1, self.step + 1) if self.step % d == 0 and self.step / d <= stride_model_px),
                 self.step)  # fmt: skip
        with self._building:
            if n not in self._twins:
                try:
                    self._twins[n] = fully_convolutional(self.model, n)
                except HeatmapError:
                    self._twins[n] = None
        if self._twins[n] is None:
            fcn, step = self._twins[1]
            return fcn, step, [i * step // n for i in range(n)]
        fcn, step = self._twins[n]
        return fcn, step, [0]


def prepare_region(frame, roi, crop_px, input_size, normalise):
    """Resize the region (with half a crop of margin) to the model's scale and normalise it.

    Parameters
    ----------
    frame : (H, W, 3) uint8 ndarray
    roi : Roi
        Crop centres are searched inside it.
    crop_px : float or (float, float)
        Crop width and height on the frame, pixels (they differ where the
        pixels are not square: the crop is square on the sample).
    input_size : int
        Model input side, pixels.
    normalise : callable
        ``normalise(region) -> float32 array``, per region (never per crop,
        so that every crop of the region sees the same transformation).

    Returns
    -------
    region : (h, w, C) float32 ndarray
        The normalised region at model scale.
    origin : (float, float)
        Frame position of the region's pixel (0, 0), pixels.
    scale : float or (float, float)
        Model pixels per frame pixel (x, y), a float when ``crop_px`` is one.
    """
    crop_w, crop_h = per_axis(crop_px)
    sx, sy = input_size / crop_w, input_size / crop_h
    # The first crop's point (its middle) on the roi's corner.
    x0, y0 = roi.x0 - crop_middle(input_size) / sx, roi.y0 - crop_middle(input_size) / sy
    out_w, out_h = int(round((roi.width + crop_w) * sx)), int(round((roi.height + crop_h) * sy))
    scale = sx if np.ndim(crop_px) == 0 else (sx, sy)
    return normalise(resample(frame, (x0, y0), (sx, sy), (out_w, out_h))), (x0, y0), scale


def within_frame(heatmap: Heatmap, frame_shape, margin_px: float) -> np.ndarray:
    """Which grid points lie at least ``margin_px`` inside the frame.

    A crop nearer the frame's edge than that is partly made up: the region
    repeats the edge pixels (:func:`~mxcube_autocenter.learning.crops.resample`), and a model reads the bands
    they draw as structure (a stem cut off by the edge becomes a long dark
    band, a crystal-like response on the edge itself).

    Parameters
    ----------
    heatmap : Heatmap
    frame_shape : tuple
        ``(height, width, ...)`` of the frame, pixels.
    margin_px : float or (float, float)
        Smallest distance from the frame's edges, pixels (from the left and
        right edges, from the top and bottom ones).

    Returns
    -------
    (len(heatmap.ys), len(heatmap.xs)) bool ndarray
    """
    h, w = frame_shape[:2]
    mx, my = per_axis(margin_px)
    cols = (heatmap.xs >= mx) & (heatmap.xs <= w - mx)
    rows = (heatmap.ys >= my) & (heatmap.ys <= h - my)
    return rows[:, None] & cols[None, :]


def dense_heatmap(evaluator: DenseEvaluator, region, origin, scale, stride_px) -> Heatmap:
    """Evaluate a model densely on a prepared region.

    Parameters
    ----------
    evaluator : DenseEvaluator
    region, origin, scale : from :func:`prepare_region`
    stride_px : float
        Wanted grid step on the frame, pixels (the grid is at most this coarse).

    Returns
    -------
    Heatmap
    """
    size = evaluator.input_size
    sx, sy = per_axis(scale)
    fcn, step, shifts = evaluator.twin(stride_px * min(sx, sy))
    h, w = _check_region(region, size)
    outputs = {(dy, dx): np.asarray(fcn(region[None, dy:, dx:], training=False))[0, ..., 0] for dy in shifts for dx in shifts}
    # Output r of shift d is the crop starting at r * step + d: in start order, shift i's outputs fill every
    # k-th place from place i. The grid runs as far as every shift has its output there, and the whole crop lies
    # in the region (pooling that floors odd sizes can leave a few more); a larger shift has fewer outputs, so
    # cutting all to the last one's count left up to a step of the region's far edge unscored.
    k = len(shifts)
    n_y = _places(h, size, step, shifts, [min(outputs[dy, dx].shape[0] for dx in shifts) for dy in shifts])
    n_x = _places(w, size, step, shifts, [min(outputs[dy, dx].shape[1] for dy in shifts) for dx in shifts])
    values = np.empty((n_y, n_x), dtype=np.float32)
    for i, dy in enumerate(shifts):
        for j, dx in enumerate(shifts):
            values[i::k, j::k] = outputs[dy, dx][: len(range(i, n_y, k)), : len(range(j, n_x, k))]
    starts_y = (np.arange(n_y) // k) * step + np.array(shifts)[np.arange(n_y) % k]
    starts_x = (np.arange(n_x) // k) * step + np.array(shifts)[np.arange(n_x) % k]
    # Output (row, col) is the crop starting there; its point is its middle.
    ys = origin[1] + (starts_y + crop_middle(size)) / sy
    xs = origin[0] + (starts_x + crop_middle(size)) / sx
    return Heatmap(values=values, xs=xs, ys=ys)


def _places(length, size, step, shifts, counts) -> int:
    """Grid places along an axis of ``length`` model pixels: the first one whose crop (start r * step + shift
    i, for place r * k + i) is not whole in it or that its shift has no output for, ends them."""
    k = len(shifts)
    place = 0
    while True:
        r, i = divmod(place, k)
        if r >= counts[i] or r * step + shifts[i] + size > length:
            return place
        place += 1


def _check_region(region, size):
    h, w = region.shape[:2]
    if h < size or w < size:
        raise HeatmapError(f"region {w}x{h} is smaller than one crop ({size} px)")
    return h, w


def symmetric_heatmap(evaluator: DenseEvaluator, region, origin, scale, stride_px, symmetries="none") -> Heatmap:
    """The mean of the dense heatmaps of the region turned and mirrored, each turned back.

    A model trained on every flip and rotation of its crops
    (:mod:`mxcube_autocenter.learning.augment`) should predict the same for
    each, but does not exactly; averaging over them (test-time augmentation)
    cancels part of its error. Each grid point then gets the mean of the
    model's outputs (its label space) on the turned copies of its crop.

    Parameters
    ----------
    evaluator, region, origin, scale, stride_px
        As :func:`dense_heatmap`.
    symmetries : {'dihedral', 'flips', 'none'}
        The group elements averaged (``augment.GROUP_ELEMENTS``): all eight
        flips and quarter turns, the four flips (the exact symmetries of a
        rectangular beam; half the cost), or none (:func:`dense_heatmap`).

    Returns
    -------
    Heatmap
        On the grid of :func:`dense_heatmap`.

    Raises
    ------
    HeatmapError
        Unknown ``symmetries``.
    """
    from mxcube_autocenter.learning.augment import GROUP_ELEMENTS, dihedral_np, inverse_element

    if symmetries not in GROUP_ELEMENTS:
        raise HeatmapError(f"heatmap symmetries must be one of {sorted(GROUP_ELEMENTS)}, not {symmetries!r}")
    if len(GROUP_ELEMENTS[symmetries]) == 1:
        return dense_heatmap(evaluator, region, origin, scale, stride_px)
    size = evaluator.input_size
    h, w = _check_region(region, size)
    _, step, shifts = evaluator.twin(stride_px * min(per_axis(scale)))
    fine = step // len(shifts)  # the shifts divide the step (DenseEvaluator.twin)

    def symmetric_length(length):
        # The grid dense_heatmap keeps maps onto itself when mirrored once it
        # ends exactly one crop from the far edge: trim the region there, which
        # drops no grid point.
        return size + (length - size) // fine * fine

    region = region[: symmetric_length(h), : symmetric_length(w)]
    first = dense_heatmap(evaluator, region, origin, scale, stride_px)
    total = first.values.astype(np.float64)
    for k in GROUP_ELEMENTS[symmetries][1:]:
        turned = dense_heatmap(evaluator, dihedral_np(region, k), origin, scale, stride_px).values
        total += dihedral_np(turned, inverse_element(k))
    return Heatmap(values=(total / len(GROUP_ELEMENTS[symmetries])).astype(np.float32), xs=first.xs, ys=first.ys)


def reference_heatmap(model, region, origin, scale, input_size, xs, ys, batch=256, symmetries="none") -> Heatmap:
    """The slow path: cut every crop of the grid from the prepared region and call the model.

    ``xs`` and ``ys`` are the grid of a :func:`dense_heatmap` (or
    :func:`symmetric_heatmap`) result, so both paths evaluate the same
    crops; with ``symmetries`` each crop is turned by every element of the
    group and the model's outputs averaged. Other points are taken to the
    nearest crop of the region's pixels: the result's ``xs`` and ``ys`` are
    the points of the crops evaluated.
    """
    from mxcube_autocenter.learning.augment import GROUP_ELEMENTS, dihedral_np

    elements = GROUP_ELEMENTS[symmetries]
    sx, sy = per_axis(scale)
    starts_x = np.rint((np.asarray(xs) - origin[0]) * sx - crop_middle(input_size)).astype(int)
    starts_y = np.rint((np.asarray(ys) - origin[1]) * sy - crop_middle(input_size)).astype(int)
    crops = []
    values = np.empty((len(starts_y), len(starts_x)), dtype=np.float32)
    index = []
    for i, y in enumerate(starts_y):
        for j, x in enumerate(starts_x):
            crop = region[y : y + input_size, x : x + input_size]
            crops.extend(dihedral_np(crop, k) for k in elements)
            index.append((i, j))
            if len(index) * len(elements) >= batch:
                _predict_into(model, crops, index, values)
                crops, index = [], []
    if crops:
        _predict_into(model, crops, index, values)
    return Heatmap(values=values, xs=origin[0] + (starts_x + crop_middle(input_size)) / sx,
                   ys=origin[1] + (starts_y + crop_middle(input_size)) / sy)


def _predict_into(model, crops, index, values):
    """Each grid point's mean output over its consecutive crops (one per group element)."""
    out = np.asarray(model(np.stack(crops), training=False))[:, 0].reshape(len(index), -1).mean(axis=1)
    for (i, j), v in zip(index, out):
        values[i, j] = v
