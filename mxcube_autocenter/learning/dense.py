"""Dense training of the ``fcn`` regressor on whole regions of virtual-beamline frames.

An ``fcn`` regressor evaluated on a region gives the prediction of every
crop on a 16-pixel grid at once (:func:`.architectures.dense_evaluator`),
which is how a centring computes its heatmaps. Trained the same way, one
region of ``S x S`` model pixels teaches its ``n x n`` grid crops
(``S = input_size + 16 (n - 1)``) for the work of about ``(S / input_size)^2``
crops: with the defaults a 256-pixel region labels 81 crops for the price of
about four. Since a region is normalised as a whole, as at centring time,
the model also learns exactly the input a heatmap gives it.

Dense labels need the count with the beam on every grid point of one frame,
which only the virtual beamline knows
(:meth:`~mxcube_autocenter.simulation.diffraction.DiffractionModel.expected_rc_on_screen`);
a beamline records one count per frame, the beam's, and its data trains
crop by crop (:func:`.training.train`, which can also fine-tune a densely
trained model). The model file is the ordinary crop model with the usual
metadata, so centring, evaluation and fine-tuning use it unchanged.

Region sets (``regions.h5``)
----------------------------
``/regions/image`` (N,) JPEG bytes
    The camera frame around the region's centre, resampled to the model's
    scale (``crop_um`` to ``input_size`` pixels), ``S x S`` RGB, not normalised.
``/regions/rc_expected`` (N, n, n) float32
    Ground-truth expected reflection count with the beam on the centre of
    each grid crop (row ``i``, column ``j``: the crop whose top-left corner
    is at model pixel ``(16 j, 16 i)``; its centre is its middle, model pixel
    coordinate ``16 j + (input_size - 1) / 2``, :func:`grid_centres`).
``/regions/rc`` (N, n, n) float32
    A Poisson draw of it (what a detector would count).
``/regions/valid`` (N, n, n) bool
    The crop centre lies on the camera frame (a heatmap evaluates no other
    points; outside, the resampled image repeats the frame's edge).
``/regions/crystal_id``, ``/regions/scan_id`` (N,) str
    One crystal id per sample (the split by crystal keeps a sample's regions
    together) and one scan id per view.
``/regions/omega`` (N,), ``/regions/pixels_per_mm`` (N, 2)
Attributes: ``format`` (:data:`REGIONS_FORMAT`), ``format_version``,
``crop_um``, ``input_size``, ``step``, ``cells``, ``provenance`` (JSON).
"""

from __future__ import annotations

import json
import os

# As in the other learning modules: train_dense imports keras itself, before any of them is loaded, and without
# this TensorFlow's own log printed the traceback of a damaged row beside the one-line error.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from mxcube_autocenter.hdf5errors import not_opened, open_to_read, reading  # noqa: E402
from mxcube_autocenter.learning import crops  # noqa: E402
from mxcube_autocenter.learning.synthetic import (  # noqa: E402
    JPEG,
    TEXT,
    ZOOM_PX_PER_UM,
    centring_region,
    crystal_offset,
    random_view,
    sample_jobs,
    set_provenance,
    virtual_sample,
    write_per_sample,
)
from mxcube_autocenter.outputs import first_missing, make_directory  # noqa: E402
from mxcube_autocenter.recording import encode_jpeg  # noqa: E402

REGIONS_FORMAT = "mxcube_autocenter.regions"
REGIONS_FORMAT_VERSION = 1
FCN_STEP = 16  # model pixels between the crops of an fcn's dense output (architectures.output_stride)
# The least input the fcn's trunk (its stride-2 convolutions, FCN_STEP in all) leaves an output of, pixels.
FCN_MIN_INPUT = 2 * FCN_STEP - 1
# Spread of a region's centre around a crystal point, um: the region still holds the crystal, seen off-centre.
REGION_SPREAD_UM = 80.0
# Best count of a region from which the peak term of the loss applies: a crystal (the centring's min_score).
PEAK_MIN_COUNT = 5.0
_WRITE_REGIONS = "Write one with `mxcube-autocenter synthesize-regions`"


