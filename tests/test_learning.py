"""Learning pipeline: crops, transforms, augmentation, split, architectures, data, training, evaluation.

Models are tiny (32 x 32 inputs) and datasets a few hundred crops from the
virtual beamline, so the whole file runs in about a minute on two cores.
"""

import logging
import json
import os
import re
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mxcube_autocenter.learning import crops  # noqa: E402
from mxcube_autocenter.learning.split import Split, split_by_crystal  # noqa: E402
from mxcube_autocenter.learning.transforms import TANH_CLIP, TRANSFORMS, get_transform, transform_from_config  # noqa: E402

SMALL = 32  # model input side in these tests


# ---------------------------------------------------------------- test data


def make_dataset_file(path, n_samples=20, seed=7, crops_per_sample=16):
    """A dataset.h5 in the contract's layout, rendered from the virtual beamline."""
    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    return synthetic_dataset(path, n_samples, seed, crops_per_sample=crops_per_sample, omegas_per_sample=2,
                             progress=False)


def make_rows_layout_file(path, source):
    """The same rows in the labelling code's layout: /rows, jpeg, n_rows, stored_crop_um per recording."""
    with h5py.File(source, "r") as src, h5py.File(path, "w") as f:
        n = src["samples/rc"].shape[0]
        f.attrs["format_version"] = 1
        f.attrs["n_rows"] = n - 5  # the last rows are an uncommitted append
        f.attrs["n_recordings"] = 1
        f.attrs["provenance"] = json.dumps({"tool": "test"})
        rows = f.create_group("rows")
        for name in src["samples"]:
            target = "jpeg" if name == "image" else name
            data = src["samples"][name][()]
            if name == "zoom":
                data = np.array([f"{z:g}" for z in data], dtype=object)
                rows.create_dataset(target, data=data, dtype=h5py.string_dtype())
            elif name == "image":
                ds = rows.create_dataset(target, shape=(n,), dtype=h5py.vlen_dtype(np.uint8))
                for i, buf in enumerate(data):
                    ds[i] = buf
            else:
                rows.create_dataset(target, data=data)
        rec = f.create_group("recordings")
        rec.create_dataset("provenance", data=[json.dumps({"stored_crop_um": 240.0})], dtype=h5py.string_dtype())


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("learning") / "dataset.h5")
    make_dataset_file(path)
    return path


@pytest.fixture(scope="module")
def trained(dataset_path, tmp_path_factory):
    from mxcube_autocenter.learning.training import train

    out = tmp_path_factory.mktemp("model")
    return train(dataset_path, "fcn", "log", str(out), crop_um=160, input_size=SMALL, epochs=8, batch_size=16,
                 patience=3, seed=0, verbose=0)


# ---------------------------------------------------------------- crops


def test_crop_geometry_and_border_replication():
    assert crops.crop_side_px(100, (2000.0, 1000.0)) == (200.0, 100.0)
    image = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1).repeat(3, axis=2)
    crop = crops.crop_centred(image, (15, 10), (6, 4))
    assert crop.shape == (4, 6, 3)
    assert np.array_equal(crop, image[8:12, 12:18])
    edge = crops.crop_centred(image, (0, 0), (6, 6))  # three pixels outside on each side
    assert edge.shape == (6, 6, 3)
    assert np.array_equal(edge[3:, 3:], image[:3, :3])
    assert np.all(edge[:3, 3] == image[0, 0])  # replicated
    with pytest.raises(ValueError, match="outside"):
        crops.crop_centred(image, (100, 100), (6, 6))


def test_backlight_normalisation_removes_brightness_and_tint():
    rng = np.random.default_rng(0)
    scene = np.ones((60, 60), np.float32)
    scene[20:40, 20:40] = 0.4  # an object on an empty field
    scene += rng.normal(0, 0.005, scene.shape)
    bright = np.clip(scene[..., None] * np.array([230, 240, 220]), 0, 255).astype(np.uint8)
    dim = np.clip(scene[..., None] * np.array([120, 100, 130]), 0, 255).astype(np.uint8)
    a, b = crops.normalise(bright, "backlight"), crops.normalise(dim, "backlight")
    assert np.abs(a - b).max() < 0.03
    assert abs(float(np.median(a[:10, :10]))) < 0.02  # the empty field is 0
    assert abs(float(a[30, 30].mean()) + 0.6) < 0.03  # the object is -0.6
    z = crops.normalise(dim, "standardise")
    assert np.allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-4)


def test_model_input_shapes_and_colour():
    rgb = np.full((300, 300, 3), 200, np.uint8)
    rgb[140:160, 140:160] = 50
    spec = crops.CropSpec(crop_um=100, input_size=64)
    x = crops.model_input(rgb, (150, 150), (2000.0, 2000.0), spec)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert x[32, 32].max() < -0.5 and abs(x[0, 0]).max() < 1e-6
    grey = crops.model_input(rgb, (150, 150), (2000.0, 2000.0), crops.CropSpec(100, 64, "grey"))
    assert grey.shape == (64, 64, 1)
    with pytest.raises(ValueError, match="colour"):
        crops.CropSpec(colour="cmyk")


def test_region_normalisation_lets_crops_share_one_prepared_region():
    # The training crops (model_input) are windows of the region the centring prepares once.
    from mxcube_autocenter.centring.heatmap import prepare_region
    from mxcube_autocenter.centring.loop import Roi

    rng = np.random.default_rng(1)
    # Pixel noise, shrunk by 2: area averaging and bilinear sampling would differ, so training must sample as the heatmap does.
    region = rng.integers(0, 255, size=(400, 400, 3), dtype=np.uint8)
    spec = crops.CropSpec(crop_um=100, input_size=50)
    ppmm = (1000.0, 1000.0)  # 100 um = 100 px -> scale 0.5
    stats = crops.region_stats(region, spec.normalisation)
    crop_px = crops.crop_side_px(spec.crop_um, ppmm)[0]
    prepared, origin, scale = prepare_region(region, Roi(100, 100, 300, 300), crop_px, spec.input_size,
                                             lambda r: crops.apply_stats(r, stats))  # fmt: skip
    # The first crop's middle (model pixel 24.5) on the roi's corner.
    assert prepared.shape == (150, 150, 3) and origin == (51.0, 51.0) and scale == 0.5
    centre = (200, 180)
    per_crop = crops.model_input(region, centre, ppmm, spec)
    window = prepared[65 - 25 : 65 + 25, 75 - 25 : 75 + 25]
    assert np.allclose(per_crop, window, atol=1e-5)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transforms_invert_exactly_and_travel_as_config(name):
    rng = np.random.default_rng(2)
    rc = np.concatenate([np.zeros(50), rng.poisson(3, 100), rng.lognormal(3, 1, 100).round()])
    transform = get_transform(name).fit(rc)
    y = transform.forward(rc)
    exact = rc
    if name == "tanh":
        # tanh saturates: exact up to z = arctanh(1 - 1e-7) = 8.4, clipped beyond (documented).
        z = (rc - transform.mean) / transform.std
        assert z.max() > 8.4
        exact = np.where(z < 8.3, rc, transform.mean + np.arctanh(TANH_CLIP) * transform.std)
    assert np.allclose(transform.inverse(y), exact, rtol=1e-9, atol=1e-9)
    clone = transform_from_config(json.loads(json.dumps(transform.to_config())))
    assert type(clone) is type(transform)
    assert np.array_equal(clone.forward(rc), y)
    if name == "vanilla":
        assert abs(y.mean()) < 1e-9 and abs(y.std() - 1) < 1e-9
    if name == "log":
        assert np.isclose(transform.forward([0.0])[0], (0 - transform.mean) / transform.std)
    if name == "tanh":
        assert np.all(np.abs(y) < 1)
        assert np.all(np.isfinite(transform.inverse([-3.0, 1.0, 3.0])))  # clipped predictions
    with pytest.raises(RuntimeError, match="not fitted"):
        get_transform(name).forward(rc)


def test_unknown_transform_is_refused():
    with pytest.raises(ValueError, match="unknown label transform"):
        get_transform("sqrt")
    with pytest.raises(ValueError, match="unknown label transform"):
        transform_from_config({"name": "sqrt"})


# ---------------------------------------------------------------- augmentation


def test_augmentation_yields_the_eight_distinct_dihedral_images():
    import tensorflow as tf

    from mxcube_autocenter.learning.augment import augmenter, dihedral_np, dihedral_tf

    image = np.arange(5 * 5 * 2, dtype=np.float32).reshape(5, 5, 2)
    images = [dihedral_np(image, k) for k in range(8)]
    assert len({im.tobytes() for im in images}) == 8
    for k in range(8):
        assert np.array_equal(dihedral_tf(tf.constant(image), tf.constant(k)).numpy(), images[k])
    seen = {name: set() for name in ("dihedral", "flips")}
    for name in seen:
        fn = tf.function(augmenter(name))
        for s in range(200):
            out, label = fn(tf.constant(image), tf.constant([1.0]), tf.constant([s, 17], tf.int64))
            seen[name].add(out.numpy().tobytes())
            assert label.numpy()[0] == 1.0
    assert seen["dihedral"] == {im.tobytes() for im in images}
    flips = {images[k].tobytes() for k in (0, 2, 4, 6)}
    assert seen["flips"] == flips
    # The four flips are the exact symmetries of a rectangular beam: a horizontal bar stays horizontal.
    bar = np.zeros((5, 5, 1), np.float32)
    bar[2, 1:4] = 1
    for k in (0, 2, 4, 6):
        assert np.array_equal(dihedral_np(bar, k), bar)


def test_jitter_is_seeded():
    import tensorflow as tf

    from mxcube_autocenter.learning.augment import augmenter

    fn = augmenter("none", jitter_strength=0.5)
    image = tf.random.stateless_uniform((16, 16, 3), seed=(1, 2))
    a, _ = fn(image, tf.constant([0.0]), tf.constant([3, 4], tf.int64))
    b, _ = fn(image, tf.constant([0.0]), tf.constant([3, 4], tf.int64))
    c, _ = fn(image, tf.constant([0.0]), tf.constant([5, 4], tf.int64))
    assert np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


# ---------------------------------------------------------------- split


