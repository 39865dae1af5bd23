"""The command line's handling of bad input: a usage error or "error: ..." with exit code 2, nothing lost."""

import json
import subprocess
import sys

import pytest

from mxcube_autocenter.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["heatmap", "x.png", "--pixels-per-mm", "0"], "--pixels-per-mm: '0': expected a finite number greater than 0"),
        (["heatmap", "x.png", "--pixels-per-mm", "nan"], "'nan': expected a finite number greater than 0"),
        (["heatmap", "x.png", "--pixels-per-mm", "100", "--stride", "-6"], "--stride: '-6'"),
        (["heatmap", "x.png", "--pixels-per-mm", "100", "--min-score", "nan"], "--min-score: 'nan': expected a finite"),
        (["inspect", "x.h5", "--frames", "0"], "--frames: '0': expected a whole number of at least 1"),
        (["synthesize", "x.h5", "--line-fraction", "2"], "--line-fraction: '2': expected a finite number from 0 to 1"),
        (["synthesize", "x.h5", "--samples", "1.5"], "--samples: '1.5': expected a whole number"),
        (["label", "x.h5", "--out", "y.h5", "--nproc", "0"], "--nproc: '0'"),
        (["simulate", "--images", "0"], "--images: '0'"),
        (["web", "--port", "70000"], "--port: '70000': expected a whole number from 1 to 65535"),
        (["bench", "--only", "renderr"], "invalid choice: 'renderr'"),
        (["inspect", "x.h5", "--frames", "1" + "0" * 400], "expected a whole number of at least 1"),
        (["demo", "--seed", "-1"], "--seed: '-1': expected a whole number of at least 0"),
    ],
)
def test_numbers_and_names_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_synthesize_never_overwrites_without_being_told(tmp_path, capsys):
    existing = tmp_path / "labelled.h5"
    existing.write_bytes(b"a training set that took a beamtime to label")
    assert main(["synthesize", str(existing), "--samples", "1", "--crops-per-sample", "1"]) == 2
    assert "exists: choose another name, or pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"a training set that took a beamtime to label"
    blocked = tmp_path / "a_file" / "set.h5"
    (tmp_path / "a_file").write_text("")
    assert main(["synthesize-regions", str(blocked), "--samples", "1", "--overwrite"]) == 2
    assert "error:" in capsys.readouterr().err


def test_demo_checks_its_model_and_configuration_before_it_clears_the_last_report(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("the last report")
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "missing.keras")]) == 2
    err = capsys.readouterr().err
    assert "missing.keras: no such model file" in err and "given with --model" in err
    assert main(["demo", "--quick", "--out", str(out), "--config", str(tmp_path / "nowhere")]) == 2
    assert "holds no beamline.yaml" in capsys.readouterr().err
    (out / "learning").mkdir()
    own = out / "learning" / "model.keras"
    own.write_bytes(b"a model the last run trained")
    assert main(["demo", "--out", str(out), "--model", str(own)]) == 2  # the demo would remove it first
    assert "copy it elsewhere first" in capsys.readouterr().err and own.exists()
    assert (out / "report.md").read_text() == "the last report"
    # Options the run would ignore are refused, not dropped.
    assert main(["demo", "--out", str(out), "--classifier", str(own)]) == 2
    assert "--classifier goes with --model" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--input-size", "96"]) == 2
    assert "--input-size goes with --from-scratch" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--quick", "--from-scratch", "--epochs", "3"]) == 2
    assert "--from-scratch, --epochs: no recording or training with --quick" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--model", str(own), "--use-shipped-model"]) == 2
    assert "give one model to centre with" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "the last report"


def test_web_names_an_unwritable_state_directory_and_a_missing_ui_build(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert main(["web", "--state-dir", str(tmp_path / "a_file" / "state")]) == 2
    assert "choose another --state-dir" in capsys.readouterr().err
    assert main(["web", "--state-dir", str(tmp_path / "state"), "--ui-build", str(tmp_path / "no_ui")]) == 2
    assert "holds no index.html" in capsys.readouterr().err


def test_web_refuses_a_state_directory_that_is_the_configuration_directory(tmp_path, capsys):
    # The state directory gets a fresh copy of mxcube-web/: here that would delete the one it copies.
    import shutil

    from mxcube_autocenter.beamline import virtual_beamline_dir

    shutil.copytree(virtual_beamline_dir(), tmp_path / "config")
    before = sorted(p.name for p in (tmp_path / "config" / "mxcube-web").rglob("*"))
    assert main(["web", "--config", str(tmp_path / "config"), "--state-dir", str(tmp_path / "config")]) == 2
    assert "holds the configuration itself" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "config" / "mxcube-web").rglob("*")) == before