class RegionSetError(ValueError):
    """A region set that cannot be used, with what to do about it."""


def region_side(cells: int, input_size: int = crops.DEFAULT_INPUT_SIZE) -> int:
    """Side, model pixels, of a region whose dense output is ``cells x cells`` crops."""
    if cells < 1:
        raise ValueError(f"cells must be at least 1, not {cells}")
    return int(input_size + FCN_STEP * (cells - 1))


def grid_centres(origin, scale, cells: int, input_size: int) -> np.ndarray:
    """Frame positions, pixels, of the centres of a region's grid crops: ``(cells, cells, 2)`` as (x, y).

    Parameters
    ----------
    origin : (float, float)
        Frame position of the region's pixel (0, 0), pixels.
    scale : float
        Model pixels per frame pixel.
    """
    offsets = (FCN_STEP * np.arange(cells) + crops.crop_middle(input_size)) / scale
    xs = origin[0] + offsets
    ys = origin[1] + offsets
    return np.stack(np.meshgrid(xs, ys), axis=-1)


def _sample_regions(k, sample_seed, look_seed, *, views_per_sample, regions_per_view, cells, crop_um, input_size,
                    zoom_levels, random_looks, frame_size, jpeg_quality, empty_fraction, ice_fraction,
                    crystal_fraction, label_seed):
    """All regions of one virtual sample, as a dict of lists."""
    sample, model, renderer, rng = virtual_sample(sample_seed, look_seed, random_looks=random_looks,
                                                  frame_size=frame_size, empty_fraction=empty_fraction,
                                                  ice_fraction=ice_fraction)
    width, height = frame_size
    beam = np.array([width / 2.0, height / 2.0])
    side = region_side(cells, input_size)
    label_rng = np.random.default_rng(label_seed)
    crystal_id = f"sim-{int(sample_seed):06d}"
    out = {name: [] for name in ("image", "rc_expected", "rc", "valid", "crystal_id", "scan_id", "omega",
                                 "pixels_per_mm")}
    for j in range(views_per_sample):
        omega, _, ppmm, motors, loop_xy = random_view(sample, rng, zoom_levels)
        frame = renderer.render(sample, motors, ppmm, tuple(beam))
        roi = centring_region(loop_xy, ppmm, beam, (height, width))
        scale = input_size / crops.crop_side_px(crop_um, ppmm)[0]
        for _ in range(regions_per_view):
            if sample.crystals and rng.random() < crystal_fraction:
                offset = crystal_offset(sample, motors, rng) + rng.normal(0.0, REGION_SPREAD_UM * 1e-3, size=2)
                centre = beam + offset * np.asarray(ppmm)
            else:
                centre = rng.uniform((roi.x0, roi.y0), (max(roi.x1, roi.x0 + 1), max(roi.y1, roi.y0 + 1)))
            origin = centre - side / (2.0 * scale)
            image = crops.resample(frame, origin, scale, (side, side))
            points = grid_centres(origin, scale, cells, input_size).reshape(-1, 2)
            expected = model.expected_rc_on_screen(motors, ppmm, tuple(beam), points).reshape(cells, cells)
            valid = ((points >= 0) & (points < (width, height))).all(axis=1).reshape(cells, cells)
            out["image"].append(np.frombuffer(encode_jpeg(image, jpeg_quality), dtype=np.uint8))
            out["rc_expected"].append(expected.astype(np.float32))
            out["rc"].append(label_rng.poisson(expected).astype(np.float32))
            out["valid"].append(valid)
            out["crystal_id"].append(crystal_id)
            out["scan_id"].append(f"{crystal_id}-w{j}")
            out["omega"].append(omega)
            out["pixels_per_mm"].append(ppmm)
    return out


def _worker(args):
    kwargs = args[-1]
    return _sample_regions(*args[:-1], **kwargs)


