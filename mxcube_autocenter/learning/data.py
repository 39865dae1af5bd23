"""Reading ``dataset.h5`` and streaming it to Keras with ``tf.data``.

The dataset contract (written by the labelling code and by
:func:`mxcube_autocenter.learning.synthetic.synthetic_dataset`):

- root attributes ``format_version`` (1), ``provenance`` (JSON text) and
  ``stored_crop_um`` (float: side of the stored crops, um);
- group ``/samples`` with equal-length datasets, row ``i`` one sample:
  ``image`` (vlen uint8: JPEG of the camera frame cropped to a square of
  ``stored_crop_um`` around the beam), ``beam_xy`` (N, 2) (beam in the stored
  image, pixels), ``pixels_per_mm`` (N, 2), ``zoom``, ``omega`` (deg),
  ``rc`` (reflection count), ``scan_id``, ``crystal_id``, ``scan_type``
  (text), ``timestamp``, ``detector_frame``, ``recording_frame``. Other
  datasets of the same length (e.g. the simulator's ``rc_expected``) are
  read into :attr:`Table.extra`.

The layout the labelling code (``mxcube_autocenter.labelling.dataset``)
writes is read too: group ``/rows`` with the JPEGs in ``jpeg``, only the
first ``n_rows`` (root attribute) rows committed, ``zoom`` as text and
``stored_crop_um`` per recording in ``/recordings/provenance``.

Everything but the images is read into memory (:func:`read_table`, a few
tens of bytes a row). Images are read lazily, one row at a time, by a
parallel ``tf.data`` map over shuffled row indices, so datasets larger than
memory stream; with ``cache=True`` the decoded, cropped and resized uint8
crops (``input_size^2 x channels`` bytes a row: 49 kB at 128 x 128 RGB) are
kept in memory after the first epoch, with ``cache="file"`` on disk.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mxcube_autocenter.labelling.dataset import DatasetError  # noqa: E402  (one error for the set, written or read)
from mxcube_autocenter.learning import crops  # noqa: E402
from mxcube_autocenter.learning.augment import augmenter  # noqa: E402
from mxcube_autocenter.recording import decode_jpeg  # noqa: E402

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NUMERIC = ("beam_xy", "pixels_per_mm", "zoom", "omega", "rc", "timestamp", "detector_frame", "recording_frame")
TEXT = ("scan_id", "crystal_id", "scan_type")
REQUIRED = ("image", *NUMERIC, *TEXT)


def _text(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


@dataclass
class Table:
    """Everything in a dataset file but the images.

    Attributes
    ----------
    path : str
    rc : (N,) float64
    crystal_id, scan_id, scan_type : (N,) object arrays of str
    beam_xy, pixels_per_mm : (N, 2) float64
    zoom, omega, timestamp : (N,) float64
    detector_frame, recording_frame : (N,) int64
    stored_crop_um : float or None
        None when a labelling-layout file does not record it.
    format_version : int
    provenance : dict or str
    extra : dict
        Other numeric per-row datasets (e.g. ``rc_expected``, ``padded``).
    image_dataset : str
        Where the JPEG crops are: ``samples/image`` or ``rows/jpeg``.
    """

    path: str
    rc: np.ndarray
    crystal_id: np.ndarray
    scan_id: np.ndarray
    scan_type: np.ndarray
    beam_xy: np.ndarray
    pixels_per_mm: np.ndarray
    zoom: np.ndarray
    omega: np.ndarray
    timestamp: np.ndarray
    detector_frame: np.ndarray
    recording_frame: np.ndarray
    stored_crop_um: float
    format_version: int
    provenance: object
    extra: dict = field(default_factory=dict)
    image_dataset: str = "samples/image"

    def __len__(self):
        return len(self.rc)

    def summary(self) -> dict:
        """Sizes and label statistics, as stored in a model's metadata."""
        rc = self.rc
        return {
            # The file name only: a model file travels, the machine it was trained on does not matter.
            "path": os.path.basename(self.path),
            "rows": int(len(rc)),
            "crystals": int(len(set(self.crystal_id))),
            "scans": int(len(set(self.scan_id))),
            "stored_crop_um": None if self.stored_crop_um is None else float(self.stored_crop_um),
            "format_version": int(self.format_version),
            "rc": {
                "mean": float(rc.mean()) if len(rc) else None,
                "median": float(np.median(rc)) if len(rc) else None,
                "max": float(rc.max()) if len(rc) else None,
                "zero_fraction": float(np.mean(rc == 0)) if len(rc) else None,
            },
            "provenance": self.provenance,
        }


def _stored_crop_um(f, layout):
    """Side of the stored crops: the root attribute, else (labelling layout) the smallest of the recordings'."""
    if "stored_crop_um" in f.attrs:
        return float(f.attrs["stored_crop_um"])
    if layout == "rows" and "recordings/provenance" in f:
        n = int(f.attrs.get("n_recordings", f["recordings/provenance"].shape[0]))
        sides = []
        for text in f["recordings/provenance"].asstr()[:n]:
            try:
                sides.append(float(json.loads(text)["stored_crop_um"]))
            except (KeyError, TypeError, ValueError):
                pass
        if sides:
            return min(sides)
    return None


