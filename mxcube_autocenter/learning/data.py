"""Streaming a training set to Keras with ``tf.data``.

The set is read by :func:`mxcube_autocenter.labelling.dataset.read_table`:
everything but the images into memory (a few tens of bytes a row). Images
are read lazily, one row at a time, by a parallel ``tf.data`` map over
shuffled row indices, so datasets larger than memory stream; with
``cache=True`` the decoded, cropped and resized uint8 crops
(``input_size^2 x channels`` bytes a row: 49 kB at 128 x 128 RGB) are kept
in memory after the first epoch, with ``cache="file"`` on disk.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import weakref

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mxcube_autocenter.labelling.dataset import DatasetError, RowReader, Table  # noqa: E402
from mxcube_autocenter.learning import crops  # noqa: E402
from mxcube_autocenter.learning.augment import augmenter  # noqa: E402

log = logging.getLogger(__name__)

# What a file-cached pipeline reshuffles at a time: 4096 crops of 128 x 128 RGB, 200 MB.
SHUFFLE_BUFFER_BYTES = 4096 * 128 * 128 * 3

def row_crop(reader: RowReader, table: Table, i: int, spec: crops.CropSpec):
    """Row ``i``'s model input before normalisation: uint8 crop (S, S, C) and its region statistics (2, C).

    The statistics are those of the whole stored image (the region).
    """
    rgb = reader.image(i)
    coloured = crops.to_colour(rgb, spec.colour)
    stats = crops.region_stats(coloured, spec.normalisation)
    crop = crops.crop_uint8(rgb, table.beam_xy[i], table.pixels_per_mm[i], spec)
    return crop, stats


def check_crop_fits(table: Table, spec: crops.CropSpec, model_path=None, fix: str = ""):
    """Refuse a crop larger than the dataset's stored crops (it would be padded).

    ``model_path``: the model whose crops these are, and ``fix``, what to do
    instead, where the crop side is the model's, not the user's to choose.
    """
    if table.stored_crop_um is None or spec.crop_um <= table.stored_crop_um * (1 + 1e-6):
        return
    if model_path is None:
        raise DatasetError(f"{table.path}: crop of {spec.crop_um} um asked for, the dataset stores only "
                           f"{table.stored_crop_um} um around the beam: choose crop_um <= {table.stored_crop_um}")
    raise DatasetError(f"{table.path}: {model_path} needs crops of {spec.crop_um:g} um and this set stores "
                       f"{table.stored_crop_um:g} um around the beam: {fix}")


def cgroup_memory_limit_files(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup") -> list:
    """The memory limit files of this process's control groups, its own and every one above it (v2 and v1).

    A container sees its own group as the root; a batch job (SLURM) or a service sits in a group below it, and its
    limit is there, not at the root.
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            places = [(os.path.join(root, "unified"), "memory.max"), (root, "memory.max")]
        elif "memory" in controllers.split(","):
            places = [(os.path.join(root, "memory"), "memory.limit_in_bytes")]
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            files += [os.path.join(base, *parts[:depth], name) for base, name in places]
    return files