def synthetic_regions(
    path,
    n_samples: int = 300,
    seed: int = 0,
    *,
    views_per_sample: int = 4,
    regions_per_view: int = 2,
    cells: int = 9,
    crop_um: float = crops.DEFAULT_CROP_UM,
    input_size: int = crops.DEFAULT_INPUT_SIZE,
    zoom_levels=ZOOM_PX_PER_UM,
    random_looks: bool = True,
    frame_size=(1280, 1024),
    jpeg_quality: int = 95,
    empty_fraction: float = 0.15,
    ice_fraction: float = 0.3,
    crystal_fraction: float = 0.5,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write a region set (``regions.h5``, see the module documentation); returns a summary.

    Parameters
    ----------
    path : str
        The file to write (replaced).
    n_samples : int
        Virtual samples (= crystal ids), each with a random camera look
        (domain randomisation) unless ``random_looks`` is False.
    seed : int
        Everything follows from it.
    views_per_sample, regions_per_view : int
        Random views (omega, zoom) per sample; regions cut from each view's frame.
    cells : int
        Grid crops per region side (the region is :func:`region_side` pixels).
    crop_um, input_size : float, int
        The model input the set is for (crop side on the sample, um; pixels).
    empty_fraction, ice_fraction : float
        Shares of samples with an empty loop and with ice balls (no Bragg
        spots: ice-ring spots only, so the labels teach ice from crystals).
    crystal_fraction : float
        Share of regions centred near a crystal point (:data:`REGION_SPREAD_UM`
        around it); the others anywhere in the region a centring searches
        (``loop_roi``: stem, rim, liquid and background included).
    workers : int
        Processes rendering samples in parallel.
    """
    if not 0.0 <= crystal_fraction <= 1.0:
        raise ValueError(f"crystal_fraction {crystal_fraction}: give a share between 0 and 1")
    if input_size < FCN_MIN_INPUT:  # refused before the rendering: train-dense could never use the set
        raise ValueError(f"input_size {input_size}: a region set is for the fcn, whose input is at least "
                         f"{FCN_MIN_INPUT} pixels")
    kwargs = dict(views_per_sample=views_per_sample, regions_per_view=regions_per_view, cells=cells,
                  crop_um=float(crop_um), input_size=int(input_size), zoom_levels=tuple(zoom_levels),
                  random_looks=random_looks, frame_size=tuple(frame_size), jpeg_quality=jpeg_quality,
                  empty_fraction=empty_fraction, ice_fraction=ice_fraction, crystal_fraction=crystal_fraction)
    provenance = set_provenance("mxcube_autocenter.learning.dense.synthetic_regions", seed, n_samples, kwargs)
    columns = {
        "image": (JPEG, ()),
        "rc_expected": (np.float32, (cells, cells)),
        "rc": (np.float32, (cells, cells)),
        "valid": (bool, (cells, cells)),
        "crystal_id": (TEXT, ()),
        "scan_id": (TEXT, ()),
        "omega": (np.float64, ()),
        "pixels_per_mm": (np.float64, (2,)),
    }
    attrs = {"format": REGIONS_FORMAT, "format_version": REGIONS_FORMAT_VERSION, "crop_um": float(crop_um),
             "input_size": int(input_size), "step": FCN_STEP, "cells": int(cells), "provenance": json.dumps(provenance)}
    n = write_per_sample(path, _worker, sample_jobs(n_samples, seed, kwargs), "regions", columns, attrs,
                         workers=workers, progress=progress)
    table = read_regions(path)
    return {"path": os.path.abspath(path), "regions": n, "samples": int(n_samples), **table.label_summary()}


class RegionTable:
    """A region set's labels and attributes in memory (the images stay in the file).

    Attributes
    ----------
    path : str
    crop_um : float
    input_size, cells : int
    rc_expected, rc : (N, n, n) ndarray
    valid : (N, n, n) bool ndarray
    crystal_id, scan_id : (N,) ndarray of str
    provenance : dict
    """

    def __init__(self, path, attrs, columns):
        self.path = str(path)
        self.crop_um = float(attrs["crop_um"])
        self.input_size = int(attrs["input_size"])
        self.cells = int(attrs["cells"])
        self.provenance = json.loads(attrs.get("provenance", "{}"))
        self.rc_expected = columns["rc_expected"]
        self.rc = columns["rc"]
        self.valid = columns["valid"]
        self.crystal_id = columns["crystal_id"]
        self.scan_id = columns["scan_id"]

    def __len__(self):
        return len(self.crystal_id)

    @property
    def side(self) -> int:
        return region_side(self.cells, self.input_size)

    def label_summary(self) -> dict:
        """Label statistics over the valid grid points."""
        rc = self.rc_expected[self.valid]
        return {
            "points": int(rc.size),
            "rc_expected_mean": float(rc.mean()) if rc.size else None,
            "rc_expected_zero_fraction": float(np.mean(rc < 0.5)) if rc.size else None,
            "rc_expected_ge_5_fraction": float(np.mean(rc >= 5)) if rc.size else None,
        }

    def summary(self) -> dict:
        """Sizes and label statistics, as stored in a model's metadata."""
        return {
            "path": os.path.basename(self.path),
            "kind": "regions",
            "regions": len(self),
            "cells": self.cells,
            "crystals": int(len(set(self.crystal_id))),
            "scans": int(len(set(self.scan_id))),
            **self.label_summary(),
            "provenance": self.provenance,
        }


def read_regions(path) -> RegionTable:
    """Read a region set's labels (see the module documentation).

    Raises
    ------
    RegionSetError
        Not a readable HDF5 file, not a region set, or inconsistent columns.
    """
    path = str(path)
    fix = _WRITE_REGIONS
    try:
        f = open_to_read(path)
    except OSError as err:
        raise RegionSetError(f"{path}: {not_opened(path, err)}. {fix}") from err
    with f, reading(path, "region set", RegionSetError, fix):
        attrs = dict(f.attrs)
        if attrs.get("format") != REGIONS_FORMAT:
            # The other files of this workflow, by what they hold: say which it is and where it goes.
            kind = ("a dataset of crops: train on it with `mxcube-autocenter train`, or give a region set"
                    if "samples" in f or "rows" in f else
                    "a camera recording: label it (`mxcube-autocenter label`) and train on the dataset with "
                    "`mxcube-autocenter train`, or give a region set" if "frames" in f else
                    f"format {attrs.get('format')!r}, not {REGIONS_FORMAT!r}")  # fmt: skip
            raise RegionSetError(f"{path}: not a region set ({kind}). {fix}")
        if int(attrs.get("format_version", -1)) != REGIONS_FORMAT_VERSION:
            raise RegionSetError(f"{path}: region set format_version {attrs.get('format_version')!r}; this "
                                 f"version reads {REGIONS_FORMAT_VERSION}. {fix}")
        g = f["regions"]
        columns = {name: g[name][()] for name in ("rc_expected", "rc", "valid")}
        for name in ("crystal_id", "scan_id"):
            columns[name] = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in g[name][()]])
        n_images = g["image"].shape[0]
        # Within the block: a missing attribute or provenance that is not JSON is a damaged file, said so.
        table = RegionTable(path, attrs, columns)
    lengths = {len(columns[name]) for name in columns} | {n_images}
    if len(lengths) != 1:
        raise RegionSetError(f"{path}: its columns have different lengths {sorted(lengths)}: the file is damaged. {fix}")
    for name in ("rc_expected", "rc", "valid"):
        if columns[name].shape[1:] != (table.cells, table.cells):
            raise RegionSetError(f"{path}: its {name} grids are {columns[name].shape[1:]}, not the {table.cells} x "
                                 f"{table.cells} of its cells attribute: the file is damaged. {fix}")  # fmt: skip
    for name in ("rc_expected", "rc"):
        counts = columns[name][table.valid]
        if not np.all(np.isfinite(counts) & (counts >= 0)):
            raise RegionSetError(f"{path}: its {name} grids hold values that are not finite counts >= 0 at valid "
                                 f"points: the file is damaged. {fix}")  # fmt: skip
    return table


