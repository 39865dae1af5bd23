"""Dense training: region sets from the virtual beamline and the fcn trained on every grid crop at once.

Regions are small (32-pixel model input, 5 x 5 grid crops), so the file runs
in well under a minute on two cores.
"""

import os
import re
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mxcube_autocenter.learning import dense  # noqa: E402
from tests.helpers import GROUP_SIGNATURES, damaged_copy  # noqa: E402

SMALL = 32
CELLS = 5


@pytest.fixture(scope="module")
def regions_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "regions.h5"
    dense.synthetic_regions(path, 12, seed=3, views_per_sample=2, regions_per_view=2, cells=CELLS, crop_um=160,
                            input_size=SMALL, crystal_fraction=0.8, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def trained(regions_path, tmp_path_factory):
    return dense.train_dense(regions_path, tmp_path_factory.mktemp("dense_model"), epochs=6, batch_size=8,
                             patience=3, seed=0, verbose=0)


MIRRORED = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mxcube_autocenter.learning.dense import train_dense
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    try:
        train_dense(sys.argv[1], sys.argv[2], epochs=1, batch_size=int(sys.argv[3]), strategy=strategy, verbose=0)
    except ValueError as err:
        print("CLEAR:", err)
        sys.exit(3)
    print("TRAINED")
""")


@pytest.mark.parametrize("batch_size, outcome", [(7, "CLEAR: batch_size 7 does not split"), (64, "TRAINED")])
def test_dense_training_batches_split_over_mirrored_replicas(regions_path, tmp_path, batch_size, outcome):
    """Two replicas: batch 7 is refused with the fix; 64, more than the small subsets hold, still trains.

    Keras builds the model on the replicas' first batch averaged across them, which fails in TensorFlow's AddN
    when the shards differ in size.
    """
    run = subprocess.run([sys.executable, "-c", MIRRORED, regions_path, str(tmp_path / "m"), str(batch_size)],
                         capture_output=True, text=True, timeout=300)
    assert "AddN" not in run.stderr, run.stderr[-600:]
    assert outcome in run.stdout, run.stdout + run.stderr[-600:]


def test_grid_centres_are_the_centres_of_the_crops_a_dense_output_sees():
    # Dense output (i, j) is the crop whose top-left corner is at model pixel (16 j, 16 i).
    origin, scale = (10.5, -20.25), 0.5
    centres = dense.grid_centres(origin, scale, 3, SMALL)
    assert centres.shape == (3, 3, 2)
    for i in range(3):
        for j in range(3):
            # Its centre is its middle, model pixel (SMALL - 1) / 2 past its first, as crops.crop_uint8 has it.
            expected = (origin[0] + (16 * j + (SMALL - 1) / 2) / scale, origin[1] + (16 * i + (SMALL - 1) / 2) / scale)
            assert np.allclose(centres[i, j], expected)
    assert dense.region_side(CELLS, SMALL) == SMALL + 16 * (CELLS - 1)


def test_a_grid_crop_centred_on_a_round_object_is_the_same_turned_so_its_label_survives_augmentation():
    # The label of grid crop (i, j) is the count at grid_centres[i, j]; augmentation turns the region and the
    # label grid together. Each turned crop keeps its label only if that point is the crop's middle, the point
    # every flip and turn keeps: a disc centred there is then the same crop turned. (On SMALL / 2 a flip moved
    # the label's point by a model pixel relative to the crop.)
    from mxcube_autocenter.learning import crops
    from mxcube_autocenter.learning.augment import dihedral_np

    origin, scale, side = (101.0, 57.0), 0.5, dense.region_side(CELLS, SMALL)
    centres = dense.grid_centres(origin, scale, CELLS, SMALL)
    ys, xs = np.mgrid[0:400, 0:400]
    for i, j in ((0, 0), (2, 3), (4, 1)):
        cx, cy = centres[i, j]
        frame = np.where((xs - cx) ** 2 + (ys - cy) ** 2 <= 14**2, 30, 210).astype(np.uint8)
        region = crops.resample(frame, origin, scale, (side, side)).astype(int)
        crop = region[16 * i : 16 * i + SMALL, 16 * j : 16 * j + SMALL]
        assert crop.min() < 100  # the disc is in it
        for k in range(8):
            assert np.abs(dihedral_np(crop, k) - crop).max() <= 1, ((i, j), k)


def test_a_region_set_holds_regions_and_their_ground_truth_grids(regions_path):
    table = dense.read_regions(regions_path)
    n = len(table)
    assert n == 12 * 2 * 2
    assert table.rc_expected.shape == table.rc.shape == table.valid.shape == (n, CELLS, CELLS)
    assert np.all(table.rc_expected >= 0) and np.all(table.rc == np.round(table.rc))
    assert table.valid.mean() > 0.5
    # One crystal id per sample (the split keeps a sample's regions together), one scan id per view.
    assert len(set(table.crystal_id)) == 12 and len(set(table.scan_id)) == 24
    # Regions centred near crystals: most crystal samples have a grid crop with a real count.
    best = table.rc_expected.reshape(n, -1).max(axis=1)
    assert np.mean(best >= 5) > 0.3
    with h5py.File(regions_path, "r") as f:
        from mxcube_autocenter.recording import decode_jpeg

        image = decode_jpeg(f["regions/image"][0])
    assert image.shape == (table.side, table.side, 3)
    summary = table.summary()
    assert summary["kind"] == "regions" and summary["points"] == int(table.valid.sum())


def test_files_that_are_not_region_sets_are_refused_with_the_fix(tmp_path, regions_path):
    other = tmp_path / "dataset.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(dense.RegionSetError, match="dataset.h5.*not a region set.*synthesize-regions"):
        dense.read_regions(other)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(open(regions_path, "rb").read()[:4096])
    with pytest.raises(dense.RegionSetError, match="broken.h5: not a readable HDF5 file"):
        dense.read_regions(broken)


@pytest.mark.parametrize("signature", GROUP_SIGNATURES)
def test_a_damaged_region_set_is_named_as_damaged(tmp_path, regions_path, signature):
    damaged = damaged_copy(regions_path, signature, tmp_path / "damaged.h5")
    with pytest.raises(dense.RegionSetError, match="damaged.h5: cannot read this region set .*the file is damaged; "
                                                   "Write one with `mxcube-autocenter synthesize-regions`"):  # fmt: skip
        dense.read_regions(damaged)


@pytest.mark.parametrize("damage", ["no cells", "provenance", "nan count"])
def test_a_region_set_with_bad_attributes_or_counts_is_named_as_damaged(tmp_path, regions_path, damage):
    import shutil

    path = tmp_path / "bad.h5"
    shutil.copy(regions_path, path)
    with h5py.File(path, "r+") as f:
        if damage == "no cells":
            del f.attrs["cells"]
        elif damage == "provenance":
            f.attrs["provenance"] = "{not json"
        else:
            f["regions/rc_expected"][0] = np.nan
    with pytest.raises(dense.RegionSetError, match=f"{path}: .*the file is damaged"):
        dense.read_regions(path)


def test_an_interrupted_dense_training_leaves_a_checkpoint_that_becomes_a_model_file(regions_path, tmp_path,
                                                                                     monkeypatch):
    # Its checkpoint was the region network (a map per region, refused as a model file) and no run.json was left.
    import json

    import keras

    from mxcube_autocenter.learning import training

    monkeypatch.setattr(training, "save_model", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        dense.train_dense(regions_path, out, epochs=2, batch_size=8, seed=0, verbose=0)
    info = json.loads((out / "run.json").read_text())
    assert info["training"]["interrupted"].startswith("the training did not end")
    path = str(tmp_path / "recovered.keras")
    training.attach_info(keras.models.load_model(str(out / "checkpoint.keras")), info).save(path)
    model, loaded = training.load_model(path)
    assert loaded["transform"] == info["transform"] and model.output_shape[1:] == (1,)
    monkeypatch.undo()
    with pytest.raises(training.ModelFileError, match="holds an interrupted training's best epoch"):
        dense.train_dense(regions_path, out, epochs=1, batch_size=8, seed=0, verbose=0)
    (out / "run.json").unlink()  # recovered above
    dense.train_dense(regions_path, out, epochs=1, batch_size=8, seed=0, verbose=0)
    assert not (out / "run.json").exists()


def test_a_region_set_whose_training_counts_are_all_equal_is_refused(regions_path, tmp_path):
    import shutil

    flat = tmp_path / "flat.h5"
    shutil.copy(regions_path, flat)
    with h5py.File(flat, "r+") as f:
        f["regions/rc_expected"][...] = 0.0
    with pytest.raises(dense.RegionSetError, match="has the same rc_expected \\(0\\): a model would learn a constant"):
        dense.train_dense(flat, tmp_path / "model", epochs=1, verbose=0)
    assert not (tmp_path / "model").exists()


def test_a_region_set_too_small_for_the_fcn_is_refused_before_rendering_and_named_with_the_fix(regions_path,
                                                                                                 tmp_path):
    # synthesize-regions took --input-size 16 and rendered for minutes a set train-dense refused with "raise
    # input_size", an option train-dense does not have: the set's own crops decide.
    import shutil

    with pytest.raises(ValueError, match="input_size 16: a region set is for the fcn, whose input is at least 31"):
        dense.synthetic_regions(tmp_path / "r.h5", n_samples=1, input_size=16, progress=False)
    assert not (tmp_path / "r.h5").exists()
    small = tmp_path / "small.h5"
    shutil.copy(regions_path, small)
    with h5py.File(small, "r+") as f:
        f.attrs["input_size"] = 16
    with pytest.raises(dense.RegionSetError, match="small.h5: its crops are 16 pixels, fewer than the 31 the fcn takes: "
                                                   "write it again with `synthesize-regions --input-size 31` or more"):
        dense.train_dense(small, tmp_path / "model", epochs=1, verbose=0)
    assert not (tmp_path / "model").exists()


def test_a_region_set_of_too_few_crystals_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = tmp_path / "two.h5"
    dense.synthetic_regions(path, 2, seed=3, views_per_sample=1, regions_per_view=1, cells=3, crop_um=160,
                            input_size=SMALL, progress=False)
    with pytest.raises(dense.RegionSetError, match=f"{path}: need at least 3 distinct crystals.*--samples"):
        dense.train_dense(path, tmp_path / "model", epochs=1, verbose=0)
    assert not (tmp_path / "model").exists()


def test_augmentation_turns_the_region_and_its_label_grid_together(regions_path):
    from mxcube_autocenter.learning import crops
    from mxcube_autocenter.learning.augment import dihedral_np
    from mxcube_autocenter.recording import decode_jpeg

    table = dense.read_regions(regions_path)
    labels = np.arange(CELLS * CELLS, dtype=np.float32).reshape(1, CELLS, CELLS)
    with h5py.File(regions_path, "r") as f:
        plain = crops.normalise(decode_jpeg(f["regions/image"][0]))
    seen = set()
    for seed in range(12):
        ds = dense.region_dataset(table, [0], labels, np.ones_like(labels), augment="dihedral", seed=seed,
                                  shuffle=False)
        image, y, w = (np.asarray(t)[0] for t in next(iter(ds)))
        k = next(k for k in range(8) if np.array_equal(dihedral_np(labels[0], k), y[..., 0]))
        assert np.allclose(image, dihedral_np(plain, k), atol=1e-5)
        assert np.all(w == 1)
        seen.add(k)
    assert len(seen) > 3


def test_region_sets_cache_in_memory_or_in_a_file_that_goes_with_the_pipeline(regions_path, tmp_path):
    """``cache`` means for regions what it means for crops: "file" and a folder are on disk, not in memory."""
    import gc

    from mxcube_autocenter.learning.data import cache_for

    table = dense.read_regions(regions_path)
    rows = np.arange(6)
    labels = np.arange(6 * CELLS * CELLS, dtype=np.float32).reshape(6, CELLS, CELLS)
    weights = np.ones_like(labels)
    in_memory = [np.asarray(t) for b in dense.region_dataset(table, rows, labels, weights, shuffle=False, cache=True)
                 for t in b]  # fmt: skip
    folder = tmp_path / "cache"
    ds = dense.region_dataset(table, rows, labels, weights, shuffle=False, cache=folder)
    for _ in range(2):  # the second epoch reads the file back
        on_disk = [np.asarray(t) for b in ds for t in b]
        assert all(np.array_equal(a, b) for a, b in zip(in_memory, on_disk))
    (cache_dir,) = folder.iterdir()
    assert any(cache_dir.iterdir())
    del ds
    gc.collect()
    assert list(folder.iterdir()) == []
    # "auto" counts a region's bytes, not a crop's.
    side_bytes = table.side * table.side * 3
    assert cache_for(4, None, memory_bytes=4 * 4 * side_bytes, row_bytes=side_bytes) is True
    assert cache_for(5, None, memory_bytes=4 * 4 * side_bytes, row_bytes=side_bytes) == "file"


def test_dense_training_lowers_the_loss_and_saves_an_ordinary_crop_model(trained, regions_path):
    from mxcube_autocenter.learning.training import load_model

    assert min(trained.history["val_loss"]) < trained.history["val_loss"][0]
    model, info = load_model(trained.model_path)
    assert model.input_shape == (None, SMALL, SMALL, 3)
    assert info["architecture"]["name"] == "fcn" and info["label"] == "rc_expected"
    assert info["data"]["kind"] == "regions" and info["training"]["mode"] == "dense regions"
    assert info["input"]["crop_um"] == 160 and info["transform"]["name"] == "log"
    test = info["metrics"]["test"]
    assert test["n"] > 0 and test["regions"] > 0 and -1 <= test["spearman_expected"] <= 1
    # No crystal in two subsets.
    split = info["split"]
    assert not set(split["train"]) & set(split["test"])


def test_dense_model_evaluates_a_frame_like_any_centring_model(trained):
    from mxcube_autocenter.centring.loop import Roi
    from mxcube_autocenter.centring.predictor import load_predictor

    predictor = load_predictor(trained.model_path)
    frame = np.full((240, 320, 3), 200, dtype=np.uint8)
    frame[100:140, 150:170] = 60
    heatmap = predictor.predict(frame, Roi(100, 80, 220, 160), (400.0, 400.0), stride_px=4)
    assert heatmap.values.shape == (len(heatmap.ys), len(heatmap.xs))
    assert np.all(np.isfinite(heatmap.values))


def test_dense_fine_tuning_keeps_the_initial_transform(trained, regions_path, tmp_path):
    result = dense.train_dense(regions_path, tmp_path, epochs=1, batch_size=8, verbose=0,
                               initial_model=trained.model_path, peak_weight=0.5)
    assert result.info["transform"] == trained.info["transform"]
    assert result.info["training"]["learning_rate"] == 1e-4  # fine-tuning's smaller default step
    assert result.info["training"]["peak_weight"] == 0.5 and "KL divergence" in result.info["training"]["loss"]
    assert np.isfinite(result.history["loss"]).all()
    assert result.info["training"]["initial_model"]["file"] == "model.keras"
    with pytest.raises(ValueError, match="initial model has transform 'log', not 'tanh'"):
        dense.train_dense(regions_path, tmp_path / "x", transform="tanh", epochs=1, verbose=0,
                          initial_model=trained.model_path)
    # A region set holds counts: the ice network's flag is not among them (nor silently read as rc).
    with pytest.raises(ValueError, match=r"label 'on_ice': choose one of \('rc', 'rc_expected'\)"):
        dense.train_dense(regions_path, tmp_path / "ice", label="on_ice", epochs=1, verbose=0)
    # An epoch that changes nothing does not beat the starting weights: they are kept.
    same = dense.train_dense(regions_path, tmp_path / "same", epochs=1, batch_size=8, verbose=0, learning_rate=0.0,
                             initial_model=trained.model_path)
    assert same.best_epoch == 0 and not (tmp_path / "same" / "checkpoint.keras").exists()


def test_dense_fine_tuning_on_the_command_line_keeps_the_colour_and_normalisation_of_the_file(regions_path, tmp_path,
                                                                                               capsys):
    from mxcube_autocenter.cli import main
    from mxcube_autocenter.learning.training import load_model

    grey = dense.train_dense(regions_path, tmp_path / "grey", colour="grey", normalisation="standardise", epochs=1,
                             batch_size=8, verbose=0, transform="tanh")
    args = ["train-dense", regions_path, "--initial-model", grey.model_path, "--out", str(tmp_path / "tuned"),
            "--epochs", "1", "--batch-size", "8"]
    assert main(args) == 0, capsys.readouterr().err
    _, info = load_model(tmp_path / "tuned" / "model.keras")
    assert (info["input"]["colour"], info["input"]["normalisation"]) == ("grey", "standardise")
    # And its label transform, as the help says (the default log was refused as not the model's).
    assert info["transform"]["name"] == "tanh"
    assert main([*args, "--transform", "log"]) == 2
    assert "the initial model has transform 'tanh', not 'log'" in capsys.readouterr().err


def test_region_loss_is_the_masked_mse_plus_where_a_crystal_region_peaks():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(3, 4, 4)).astype(np.float32)
    target[0, 1, 2] = 3.0  # region 0: a crystal peaking at (1, 2)
    target[2] = -1.0  # region 2: no crystal (below peak_from)
    valid = np.ones((3, 4, 4), np.float32)
    valid[:, 3, :] = 0.0
    y_true = np.stack([target, valid], axis=-1)

    def loss(predicted, **kwargs):
        return np.asarray(dense.region_loss(**kwargs)(y_true, predicted[..., None].astype(np.float32)))

    mse = np.mean(valid * (target - 0.5) ** 2, axis=(1, 2))
    assert np.allclose(loss(np.full_like(target, 0.5)), mse, rtol=1e-6)
    # An offset common to the region changes the MSE only; invalid points change nothing.
    shifted = target + 0.7
    shifted[:, 3, :] = 50.0
    peaked = loss(shifted, peak_weight=2.0, peak_from=2.0)
    assert np.allclose(peaked, np.mean(valid * 0.49, axis=(1, 2)), atol=1e-5)
    # Predicting region 0's peak elsewhere costs there, and only there.
    moved = target.copy()
    moved[0, 1, 2], moved[0, 0, 0] = target[0, 0, 0], 3.0
    extra = loss(moved, peak_weight=2.0, peak_from=2.0) - loss(moved)
    assert extra[0] > 0.5 and np.allclose(extra[1:], 0.0, atol=1e-6)


def test_peak_hit_rate_judges_where_the_predicted_maximum_falls():
    expected = np.zeros((3, 2, 2))
    expected[0, 0, 0], expected[1, 1, 1] = 10.0, 10.0  # region 2 has no crystal: not judged
    predicted = np.zeros((3, 2, 2))
    predicted[0, 0, 0], predicted[1, 0, 0] = 5.0, 5.0
    valid = np.ones((3, 2, 2), dtype=bool)
    assert dense.peak_hit_rate(expected, predicted, valid) == 0.5
    assert dense.peak_hit_rate(expected[2:], predicted[2:], valid[2:]) is None


def test_synthesize_regions_from_the_command_line_with_only_empty_loops_full_of_ice(tmp_path, capsys):
    from mxcube_autocenter.cli import main

    path = tmp_path / "empty.h5"
    args = ["synthesize-regions", str(path), "--samples", "3", "--views-per-sample", "1", "--cells", "3",
            "--crop-um", "160", "--input-size", str(SMALL), "--empty-fraction", "1", "--ice-fraction", "1", "--seed", "5"]  # fmt: skip
    assert main(args) == 0
    assert "regions 6" in capsys.readouterr().out
    table = dense.read_regions(path)
    # An empty loop diffracts no more than the liquid's background anywhere, ice balls or not.
    assert table.rc_expected.max() < 1.0 and table.provenance["empty_fraction"] == 1.0
    assert table.provenance["ice_fraction"] == 1.0


def test_train_dense_prints_one_line_for_a_damaged_region_not_tensorflows_log_of_it(regions_path, tmp_path):
    # train_dense imported keras before any module set TF_CPP_MIN_LOG_LEVEL: TensorFlow logged the damaged
    # row's whole Python traceback (and its start-up lines) to stderr beside the one-line error.
    import shutil

    damaged = tmp_path / "damaged.h5"
    shutil.copy(regions_path, damaged)
    with h5py.File(damaged, "r+") as f:
        f["regions/image"][1] = np.frombuffer(b"\xff\xd8" + b"\x00" * 100, np.uint8)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a shell starts the command
    run = subprocess.run([sys.executable, "-m", "mxcube_autocenter.cli", "train-dense", str(damaged), "--out",
                          str(tmp_path / "model"), "--epochs", "1", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    # Refused before any pipeline reads it: found inside tf.data, the error left the program hanging (or
    # aborting) at its exit.
    assert f"error: {damaged}: row 1: its stored image is no readable JPEG image: the file is damaged" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "model").exists()


def test_a_dataset_or_a_recording_given_as_a_region_set_is_named_with_the_command_to_use(tmp_path):
    # Both said only "not a region set (format None, not 'mxcube_autocenter.regions')".
    for name, group, command in (("crops.h5", "samples", "train on it with `mxcube-autocenter train`"),
                                 ("x_camera.h5", "frames", "label it (`mxcube-autocenter label`)")):  # fmt: skip
        with h5py.File(tmp_path / name, "w") as f:
            f.attrs["format_version"] = 1
            f.create_group(group)
        with pytest.raises(dense.RegionSetError, match=f"{name}: not a region set .*{re.escape(command)}"):
            dense.read_regions(tmp_path / name)
