"""Training and evaluating on a beamline's own data: no rc_expected, few crystals, constant counts, empty sets, LIMS ids, several GPUs."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "mxcube_autocenter", "models", "default_regressor.keras")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    path = tmp_path_factory.mktemp("review") / "base.h5"
    synthetic_dataset(path, 5, 3, crops_per_sample=8, omegas_per_sample=2, progress=False)
    return str(path)


def variant(base, tmp_path, name, **edits):
    """A copy of ``base`` with /samples columns replaced (a function of the old values) or dropped (None)."""
    dst = str(tmp_path / f"{name}.h5")
    shutil.copy(base, dst)
    with h5py.File(dst, "r+") as f:
        for key, value in edits.items():
            old = f["samples"][key][()]
            del f["samples"][key]
            if value is not None:
                f["samples"].create_dataset(key, data=value(old) if callable(value) else value)
    return dst


@pytest.fixture(scope="module")
def tiny(base, tmp_path_factory):
    from mxcube_autocenter.learning.training import train

    out = tmp_path_factory.mktemp("tiny")
    return train(base, "fcn", "log", str(out), crop_um=120, input_size=32, epochs=1, batch_size=8, verbose=0,
                 augment="none")


def test_shipped_model_evaluates_on_a_beamline_dataset_without_rc_expected(base, tmp_path):
    """The shipped model learnt label='rc_expected'; a site's own set has only recorded counts."""
    from mxcube_autocenter.learning.evaluate import evaluate

    real = variant(base, tmp_path, "real", rc_expected=None)
    metrics = evaluate(SHIPPED, real, str(tmp_path / "report"), subset="all", gallery=2)
    assert metrics["n"] == 40 and np.isfinite(metrics["mse"])


def test_report_says_which_counts_the_mse_is_against(base, tmp_path):
    """The shipped model learnt rc_expected: its target MSE is against those, its count MSE against rc."""
    from mxcube_autocenter.learning.evaluate import evaluate

    metrics = evaluate(SHIPPED, base, str(tmp_path / "report"), subset="all", gallery=2)
    assert metrics["mse_against"] == "rc_expected"
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| MSE (log targets, against the rc_expected counts the model learnt) |" in text
    assert "| MSE (counts, against the recorded rc) |" in text


def test_evaluate_refuses_an_empty_dataset(tiny, tmp_path):
    from pathlib import Path

    from mxcube_autocenter.labelling.dataset import create_if_missing
    from mxcube_autocenter.learning.evaluate import evaluate

    empty = tmp_path / "empty.h5"
    create_if_missing(Path(empty))  # a set whose recordings had no labelled frame yet
    with pytest.raises(ValueError, match="empty.h5"):
        evaluate(tiny.model_path, str(empty), str(tmp_path / "report"), subset="all")


def test_evaluate_all_warns_about_crystals_the_model_was_trained_on(tiny, base, tmp_path, caplog):
    from mxcube_autocenter.learning.evaluate import evaluate

    with caplog.at_level(logging.WARNING):
        metrics = evaluate(tiny.model_path, base, str(tmp_path / "report"), subset="all", gallery=2)
    assert metrics.get("rows_of_training_crystals") == 24
    assert "trained on" in caplog.text


def test_too_few_crystals_error_names_the_file_and_the_fix(base, tmp_path):
    from mxcube_autocenter.learning.training import train

    one = variant(base, tmp_path, "one_crystal", crystal_id=lambda ids: np.array([b"xtal1"] * len(ids)))
    with pytest.raises(ValueError, match="one_crystal.h5.*label recordings of more crystals"):
        train(one, "fcn", "log", str(tmp_path / "m"), crop_um=120, input_size=32, epochs=1, verbose=0)


def test_numeric_crystal_ids_stay_distinct(base, tmp_path):
    from mxcube_autocenter.labelling.dataset import read_table

    lims = variant(base, tmp_path, "lims", crystal_id=lambda ids: 3456789 + np.repeat(np.arange(5), 8))
    table = read_table(lims)
    assert len(set(table.crystal_id)) == 5, sorted(set(table.crystal_id))


def test_non_finite_camera_scale_is_refused_with_the_file(base, tmp_path):
    from mxcube_autocenter.labelling.dataset import DatasetError, read_table

    def nan_first(p):
        p = p.copy()
        p[0] = np.nan
        return p

    bad = variant(base, tmp_path, "bad_scale", pixels_per_mm=nan_first)
    with pytest.raises(DatasetError, match="bad_scale.h5.*pixels_per_mm"):
        read_table(bad)


def test_empty_test_subset_gives_no_nan_in_metrics():
    from mxcube_autocenter.learning.training import regression_metrics

    metrics = regression_metrics([], [], np.zeros(0), np.zeros(0))
    json.loads(json.dumps(metrics), parse_constant=lambda c: pytest.fail(f"{c} in the metrics"))


def test_training_on_constant_counts_is_refused(base, tmp_path):
    from mxcube_autocenter.learning.training import train

    zero = variant(base, tmp_path, "all_zero", rc=lambda rc: np.zeros_like(rc))
    with pytest.raises(ValueError, match="all_zero.h5"):
        train(zero, "fcn", "log", str(tmp_path / "m"), crop_um=120, input_size=32, epochs=1, verbose=0,
              augment="none")


def test_a_given_split_says_which_crystals_it_leaves_out(caplog):
    from mxcube_autocenter.learning.split import Split, resolve_split

    old = Split(("a", "b", "c"), ("d",), ("e",))
    ids = np.array(["a", "b", "c", "d", "e", "new1", "new2"])  # two crystals labelled since
    with caplog.at_level(logging.WARNING):
        split = resolve_split(old, ids)
    assert sum(split.rows.values()) == 5
    assert "new1" in caplog.text


MIRRORED = textwrap.dedent("""
    import os, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mxcube_autocenter.learning.training import train
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    try:
        train(sys.argv[1], "fcn", "log", sys.argv[2], crop_um=120, input_size=32, epochs=1, batch_size=7,
              strategy=strategy, verbose=0, augment="none")
    except ValueError as err:
        print("CLEAR:", err)
        sys.exit(3)
""")


def test_batch_size_not_divisible_by_the_replicas(base, tmp_path):
    """Two replicas, batch 7: Keras' first-batch reduce fails on shards of 4 and 3 (AddN)."""
    run = subprocess.run([sys.executable, "-c", MIRRORED, base, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=300)
    assert "AddN" not in run.stderr, run.stderr[-600:]
    assert run.returncode == 0 or ("CLEAR:" in run.stdout and "batch_size" in run.stdout), run.stdout + run.stderr[-600:]


def test_a_test_subset_of_few_crystals_is_warned_about(base, tmp_path, caplog):
    # Five crystals split 3 / 1 / 1: the test figures are one crystal's.
    from mxcube_autocenter.learning.training import train

    with caplog.at_level(logging.WARNING):
        train(base, "fcn", "log", str(tmp_path / "m"), crop_um=120, input_size=32, epochs=1, batch_size=8, verbose=0,
              augment="none")
    assert "the test subset holds 1 crystal(s)" in caplog.text