def region_dataset(table: RegionTable, rows, targets, weights, *, spec: crops.CropSpec | None = None,
                   batch_size=16, shuffle=True, seed=0, augment="none", cache=True):
    """A ``tf.data`` pipeline of ``(region (B, S, S, C), targets (B, n, n, 1), weights (B, n, n, 1))``.

    ``spec`` gives the colour mode and normalisation (default: RGB,
    backlight). Each region is normalised with its own statistics (as a
    centring normalises its region); ``augment`` turns the region and its label and
    weight grids by the same dihedral element (the grid is symmetric: its
    crops' centres map onto each other). ``cache`` keeps the decoded
    regions between epochs as :func:`.data.make_dataset` keeps its crops:
    in memory (True), where they fit (``"auto"``), in a temporary file
    (``"file"`` or a folder) or not at all (False).
    """
    import tensorflow as tf

    from mxcube_autocenter.learning.augment import dihedral_tf, group_element
    from mxcube_autocenter.learning.data import cache_for, decoded_rows, remove_with
    from mxcube_autocenter.labelling.dataset import RowReader

    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise RegionSetError(f"{table.path}: no regions to stream")
    reader = RowReader(table.path, "regions/image", fix=_WRITE_REGIONS)
    reader.check(rows)
    spec = spec or crops.CropSpec(crop_um=table.crop_um, input_size=table.input_size)
    side, channels = table.side, spec.channels

    def load(i):
        coloured = crops.to_colour(reader.image(int(i)), spec.colour)
        return coloured, crops.region_stats(coloured, spec.normalisation)

    def tf_load(i, y, w):
        image, stats = tf.numpy_function(load, [i], [tf.uint8, tf.float32], stateful=False)
        return tf.ensure_shape(image, (side, side, channels)), tf.ensure_shape(stats, (2, channels)), y, w

    grids = (np.asarray(targets, np.float32)[..., None], np.asarray(weights, np.float32)[..., None])
    ds = tf.data.Dataset.from_tensor_slices((rows, *grids))
    row_bytes = side * side * channels
    if cache == "auto":
        cache = cache_for(len(rows), spec, row_bytes=row_bytes)
    ds, cache_dir = decoded_rows(ds, tf_load, cache, len(rows), row_bytes, shuffle=shuffle, seed=seed)
    ds = ds.map(lambda image, stats, y, w: ((tf.cast(image, tf.float32) - stats[0]) / stats[1], y, w),
                num_parallel_calls=tf.data.AUTOTUNE)
    if augment != "none":
        def turn(example, s):
            k = group_element(augment, tf.random.stateless_uniform([], seed=tf.cast(s, tf.int64)))
            return tuple(dihedral_tf(t, k) for t in example)

        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(turn, num_parallel_calls=tf.data.AUTOTUNE)
    return remove_with(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE), cache_dir, reader)