def _as_float(values) -> np.ndarray:
    """Numbers, or text that should be numbers (NaN where it is not)."""
    values = np.asarray(values)
    if values.dtype.kind in "fiub":
        return values.astype(np.float64)
    out = np.full(values.shape, np.nan)
    for i, v in enumerate(_text(values.ravel())):
        try:
            out.flat[i] = float(v)
        except ValueError:
            pass
    return out


def read_table(path) -> Table:
    """Read and check everything but the images of a dataset file.

    Two layouts are read: the contract's (``/samples`` with ``image``, root
    attribute ``stored_crop_um``) and the one the labelling code writes
    (``/rows`` with ``jpeg``, only the first ``n_rows`` rows committed,
    ``stored_crop_um`` per recording in ``/recordings/provenance``, ``zoom``
    as text).

    Raises
    ------
    DatasetError
        Missing file, group, dataset or attribute, unequal lengths or an
        unknown format version, with a message that names the file and the
        fix.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such dataset file (make one with the labelling code or learning.synthetic.synthetic_dataset)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path}: not an HDF5 dataset file ({err})") from err
    with f:
        version = f.attrs.get("format_version")
        if version is None:
            raise DatasetError(f"{path}: no root attribute 'format_version': not a mxcube_autocenter dataset")
        if int(version) != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: dataset format_version {int(version)}, this code reads version {FORMAT_VERSION}: "
                "relabel the recordings with this version of mxcube_autocenter"
            )
        if "samples" in f:
            layout, g, image_name = "samples", f["samples"], "image"
        elif "rows" in f and "n_rows" in f.attrs:
            layout, g, image_name = "rows", f["rows"], "jpeg"
        else:
            raise DatasetError(f"{path}: no group '/samples' (nor the labelling code's '/rows' with the attribute n_rows)")
        required = [image_name if name == "image" else name for name in REQUIRED]
        missing = [name for name in required if name not in g]
        if missing:
            raise DatasetError(f"{path}: /{layout} lacks the datasets {missing} (see docs/learning.md for the format)")
        lengths = {name: g[name].shape[0] for name in g if isinstance(g[name], h5py.Dataset)}
        if layout == "rows":
            n = int(f.attrs["n_rows"])
            short = {name: m for name, m in lengths.items() if m < n}
            if set(short) & set(required):
                raise DatasetError(f"{path}: n_rows is {n} but /rows datasets are shorter: {short}")
            # A column added after labelling (add_row_column) that a later append did not extend.
            for name in short:
                log.warning("%s: /rows/%s covers %d of the %d rows: not read (add it again)", path, name, short[name],
                            n)  # fmt: skip
                del lengths[name]
        else:
            n = lengths[image_name]
            unequal = {name: m for name, m in lengths.items() if m != n}
            if unequal:
                raise DatasetError(f"{path}: /samples datasets differ in length: image has {n} rows, {unequal}")
        stored = _stored_crop_um(f, layout)
        if stored is None and layout == "samples":
            raise DatasetError(f"{path}: no root attribute 'stored_crop_um' (side of the stored crops, um)")
        provenance = f.attrs.get("provenance", "{}")
        if isinstance(provenance, bytes):
            provenance = provenance.decode()
        try:
            provenance = json.loads(provenance)
        except (TypeError, ValueError):
            provenance = str(provenance)
        arrays = {name: g[name][:n] for name in NUMERIC}
        texts = {name: _text(g[name][:n]) for name in TEXT}
        extra = {
            name: g[name][:n]
            for name in lengths
            if name not in required and g[name].dtype.kind in "fiub"
        }
        table = Table(
            path=path,
            rc=np.asarray(arrays["rc"], dtype=np.float64).reshape(n),
            crystal_id=texts["crystal_id"],
            scan_id=texts["scan_id"],
            scan_type=texts["scan_type"],
            beam_xy=np.asarray(arrays["beam_xy"], dtype=np.float64).reshape(n, 2),
            pixels_per_mm=np.asarray(arrays["pixels_per_mm"], dtype=np.float64).reshape(n, 2),
            zoom=_as_float(arrays["zoom"]).reshape(n),
            omega=np.asarray(arrays["omega"], dtype=np.float64).reshape(n),
            timestamp=np.asarray(arrays["timestamp"], dtype=np.float64).reshape(n),
            detector_frame=np.asarray(arrays["detector_frame"], dtype=np.int64).reshape(n),
            recording_frame=np.asarray(arrays["recording_frame"], dtype=np.int64).reshape(n),
            stored_crop_um=stored,
            format_version=int(version),
            provenance=provenance,
            extra=extra,
            image_dataset=f"{layout}/{image_name}",
        )
    if np.any(~np.isfinite(table.rc)) or np.any(table.rc < 0):
        raise DatasetError(f"{path}: reflection counts must be finite and >= 0")
    return table


class RowReader:
    """Reads the stored images of a dataset one row at a time (thread-safe)."""

    def __init__(self, path, image_dataset: str = "samples/image"):
        self.path = str(path)
        self.image_dataset = image_dataset
        self._file = None
        self._lock = threading.Lock()

    def image(self, i: int) -> np.ndarray:
        """The stored crop of row ``i``, RGB uint8."""
        with self._lock:
            if self._file is None:
                self._file = h5py.File(self.path, "r")
            data = self._file[self.image_dataset][int(i)]
        try:
            return decode_jpeg(data)
        except ValueError as err:
            raise DatasetError(f"{self.path}: row {i}: {err}: the set is damaged; write it again (label or synthesize)") from err

    def close(self):
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def row_crop(reader: RowReader, table: Table, i: int, spec: crops.CropSpec):
    """Row ``i``'s model input before normalisation: uint8 crop (S, S, C) and its region statistics (2, C).

    The statistics are those of the whole stored image (the region).
    """
    rgb = reader.image(i)
    coloured = crops.to_colour(rgb, spec.colour)
    stats = crops.region_stats(coloured, spec.normalisation)
    crop = crops.crop_uint8(rgb, table.beam_xy[i], table.pixels_per_mm[i], spec)
    return crop, stats


def check_crop_fits(table: Table, spec: crops.CropSpec):
    """Refuse a crop larger than the dataset's stored crops (it would be padded)."""
    if table.stored_crop_um is not None and spec.crop_um > table.stored_crop_um * (1 + 1e-6):
        raise DatasetError(
            f"{table.path}: crop of {spec.crop_um} um asked for, the dataset stores only "
            f"{table.stored_crop_um} um around the beam: choose crop_um <= {table.stored_crop_um}"
        )