def test_split_never_shares_a_crystal():
    ids = [f"c{i % 50}" for i in range(1000)]
    split = split_by_crystal(ids, seed=3)
    sets = [set(split.train), set(split.validation), set(split.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(ids)
    assert (len(sets[0]), len(sets[1]), len(sets[2])) == (30, 10, 10)
    idx = split.indices(ids)
    assert sum(len(v) for v in idx.values()) == 1000
    for name, rows in idx.items():
        assert {ids[i] for i in rows} <= set(getattr(split, name))
    assert split_by_crystal(ids, seed=3) == split
    assert split_by_crystal(ids, seed=4) != split
    assert Split.from_config(json.loads(json.dumps(split.to_config()))) == split
    assert split.rows == {"train": 600, "validation": 200, "test": 200}
    with pytest.raises(ValueError, match="at least 3"):
        split_by_crystal(["a", "b", "a"])
    with pytest.raises(ValueError, match="both"):
        Split(train=("a",), validation=("a",), test=("b",))
    with pytest.raises(ValueError, match="must be a list of crystal ids"):
        Split(train="abc", validation=("d",), test=("e",))  # a string would be three crystals
    with pytest.raises(ValueError, match="that an earlier model was trained on"):
        Split(train=("a",), validation=("b",), test=("c",), trained_before=("b",))


def test_a_split_extended_for_fine_tuning_keeps_the_initial_models_subsets_and_splits_only_new_crystals():
    # A site appends recordings and fine-tunes again: a new split of all crystals put crystals the initial
    # weights were trained on into validation and test.
    from mxcube_autocenter.learning.split import extend_split

    initial = split_by_crystal([f"old{i}" for i in range(10)], seed=0)
    ids = [f"old{i}" for i in range(10)] + [f"new{i}" for i in range(10)] + ["older"] * 3
    initial = Split(initial.train, initial.validation, initial.test, trained_before=("older",))
    extended = extend_split(initial, ids, seed=5)
    for name in ("validation", "test"):
        assert set(getattr(initial, name)) <= set(getattr(extended, name))
    assert set(initial.train) | {"older"} <= set(extended.train)
    new = [f"new{i}" for i in range(10)]
    assert [len(set(getattr(extended, name)) & set(new)) for name in ("train", "validation", "test")] == [6, 2, 2]
    assert set(extended.trained_before) == set(initial.train) | {"older"}
    assert sum(extended.rows.values()) == len(ids)
    assert Split.from_config(json.loads(json.dumps(extended.to_config()))) == extended
    # Fewer than three new crystals all train,
    few = extend_split(initial, [f"old{i}" for i in range(10)] + ["x", "y"])
    assert {"x", "y"} <= set(few.train)
    # but one validates where the data holds none of the initial model's validation crystals (early stopping
    # needs one; the run was refused).
    without_validation = extend_split(initial, [*initial.train, "x", "y"])
    assert without_validation.validation == ("x",) and without_validation.train == tuple(sorted({*initial.train, "y"}))


# ---------------------------------------------------------------- architectures


def expected_thesis_params(c8, mpool, c16, f256, f128, f64, input_shape=(128, 128, 3)):
    """Parameters implied by a spec: 3x3 'same' convolutions, 2x2 poolings, flatten, dense layers."""
    h, w, channels = input_shape
    n = 0
    for filters, count in ((8, c8), (16, c16)):
        for _ in range(count):
            n += (9 * channels + 1) * filters
            channels = filters
    width = (h // 2**mpool) * (w // 2**mpool) * channels
    for units, count in ((256, f256), (128, f128), (64, f64)):
        for _ in range(count):
            n += (width + 1) * units
            width = units
    return n + width + 1


def test_every_architecture_builds_with_the_parameter_count_of_its_spec():
    from mxcube_autocenter.learning import architectures as A

    assert len(A.THESIS_SPECS) == 10 and list(A.THESIS_SPECS) == [f"a{i}" for i in range(1, 11)]
    depths = []
    for name, spec in A.THESIS_SPECS.items():
        model = A.build(name, (128, 128, 3))
        counts = (spec.c8, spec.mpool, spec.c16, spec.f256, spec.f128, spec.f64)
        assert model.count_params() == expected_thesis_params(*counts), name
        assert model.output_shape == (None, 1)
        layers = spec.layers()
        assert layers.count("MPOOL") == spec.mpool and layers[-1] == "OUT"
        assert layers.index("C8" if spec.c8 else "C16") == 0
        depths.append(spec.c8 + spec.c16 + spec.f256 + spec.f128 + spec.f64)
        assert A.build(name, (SMALL, SMALL, 3)).count_params() == expected_thesis_params(*counts, (SMALL, SMALL, 3))
    assert depths == sorted(depths) and depths[0] < depths[-1]  # increasingly deep
    classifier = A.build("classifier", (128, 128, 3))
    expected = 28 * 32 + (9 * 32 + 1) * 32 + (9 * 32 + 1) * 64 + (16 * 16 * 64 + 1) * 64 + 65
    assert classifier.count_params() == expected
    # The fcn classifier is the fcn with a sigmoid: the same weights, so that it can start from a regressor.
    fcn_classifier = A.build("fcn_classifier", (128, 128, 3))
    assert [w.shape for w in fcn_classifier.get_weights()] == [w.shape for w in A.build("fcn").get_weights()]
    assert A.task_of("fcn_classifier") == "classifier"
    for name in A.ARCHITECTURES:
        model = A.build(name, (128, 128, 3))
        assert model.output_shape == (None, 1)
        assert A.describe(name)["name"] == name
    with pytest.raises(ValueError, match="unknown architecture"):
        A.build("a11")
    for arch in ("fcn", "fcn_gap"):
        with pytest.raises(ValueError, match=r"input \(30, 30, 3\) is too small for the fcn trunk: at least 31 x 31"):
            A.build(arch, (30, 30, 3))


@pytest.mark.parametrize("arch", ["fcn", "fcn_classifier"])
def test_fcn_evaluates_a_region_exactly_like_its_crops(arch):
    from mxcube_autocenter.learning import architectures as A
    from mxcube_autocenter.learning.dense import FCN_STEP

    model = A.build(arch, (SMALL, SMALL, 3))
    dense = A.dense_evaluator(model)
    step = A.output_stride(arch)
    assert step == FCN_STEP  # the region sets' label grid
    region = np.random.default_rng(4).normal(size=(1, SMALL + 2 * step, SMALL + step, 3)).astype(np.float32)
    heat = dense.predict(region, verbose=0)
    assert heat.shape == (1, 3, 2, 1)
    batch = np.stack([region[0, i * step : i * step + SMALL, j * step : j * step + SMALL]
                      for i in range(3) for j in range(2)])
    per_crop = model.predict(batch, verbose=0).reshape(3, 2)
    assert np.allclose(heat[0, ..., 0], per_crop, atol=1e-5)  # a classifier's probabilities, not its logits


# ---------------------------------------------------------------- data


def model_inputs(table, rows, spec):
    """The rows' normalised model inputs, crop by crop: what the pipeline must give."""
    from mxcube_autocenter.labelling.dataset import RowReader
    from mxcube_autocenter.learning.data import row_crop

    with RowReader(table.path, table.image_dataset) as reader:
        return np.stack([crops.apply_stats(*row_crop(reader, table, int(i), spec)) for i in rows])


def test_a_bad_augmentation_is_refused_before_any_row_is_read_or_cache_made(dataset_path, tmp_path, monkeypatch):
    # It was checked after every row had been read and a cache folder made, which stayed behind.
    import tempfile

    from mxcube_autocenter.labelling.dataset import RowReader, read_table
    from mxcube_autocenter.learning.data import make_dataset

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(RowReader, "check", lambda *args: pytest.fail("the rows were read"))
    table = read_table(dataset_path)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        make_dataset(table, np.arange(8), table.rc[:8], crops.CropSpec(crop_um=160, input_size=SMALL), augment="flip",
                     cache=True)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_dataset_contract_and_pipeline(dataset_path, tmp_path):
    from mxcube_autocenter.labelling.dataset import DatasetError, read_table
    from mxcube_autocenter.learning.data import make_dataset

    table = read_table(dataset_path)
    assert len(table) == 320 and table.stored_crop_um == 240.0
    assert len(set(table.crystal_id)) == 20
    assert "rc_expected" in table.extra
    assert np.array_equal(table.rc, np.round(table.rc)) and table.rc.max() > 5
    spec = crops.CropSpec(crop_um=160, input_size=SMALL)
    rows = np.arange(0, 40)
    ds = make_dataset(table, rows, table.rc[rows], spec, batch_size=16, shuffle=False)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    assert x.shape == (40, SMALL, SMALL, 3) and y.shape == (40, 1)
    assert np.array_equal(y[:, 0], table.rc[rows].astype(np.float32))
    assert np.allclose(x, model_inputs(table, rows, spec), atol=1e-5)
    # Shuffled, augmented, cached: the same rows, other order, each epoch anew.
    ds = make_dataset(table, rows, rows.astype(float), spec, batch_size=40, shuffle=True, seed=1,
                      augment="dihedral", cache=True)
    first = np.concatenate([b[1].numpy() for b in ds])[:, 0]
    second = np.concatenate([b[1].numpy() for b in ds])[:, 0]
    assert sorted(first) == sorted(second) == list(rows.astype(float))
    assert not np.array_equal(first, second)
    # Streamed (no cache) and cached in a folder shared by two pipelines: each gets its own rows, reshuffled.
    folder = tmp_path / "cache"
    for cache in (False, folder):
        ds = make_dataset(table, rows, rows.astype(float), spec, batch_size=40, shuffle=True, seed=1, cache=cache)
        other = make_dataset(table, rows[:10], rows[:10] + 100.0, spec, batch_size=40, shuffle=False, cache=cache)
        first = np.concatenate([b[1].numpy() for b in ds])[:, 0]
        assert np.concatenate([b[1].numpy() for b in other])[:, 0].tolist() == list(rows[:10] + 100.0)
        second = np.concatenate([b[1].numpy() for b in ds])[:, 0]
        assert sorted(first) == sorted(second) == list(rows.astype(float)) and not np.array_equal(first, second)
    assert len(list(folder.iterdir())) == 2
    with pytest.raises(DatasetError, match="crop_um <= 240"):
        make_dataset(table, rows, table.rc[rows], crops.CropSpec(crop_um=300, input_size=SMALL))
    # The labelling code's layout reads the same, up to its committed rows.
    other = str(tmp_path / "rows.h5")
    make_rows_layout_file(other, dataset_path)
    alt = read_table(other)
    assert len(alt) == 315 and alt.stored_crop_um == 240.0 and alt.image_dataset == "rows/jpeg"
    assert np.array_equal(alt.rc, table.rc[:315]) and np.array_equal(alt.zoom, table.zoom[:315])
    assert np.allclose(model_inputs(alt, [3], spec), model_inputs(table, [3], spec))
    broken = str(tmp_path / "broken.h5")
    with h5py.File(broken, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["stored_crop_um"] = 240.0
        f.create_group("samples").create_dataset("rc", data=np.zeros(3))
    with pytest.raises(DatasetError, match="lacks the datasets"):
        read_table(broken)
    with pytest.raises(DatasetError, match="no such dataset"):
        read_table(str(tmp_path / "missing.h5"))


def open_files(path) -> list:
    """The HDF5 files open in this process under ``path``."""
    ids = h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)
    return [i for i in ids if os.path.samefile(h5py.File(i).filename, path)]


def test_file_caches_and_the_set_go_with_their_pipelines_and_training_leaves_none(dataset_path, tmp_path):
    """A file cache holds every crop of its subset: it must not outlive the pipeline (nor a training run), and
    neither may the set's file stay open (TensorFlow keeps the pipeline's reader long after it)."""
    import gc

    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.data import make_dataset
    from mxcube_autocenter.learning.training import train

    table = read_table(dataset_path)
    folder = tmp_path / "cache"
    ds = make_dataset(table, np.arange(20), np.zeros(20), crops.CropSpec(crop_um=160, input_size=SMALL),
                      batch_size=8, cache=folder)
    for _ in range(2):
        assert sum(len(b[1]) for b in ds) == 20
    assert len(list(folder.iterdir())) == 1
    assert open_files(dataset_path)
    del ds
    gc.collect()
    assert list(folder.iterdir()) == []
    assert open_files(dataset_path) == []
    train(dataset_path, "fcn", "log", str(tmp_path / "model"), crop_um=160, input_size=SMALL, epochs=2,
          batch_size=16, verbose=0, cache=folder)
    gc.collect()
    assert list(folder.iterdir()) == []
    assert open_files(dataset_path) == []


def test_a_file_cache_without_room_for_the_rows_is_refused_before_the_first_epoch(tmp_path):
    # TensorFlow failed only once the folder was full, part-way through the first epoch, with a traceback.
    import errno

    from mxcube_autocenter.learning.data import check_cache_room

    cache_dir = tmp_path / "autocenter-cache-x"
    cache_dir.mkdir()
    check_cache_room(str(cache_dir), 1000)
    with pytest.raises(OSError, match=rf"needs 1000000000000 MB in {re.escape(str(tmp_path))}, .*set TMPDIR .*"
                                      r"--cache none") as refused:  # fmt: skip
        check_cache_room(str(cache_dir), 10**18)
    assert refused.value.errno == errno.ENOSPC and not cache_dir.exists()


def test_auto_cache_keeps_crops_in_memory_where_they_fit_and_the_command_line_chooses(dataset_path):
    from mxcube_autocenter.cli import _train_options, build_parser
    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.data import cache_for, make_dataset

    spec = crops.CropSpec(crop_um=240, input_size=128)  # 49 152 bytes a decoded RGB crop
    assert cache_for(1000, spec, memory_bytes=4 * 49152 * 1000) is True
    assert cache_for(1001, spec, memory_bytes=4 * 49152 * 1000) == "file"  # a set larger than memory streams
    ds = make_dataset(read_table(dataset_path), np.arange(10), np.zeros(10), crops.CropSpec(crop_um=160, input_size=SMALL),
                      batch_size=5, cache="auto")  # fmt: skip
    assert sum(len(b[1]) for b in ds) == 10
    parser = build_parser()
    assert _train_options(parser.parse_args(["train", "set.h5"]))["cache"] == "auto"
    chosen = {name: _train_options(parser.parse_args(["train", "set.h5", "--cache", name]))["cache"]
              for name in ("memory", "file", "none")}  # fmt: skip
    assert chosen == {"memory": True, "file": "file", "none": False}


def test_the_memory_an_auto_cache_may_take_is_the_control_groups_where_it_is_lower(tmp_path):
    # In a container or a batch job the machine's memory is not the job's: a cache sized by it was killed. A SLURM
    # job's limit is on its own group, below the root's.
    from mxcube_autocenter.learning.data import cgroup_memory_limit_files, memory_bytes_available

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    root = tmp_path / "cgroup"
    job = root / "memory" / "slurm" / "job_7"
    job.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (job / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    (root / "memory.max").write_text("max\n")  # v2: no limit
    proc = tmp_path / "cgroup_of_this_process"
    proc.write_text("5:cpu:/\n4:memory:/slurm/job_7\n0::/\n")
    files = cgroup_memory_limit_files(str(proc), str(root))
    assert files[0] == str(job / "memory.limit_in_bytes") and str(root / "memory.max") in files
    assert memory_bytes_available(files) == 2**30
    assert memory_bytes_available([str(root / "memory.max")]) == physical
    (job / "memory.limit_in_bytes").write_text(f"{physical * 2}\n")  # a limit above the machine's is no limit
    assert memory_bytes_available(files) == physical
    assert cgroup_memory_limit_files(str(tmp_path / "none"), str(root)) == []


# ---------------------------------------------------------------- training and model files


def test_training_lowers_validation_loss_and_saves_a_self_describing_model(trained, dataset_path):
    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.training import info_spec, info_transform, load_model, predict_rows

    table = read_table(dataset_path)
    split = Split.from_config(trained.info["split"])
    idx = split.indices(table.crystal_id)
    transform = info_transform(trained.info)
    constant_mse = float(np.mean(transform.forward(table.rc[idx["validation"]]) ** 2))  # predicting the mean
    val = trained.history["val_loss"]
    assert min(val) < 0.8 * constant_mse
    assert min(val) < val[0]
    assert os.path.exists(os.path.join(trained.out_dir, "checkpoint.keras"))
    assert os.path.exists(os.path.join(trained.out_dir, "history.csv"))

    model, info = load_model(trained.model_path)
    assert info["format_version"] == 1 and info["task"] == "regression"
    assert info["input"] == {**crops.CropSpec(160, SMALL).to_config(), "channels": 3,
                             "normalisation_region": info["input"]["normalisation_region"]}
    assert info["architecture"]["name"] == "fcn" and info["architecture"]["params"] == model.count_params()
    assert info["transform"]["name"] == "log" and info["transform"] == transform.to_config()
    assert set(info["split"]["test"]) == set(split.test) and info["split"]["seed"] == 0
    assert info["data"]["rows"] == 320 and info["data"]["crystals"] == 20
    for key in ("package_version", "training", "metrics", "created"):
        assert key in info
    assert info["training"]["best_epoch"] == int(np.argmin(val)) + 1
    assert info["metrics"]["test"]["n"] == len(idx["test"])
    rows = idx["test"][:10]
    again = predict_rows(model, table, rows, info_spec(info))
    before = predict_rows(trained.model, table, rows, info_spec(info))
    assert np.allclose(again, before, atol=1e-6)
    assert np.isclose(info["metrics"]["validation"]["mse"], min(val), rtol=1e-3)

    import keras

    plain = keras.saving.load_model(trained.model_path, compile=False)  # no special loader needed
    assert json.loads(plain.get_layer("model_info").get_config()["info"])["task"] == "regression"


def test_model_files_without_metadata_or_with_a_wrong_shape_are_refused(trained, tmp_path):
    import keras

    from mxcube_autocenter.learning import architectures as A
    from mxcube_autocenter.learning.training import ModelFileError, attach_info, load_model

    bare = str(tmp_path / "bare.keras")
    A.build("fcn", (SMALL, SMALL, 3)).save(bare)
    with pytest.raises(ModelFileError, match="no mxcube_autocenter metadata") as err:
        load_model(bare)
    assert bare in str(err.value) and "train" in str(err.value)

    wrong = str(tmp_path / "wrong_shape.keras")
    attach_info(A.build("fcn", (48, 48, 3)), trained.info).save(wrong)
    with pytest.raises(ModelFileError, match=r"inputs of shape \(48, 48, 3\).*32 x 32") as err:
        load_model(wrong)
    assert wrong in str(err.value)

    future = str(tmp_path / "future.keras")
    attach_info(A.build("fcn", (SMALL, SMALL, 3)), {**trained.info, "format_version": 99}).save(future)
    with pytest.raises(ModelFileError, match="format_version 99"):
        load_model(future)

    diverged = A.build("fcn", (SMALL, SMALL, 3))
    diverged.set_weights([np.full_like(w, np.nan) for w in diverged.get_weights()])
    nan_weights = str(tmp_path / "nan_weights.keras")
    attach_info(diverged, trained.info).save(nan_weights)
    with pytest.raises(ModelFileError, match="weights are not all finite numbers .*lower learning rate"):
        load_model(nan_weights)

    listed = str(tmp_path / "listed.keras")
    attach_info(A.build("fcn", (SMALL, SMALL, 3)), []).save(listed)
    with pytest.raises(ModelFileError, match="its metadata is a JSON list, not an object"):
        load_model(listed)

    incomplete = str(tmp_path / "incomplete.keras")
    info = {k: v for k, v in trained.info.items() if k != "transform"}
    attach_info(A.build("fcn", (SMALL, SMALL, 3)), info).save(incomplete)
    with pytest.raises(ModelFileError, match="lacks"):
        load_model(incomplete)
    # Everything the file describes is checked, not only what centring needs.
    for key in ("data", "split", "metrics", "training"):
        path = str(tmp_path / f"no_{key}.keras")
        attach_info(A.build("fcn", (SMALL, SMALL, 3)), {k: v for k, v in trained.info.items() if k != key}).save(path)
        with pytest.raises(ModelFileError, match=rf"lacks \['{key}'\]"):
            load_model(path)
    # A file of a version before the label was stored (same format_version) learnt the recorded counts.
    unlabelled = str(tmp_path / "no_label.keras")
    attach_info(A.build("fcn", (SMALL, SMALL, 3)), {k: v for k, v in trained.info.items() if k != "label"}).save(unlabelled)
    assert load_model(unlabelled)[1]["label"] == "rc"

    # Metadata present but unusable: refused when loaded, not at the first centring.
    broken = {
        "unfitted": ({"transform": {"name": "log"}}, "its metadata's log transform has no fitted parameters"),
        # A part missing or of another type is named, with what it lacks ("invalid metadata ('colour')").
        "colourless": ({"input": {k: v for k, v in trained.info["input"].items() if k != "colour"}},
                       "its metadata's input lacks 'colour'"),
        "named_transform": ({"transform": "log"}, "its metadata's transform is a JSON str, not an object"),
        "listed_split": ({"split": []}, "its metadata's split is a JSON list, not an object"),
        "untested_split": ({"split": {k: v for k, v in trained.info["split"].items() if k != "test"}},
                           "its metadata's split lacks 'test'"),
        "nameless": ({"architecture": {}}, "the architecture {} has no name"),
        "unknown_label": ({"label": "counts"}, "the label 'counts' is none of"),
        # The ice network's flag is a classifier's to learn: a regressor of it would centre on ice.
        "flag_regressor": ({"label": "on_ice"}, "a regressor of the label 'on_ice', a flag"),
        "listed_metrics": ({"metrics": []}, "metrics is a JSON list, not an object"),
        "shared_crystal": ({"split": {**trained.info["split"], "test": trained.info["split"]["train"][:1]}},
                           "crystals in both train and test"),
        # What no fit gives: infinite targets, or (std < 0) every heatmap upside down.
        "zero_std": ({"transform": {**trained.info["transform"], "std": 0.0}}, "std must be a positive finite"),
        "negative_std": ({"transform": {**trained.info["transform"], "std": -1.0}}, "std must be a positive finite"),
        "nan_mean": ({"transform": {**trained.info["transform"], "mean": float("nan")}}, "mean must be a finite"),
        # A regressor's counts read as probabilities.
        "task_of_another_network": ({"task": "classifier", "threshold": 5.0},
                                    "the task 'classifier' is not that of the architecture 'fcn'"),
        "unknown_architecture": ({"architecture": {"name": "fcn9"}}, "the architecture 'fcn9' is none of"),
        "string_split": ({"split": {**trained.info["split"], "train": "abc"}}, "must be a list of crystal ids"),
    }
    for name, (change, message) in broken.items():
        path = str(tmp_path / f"{name}.keras")
        attach_info(A.build("fcn", (SMALL, SMALL, 3)), {**trained.info, **change}).save(path)
        with pytest.raises(ModelFileError, match=message) as err:
            load_model(path)
        assert path in str(err.value)
    # Metadata that names another network of the same task and input: its name would say what it is not.
    renamed = str(tmp_path / "a1_as_a2.keras")
    attach_info(A.build("a1", (SMALL, SMALL, 3)), {**trained.info, "architecture": A.describe("a2")}).save(renamed)
    with pytest.raises(ModelFileError, match=r"a1_as_a2\.keras: its network is not the a2 network this version "
                                             r"builds for 32 x 32 crops \(layer 4: Flatten in the file, Conv2D "
                                             r"activation=relu strides=\(1, 1\) padding=same .* built\)"):  # fmt: skip
        load_model(renamed)
    # A classifier's network as the regressor it was fine-tuned from: the same weights, but probabilities read
    # as counts by the centring.
    sigmoid = str(tmp_path / "fcn_classifier_as_fcn.keras")
    attach_info(A.build("fcn_classifier", (SMALL, SMALL, 3)), trained.info).save(sigmoid)
    with pytest.raises(ModelFileError, match=r"fcn_classifier_as_fcn\.keras: its network is not the fcn network "
                                             r"this version builds for 32 x 32 crops \(layer 9: Activation "
                                             r"activation=sigmoid in the file, nothing built\)"):  # fmt: skip
        load_model(sigmoid)
    three = keras.Sequential([keras.Input((SMALL, SMALL, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    attach_info(three, trained.info).save(str(tmp_path / "three.keras"))
    with pytest.raises(ModelFileError, match=r"outputs of shape \(3,\), not one number per crop"):
        load_model(str(tmp_path / "three.keras"))

    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ModelFileError, match="garbage.keras: the file is not a .keras model"):
        load_model(str(garbage))
    # A byte changed inside the archive (an interrupted copy): its CRC no longer matches.
    damaged = bytearray(open(trained.model_path, "rb").read())
    with zipfile.ZipFile(trained.model_path) as archive:
        weights = archive.getinfo("model.weights.h5")
    at = weights.header_offset
    data_start = at + 30 + len(weights.filename) + int.from_bytes(damaged[at + 28 : at + 30], "little")  # local header
    damaged[data_start + weights.compress_size // 2] ^= 0xFF
    (tmp_path / "damaged.keras").write_bytes(bytes(damaged))
    with pytest.raises(ModelFileError, match=r"damaged.keras: the file is damaged \(Bad CRC-32 .*Copy it again"):
        load_model(str(tmp_path / "damaged.keras"))
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(str(tmp_path / "missing.keras"))


def test_fine_tuning_starts_from_the_initial_model_and_keeps_its_transform(trained, dataset_path, tmp_path, caplog):
    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.training import info_spec, load_model, predict_rows, train

    initial, initial_info = load_model(trained.model_path)
    same = dict(crop_um=160, input_size=SMALL, batch_size=16, seed=1, verbose=0)
    # With a learning rate of 0 the fine-tuned network is the initial one, whatever the new split.
    with caplog.at_level(logging.WARNING):
        result = train(dataset_path, "fcn", "log", str(tmp_path / "tuned"), epochs=1, learning_rate=0.0,
                       initial_model=trained.model_path, **same)
    # Another seed, but the initial model's split: its crystals keep their subsets (a new split by the seed held
    # out crystals the initial weights had learnt), and the crystals those weights saw are recorded.
    assert "was trained on" not in caplog.text
    tuned, info = load_model(result.model_path)
    for name in ("train", "validation", "test"):
        assert info["split"][name] == initial_info["split"][name]
    assert info["split"]["trained_before"] == sorted(initial_info["split"]["train"])
    assert result.best_epoch == 0  # no epoch improved on the starting weights: they are kept
    assert not os.path.exists(tmp_path / "tuned" / "checkpoint.keras")
    assert info["transform"] == initial_info["transform"]
    assert info["training"]["initial_model"]["file"] == os.path.basename(trained.model_path)
    table = read_table(dataset_path)
    rows = np.arange(16)
    spec = info_spec(info)
    np.testing.assert_allclose(predict_rows(tuned, table, rows, spec), predict_rows(initial, table, rows, spec), atol=1e-5)
    # A given split that holds out crystals the initial weights learnt: said, and they are left out.
    from mxcube_autocenter.learning.split import Split

    own = initial_info["split"]
    learnt = set(own["train"])
    moved = own["train"][0]
    given = Split(tuple(c for c in own["train"] if c != moved), (*own["validation"], moved), tuple(own["test"]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = train(dataset_path, "fcn", "log", str(tmp_path / "given"), epochs=1, learning_rate=0.0, split=given,
                       initial_model=trained.model_path, **same)
    assert "crystals held out in the given split" in caplog.text and "left out of validation and test" in caplog.text
    assert not learnt & {*result.info["split"]["validation"], *result.info["split"]["test"]}
    with pytest.raises(ValueError, match="initial model has crop_um 160.0, not 200.0: train with crop_um=160.0; on the "
                       "command line --crop-um 160.0 \\(train-dense: a region set written with synthesize-regions"):
        train(dataset_path, "fcn", "log", str(tmp_path / "bad"), epochs=1, initial_model=trained.model_path,
              **dict(same, crop_um=200))
    with pytest.raises(ValueError, match="initial model has transform 'log', not 'tanh'"):
        train(dataset_path, "fcn", "tanh", str(tmp_path / "bad"), epochs=1, initial_model=trained.model_path, **same)


def test_fine_tuning_keeps_the_starting_weights_when_no_epoch_improves_on_them(tmp_path):
    import keras
    import tensorflow as tf

    from mxcube_autocenter.learning.training import fit_with_early_stopping

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")

    def fit(y_train, y_val, keep_start):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
        y_val = model.predict(x, verbose=0) if y_val is None else y_val
        start = model.get_weights()
        train_ds = tf.data.Dataset.from_tensor_slices((x, y_train)).batch(16)
        val_ds = tf.data.Dataset.from_tensor_slices((x, y_val)).batch(16)
        hist, _, _, best = fit_with_early_stopping(model, train_ds, val_ds, str(tmp_path), epochs=3, patience=1,
                                                   verbose=0, keep_start=keep_start)  # fmt: skip
        kept = all(np.array_equal(a, b) for a, b in zip(start, model.get_weights()))
        return hist, best, kept

    noise = (10 * rng.normal(size=(64, 1))).astype("float32")
    # The starting weights are exact on the validation set and training on noise only pulls them away.
    hist, best, kept = fit(noise, None, keep_start=True)
    assert min(hist["val_loss"]) > 0 and best == 0 and kept
    # Without keep_start (training from scratch) the least bad epoch is kept.
    hist, best, kept = fit(noise, None, keep_start=False)
    assert best >= 1 and not kept
    # Training that helps is kept.
    target = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype="float32"))[:, None]
    hist, best, kept = fit(target, target, keep_start=True)
    assert best >= 1 and not kept


def test_an_interrupted_training_leaves_a_checkpoint_that_becomes_a_model_file(dataset_path, tmp_path, monkeypatch):
    # Ctrl-C or a killed job after some epochs: checkpoint.keras had no metadata, and the fitted label transform
    # its outputs need was written nowhere.
    import keras

    from mxcube_autocenter.learning import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_model", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(dataset_path, "fcn", "log", str(out), crop_um=160, input_size=SMALL, epochs=2, batch_size=16,
                       verbose=0)
    with pytest.raises(training.ModelFileError, match="run.json beside it"):
        training.load_model(str(out / "checkpoint.keras"))
    info = json.loads((out / "run.json").read_text())
    assert info["transform"]["std"] > 0 and info["training"]["interrupted"].startswith("the training did not end")
    path = str(tmp_path / "recovered.keras")
    training.attach_info(keras.models.load_model(str(out / "checkpoint.keras")), info).save(path)
    assert training.load_model(path)[1]["transform"] == info["transform"]
    # Its history stays beside them under its running name: history.csv is the saved model's.
    assert (out / "history.part.csv").read_text().startswith("epoch,") and not (out / "history.csv").exists()
    monkeypatch.undo()
    # The next run into that folder would remove both: refused until they are moved (here: recovered already).
    with pytest.raises(training.ModelFileError, match="holds an interrupted training's best epoch .*move the two"):
        training.train(dataset_path, "fcn", "log", str(out), crop_um=160, input_size=SMALL, epochs=1, verbose=0)
    assert (out / "run.json").exists() and (out / "checkpoint.keras").exists()
    (out / "run.json").unlink()
    finished = training.train(dataset_path, "fcn", "log", str(out), crop_um=160, input_size=SMALL, epochs=1,
                              batch_size=16, verbose=0)
    assert os.path.exists(finished.model_path) and not (out / "run.json").exists()  # info.json says it all now
    # Nor may fine-tuning replace the model it starts from (--out defaults to out/model, where it may lie).
    before = Path(finished.model_path).read_bytes()
    with pytest.raises(training.ModelFileError, match="holds the initial model .*choose another --out"):
        training.train(dataset_path, None, None, str(out), initial_model=finished.model_path, epochs=1, verbose=0)
    assert Path(finished.model_path).read_bytes() == before
    history = (out / "history.csv").read_text()
    assert len(history.splitlines()) == 2 and not (out / "history.part.csv").exists()
    # A run that diverged has no epoch to make a model of: its run.json (which says how to) goes too, and its
    # history; the earlier run's model, info and history stay, together.
    with pytest.raises(ValueError, match="training diverged"):
        training.train(dataset_path, "fcn", "log", str(out), crop_um=160, input_size=SMALL, epochs=1,
                       batch_size=16, learning_rate=1e30, verbose=0)
    assert not (out / "run.json").exists() and not (out / "checkpoint.keras").exists()
    assert (out / "history.csv").read_text() == history and not (out / "history.part.csv").exists()
    assert Path(finished.model_path).read_bytes() == before
    with pytest.raises(ValueError, match="epochs = 0: give at least 1 epoch"):
        training.train(dataset_path, "fcn", "log", str(out), crop_um=160, input_size=SMALL, epochs=0, verbose=0)
    assert (out / "history.csv").read_text() == history and not (out / "run.json").exists()


def test_fine_tuning_a_network_that_is_not_its_architectures_is_refused_naming_the_file(tiny_model, dataset_path,
                                                                                         tmp_path):
    # An fcn network whose metadata names fcn_gap (a file written before an architecture changed) ended in a bare
    # Keras error: "Layer fcn_gap weight shape (64, 32) is not compatible with provided weight shape (1, 1, 64, 32)".
    import keras

    from mxcube_autocenter.learning import training

    model, info = training.load_model(tiny_model)
    renamed = str(tmp_path / "renamed.keras")
    described = {**info["architecture"], "name": "fcn_gap"}
    training.attach_info(keras.models.clone_model(model), {**info, "architecture": described}).save(renamed)
    with pytest.raises(training.ModelFileError, match=r"renamed\.keras: its network is not the fcn_gap network "
                                                      r"this version builds .*Use the mxcube_autocenter version"):
        training.train(dataset_path, None, None, str(tmp_path / "out"), initial_model=renamed, epochs=1, verbose=0)


def test_a_training_run_that_diverges_is_refused_not_saved_with_nan_weights(tmp_path):
    # Early stopping restores no weights when no epoch had a finite loss: the NaN ones were saved as the model,
    # which loaded and gave heatmaps of NaN.
    import keras
    import tensorflow as tf

    from mxcube_autocenter.learning.training import fit_with_early_stopping

    x = np.random.default_rng(0).random((64, 4)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True))).batch(16)

    def diverging():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(1e30), loss="mse")
        return model

    with pytest.raises(ValueError, match=r"training diverged \(val_loss per epoch: \[nan.*lower learning rate"):
        fit_with_early_stopping(diverging(), ds, ds, str(tmp_path), epochs=3, patience=1, verbose=0)
    # Nor is a NaN epoch checkpointed (Keras saved the first epoch whatever its loss), for attach_info to revive.
    assert not (tmp_path / "checkpoint.keras").exists()
    # Fine-tuning falls back on its starting weights, as when no epoch improves on them.
    model = diverging()
    start = model.get_weights()
    _, _, _, best = fit_with_early_stopping(model, ds, ds, str(tmp_path), epochs=3, patience=1, verbose=0,
                                            keep_start=True)
    assert best == 0 and all(np.array_equal(a, b) for a, b in zip(start, model.get_weights()))


def test_a_checkpoint_save_cut_short_leaves_the_last_best_epoch_whole(tmp_path):
    # Keras wrote checkpoint.keras in place: a Ctrl-C or a full disk during an epoch's save emptied the best epoch
    # before it, the one run.json promises to recover.
    import keras
    import tensorflow as tf

    from mxcube_autocenter.learning.training import fit_with_early_stopping

    x = np.random.default_rng(0).random((64, 4)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True))).batch(16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    real_save, saves = model.save, []

    def cut_short(path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 1:
            return real_save(path, *args, **kwargs)
        with open(path, "wb") as f:  # as Keras begins: the file truncated, then written
            f.write(b"PK")
        raise KeyboardInterrupt

    model.save = cut_short
    with pytest.raises(KeyboardInterrupt):
        fit_with_early_stopping(model, ds, ds, str(tmp_path), epochs=3, patience=3, verbose=0)
    assert len(saves) == 2
    assert keras.models.load_model(str(tmp_path / "checkpoint.keras")).count_params() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.keras", "history.part.csv"]


def test_no_checkpoint_of_an_earlier_run_stays_when_the_starting_weights_are_kept(tmp_path):
    import keras
    import tensorflow as tf

    from mxcube_autocenter.learning.training import fit_with_early_stopping

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.0), loss="mse")  # no step: no epoch beats the start
    ds = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(16)
    model.save(tmp_path / "checkpoint.keras")  # an earlier run's best epoch, in the same output folder
    _, _, _, best = fit_with_early_stopping(model, ds, ds, str(tmp_path), epochs=2, patience=1, verbose=0,
                                            keep_start=True)
    assert best == 0 and not (tmp_path / "checkpoint.keras").exists()


def test_fine_tuning_on_the_command_line_keeps_the_colour_and_normalisation_of_the_file(dataset_path, tmp_path, capsys):
    from mxcube_autocenter import cli
    from mxcube_autocenter.learning.training import load_model, train

    grey = train(dataset_path, "fcn", "log", str(tmp_path / "grey"), crop_um=160, input_size=SMALL, colour="grey",
                 normalisation="standardise", epochs=1, batch_size=16, verbose=0)
    args = ["train", dataset_path, "--initial-model", grey.model_path, "--out", str(tmp_path / "tuned"),
            "--epochs", "1", "--batch-size", "16"]
    assert cli.main(args) == 0, capsys.readouterr().err
    _, info = load_model(tmp_path / "tuned" / "model.keras")
    assert (info["input"]["colour"], info["input"]["normalisation"]) == ("grey", "standardise")


def test_fine_tuning_takes_smaller_steps_by_default():
    from mxcube_autocenter.learning.training import FINE_TUNE_LEARNING_RATE, LEARNING_RATE, learning_rate_for

    assert learning_rate_for(None, None) == LEARNING_RATE == 1e-3
    assert learning_rate_for(None, "shipped.keras") == FINE_TUNE_LEARNING_RATE == 1e-4
    assert learning_rate_for(3e-4, "shipped.keras") == 3e-4 and learning_rate_for(0.0, None) == 0.0
    from mxcube_autocenter.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "set.h5"]).learning_rate is None
    assert parser.parse_args(["train", "set.h5", "--learning-rate", "3e-4"]).learning_rate == 3e-4
    assert parser.parse_args(["train-dense", "regions.h5"]).learning_rate is None