def peak_hit_rate(expected, predicted, valid, min_count: float = PEAK_MIN_COUNT, share: float = 0.5) -> float | None:
    """Share of regions whose predicted maximum lies where the count is at least ``share`` of the region's best.

    Only regions whose best valid count reaches ``min_count`` are judged
    (None when there are none): what a heatmap's maximum is for.
    """
    judged = hits = 0
    for e, p, v in zip(expected, predicted, valid):
        if not v.any() or e[v].max() < min_count:
            continue
        judged += 1
        chosen = np.unravel_index(int(np.argmax(np.where(v, p, -np.inf))), p.shape)
        hits += bool(e[chosen] >= share * e[v].max())
    return hits / judged if judged else None


def region_loss(peak_weight: float = 0.0, sharpness: float = 4.0, peak_from: float = -np.inf):
    """Loss of a region's grid: MSE over its valid points, plus where its counts peak.

    ``y_true`` (B, n, n, 2) holds each grid point's transformed count and
    its valid flag (invalid points weigh nothing); ``y_pred`` (B, n, n, 1).
    The MSE term is the mean of the squared errors over the grid, as Keras'
    ``mse`` weighted by the flags. The peak term, ``peak_weight`` times the
    Kullback-Leibler divergence between ``softmax(sharpness * y)`` of the
    truth and of the prediction over the valid points, counts in regions
    whose best true value reaches ``peak_from`` (a crystal): it asks where
    in the region the count is highest, which is what a centring takes
    from a heatmap. A softmax ignores an offset common to the region, and
    with the ``log`` transform a crystal's invisible capacity (a factor on
    all its counts) is nearly such an offset where the counts are well
    above 1, so the peak term is nearly free of the noise that dominates
    the MSE on crystal points.

    Parameters
    ----------
    peak_weight : float
        Weight of the peak term; 0 gives the plain masked MSE.
    sharpness : float
        Inverse temperature of the softmax, per unit of the transformed
        label (with ``log``, 4 weighs a point of half the best count about
        1/5 of the best).
    peak_from : float
        Transformed count from which a region's peak is learnt.
    """
    from keras import ops

    def loss(y_true, y_pred):
        target, valid, predicted = y_true[..., 0], y_true[..., 1], y_pred[..., 0]
        mse = ops.mean(valid * ops.square(target - predicted), axis=(1, 2))
        if peak_weight == 0:
            return mse
        # A large finite floor for invalid points: exp() gives 0 and 0 * floor stays finite.
        outside = -1e9
        flat = (-1, target.shape[1] * target.shape[2])
        truth = ops.reshape(ops.where(valid > 0, sharpness * target, outside), flat)
        guess = ops.reshape(ops.where(valid > 0, sharpness * predicted, outside), flat)
        log_p, log_q = ops.log_softmax(truth, axis=-1), ops.log_softmax(guess, axis=-1)
        divergence = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        crystal = ops.max(truth, axis=-1) >= sharpness * peak_from
        return mse + peak_weight * ops.where(crystal, divergence, 0.0)

    return loss