def memory_bytes_available(limit_files=None) -> int:
    """The memory this process may use, bytes: physical memory, or its control groups' lowest limit
    (:func:`cgroup_memory_limit_files`; in Docker or under SLURM the machine's memory is not the job's, and a
    cache sized by it is killed)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in cgroup_memory_limit_files() if limit_files is None else limit_files:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            memory = min(memory, int(limit))
    return memory


def cache_for(n_rows: int, spec: crops.CropSpec, memory_bytes: float | None = None, row_bytes: int | None = None):
    """What ``cache="auto"`` keeps: in memory (True) when the decoded rows take at most a quarter of the
    memory (``memory_bytes``, by default :func:`memory_bytes_available`), else in a temporary file (``"file"``).

    A row is a decoded crop of ``spec`` unless ``row_bytes`` says otherwise (a dense training region)."""
    if memory_bytes is None:
        memory_bytes = memory_bytes_available()
    if row_bytes is None:
        row_bytes = int(np.prod(spec.input_shape))
    return True if n_rows * row_bytes <= memory_bytes / 4 else "file"


def decoded_rows(ds: tf.data.Dataset, decode, cache, n_rows: int, row_bytes: int, *, shuffle: bool, seed: int):
    """Row indices -> decoded rows, shuffled and kept between epochs as ``cache`` says (:func:`make_dataset`).

    Returns
    -------
    ds : tf.data.Dataset
    cache_dir : str or None
        The file cache's folder, to be removed with the finished pipeline (:func:`remove_with`).
    """
    cache_dir = None
    if shuffle and cache is not True:
        # Indices are cheap to shuffle whole; decoded rows are not (a set larger than memory).
        ds = ds.shuffle(n_rows, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is True:
        ds = ds.cache()
        if shuffle:
            ds = ds.shuffle(n_rows, seed=seed, reshuffle_each_iteration=True)
    elif cache:
        # A fresh file for each pipeline: one shared by training and validation (or left by an
        # earlier run) would hand them another pipeline's rows.
        folder = None if cache == "file" else os.fspath(cache)
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
        cache_dir = tempfile.mkdtemp(prefix="autocenter-cache-", dir=folder)
        check_cache_room(cache_dir, n_rows * row_bytes)
        ds = ds.cache(os.path.join(cache_dir, "rows"))
        if shuffle:
            # The file replays the first epoch's order; a bounded buffer reshuffles it without reading it all back.
            buffer = max(1, min(n_rows, SHUFFLE_BUFFER_BYTES // max(1, row_bytes)))
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    return ds, cache_dir


def check_cache_room(cache_dir: str, needed_bytes: int) -> None:
    """Refuse, with the fix, a file cache whose folder has no room for the decoded rows (``needed_bytes``): TensorFlow
    would fail only once the folder is full, part-way through the first epoch, with a traceback.

    Raises
    ------
    OSError
        ENOSPC, naming the folder, the room needed and the options; the empty ``cache_dir`` is removed.
    """
    free = shutil.disk_usage(cache_dir).free
    if free < needed_bytes:
        shutil.rmtree(cache_dir, ignore_errors=True)
        raise OSError(errno.ENOSPC, f"the file cache of the decoded rows needs {needed_bytes / 1e6:.0f} MB in "
                      f"{os.path.dirname(cache_dir)}, which has {free / 1e6:.0f} MB free: free space there, set TMPDIR "
                      "to a folder with room, or keep no cache (--cache none)")


def remove_with(ds: tf.data.Dataset, cache_dir, reader) -> tf.data.Dataset:
    """The finished pipeline, its file cache (if any) removed and its ``RowReader``'s file closed once it is gone."""
    # TensorFlow's registry of numpy_functions keeps their closures, and with them the reader,
    # long after the pipeline: without this, every pipeline would leave its HDF5 file open.
    # A reader closed while a copy of the pipeline still runs opens the file again.
    weakref.finalize(ds, reader.close)
    if cache_dir is not None:
        # The file cache lives as long as the pipeline (its iterators and the datasets made from it hold it),
        # at the latest until the program ends: a file of every row per pipeline would otherwise stay behind.
        weakref.finalize(ds, shutil.rmtree, cache_dir, ignore_errors=True)
    return ds


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
        From :func:`mxcube_autocenter.labelling.dataset.read_table`.
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
    cache : bool or "auto" or "file" or path
        Keep the decoded uint8 crops after the first epoch: in memory
        (True), where they fit (``"auto"``: :func:`cache_for`), in a new
        temporary file (``"file"``, in ``TMPDIR``) or in a new file in
        the given folder; a file is removed with the pipeline (when it and
        every dataset and iterator made from it are gone, at the latest at
        the program's end). Without a memory cache the row indices are
        shuffled, so the crops stream; a file cache is then reshuffled
        within :data:`SHUFFLE_BUFFER_BYTES` of crops.
    drop_remainder : bool
    """
    check_crop_fits(table, spec)
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    if len(rows) == 0:
        raise ValueError(f"{table.path}: no rows to stream")
    # Before the rows are read and a cache folder made: a bad augmentation option must cost neither.
    fn = augmenter(augment, jitter_strength=jitter) if augment != "none" or jitter > 0 else None
    if cache == "auto":
        cache = cache_for(len(rows), spec)
    reader = RowReader(table.path, table.image_dataset)
    reader.check(rows)
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
    ds, cache_dir = decoded_rows(ds, tf_load, cache, len(rows), size * size * channels, shuffle=shuffle, seed=seed)

    def normalise(crop, stats, label):
        image = (tf.cast(crop, tf.float32) - stats[0]) / stats[1]
        return image, label

    ds = ds.map(normalise, num_parallel_calls=tf.data.AUTOTUNE)
    if fn is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: fn(xy[0], xy[1], s), num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = ds.map(lambda x, y: (tf.ensure_shape(x, (size, size, channels)), y))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Rows come from one file through a Python function: shard by element, not by file.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return remove_with(ds.with_options(options), cache_dir, reader)