def test_a_corrupt_row_found_while_training_is_an_error_that_names_the_set_and_the_row(tmp_path, capsys):
    import h5py
    import numpy as np

    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    dataset = tmp_path / "set.h5"
    synthetic_dataset(dataset, n_samples=5, seed=1, crops_per_sample=4, stored_crop_um=240, progress=False)
    with h5py.File(dataset, "r+") as h5file:
        h5file["samples/image"][5] = np.frombuffer(b"\xff\xd8" + b"\x00" * 100, np.uint8)
    argv = ["train", str(dataset), "--out", str(tmp_path / "model"), "--epochs", "1", "--input-size", "32",
            "--crop-um", "120", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {dataset}: row 5: " in err and "write it again" in err and "Traceback" not in err


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    from mxcube_autocenter.labelling import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "label_recordings", interrupted)
    assert main(["label", str(tmp_path / "x_camera.h5"), "--out", str(tmp_path / "set.h5")]) == 130
    assert capsys.readouterr().err.strip() == "mxcube-autocenter label: interrupted"


def test_compare_refuses_a_run_given_in_two_pairs(tmp_path, capsys):
    # Its crystals would count twice: twice the crystals and a smaller standard error.
    from mxcube_autocenter import scorecard

    def report(name, rc_fraction):
        outcome = scorecard.Outcome("ml", "s0", True, False, {"sampx": 0.0}, 4.0, hits=[True] * 4, dist_um=5.0,
                                    rc_fraction=rc_fraction)
        path = tmp_path / name
        path.write_text(json.dumps([{"sample": "s0", "description": "d", "has_crystal": True,
                                     "ml": outcome.to_dict()}]))
        return str(path)

    a, b = report("a.json", 0.5), report("b.json", 0.9)
    assert main(["compare", a, b, "--json"]) == 0
    capsys.readouterr()
    assert main(["compare", a, b, a, b]) == 2
    assert "a.json is in more than one pair" in capsys.readouterr().err


def test_simulate_closes_both_camera_recordings_before_it_ends(tmp_path, capsys):
    # The recordings close in the background; tearing the beamline down first left the second one open
    # (and the process crashed at exit while its file was being written).
    from mxcube_autocenter.recording import read_recording

    assert main(["simulate", "--seed", "16", "--out", str(tmp_path), "--images", "16"]) == 0
    out = capsys.readouterr().out
    assert "Helical: camera recording of" in out and "OSC: camera recording of" in out
    recordings = sorted((tmp_path / "data").rglob("*_camera.h5"))
    assert [p.name for p in recordings] == ["sample16_1_camera.h5", "sample16_2_camera.h5"]
    assert all(read_recording(p).status == "complete" for p in recordings)
    # The usual first mistakes with these files: a recording given as the dataset, a text file as the model.
    assert main(["train", str(recordings[0]), "--out", str(tmp_path / "model")]) == 2
    assert "a camera recording, not a dataset: label it first (`mxcube-autocenter label" in capsys.readouterr().err
    (tmp_path / "notes.keras").write_text("not a model")
    assert main(["train", str(recordings[0]), "--initial-model", str(tmp_path / "notes.keras")]) == 2
    assert "notes.keras: the file is not a .keras model" in capsys.readouterr().err


def test_simulate_names_a_refused_auto_centring_configuration_without_a_traceback(tmp_path, capsys):
    # mxcubecore logs the refused property and loads the beamline without the object; simulate then ended
    # in a LookupError traceback (exit code 1) after writing the gallery.
    import shutil

    from mxcube_autocenter.beamline import virtual_beamline_dir

    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    xml = config / "auto_centring.xml"
    xml.write_text(xml.read_text().replace("<record_frame_rate>10<", "<record_frame_rate>fast<"))
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(config), "--out", str(out), "--images", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: no 'auto_centring' object loaded" in err and "check the log for configuration errors" in err
    assert "Traceback" not in err and not out.exists()


def test_the_beamline_log_is_printed_once(tmp_path):
    # mxcubecore's first module-level logging call ran logging.basicConfig: every line came twice.
    run = subprocess.run([sys.executable, "-m", "mxcube_autocenter.cli", "simulate", "--out", str(tmp_path),
                          "--images", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    both = run.stdout + run.stderr
    assert both.count("SampleView automatic centring now runs the optical ML centring") == 1, both[-3000:]
    assert both.count("recording complete") == 2


def test_initial_model_shipped_names_the_shipped_regressor():
    from mxcube_autocenter.centring.predictor import DEFAULT_REGRESSOR
    from mxcube_autocenter.cli import build_parser

    args = build_parser().parse_args(["train", "set.h5", "--initial-model", "shipped"])
    assert args.initial_model == str(DEFAULT_REGRESSOR)