def train_dense(
    regions_path,
    out="out/dense_model",
    *,
    transform: str | None = None,
    label: str = "rc_expected",
    colour: str | None = None,
    normalisation: str | None = None,
    epochs: int = 20,
    batch_size: int = 16,
    patience: int = 4,
    seed: int = 0,
    strategy=None,
    augment: str = "dihedral",
    learning_rate: float | None = None,
    cache=True,
    fractions=None,
    split=None,
    verbose: int = 2,
    initial_model=None,
    peak_weight: float = 0.0,
    peak_sharpness: float = 4.0,
):
    """Train an ``fcn`` regressor on a region set, every grid crop of a region at once.

    Adam + MSE over the valid grid points (the others weigh nothing), with
    ``peak_weight`` > 0 plus the peak term of :func:`region_loss` in the
    regions that hold a crystal (a best count of at least 5), early
    stopping on the validation loss with the best weights restored, the
    split 60/20/20 by crystal. The saved model is the crop model
    (``input_size`` square input) with the metadata of
    :func:`.training.train`; ``data.kind`` is ``"regions"``.

    Parameters
    ----------
    regions_path : str
        From :func:`synthetic_regions`.
    out : str
        Output directory (``model.keras``, ``checkpoint.keras``, ``history.csv``, ``info.json``).
    transform : {"vanilla", "log", "tanh"}, optional
        Label transform, fitted on the training subset's valid points (default
        ``log``, or the initial model's).
    colour, normalisation : optional
        The model input (default RGB, backlight, or the initial model's); its
        crop side and size are the region set's.
    label : {"rc_expected", "rc"}
        Learn the noise-free expected counts or their Poisson draws.
    learning_rate : float, optional
        Adam's; by default ``training.LEARNING_RATE``, or
        ``training.FINE_TUNE_LEARNING_RATE`` with ``initial_model``.
    initial_model : path, optional
        Start from this ``fcn`` model's weights and keep its label transform;
        they are kept if no epoch improves their validation loss.
    peak_weight, peak_sharpness : float
        The peak term of :func:`region_loss` (0: MSE alone).

    Returns
    -------
    TrainResult
    """
    import keras
    import tensorflow as tf

    from mxcube_autocenter.labelling.dataset import RowReader
    from mxcube_autocenter.learning import architectures, training
    from mxcube_autocenter.learning.split import DEFAULT_FRACTIONS
    from mxcube_autocenter.learning.transforms import get_transform

    if label not in training.COUNT_LABELS:
        raise ValueError(f"label {label!r}: choose one of {training.COUNT_LABELS} (a region set holds counts)")
    keras.utils.set_random_seed(int(seed))
    learning_rate = training.learning_rate_for(learning_rate, initial_model)
    out = str(out)
    training.check_out(out, initial_model)
    initial = initial_info = None
    if initial_model is not None:
        initial, initial_info = training.load_model(initial_model)
    options = training.initial_or_default("regression", initial_info, colour=colour, normalisation=normalisation,
                                          transform_name=transform)  # fmt: skip
    transform = options["transform_name"]

    def checked(crop_um, input_size) -> crops.CropSpec:
        spec = crops.CropSpec(crop_um=crop_um, input_size=input_size, colour=options["colour"],
                              normalisation=options["normalisation"])  # fmt: skip
        if initial is not None:
            training.check_initial(initial_model, initial_info, task="regression", arch="fcn", spec=spec,
                                   transform_name=transform, threshold=None, label=label)  # fmt: skip
        return spec

    if initial is not None:
        # The options given before any file is read (a wrong --transform is not news of a missing set), the
        # region set's crops once it is.
        checked(initial_info["input"]["crop_um"], initial_info["input"]["input_size"])
    table = read_regions(regions_path)
    if table.input_size < FCN_MIN_INPUT:
        raise RegionSetError(f"{regions_path}: its crops are {table.input_size} pixels, fewer than the {FCN_MIN_INPUT} "
                             f"the fcn takes: write it again with `synthesize-regions --input-size {FCN_MIN_INPUT}` or "
                             "more")  # fmt: skip
    spec = checked(table.crop_um, table.input_size)
    try:
        split = training.split_for(split, table.crystal_id, seed, fractions or DEFAULT_FRACTIONS, initial_model,
                                   initial_info)  # fmt: skip
    except ValueError as err:
        raise RegionSetError(f"{regions_path}: {err}: write a set of more samples (synthesize-regions --samples), "
                             "or pass split= (a Split naming the crystals of each subset)") from err
    idx = split.indices(table.crystal_id)
    for name in ("train", "validation"):
        if len(idx[name]) == 0:
            raise RegionSetError(f"{regions_path}: the {name} subset has no regions: give a set of more samples")

    counts = table.rc_expected if label == "rc_expected" else table.rc
    train_points = counts[idx["train"]][table.valid[idx["train"]]]
    if train_points.size == 0 or np.ptp(train_points) == 0:
        # As train refuses it: a network would learn a constant.
        raise RegionSetError(f"{regions_path}: every one of the {train_points.size} valid grid points of the training "
                             f"regions has the same {label} ({float(train_points.max(initial=0)):g}): a model would "
                             "learn a constant; write a set with crystals in its regions (synthesize-regions "
                             "--crystal-fraction)")  # fmt: skip
    fitted = training.info_transform(initial_info) if initial is not None else get_transform(transform).fit(train_points)
    targets = np.where(table.valid, fitted.forward(counts), 0.0)
    weights = table.valid.astype(np.float32)

    strategy = strategy or training.default_strategy()
    with strategy.scope():
        model = architectures.build("fcn", spec.input_shape)
        if initial is not None:
            model.set_weights(initial.get_weights())
        region_model = architectures.dense_evaluator(model)
        loss = region_loss(peak_weight, peak_sharpness, float(fitted.forward(np.array([PEAK_MIN_COUNT]))[0]))
        region_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    train_batch, val_batch = (training.replica_batch(batch_size, len(idx[name]), strategy, name, regions_path)
                              for name in ("train", "validation"))

    def with_flags(x, y, w):
        # region_loss reads the valid flags beside the targets.
        return x, tf.concat([y, w], axis=-1)

    common = dict(spec=spec, cache=cache)
    train_ds = region_dataset(table, idx["train"], targets[idx["train"]], weights[idx["train"]], shuffle=True,
                              seed=seed, augment=augment, batch_size=train_batch, **common).map(with_flags)
    val_ds = region_dataset(table, idx["validation"], targets[idx["validation"]], weights[idx["validation"]],
                            shuffle=False, batch_size=val_batch, **common).map(with_flags)
    # The test regions are read only once the training is over: a damaged one must not cost the run.
    with RowReader(table.path, "regions/image", fix=_WRITE_REGIONS) as reader:
        reader.check(idx["test"])
    made = first_missing(out)
    make_directory(out)  # only once the inputs and the network are checked: a refused run leaves nothing
    work = training.work_dir(out, strategy)
    settings = {
        "mode": "dense regions",
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "optimizer": "adam",
        "loss": "mse over the valid grid points" + (
            f" + {peak_weight:g} x KL divergence of softmax({peak_sharpness:g} x label) over the regions "
            f"with a count of at least {PEAK_MIN_COUNT:g}" if peak_weight else ""),
        "peak_weight": float(peak_weight),
        "peak_sharpness": float(peak_sharpness),
        "label": label,
        "patience": int(patience),
        "seed": int(seed),
        "augment": augment,
        "jitter": 0.0,
    }

    def describe(training_settings, metrics):
        return training.model_info(
            "regression", model, spec=spec, arch="fcn", label=label, data=table.summary(), split=split,
            training=training_settings, metrics=metrics, strategy=strategy, transform=fitted,
            initial=None if initial is None else (initial_model, initial_info),
            normalisation_region="the region (region set) / the region of interest (centring)",
        )

    # The checkpoint holds the crop network (the region network shares its layers): a model file with run.json.
    hist, seconds, cpu_seconds, best_epoch = training.fit_leaving_run_info(
        region_model, train_ds, val_ds, work, out, strategy,
        describe({**settings, "interrupted": training.INTERRUPTED}, {}), made, epochs=epochs, patience=patience,
        verbose=verbose, keep_start=initial is not None, checkpointed=model)

    results = {}
    for name in ("validation", "test"):
        rows = idx[name]
        if len(rows) == 0:
            results[name] = {"n": 0}
            continue
        ds = region_dataset(table, rows, targets[rows], weights[rows], shuffle=False, batch_size=batch_size, **common)
        raw = np.asarray(region_model.predict(ds.map(lambda x, y, w: x), verbose=0))[..., 0]
        valid = table.valid[rows]
        predicted = fitted.inverse(raw)
        results[name] = training.regression_metrics(table.rc[rows][valid], predicted[valid], targets[rows][valid],
                                                    raw[valid])
        results[name]["spearman_expected"] = training.regression_metrics(
            table.rc_expected[rows][valid], predicted[valid])["spearman"]
        results[name]["peak_hit_rate"] = peak_hit_rate(table.rc_expected[rows], predicted, valid)
        results[name]["regions"] = int(len(rows))

    info = describe({**settings, "epochs_run": len(hist.get("loss", [])), "best_epoch": best_epoch,
                     "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2)}, results)
    final, model_path = training.save_model(model, info, work, out, strategy)
    training.remove_run_info(out, strategy)
    return training.TrainResult(model_path=model_path, info=info, history=hist, metrics=results, seconds=seconds,
                                best_epoch=best_epoch, out_dir=out, model=final)