def load_inputs(table: Table, rows, spec: crops.CropSpec, *, progress=False) -> np.ndarray:
    """Normalised model inputs of the given rows, float32 (N, S, S, C), in memory."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), *spec.input_shape), dtype=np.float32)
    iterator = enumerate(rows)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(rows), desc="crops", unit="crop")
    with RowReader(table.path, table.image_dataset) as reader:
        for k, i in iterator:
            crop, stats = row_crop(reader, table, int(i), spec)
            out[k] = crops.apply_stats(crop, stats)
    return out


def make_dataset(
    table: Table,
    rows,
    labels,
    spec: crops.CropSpec,
    *,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int = 0,
    augment: str = "none",
    jitter: float = 0.0,
    cache=False,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """A ``tf.data`` pipeline of ``(image float32 (B, S, S, C), label float32 (B, 1))``.

    Parameters
    ----------
    table : Table
        From :func:`read_table`.
    rows : sequence of int
        The dataset rows to stream.
    labels : (N,) array
        One target per entry of ``rows`` (already transformed).
    spec : CropSpec
    batch_size : int
        Global batch size.
    shuffle : bool
        Reshuffle the rows at every epoch (seeded).
    seed : int
    augment : {"dihedral", "flips", "none"}
    jitter : float
        Jitter strength (0: off), see :mod:`.augment`.
    cache : bool or "file" or str
        Keep the decoded uint8 crops after the first epoch: in memory
        (True), in a temporary file (``"file"``) or in the given file path.
    drop_remainder : bool
    """
    check_crop_fits(table, spec)
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    if len(rows) == 0:
        raise ValueError(f"{table.path}: no rows to stream")
    reader = RowReader(table.path, table.image_dataset)
    size, channels = int(spec.input_size), spec.channels

    def load(i):
        crop, stats = row_crop(reader, table, int(i), spec)
        return crop, stats

    def tf_load(i, label):
        crop, stats = tf.numpy_function(load, [i], [tf.uint8, tf.float32], stateful=False)
        crop = tf.ensure_shape(crop, (size, size, channels))
        stats = tf.ensure_shape(stats, (2, channels))
        return crop, stats, label

    ds = tf.data.Dataset.from_tensor_slices((rows, labels))
    if cache is not False and cache is not None:
        ds = ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if cache is True:
            ds = ds.cache()
        else:
            if cache == "file":
                import tempfile

                cache = os.path.join(tempfile.mkdtemp(prefix="autocenter-cache-"), "crops")
            ds = ds.cache(str(cache))
        if shuffle:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    else:
        if shuffle:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def normalise(crop, stats, label):
        image = (tf.cast(crop, tf.float32) - stats[0]) / stats[1]
        return image, label

    ds = ds.map(normalise, num_parallel_calls=tf.data.AUTOTUNE)
    if augment != "none" or jitter > 0:
        fn = augmenter(augment, jitter_strength=jitter)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: fn(xy[0], xy[1], s), num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = ds.map(lambda x, y: (tf.ensure_shape(x, (size, size, channels)), y))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Rows come from one file through a Python function: shard by element, not by file.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # The reader stays alive with the dataset: the map function's closure holds it.
    return ds.with_options(options)