def test_learning_commands_report_bad_input_without_a_traceback(dataset_path, tmp_path, capsys):
    from mxcube_autocenter import cli

    assert cli.main(["train", str(dataset_path), "--arch", "a11", "--out", str(tmp_path / "model")]) == 2
    assert "unknown architecture 'a11'" in capsys.readouterr().err
    missing = tmp_path / "missing.keras"
    assert cli.main(["evaluate", str(missing), str(dataset_path), "--out", str(tmp_path / "report")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "report").exists()  # a refused run leaves no empty report directory


@pytest.mark.parametrize("damage", ["nan crop", "negative crop", "scalar rc"])
def test_a_set_whose_crop_side_or_columns_are_damaged_is_named_as_damaged(dataset_path, tmp_path, damage):
    # A NaN side was read, trained on and written into info.json (no valid JSON); a negative one asked for a crop
    # "<= -5.0 um"; a scalar column ended in a bare IndexError.
    import shutil

    from mxcube_autocenter.labelling.dataset import DatasetError, read_table

    path = tmp_path / "bad.h5"
    shutil.copy(dataset_path, path)
    with h5py.File(path, "r+") as f:
        if damage == "scalar rc":
            del f["samples/rc"]
            f["samples/rc"] = 3.0
        else:
            f.attrs["stored_crop_um"] = np.nan if damage == "nan crop" else -5.0
    what = "/samples/rc holds one value, not one per row" if damage == "scalar rc" else "stored_crop_um reads"
    with pytest.raises(DatasetError, match=rf"{path}: {what}.*the file is damaged; write it again"):
        read_table(str(path))


@pytest.mark.parametrize("bad", [np.nan, -3.0])
def test_expected_counts_that_are_no_counts_are_refused_naming_the_column_and_row(dataset_path, tmp_path, bad):
    # Unchecked, a NaN read as a diverged training ("give a lower learning rate").
    import shutil

    from mxcube_autocenter.learning.training import train

    path = tmp_path / "bad.h5"
    shutil.copy(dataset_path, path)
    with h5py.File(path, "r+") as f:
        f["samples/rc_expected"][5] = bad
    with pytest.raises(ValueError, match=rf"{path}: rc_expected has 1 values that are not finite counts >= 0 "
                                         r"\(first at row 5: .*\): write the set again"):  # fmt: skip
        train(str(path), "fcn", "log", str(tmp_path / "model"), label="rc_expected", crop_um=160, input_size=SMALL,
              epochs=1, batch_size=32, seed=0, verbose=0)  # fmt: skip
    assert not (tmp_path / "model").exists()


def test_label_option_learns_the_expected_counts_and_is_recorded(dataset_path, tmp_path):
    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.training import load_model, train, train_classifier

    table = read_table(dataset_path)
    small = dict(crop_um=160, input_size=SMALL, epochs=1, batch_size=32, seed=0, verbose=0)
    result = train(dataset_path, "fcn", "log", str(tmp_path / "expected"), label="rc_expected", **small)
    _, info = load_model(result.model_path)
    assert info["label"] == "rc_expected" and info["training"]["label"] == "rc_expected"
    train_rows = Split.from_config(info["split"]).indices(table.crystal_id)["train"]
    fitted = get_transform("log").fit(table.extra["rc_expected"][train_rows])
    assert info["transform"] == fitted.to_config() != get_transform("log").fit(table.rc[train_rows]).to_config()
    assert "spearman_expected" in info["metrics"]["test"]

    clf = train_classifier(dataset_path, str(tmp_path / "clf"), label="rc_expected", arch="classifier", **small)
    assert clf.info["label"] == "rc_expected"
    assert 0 <= clf.metrics["test"]["accuracy_expected"] <= 1 and 0 <= clf.metrics["test"]["accuracy"] <= 1

    with pytest.raises(ValueError, match="label 'expected'.*rc_expected"):
        train(dataset_path, "fcn", "log", str(tmp_path / "bad"), label="expected", **small)
    recorded_only = str(tmp_path / "recorded_only.h5")
    make_rows_layout_file(recorded_only, dataset_path)
    with h5py.File(recorded_only, "a") as f:
        del f["rows/rc_expected"]
    with pytest.raises(ValueError, match="recorded_only.h5.*has none: use the label rc \(--label rc\)"):
        train(recorded_only, "fcn", "log", str(tmp_path / "none"), label="rc_expected", **small)


def test_a_point_is_on_ice_within_the_disc_a_ball_projects():
    from types import SimpleNamespace

    from mxcube_autocenter.geometry import centred_motors, sample_to_screen
    from mxcube_autocenter.learning.synthetic import on_ice_ball

    ball = (0.01, 0.02, 0.0, 0.015)  # (a, u, v) and radius, mm
    motors, ppmm, beam = centred_motors((0.0, 0.0, 0.0)), (1000.0, 1000.0), (640.0, 512.0)
    (centre,), _ = sample_to_screen([ball[:3]], motors, ppmm, beam)
    inside, edge, outside = centre + (0.0, 14.0), centre + (15.0, 0.0), centre + (0.0, 16.0)  # 15 px radius
    assert on_ice_ball(SimpleNamespace(ice=np.array([ball])), motors, ppmm, beam,
                       [centre, inside, edge, outside]).tolist() == [True, True, True, False]  # fmt: skip
    assert on_ice_ball(SimpleNamespace(ice=np.zeros((0, 4))), motors, ppmm, beam, [centre]).tolist() == [False]


def test_the_ice_network_learns_the_on_ice_flag_and_is_evaluated_against_it(tmp_path):
    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.evaluate import evaluate
    from mxcube_autocenter.learning.synthetic import synthetic_dataset
    from mxcube_autocenter.learning.training import load_model, train, train_classifier

    path = str(tmp_path / "ice.h5")
    synthetic_dataset(path, 8, 3, crops_per_sample=16, ice_fraction=1.0, line_fraction=0.1, ice_hit_fraction=0.5,
                      progress=False)  # fmt: skip
    small = dict(crop_um=80, input_size=SMALL, epochs=1, batch_size=16, seed=0, verbose=0)
    result = train_classifier(path, str(tmp_path / "ice"), label="on_ice", **small)
    _, info = load_model(result.model_path)
    # The flag is set at 1: the crystal threshold of 5 spots would have made every row "not on ice".
    assert info["label"] == "on_ice" and info["threshold"] == 1.0
    assert "accuracy_expected" not in info["metrics"]["test"]  # counts say nothing of ice
    report = evaluate(result.model_path, path, str(tmp_path / "report"), collections=1)
    table = read_table(path)
    rows = Split.from_config(info["split"]).indices(table.crystal_id)["test"]
    assert sum(report["confusion"][1]) == int(table.extra["on_ice"][rows].sum())  # the real positives: on ice
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| on ice share (on_ice >= 1) |" in text and "| real \\ predicted | not on ice | on ice |" in text

    with pytest.raises(ValueError, match="label 'on_ice' is a flag .* train a classifier"):
        train(path, "fcn", "log", str(tmp_path / "regressor"), label="on_ice", **small)
    # Nor does one start the other: its threshold of 1 would make a crystal of every spot.
    with pytest.raises(ValueError, match=r"ice/model\.keras: the initial model is a classifier of the label 'on_ice', "
                                         r"this one learns 'rc': give an initial classifier of counts \(rc or rc_expected\)"):  # fmt: skip
        train_classifier(path, str(tmp_path / "crystal_from_ice"), initial_model=result.model_path, **small)
    crystal = train_classifier(path, str(tmp_path / "crystal"), **small)
    with pytest.raises(ValueError, match="the initial model is a classifier of the label 'rc', this one learns "
                                         "'on_ice'"):  # fmt: skip
        train_classifier(path, str(tmp_path / "ice2"), label="on_ice", initial_model=crystal.model_path, **small)
    # Fine-tuned with nothing else given, an ice network keeps its own threshold.
    half = train_classifier(path, str(tmp_path / "ice_half"), label="on_ice", threshold=0.5, **small)
    tuned = train_classifier(path, str(tmp_path / "ice_tuned"), label="on_ice", initial_model=half.model_path,
                             **{**small, "crop_um": None, "input_size": None})  # fmt: skip
    assert load_model(tuned.model_path)[1]["threshold"] == 0.5
    with h5py.File(path, "a") as f:
        del f["samples/on_ice"]
    with pytest.raises(ValueError, match=r"ice.h5: the label on_ice needs .*the on_ice column .*write the set again"):
        train_classifier(path, str(tmp_path / "none"), label="on_ice", **small)


def test_a_views_positions_add_up_to_its_share_of_the_crops_per_sample():
    # Each kind rounded on its own, 3 positions with line and hit shares of 0.5 each made 4 rows.
    from mxcube_autocenter.learning.synthetic import position_counts

    assert position_counts(3, (0.5, 0.5, 0, 0, 0)) == (2, 1, 0, 0, 0, 0)
    # The shipped model's recipe (model card): 1 line, 1 on, 2 near, 3 anywhere in the region, 1 around the loop.
    assert position_counts(8, (0.1, 0.15, 0.2, 0.0, 0.4)) == (1, 1, 2, 0, 3, 1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        shares = rng.dirichlet(np.ones(6))[:5] * rng.uniform(0, 1)
        n = int(rng.integers(1, 40))
        assert sum(position_counts(n, tuple(shares))) == n


def test_position_kinds_of_a_synthetic_set(tmp_path):
    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    path = str(tmp_path / "near.h5")
    synthetic_dataset(path, 3, 11, crops_per_sample=20, omegas_per_sample=2, line_fraction=0.2, hit_fraction=0.2,
                      near_fraction=0.2, ice_hit_fraction=0.2, region_fraction=0.2, empty_fraction=0.0, ice_fraction=1.0,
                      progress=False)  # fmt: skip
    with h5py.File(path, "r") as f:
        kinds = f["samples/scan_type"].asstr()[()]
        expected = f["samples/rc_expected"][()]
        on_ice = f["samples/on_ice"][()]
    assert len(kinds) == 60
    assert [np.sum(kinds == f"synthetic-{kind}") for kind in ("hit", "near", "ice", "region")] == [12, 12, 12, 12]
    # The beam on a crystal counts; the region around the loop is mostly liquid, stem and background; ice
    # gives no reflections, so its crops count as what lies beside or behind the ball.
    assert np.median(expected[kinds == "synthetic-hit"]) > 5 > np.median(expected[kinds == "synthetic-region"])
    assert np.median(expected[kinds == "synthetic-ice"]) < 1
    # The ice network's label: the points put on a ball (a few clipped at the frame's edge or diffracting from a
    # crystal behind it aside), never one that diffracts.
    assert set(np.unique(on_ice)) <= {0.0, 1.0} and np.mean(on_ice[kinds == "synthetic-ice"]) > 0.8
    assert not on_ice[expected >= 5].any()
    with pytest.raises(ValueError, match="at most 1"):
        synthetic_dataset(path, 1, 0, line_fraction=0.5, hit_fraction=0.3, near_fraction=0.3, progress=False)


# ---------------------------------------------------------------- classifier, evaluation, sweep


def test_classifier_training_and_evaluation_reports(trained, dataset_path, tmp_path):
    from mxcube_autocenter.learning.evaluate import evaluate, sweep
    from mxcube_autocenter.learning.training import load_model, train_classifier

    result = train_classifier(dataset_path, str(tmp_path / "clf"), threshold=5, crop_um=160, input_size=SMALL,
                              epochs=3, batch_size=16, patience=2, seed=0, verbose=0)
    model, info = load_model(result.model_path)
    assert info["task"] == "classifier" and info["threshold"] == 5.0
    assert info["architecture"]["name"] == "classifier"
    assert model.output_shape == (None, 1)
    report = evaluate(result.model_path, dataset_path, str(tmp_path / "clf_report"), collections=1)
    assert sum(map(sum, report["confusion"])) == report["n"]
    assert report["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert os.path.exists(tmp_path / "clf_report" / "confusion.png")
    # Every test collection once, the errors shared out over them, the report listing the worst.
    by_scan = report["collections"]
    assert sum(c["crops"] for c in by_scan) == report["n"] and len({c["scan_id"] for c in by_scan}) == len(by_scan)
    wrong = report["confusion"][0][1] + report["confusion"][1][0]
    assert sum(c["crops"] * (1 - c["accuracy"]) for c in by_scan) == pytest.approx(wrong)
    if wrong:
        assert sum(c["share_of_error"] for c in by_scan) == pytest.approx(1.0)
    text = (tmp_path / "clf_report" / "report.md").read_text()
    low, high = report["accuracy_ci95"]
    assert 0 <= low <= high <= 1 and f"| accuracy | {report['accuracy']:.3f} ({low:.3f}-{high:.3f}) |" in text
    assert "resampling the subset's" in text
    # The note follows the table after a blank line: right after it, Markdown reads it as one more row.
    assert "|\nIn brackets" not in text and "|\n\nIn brackets" in text
    assert f"## error by collection (the 1 of {len(by_scan)} with the largest share)" in text
    assert f"| {by_scan[0]['scan_id']} |" in text

    out = tmp_path / "report"
    metrics = evaluate(trained.model_path, dataset_path, str(out))
    assert metrics["mse"] == pytest.approx(trained.metrics["test"]["mse"], rel=1e-4)
    assert -1 <= metrics["spearman"] <= 1 and -1 <= metrics["pearson"] <= 1
    assert metrics["spearman_ci95"] is None or -1 <= metrics["spearman_ci95"][0] <= metrics["spearman_ci95"][1] <= 1
    for name in ("report.md", "metrics.json", "scatter.png", "gallery_highest.png", "gallery_lowest.png",
                 "gallery_worst.png", "heatmaps.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "Spearman" in text and "![scatter](scatter.png)" in text and "![heatmaps](heatmaps.png)" in text
    by_scan = metrics["collections"]
    assert sum(c["crops"] * c["mse"] for c in by_scan) / metrics["n"] == pytest.approx(metrics["mse"], rel=1e-4)
    assert [c["share_of_error"] for c in by_scan] == sorted((c["share_of_error"] for c in by_scan), reverse=True)
    assert "| median real count | median predicted count | spearman | mse | share of error |" in text
    with pytest.raises(ValueError, match="subset"):
        evaluate(trained.model_path, dataset_path, str(out), subset="holdout")
    # A set stored with smaller crops than the model's: refused before the report folder is made.
    import shutil

    from mxcube_autocenter.labelling.dataset import DatasetError

    narrow = tmp_path / "narrow.h5"
    shutil.copy(dataset_path, narrow)
    with h5py.File(narrow, "r+") as f:
        f.attrs["stored_crop_um"] = 120.0
    with pytest.raises(DatasetError, match=r"narrow.h5: .*model.keras needs crops of 160 um and this set stores 120 "
                                           r"um around the beam: evaluate it on a set stored with at least 160 um"):
        evaluate(trained.model_path, str(narrow), str(tmp_path / "narrow_report"))
    assert not (tmp_path / "narrow_report").exists()
    # A damaged row is refused before any is predicted: inside tf.data, its error left the program hanging or
    # aborting at its exit.
    damaged = tmp_path / "damaged.h5"
    for row, damage in ((7, lambda jpeg: b"\xff\xd8" + bytes(100)), (9, lambda jpeg: jpeg[: len(jpeg) // 2])):
        shutil.copy(dataset_path, damaged)
        with h5py.File(damaged, "r+") as f:
            f["samples/image"][row] = np.frombuffer(damage(f["samples/image"][row].tobytes()), np.uint8)
        with pytest.raises(DatasetError, match=rf"damaged.h5: row {row}: its stored image is no readable JPEG image: "
                                               r"the file is damaged; write it again"):  # fmt: skip
            evaluate(trained.model_path, str(damaged), str(tmp_path / "damaged_report"), subset="all")
        assert not (tmp_path / "damaged_report").exists()

    table = sweep(dataset_path, str(tmp_path / "sweep"), archs=("a1",), transforms=("vanilla", "tanh"),
                  crop_um=160, input_size=SMALL, epochs=1, batch_size=32, verbose=0)
    assert set(table["a1"]) == {"vanilla", "tanh"}
    text = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| architecture | vanilla | tanh |" in text and "| a1 |" in text
    assert "crystals" in text and "the same for every model" in text


def test_crystal_interval_resamples_whole_crystals():
    from mxcube_autocenter.learning.evaluate import crystal_interval

    def accuracy(correct):
        return lambda rows: float(np.mean(correct[rows]))

    # Two crystals, one always right, one always wrong: 50 % of the rows right, but a new draw of two crystals
    # could be both right or both wrong, and the interval says so; resampling rows would give about 0.43-0.57.
    crystals = np.repeat(["a", "b"], 100)
    low, high = crystal_interval(crystals, accuracy(np.repeat([1.0, 0.0], 100)))
    assert (low, high) == (0.0, 1.0)
    # Every crystal alike: no spread.
    crystals = np.repeat(["a", "b", "c", "d"], 10)
    assert crystal_interval(crystals, accuracy(np.tile([1.0, 0.0], 20))) == (0.5, 0.5)
    # Reproducible, and nothing to resample with one crystal or a statistic mostly undefined.
    spread = np.repeat([1.0, 0.9, 0.6, 0.8], 10)
    assert crystal_interval(crystals, accuracy(spread)) == crystal_interval(crystals, accuracy(spread))
    assert crystal_interval(["a"] * 5, accuracy(np.ones(5))) is None
    assert crystal_interval(crystals, lambda rows: None) is None


def test_collection_shares_rank_the_collections_by_their_part_of_the_loss():
    from mxcube_autocenter.learning.evaluate import collection_shares

    scans = np.array(["a", "b", "a", "c", "b", "a"])
    groups = collection_shares(scans, [0.0, 1.0, 0.0, 0.0, 2.0, 1.0])
    assert [g[0] for g in groups] == ["b", "a", "c"]
    assert [list(g[1]) for g in groups] == [[1, 4], [0, 2, 5], [3]]
    assert [g[2] for g in groups] == pytest.approx([0.75, 0.25, 0.0])
    # No loss at all: every share 0, in the order the collections first appear.
    assert [(g[0], g[2]) for g in collection_shares(scans, np.zeros(6))] == [("a", 0.0), ("b", 0.0), ("c", 0.0)]


def test_fcn_classifier_starts_from_an_fcn_regressor(trained, dataset_path, tmp_path):
    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning.training import info_spec, info_transform, load_model, predict_rows, train_classifier

    regressor, regressor_info = load_model(trained.model_path)
    same = dict(crop_um=160, input_size=SMALL, batch_size=16, seed=0, verbose=0)
    # With a learning rate of 0 the classifier is the regressor's prediction read against the threshold.
    result = train_classifier(dataset_path, str(tmp_path / "clf"), arch="fcn_classifier", threshold=5, epochs=1,
                              learning_rate=0.0, initial_model=trained.model_path, **same)
    classifier, info = load_model(result.model_path)
    assert info["task"] == "classifier" and info["architecture"]["name"] == "fcn_classifier"
    assert info["training"]["initial_model"]["task"] == "regression"
    table = read_table(dataset_path)
    rows = np.arange(len(table.rc))
    counts = info_transform(regressor_info).inverse(predict_rows(regressor, table, rows, info_spec(regressor_info)))
    probability = predict_rows(classifier, table, rows, info_spec(info))
    clear = np.abs(np.log1p(counts) - np.log1p(5.0)) > 1e-3  # float32 rounding decides at the threshold itself
    assert clear.mean() > 0.9 and 0 < (counts >= 5).mean() < 1
    np.testing.assert_array_equal((probability >= 0.5)[clear], (counts >= 5)[clear])

    # The command line keeps the classifier's architecture and takes the regressor's input.
    from mxcube_autocenter.cli import main

    assert main(["train", dataset_path, "--arch", "fcn_classifier", "--initial-model", trained.model_path,
                 "--epochs", "1", "--out", str(tmp_path / "cli")]) == 0
    _, cli_info = load_model(str(tmp_path / "cli" / "model.keras"))
    assert cli_info["architecture"]["name"] == "fcn_classifier" and cli_info["threshold"] == 5.0
    assert (cli_info["input"]["crop_um"], cli_info["input"]["input_size"]) == (160, SMALL)

    with pytest.raises(ValueError, match="initial model has crop_um 160.0, not 200.0"):
        train_classifier(dataset_path, str(tmp_path / "bad"), arch="fcn_classifier", epochs=1,
                         initial_model=trained.model_path, **dict(same, crop_um=200))
    with pytest.raises(ValueError, match="initial model has task 'regression' and architecture 'fcn', not "
                                         "'classifier' and 'classifier': give an initial classifier 'classifier' "
                                         "model, or none"):  # fmt: skip
        train_classifier(dataset_path, str(tmp_path / "bad"), arch="classifier", epochs=1,
                         initial_model=trained.model_path, **same)


# ---------------------------------------------------------------- review: evaluation figures


def _captured_scatter(real, pred, monkeypatch):
    import matplotlib.pyplot as plt

    from mxcube_autocenter.learning import evaluate as ev

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    ev._scatter(os.devnull, real, pred, "t")
    return figures[0].axes[0]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_scatter_shows_every_prediction_negative_ones_too(name, monkeypatch):
    # A vanilla or tanh model predicts negative counts, a log one counts down to -1: all must be on the plot.
    rng = np.random.default_rng(0)
    rc = np.where(rng.random(500) < 0.5, 0, rng.poisson(20, 500)).astype(float)
    t = get_transform(name).fit(rc)
    pred = t.inverse(t.forward(rc) + rng.normal(0, 0.5, rc.size))
    assert pred.min() < -0.5
    ax = _captured_scatter(rc, pred, monkeypatch)
    lo, hi = ax.get_ylim()
    assert lo < pred.min() and hi > pred.max() and ax.get_xlim() == (lo, hi)
    (x, y), = [line.get_data() for line in ax.get_lines()]  # x = y spans the points
    assert np.array_equal(x, y) and x[0] <= pred.min() and x[-1] >= max(rc.max(), pred.max())


def test_scatter_of_non_finite_predictions_does_not_fail(monkeypatch):
    ax = _captured_scatter(np.array([0.0, 3.0, 10.0]), np.array([1.0, np.inf, 2.0]), monkeypatch)
    assert np.all(np.isfinite(ax.get_ylim()))


def test_balanced_accuracy_needs_both_classes():
    from mxcube_autocenter.learning.training import classifier_metrics

    # A constant "crystal" classifier on a subset of crystal crops only: its balanced accuracy is unknown, not 1.
    only_crystals = classifier_metrics([1, 1, 1, 1], [0.9, 0.8, 0.7, 0.6])
    assert only_crystals["balanced_accuracy"] is None
    assert only_crystals["recall_crystal"] == 1.0 and only_crystals["recall_empty"] is None
    m = classifier_metrics([0, 0, 0, 1, 1], [0.1, 0.9, 0.2, 0.8, 0.3])
    assert m["confusion"] == [[2, 1], [1, 1]]  # rows real (empty, crystal), columns predicted
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_gallery_marks_the_beam_where_the_crop_puts_it():
    # crop_uint8 maps the beam to the crop's middle, output pixel coordinate (n - 1) / 2: the gallery's cross
    # must be there.
    image = np.zeros((200, 200, 3), np.uint8)
    image[100, 100] = 255
    for n in (32, 33, 64):
        spec = crops.CropSpec(crop_um=100, input_size=n)
        crop = crops.crop_uint8(image, (100.0, 100.0), (10.0 * n, 10.0 * n), spec)[..., 0].astype(float)  # 1:1
        ys, xs = np.indices(crop.shape)
        assert (xs * crop).sum() / crop.sum() == pytest.approx((n - 1) / 2, abs=1e-6)
    import inspect

    from mxcube_autocenter.learning import evaluate as ev

    assert "c = crops.crop_middle(spec.input_size)\n" in inspect.getsource(ev._gallery)


def test_a_crop_is_centred_on_its_point_so_that_every_flip_and_turn_keeps_it():
    # The dihedral augmentation turns a crop and keeps its label: the label's point must be the crop's middle,
    # the one point every flip and quarter turn keeps. On n / 2 a flip moved it by a model pixel (0.94 um of a
    # 240 um crop at 128 px) and a model trained on all eight learnt the middle, half a pixel off its label.
    from mxcube_autocenter.learning.augment import dihedral_np

    ys, xs = np.mgrid[0:300, 0:300]
    disc = np.where((xs - 150) ** 2 + (ys - 140) ** 2 <= 12**2, 40, 220).astype(np.uint8)
    frame = np.repeat(disc[..., None], 3, axis=-1)
    for n, side_px in ((32, 64.0), (32, 48.0), (33, 66.0), (33, 33.0)):  # sampled exactly (OpenCV: 1/32 px)
        spec = crops.CropSpec(crop_um=side_px, input_size=n)
        crop = crops.crop_uint8(frame, (150.0, 140.0), (1000.0, 1000.0), spec).astype(int)
        for k in range(8):
            assert np.abs(dihedral_np(crop, k) - crop).max() <= 1, (n, side_px, k)


def test_sweep_report_names_its_shared_test_subset(tmp_path):
    from mxcube_autocenter.learning.evaluate import _write_sweep

    split = {"train": ["a", "b", "c"], "validation": ["d"], "test": ["e", "f"], "seed": 0,
             "rows": {"train": 30, "validation": 10, "test": 20}}
    table = {"a1": {"vanilla": {"mse": 0.5, "spearman": 0.7}}}
    _write_sweep(str(tmp_path), table, ("vanilla",), "set.h5", {"label": "rc_expected"}, split)
    text = (tmp_path / "sweep.md").read_text()
    assert "test subset: 20 crops of 2 crystals" in text and "the same for every model" in text
    assert "transformed targets of the rc_expected counts" in text
    assert json.loads((tmp_path / "sweep.json").read_text()) == table


def test_interval_note_ends_the_table_and_appears_only_with_an_interval():
    from mxcube_autocenter.learning.evaluate import interval_note

    table = ["| metric | value |", "|---|---|", "| Spearman | 0.800 (0.600-0.900) |"]
    text = "\n".join(table + interval_note(["a", "b", "a"], (0.6, 0.9), None))
    assert "|\n\nIn brackets: the 95 % interval from resampling the subset's 2 crystals" in text
    # One test crystal: no interval, so no figure in brackets and no note about them.
    assert interval_note(["a", "a"], None, None) == [""]


def _captured_heatmaps(dataset_path, rows, monkeypatch, grid=15):
    """The figure of ``evaluate._heatmaps`` over ``rows`` (one crystal each), a model giving each crop's mean."""
    import matplotlib.pyplot as plt

    from mxcube_autocenter.labelling.dataset import read_table
    from mxcube_autocenter.learning import evaluate as ev

    table = read_table(dataset_path)
    spec = crops.CropSpec(crop_um=160, input_size=SMALL)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    model = lambda x, training=False: np.mean(np.asarray(x), axis=(1, 2, 3))[:, None]  # noqa: E731
    assert ev._heatmaps(os.devnull, model, spec, table, np.asarray(rows), np.ones(len(rows)), lambda v: v, grid=grid)
    return table, spec, figures[0].axes


def test_each_heatmap_is_drawn_over_its_own_grid(dataset_path, monkeypatch):
    # Rows of other zooms store images of other sizes, so each panel's grid has its own step: the overlay of
    # every panel must be centred on its own grid points (it took the last panel's step for all of them).
    from mxcube_autocenter.labelling.dataset import read_table

    table = read_table(dataset_path)
    small = int(np.argmin(table.pixels_per_mm[:, 0]))
    other = np.flatnonzero(table.crystal_id != table.crystal_id[small])
    large = int(other[np.argmax(table.pixels_per_mm[other, 0])])
    assert table.pixels_per_mm[large, 0] > 2 * table.pixels_per_mm[small, 0]
    grid = 15
    table, spec, axes = _captured_heatmaps(dataset_path, [small, large], monkeypatch, grid=grid)
    for ax, i in zip(axes, (small, large)):
        height, width = ax.get_images()[0].get_array().shape[:2]
        crop_w, crop_h = crops.crop_side_px(spec.crop_um, table.pixels_per_mm[i])
        xs = np.linspace(np.ceil(crop_w / 2), int(width - crop_w / 2), grid)
        ys = np.linspace(np.ceil(crop_h / 2), int(height - crop_h / 2), grid)
        left, right, bottom, top = ax.get_images()[1].get_extent()
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        # Within a model pixel: each point is placed at the crop it evaluated, on the region's pixels.
        pixel = crop_w / spec.input_size
        assert (left, right) == pytest.approx((xs[0] - dx / 2, xs[-1] + dx / 2), abs=pixel)
        assert (top, bottom) == pytest.approx((ys[0] - dy / 2, ys[-1] + dy / 2), abs=pixel)


def test_fine_tuning_on_a_set_of_smaller_crops_names_the_initial_model_and_both_ways_out(trained, dataset_path,
                                                                                        tmp_path):
    # "choose crop_um <= 120" led to "the initial model has crop_um 160, not 120": advice in a circle.
    import shutil

    from mxcube_autocenter.labelling.dataset import DatasetError
    from mxcube_autocenter.learning.training import train

    narrow = tmp_path / "narrow.h5"
    shutil.copy(dataset_path, narrow)
    with h5py.File(narrow, "r+") as f:
        f.attrs["stored_crop_um"] = 120.0
    with pytest.raises(DatasetError, match=rf"narrow.h5: {re.escape(trained.model_path)} needs crops of 160 um and "
                                           r"this set stores 120 um around the beam: fine-tune it on a set stored "
                                           r"with at least 160 um, or train a new model with --crop-um 120 or less"):
        train(str(narrow), out=str(tmp_path / "tuned"), initial_model=trained.model_path, epochs=1, verbose=0)
    assert not (tmp_path / "tuned").exists()


def test_a_report_leaves_no_figure_of_an_earlier_report_in_its_directory(trained, dataset_path, tmp_path):
    # A classifier's confusion matrix, or galleries this run does not draw (gallery=0), left in the directory
    # would read as this regressor's figures; files that are not the report's stay.
    from mxcube_autocenter.learning.evaluate import evaluate

    for name in ("confusion.png", "gallery_misclassified.png", "gallery_highest.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"earlier")
    metrics = evaluate(trained.model_path, dataset_path, str(tmp_path), gallery=0)
    assert set(metrics["figures"]) == {"scatter", "heatmaps"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmaps.png", "metrics.json", "notes.txt", "report.md",
                                                          "scatter.png"]


def test_a_report_that_cannot_be_written_leaves_the_earlier_one_whole(trained, dataset_path, tmp_path):
    # Each figure was written over the last report's in place: on a full disk, the scatter plot was cut short and
    # the earlier report linked a broken image. /dev/full refuses each write with ENOSPC, as a full disk does.
    import errno

    from mxcube_autocenter.learning.evaluate import evaluate

    evaluate(trained.model_path, dataset_path, str(tmp_path), gallery=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "scatter.png.part").symlink_to("/dev/full")
    with pytest.raises(OSError) as raised:
        evaluate(trained.model_path, dataset_path, str(tmp_path), gallery=0)
    assert raised.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _fake_train(calls, failing=()):
    """A stand-in for training.train: every combination on one split, those in ``failing`` raising."""
    from types import SimpleNamespace

    split = {"train": ["a", "b", "c"], "validation": ["d"], "test": ["e", "f"], "seed": 0,
             "rows": {"train": 30, "validation": 10, "test": 20}}

    def train(dataset_path, arch, transform, out, **kwargs):
        calls.append((arch, transform))
        if (arch, transform) in failing:
            raise RuntimeError(f"{arch}-{transform} ran out of memory\nthe rest of a long message")
        os.makedirs(out, exist_ok=True)
        return SimpleNamespace(info={"split": split}, metrics={"test": {"mse": 0.5, "spearman": 0.7}}, seconds=1.0,
                               best_epoch=1, model_path=os.path.join(out, "model.keras"))

    return train


def test_a_failed_sweep_combination_is_reported_and_the_others_still_trained(tmp_path, monkeypatch):
    from mxcube_autocenter.cli import main
    from mxcube_autocenter.learning import evaluate as ev

    calls = []
    monkeypatch.setattr(ev, "train", _fake_train(calls, failing={("a1", "log")}))
    table = ev.sweep("set.h5", str(tmp_path / "s"), archs=("a1", "a2"), transforms=("vanilla", "log"))
    assert calls == [("a1", "vanilla"), ("a1", "log"), ("a2", "vanilla"), ("a2", "log")]
    assert table["a1"]["log"] == {"error": "RuntimeError: a1-log ran out of memory"}
    assert table["a2"]["log"]["mse"] == 0.5 and ev.sweep_failures(table) == {"a1-log": table["a1"]["log"]["error"]}
    text = (tmp_path / "s" / "sweep.md").read_text()
    assert "| a1 | 0.5000 | failed |" in text and "| a2 | 0.5000 | 0.5000 |" in text
    assert "- a1-log: RuntimeError: a1-log ran out of memory" in text
    assert json.loads((tmp_path / "s" / "sweep.json").read_text()) == table
    # The command line names the failure and says the sweep is incomplete.
    assert main(["sweep", "set.h5", "--out", str(tmp_path / "cli"), "--archs", "a1"]) == 1
    assert "| a1 | 0.5000 | failed | 0.5000 |" in (tmp_path / "cli" / "sweep.md").read_text()


def test_a_sweep_refuses_wrong_names_before_training_and_raises_when_nothing_trains(tmp_path, monkeypatch):
    from mxcube_autocenter.learning import evaluate as ev

    calls = []
    monkeypatch.setattr(ev, "train", _fake_train(calls, failing={("a1", "vanilla"), ("a1", "log")}))
    for archs, transforms in ((("a1", "a11"), ("log",)), (("a1", "classifier"), ("log",)), (("a1",), ("sqrt",))):
        with pytest.raises(ValueError):
            ev.sweep("set.h5", str(tmp_path / "s"), archs=archs, transforms=transforms)
    # The ice flag failed each combination in turn, then advised a classifier, which a sweep refuses.
    with pytest.raises(ValueError, match="label 'on_ice': a sweep trains regressors of a count, rc or rc_expected; "
                                         "learn a flag with train --arch classifier"):  # fmt: skip
        ev.sweep("set.h5", str(tmp_path / "s"), archs=("a1",), transforms=("log",), label="on_ice")
    assert calls == []
    with pytest.raises(RuntimeError, match="a1-vanilla ran out of memory"):
        ev.sweep("set.h5", str(tmp_path / "s"), archs=("a1", "a1"), transforms=("vanilla", "log"))
    assert calls == [("a1", "vanilla"), ("a1", "log")] and not (tmp_path / "s").exists()


def test_the_measurement_refuses_a_dataset_file_that_is_not_there(tmp_path):
    # A mistyped --dataset was filled with a newly generated synthetic set and measured as if it were the one given.
    from mxcube_autocenter.learning.experiment import run

    missing = tmp_path / "sets" / "mistyped.h5"
    with pytest.raises(FileNotFoundError, match="mistyped.h5: no such dataset file"):
        run(str(tmp_path / "out"), dataset=str(missing), n_samples=2, crops_per_sample=2, epochs=1)
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_a_report_on_crystals_the_model_was_trained_on_says_so(trained, dataset_path, tmp_path):
    # subset="all" on the training set: the figures read too high, and the report (not only a log) must say so.
    from mxcube_autocenter.learning.evaluate import evaluate

    metrics = evaluate(trained.model_path, dataset_path, str(tmp_path / "all"), subset="all", gallery=0)
    seen = metrics["rows_of_training_crystals"]
    assert 0 < seen < metrics["n"]
    text = (tmp_path / "all" / "report.md").read_text()
    assert f"- **{seen} of these {metrics['n']} crops are of crystals the model was trained on**" in text
    evaluate(trained.model_path, dataset_path, str(tmp_path / "test"), gallery=0)
    assert "trained on**" not in (tmp_path / "test" / "report.md").read_text()


def test_a_sweep_on_a_file_that_is_no_dataset_stops_at_once_with_one_error(tmp_path, monkeypatch, caplog):
    # Every combination failed on the dataset in turn, each logging its traceback (30 with the default
    # names) before the error; an --out under a file came out as a bare "[Errno 20] Not a directory".
    from mxcube_autocenter import cli
    from mxcube_autocenter.labelling.dataset import DatasetError
    from mxcube_autocenter.learning import evaluate as ev

    calls = []

    def train(dataset_path, arch, transform, out, **kwargs):
        calls.append((arch, transform))
        raise DatasetError(f"{dataset_path}: a camera recording, not a dataset: label it first")

    monkeypatch.setattr(ev, "train", train)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(DatasetError, match="a camera recording"):
            ev.sweep("x_camera.h5", str(tmp_path / "s"), archs=("a1", "a2"), transforms=("vanilla", "log"))
    assert calls == [("a1", "vanilla")] and not caplog.records and not (tmp_path / "s").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="a_file is a file, not a folder: choose another --out"):
        ev.sweep("set.h5", str(tmp_path / "a_file" / "s"), archs=("a1",))
    assert calls == [("a1", "vanilla")]
    assert cli.main(["sweep", "x_camera.h5", "--out", str(tmp_path / "s"), "--archs", "a1"]) == 2


def test_a_sweep_stops_at_the_first_row_that_does_not_decode(tmp_path, caplog):
    # A JPEG whose markers are whole but whose Huffman table is not passes the check before training and fails
    # only inside tf.data, which wraps the error as its own: every combination failed in turn, each with its
    # traceback, and left an empty folder.
    from mxcube_autocenter.labelling.dataset import DatasetError
    from mxcube_autocenter.learning import evaluate as ev
    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    import shutil

    path, everywhere = tmp_path / "set.h5", tmp_path / "everywhere.h5"
    synthetic_dataset(path, n_samples=5, seed=1, crops_per_sample=4, stored_crop_um=240, progress=False)
    shutil.copy(path, everywhere)
    for damaged, rows in ((path, [0]), (everywhere, range(20))):
        with h5py.File(damaged, "r+") as h5file:
            for row in rows:
                jpeg = bytearray(h5file["samples/image"][row].tobytes())
                table = jpeg.index(b"\xff\xc4") + 5  # a Huffman table's 16 code counts, now summing to 240 codes
                jpeg[table : table + 16] = bytes([15] * 16)
                h5file["samples/image"][row] = np.frombuffer(bytes(jpeg), np.uint8)

    def sweep(dataset, out):
        ev.sweep(str(dataset), str(out), archs=("a1", "a2"), transforms=("log",), input_size=32, crop_um=120,
                 epochs=1, batch_size=4, cache="none", verbose=0)  # fmt: skip

    with caplog.at_level(logging.ERROR), pytest.raises(DatasetError, match=f"{path}: row 0: "):
        sweep(path, tmp_path / "s")
    assert not caplog.records
    # Failed before its first epoch ended, a training leaves no empty folder (after one, its checkpoint stays).
    with pytest.raises(DatasetError, match=f"{everywhere}: row "):
        sweep(everywhere, tmp_path / "s2")
    assert not (tmp_path / "s2").exists()


@pytest.mark.parametrize("problem", ["one crystal", "no rc_expected"])
def test_a_sweep_on_a_dataset_no_model_can_learn_from_stops_at_once_with_one_error(tmp_path, caplog, problem):
    # Too few crystals or a missing label column failed every combination in turn, each with its traceback.
    from mxcube_autocenter.labelling.dataset import DatasetError
    from mxcube_autocenter.learning import evaluate as ev
    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    path = tmp_path / "set.h5"
    synthetic_dataset(path, n_samples=1 if problem == "one crystal" else 5, seed=1, crops_per_sample=4,
                      stored_crop_um=240, progress=False)  # fmt: skip
    if problem == "no rc_expected":
        with h5py.File(path, "r+") as h5file:
            del h5file["samples/rc_expected"]
    with caplog.at_level(logging.ERROR), pytest.raises(DatasetError, match="crystals|rc_expected"):
        ev.sweep(str(path), str(tmp_path / "s"), archs=("a1", "a2"), transforms=("vanilla", "log"), input_size=32,
                 crop_um=120, label="rc" if problem == "one crystal" else "rc_expected")  # fmt: skip
    assert not caplog.records and not (tmp_path / "s").exists()


def test_a_model_save_cut_short_leaves_the_last_runs_model_whole(tmp_path, monkeypatch):
    # Keras writes model.keras in place: a full disk or Ctrl-C during the save emptied the last run's model.
    import keras
    import tensorflow as tf

    from mxcube_autocenter.learning.training import save_model

    (tmp_path / "model.keras").write_bytes(b"the last run's model")
    (tmp_path / "info.json").write_text("the last run's metadata")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])

    def save_until_the_disk_is_full(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(keras.Model, "save", save_until_the_disk_is_full)
        with pytest.raises(OSError, match="No space left"):
            save_model(model, {"task": "regression"}, str(tmp_path), str(tmp_path), tf.distribute.get_strategy())
    assert (tmp_path / "model.keras").read_bytes() == b"the last run's model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json", "model.keras"]
    final, path = save_model(model, {"task": "regression"}, str(tmp_path), str(tmp_path), tf.distribute.get_strategy())
    assert path == str(tmp_path / "model.keras") and keras.saving.load_model(path).count_params() == 5
    assert json.loads((tmp_path / "info.json").read_text()) == {"task": "regression"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json", "model.keras"]


def test_a_region_set_or_an_eiger_file_given_as_a_dataset_is_named_with_the_command_to_use(tmp_path):
    # A region set said only "no group '/samples' (nor the labelling code's '/rows' ...)", an EIGER master
    # file "no root attribute 'format_version'".
    from mxcube_autocenter.labelling.dataset import DatasetError, read_table

    with h5py.File(tmp_path / "regions.h5", "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["format"] = "mxcube_autocenter.regions"
        f.create_group("regions")
    with h5py.File(tmp_path / "x_master.h5", "w") as f:
        f.create_group("entry")
    with pytest.raises(DatasetError, match="regions.h5: a region set .* with `mxcube-autocenter train-dense`"):
        read_table(tmp_path / "regions.h5")
    with pytest.raises(DatasetError, match="x_master.h5: an EIGER .* label the collection's camera recordings"):
        read_table(tmp_path / "x_master.h5")


def test_a_run_into_a_folder_with_a_model_says_the_model_there_is_the_earlier_runs(tmp_path, monkeypatch, caplog):
    # An interrupted rerun left the earlier run's model.keras beside this run's history and run.json, unsaid.
    from mxcube_autocenter.learning import training

    (tmp_path / "model.keras").write_bytes(b"an earlier run's")
    monkeypatch.setattr(training, "fit_with_early_stopping", lambda *args, **kwargs: "fitted")
    with caplog.at_level("WARNING"):
        assert training.fit_leaving_run_info(None, None, None, str(tmp_path), str(tmp_path), None, {}) == "fitted"
    assert f"{tmp_path / 'model.keras'} is an earlier run's model: it stays until this run ends" in caplog.text
