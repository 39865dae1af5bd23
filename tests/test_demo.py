"""The demo end to end in a very small configuration: record, label, train, centre, score, report."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from mxcube_autocenter import code_version, scorecard
from mxcube_autocenter.demo import (DemoError, declined_or_failed, format_scorecard, heldout_samples, run_demo,
                                    training_seconds)
from mxcube_autocenter.labelling.dataset import read_table

METHOD_NAMES = ("ml", "lucid", "loop_centre", "mesh_oracle", "optical_oracle")
# Each method's figures in `demo --json`, as the demo issue asks for them.
FIGURES = ("hit_rate", "median_dist_um", "p90_dist_um", "median_rc_fraction", "empty_refused_rate", "median_wall_s",
           "exposures")  # fmt: skip


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """3 training samples with short collections, 2 held-out samples of which 1 empty, 1 epoch of fine-tuning (about 1.5 min)."""
    out = tmp_path_factory.mktemp("demo")
    # A relative --out, as `make demo` gives (out/demo): the centring records went into the package's folder.
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        result = run_demo(Path(out.name), n_train=3, n_heldout=2, n_empty=1, n_images=20, epochs=1,
                          classifier_epochs=1, input_size=48, nproc=2, progress=False)
    finally:
        os.chdir(cwd)
    return out, result


def test_demo_writes_the_report_and_the_scorecard(small_demo):
    out, result = small_demo
    assert set(result) >= {"methods", "learning", "n_samples", "n_empty"}
    assert list(result["methods"]) == list(METHOD_NAMES)
    for figures in result["methods"].values():
        assert set(FIGURES) <= set(figures)
    assert set(result["learning"]) >= {"spearman", "spearman_expected", "classifier_accuracy",
                                       "classifier_accuracy_expected", "train_s"}  # fmt: skip
    # The labelled set carries the virtual beamline's true counts, of which the recorded ones are draws.
    table = read_table(out / "learning" / "dataset.h5")
    truth = table.extra["rc_expected"]
    assert truth.shape == table.rc.shape and np.all(truth >= 0)
    assert spearmanr(truth, table.rc).statistic > 0.5
    # and the counts the crystals' shapes alone predict, the models' reference, scored on the report's rows.
    shapes = table.extra["rc_shapes"]
    assert shapes.shape == truth.shape and spearmanr(shapes, truth).statistic > 0.8
    learning = result["learning"]
    assert 0.5 <= learning["shapes_classifier_accuracy_expected"] <= 1.0
    assert 0 < learning["shapes_count_threshold"] < np.inf
    assert learning["shapes_spearman_expected"] is None or -1 <= learning["shapes_spearman_expected"] <= 1
    assert result["learning"]["source"] == "trained in this run" and result["learning"]["train_s"] > 0
    # By default the demo fine-tunes the shipped regressor on its recordings (so with its input).
    assert result["learning"]["fine_tuned_from"] == "default_regressor.keras"
    assert result["learning"]["input_size"] == 128 and result["learning"]["crop_um"] == 240
    # and its crystal/empty classifier starts from the shipped regressor too.
    from mxcube_autocenter.learning.training import load_model

    _, classifier_info = load_model(result["learning"]["classifier"])
    assert classifier_info["architecture"]["name"] == "fcn_classifier"
    assert classifier_info["training"]["initial_model"]["file"] == "default_regressor.keras"
    assert result["n_samples"] == 2 and result["n_empty"] == 1

    ml, lucid, mesh = (result["methods"][m] for m in ("ml", "lucid", "mesh_oracle"))
    assert ml["n"] == 2 and ml["n_crystal"] == 1 and ml["exposures"] == 0 and lucid["exposures"] == 0
    assert ml["median_wall_s"] > 0 and lucid["median_wall_s"] > 0
    assert mesh["exposures"] > 100 and mesh["median_dist_um"] is not None
    assert mesh["empty_refused_rate"] == 1.0  # an empty loop gives no reflections on the mesh
    assert result["methods"]["loop_centre"]["empty_refused_rate"] == 0.0
    optical = result["methods"]["optical_oracle"]
    assert optical["empty_refused_rate"] == 1.0 and optical["exposures"] == 0 and optical["hit_rate"] == 1.0

    report = (out / "report.md").read_text()
    assert "## Scorecard" in report and "| mesh_oracle |" in report and "Spearman" in report
    assert "predicted from the crystals' shapes alone" in report and "shapes alone" in format_scorecard(result)
    # Held-out figures with their spread over crystals (learning.evaluate.crystal_interval), where there are two.
    interval = learning["spearman_expected_ci95"]
    assert ("95 % interval over the held-out crystals" if interval else "no interval: fewer than two crystals") in report
    for name in ("centring_errors.png", "rc_fraction.png", "training_recording.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    assert (out / "learning" / "regressor_report" / "report.md").is_file()
    assert (out / "learning" / "dataset_rc_histogram.png").is_file()
    # The plugin saved its heatmap overlays of each ML centring.
    assert len(list((out / "centring").glob("centring_*.json"))) == 2
    assert list((out / "centring").glob("centring_*_omega*.png"))
    saved = json.loads((out / "scorecard.json").read_text())
    assert saved["methods"] == result["methods"]
    # What made the ML row beside its models: the procedure's settings as the XML gave them, and the code.
    assert saved["centring"]["max_ice_probability"] == 0.5 and saved["centring"]["n_angles"] >= 3
    assert saved["code"] == code_version() and f"mxcube-autocenter {saved['code']}." in (out / "report.md").read_text()
    assert "Scorecard" in format_scorecard(result)
    assert "Learning (trained in this run): Spearman" in format_scorecard(result)
    # `make demo` centres with the shipped model: the learning line must not pass for that model's.
    shipped = {**result, "model": {**result["model"], "source": "shipped model"}}
    assert "Learning (trained in this run; the centring used the shipped model, not this one)" in format_scorecard(shipped)
    assert not (out / "data").exists()  # the large raw data is removed unless keep_data


def test_demo_with_a_given_model_runs_without_training(small_demo, tmp_path):
    out, first = small_demo
    model = first["model"]["regressor"]
    result = run_demo(tmp_path, model=model, n_heldout=2, n_empty=1, methods=("ml", "loop_centre"), progress=False)
    assert result["learning"]["source"] == "model file metadata"
    assert result["n_samples"] == 2 and result["n_empty"] == 1
    assert result["methods"]["ml"]["n"] == 2 and result["methods"]["lucid"]["n"] == 0
    assert "timings_s" in result and "record" not in result["timings_s"]
    # The same held-out samples, looks and starts as the run that trained first: the two pair up.
    trained, given = (json.loads((path / "samples.json").read_text()) for path in (out, tmp_path))
    assert [row["start"] for row in trained] == [row["start"] for row in given]
    assert scorecard.compare_runs([(trained, given)], method="loop_centre")["rc_fraction_diff_mean"] == 0


def test_a_run_cut_short_keeps_the_earlier_report_until_its_own_is_whole(tmp_path, monkeypatch, capsys):
    # The earlier report was removed once the beamline was up: a Ctrl-C then left neither it nor a new one.
    from mxcube_autocenter import demo
    from mxcube_autocenter.centring.predictor import SHIPPED_REGRESSOR
    from mxcube_autocenter.cli import main

    earlier = {"report.md": "the earlier report", "samples.json": "[]", "figures/errors.png": "a figure"}
    for name, text in earlier.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "demo.log").write_text("the earlier run's log")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(demo, "_centre_heldout", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_demo(tmp_path, model=SHIPPED_REGRESSOR, n_heldout=2, n_empty=1, methods=("loop_centre",),
                     progress=False)  # fmt: skip
    assert f"the earlier demo's report is kept in {tmp_path / 'previous'}" in capsys.readouterr().err
    assert {name: (tmp_path / "previous" / name).read_text() for name in earlier} == earlier
    assert not (tmp_path / "report.md").exists()
    assert main(["scorecard", str(tmp_path)]) == 2
    assert (f"the demo in {tmp_path} did not finish (interrupted or failed: its demo.log says); run it again, or "
            f"give {tmp_path / 'previous'}, the earlier run's report it kept") in capsys.readouterr().err
    # Cut short again, the parts of the run before are no report: the one kept stays.
    (tmp_path / "centring").mkdir(exist_ok=True)
    with monkeypatch.context() as patch:
        patch.setattr(demo, "_centre_heldout", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_demo(tmp_path, model=SHIPPED_REGRESSOR, n_heldout=2, n_empty=1, methods=("loop_centre",),
                     progress=False)  # fmt: skip
    assert {name: (tmp_path / "previous" / name).read_text() for name in earlier} == earlier
    # A model given from the report kept would be removed with it once the run's own report is whole.
    assert main(["demo", "--out", str(tmp_path), "--model", str(tmp_path / "previous" / "report.md")]) == 2
    assert "copy it elsewhere first" in capsys.readouterr().err
    run_demo(tmp_path, model=SHIPPED_REGRESSOR, n_heldout=2, n_empty=1, methods=("loop_centre",), progress=False)
    assert (tmp_path / "report.md").exists() and not (tmp_path / "previous").exists()


def test_a_figure_that_cannot_be_written_loses_neither_the_scorecard_nor_the_rest_of_the_report(tmp_path,
                                                                                                 monkeypatch):
    import errno

    from mxcube_autocenter import demo
    from mxcube_autocenter.centring.predictor import SHIPPED_REGRESSOR

    def disk_full(outcomes, figures):
        raise OSError(errno.ENOSPC, "No space left on device", str(figures / "errors.png"))

    monkeypatch.setattr(demo, "_error_figures", disk_full)
    result = run_demo(tmp_path, model=SHIPPED_REGRESSOR, n_heldout=2, n_empty=1, methods=("loop_centre",),
                      progress=False)
    assert result["methods"]["loop_centre"]["n"] == 2
    (error,) = result["write_errors"]
    assert error == f"cannot write {tmp_path / 'figures' / 'errors.png'} (No space left on device): free space there " \
                    "or give another --out"
    saved = json.loads((tmp_path / "scorecard.json").read_text())
    assert saved["methods"] == result["methods"]
    assert len(json.loads((tmp_path / "samples.json").read_text())) == 2
    assert (tmp_path / "report.md").exists() and not list(tmp_path.glob("*.part"))


def test_centring_records_the_plugin_could_not_save_are_named_as_missing_from_the_report(tmp_path, monkeypatch):
    # The plugin saves them on a thread and only logs a failure: the demo exited 0 with centring/ empty.
    import errno

    from mxcube_autocenter.centring import report
    from mxcube_autocenter.centring.predictor import SHIPPED_REGRESSOR

    def disk_full(result, directory, beam_position):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "centring.png"))

    monkeypatch.setattr(report, "save", disk_full)
    result = run_demo(tmp_path, model=SHIPPED_REGRESSOR, n_heldout=1, n_empty=0, methods=("ml",), progress=False)
    assert result["write_errors"] == [f"1 of the 1 ML centrings' overlays and records were not saved in "
                                      f"{tmp_path / 'centring'} (demo.log says why)"]
    assert (tmp_path / "report.md").exists()


def test_compare_pairs_a_demo_report_with_another_of_the_same_samples(small_demo, tmp_path, capsys):
    from mxcube_autocenter.cli import main

    out, _ = small_demo
    assert main(["compare", str(out), str(out / "samples.json"), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert (same["n_crystal"], same["n_empty"]) == (1, 1)
    assert same["rc_fraction_diff_mean"] == 0 and same["hits_a"] == same["hits_b"] and not same["hits_lost"]
    assert main(["compare", str(out), str(out), "--method", "mesh_oracle"]) == 0
    assert "mesh_oracle, B against A (samples with crystals: 1, empty loops: 1)" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / "samples.json").write_text(json.dumps(json.loads((out / "samples.json").read_text())[:1]))
    assert main(["compare", str(out), str(other)]) == 2
    assert "the runs centred different samples" in capsys.readouterr().err
    (other / "samples.json").write_text("{not json")
    assert main(["compare", str(out), str(other)]) == 2
    assert f"{other / 'samples.json'} is not a demo's samples.json" in capsys.readouterr().err
    # Another file of a good run: it was "not a demo's samples.json ...: run the demo again".
    for argv in (["compare", str(out), str(out / "scorecard.json")], ["scorecard", str(out / "scorecard.json")]):
        assert main(argv) == 2
        assert f"is not a demo's samples.json (no list of samples): give the run folder {out} or its samples.json" \
            in capsys.readouterr().err


def test_scorecard_pools_demo_reports(small_demo, tmp_path, capsys):
    from mxcube_autocenter.cli import main

    out, result = small_demo
    assert main(["scorecard", str(out), "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert pooled["n_runs"] == 1 and set(pooled["methods"]) == set(METHOD_NAMES)
    for name, figures in pooled["methods"].items():  # one run pooled: its own scorecard, with intervals
        assert {k: figures[k] for k in FIGURES} == {k: result["methods"][name][k] for k in FIGURES}
        assert len(figures["hit_rate_ci95"]) == 2 and len(figures["empty_refused_rate_ci95"]) == 2
    # The learning figures of the run that trained its model, as its own scorecard has them.
    assert {k: pooled["learning"][k] for k in scorecard.LEARNING_FIGURES} == {
        k: result["learning"][k] for k in scorecard.LEARNING_FIGURES}
    assert main(["scorecard", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 held-out samples, 1 of them empty loops, from 1 demo run(s)" in text
    assert "Learning (mean of 1 run(s) that trained their model): Spearman" in text
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples.json").write_text((out / "samples.json").read_text())
    (tmp_path / "run" / "scorecard.json").write_text("{")
    assert main(["scorecard", str(tmp_path / "run")]) == 2
    assert "scorecard.json is not a demo's scorecard.json" in capsys.readouterr().err
    assert main(["scorecard", str(out), str(out / "samples.json")]) == 2
    assert "more than one run" in capsys.readouterr().err
    # Another run (other samples) that centred with a model file: one ML row would mix two models.
    given = tmp_path / "given"
    given.mkdir()
    rows = json.loads((out / "samples.json").read_text())
    (given / "samples.json").write_text(json.dumps([{**row, "sample": row["sample"] + "b"} for row in rows]))
    card = json.loads((out / "scorecard.json").read_text())
    (given / "scorecard.json").write_text(json.dumps({**card, "model": {"source": "given model file",
                                                                         "regressor": "m.keras", "classifier": None}}))
    assert main(["scorecard", str(out), str(given)]) == 2
    assert f"different models (each its own trained model + ice network default_ice.keras: {out}; m.keras: {given})" \
        in capsys.readouterr().err
    # The same models with the ice veto off: another procedure. A card of older code names no settings.
    (given / "scorecard.json").write_text(json.dumps({**card, "centring": {**card["centring"], "max_ice_probability": 1}}))
    assert main(["scorecard", str(out), str(given)]) == 2
    assert f"different settings (max_ice_probability 0.5 in {out}; 1 in {given})" in capsys.readouterr().err
    (given / "scorecard.json").write_text(json.dumps({k: v for k, v in card.items() if k not in ("centring", "code")}))
    assert main(["scorecard", str(out), str(given)]) == 0
    assert f"Code: {card['code']} (1 run(s)); unknown (1 run(s))" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"sample": "seed1", "has_crystal": True, "ml": {}}]))
    assert main(["scorecard", str(broken)]) == 2
    assert "sample seed1 has no complete 'ml' outcome" in capsys.readouterr().err
    broken.write_text("[]")
    assert main(["scorecard", str(broken)]) == 2
    assert "no outcomes in the runs given" in capsys.readouterr().err


def test_the_ground_truth_of_a_row_is_taken_at_its_frames_exposure():
    # The recorder reads the motors when a frame arrives, a camera latency after the image it shows: in a rotation
    # at 50 degrees/s the true count was that of a sample turned one degree further.
    from mxcube_autocenter.demo import exposure_motors

    times = np.array([10.0, 10.1, 10.2, 50.0, 50.1])
    motors = np.array([[0.0, 1.0], [5.0, 1.0], [10.0, 1.0], [100.0, 2.0], [100.0, 3.0]])
    scans = np.array(["rotation", "rotation", "rotation", "helical", "helical"])
    at_exposure = exposure_motors(scans, times, motors, 0.02)
    assert at_exposure[:, 0] == pytest.approx([0.0, 4.0, 9.0, 100.0, 100.0])
    assert at_exposure[:, 1] == pytest.approx([1.0, 1.0, 1.0, 2.0, 2.8])  # each collection on its own
    order = [2, 0, 4, 1, 3]  # rows in any order
    assert exposure_motors(scans[order], times[order], motors[order], 0.02) == pytest.approx(at_exposure[order])


def test_heldout_samples_are_reproducible_and_disjoint_from_training():
    specs = heldout_samples(10, 3, seed=0)
    assert specs == heldout_samples(10, 3, seed=0)
    assert sum(s["kwargs"]["n_crystals"] == 0 for s in specs) == 3
    assert all(s["kwargs"]["n_crystals"] >= 1 for s in specs if not s["variant"].startswith("empty"))
    assert len({s["seed"] for s in specs}) == 10 and min(s["seed"] for s in specs) >= 50_000


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(DemoError, match="at least 3"):
        run_demo(tmp_path, n_train=2)
    with pytest.raises(DemoError, match="unknown methods"):
        run_demo(tmp_path, methods=("ml", "guess"))
    with pytest.raises(DemoError, match=r"n_empty = 5 empty loops \(--n-empty\) among n_heldout = 3"):
        run_demo(tmp_path, quick=True, n_heldout=3, n_empty=5)


def test_the_demo_removes_only_folders_of_an_earlier_demo_report(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "beamtime_master.h5").write_bytes(b"a user's data")
    with pytest.raises(DemoError, match="holds data but no demo.log"):
        run_demo(tmp_path, quick=True)
    assert (tmp_path / "data" / "beamtime_master.h5").exists()


def test_the_demo_removes_no_report_files_of_a_folder_without_its_log(tmp_path):
    (tmp_path / "report.md").write_text("a user's notes")
    (tmp_path / "samples.json").write_text("[]")
    with pytest.raises(DemoError, match="holds report.md, samples.json but no demo.log"):
        run_demo(tmp_path, quick=True)
    assert (tmp_path / "report.md").read_text() == "a user's notes"
    assert (tmp_path / "samples.json").exists()


def test_a_configuration_the_beamline_refuses_keeps_the_earlier_report_and_names_the_log(tmp_path):
    import shutil

    from mxcube_autocenter.beamline import virtual_beamline_dir

    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    xml = config / "auto_centring.xml"
    xml.write_text(xml.read_text().replace("<record_frame_rate>10<", "<record_frame_rate>fast<"))
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    for name in ("demo.log", "report.md", "scorecard.json", "samples.json"):
        (out / name).write_text("an earlier demo's")
    with pytest.raises(DemoError, match=r"no 'auto_centring' object loaded.*demo.log has the beamline's log"):
        run_demo(out, quick=True, config_dir=config)
    assert (out / "report.md").read_text() == "an earlier demo's"
    assert (out / "figures").is_dir()
    assert "record_frame_rate" in (out / "demo.log").read_text()
    # Nor one that does not boot at all (a beamline.yaml mxcubecore cannot read): named, not a traceback.
    (config / "beamline.yaml").write_text("not: [a beamline\n")
    with pytest.raises(DemoError, match=rf"--config {re.escape(str(config))}: the beamline does not boot \(.*\): fix "
                                        r"its configuration \(.*demo.log has the beamline's log\)"):  # fmt: skip
        run_demo(out, quick=True, config_dir=config)
    assert (out / "report.md").read_text() == "an earlier demo's"
    # An --out that exists but may not be written (another user's, read-only): named, not a traceback.
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "demo.log").mkdir()  # what even root cannot open as a file
    with pytest.raises(DemoError, match=r"cannot write .*locked/demo.log \(Is a directory\): choose another --out"):
        run_demo(locked, quick=True)


def test_the_shipped_model_given_by_its_path_is_the_shipped_model(tmp_path, monkeypatch):
    # `make demo` and `demo --model <the shipped file>` centre with one model: `scorecard` must pool them.
    import shutil

    from mxcube_autocenter.centring.predictor import SHIPPED_ICE_MODEL, SHIPPED_REGRESSOR, Predictor, load_predictor
    from mxcube_autocenter.demo import _choose_predictor, _is_shipped

    monkeypatch.chdir(tmp_path)
    assert _is_shipped(load_predictor(os.path.relpath(SHIPPED_REGRESSOR)))
    shutil.copy(SHIPPED_REGRESSOR, tmp_path / "copy.keras")
    assert not _is_shipped(load_predictor("copy.keras"))
    # The shipped regressor without the shipped ice network centres otherwise.
    assert _is_shipped(Predictor(SHIPPED_REGRESSOR)) == (not SHIPPED_ICE_MODEL.exists())
    # So does `demo --quick --ice-model <another>`, and `scorecard` must not pool it with the shipped runs.
    assert _choose_predictor(None, None, None)[1] == scorecard.SHIPPED_MODEL
    shutil.copy(SHIPPED_ICE_MODEL, tmp_path / "ice.keras")
    predictor, source = _choose_predictor(None, None, "ice.keras")
    assert source == "given model file" and predictor.ice[0] == Path("ice.keras")


def test_a_failed_centring_is_no_refusal_and_shoots_nothing():
    assert declined_or_failed(True, True, False) == (False, False)
    # Declined (CentringResult.declined: no loop, no crystal) and left where it was: a refusal.
    assert declined_or_failed(False, False, True) == (True, False)
    # An error or a time-out puts the sample back too: it is no verdict on the loop.
    assert declined_or_failed(False, False, False) == (False, True)
    # Not accepted but moved: nothing is shot there either.
    assert declined_or_failed(False, True, True) == (False, True)
    empty = scorecard.Outcome("ml", "e", False, False, {"sampx": 0.0}, 120.0, failed=True)
    crystal = scorecard.Outcome("ml", "c", True, False, {"sampx": 0.0}, 3.0, failed=True, hits=[False] * 4,
                                dist_um=50.0, rc_fraction=0.0)  # fmt: skip
    figures = scorecard.summarise_method([empty, crystal])
    assert figures["empty_refused_rate"] == 0.0 and figures["hit_rate"] == 0.0
    assert scorecard.outcome_of({"sample": "e", "ml": empty.to_dict()}, "ml").failed


def test_training_time_of_a_fine_tuned_model_file_counts_every_stage():
    stage1 = {"training": {"seconds": 1583.0}}
    assert training_seconds({"training": {"seconds": 526.0, "initial_model": stage1}}) == 2109.0
    assert training_seconds(stage1) == 1583.0 and training_seconds({}) is None
    from mxcube_autocenter.centring.predictor import SHIPPED_REGRESSOR
    from mxcube_autocenter.learning.training import load_model

    assert training_seconds(load_model(SHIPPED_REGRESSOR)[1]) == pytest.approx(526.08 + 1582.99)


def test_the_md3_recording_benchmark_reports_the_cameras_rate_and_the_frames_kept():
    # Figures only (bench prints them, never asserts): the camera's rate while the recorder reads the motors over
    # a simulated MD3 network, which tests/test_recorder.py checks.
    from mxcube_autocenter.simulation.experiments import recording_benchmark

    figures = recording_benchmark(quick=True)
    assert set(figures) == {"record_camera_idle_fps", "record_camera_md3_fps", "record_camera_md3_ratio",
                            "record_md3_kept_fps"}  # fmt: skip
    assert figures["record_camera_md3_ratio"] == pytest.approx(
        figures["record_camera_md3_fps"] / figures["record_camera_idle_fps"])
    assert figures["record_camera_md3_fps"] > 0 and 0 < figures["record_md3_kept_fps"] <= 10.5  # 10 configured
