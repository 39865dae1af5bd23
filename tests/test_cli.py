"""The command line's handling of bad input: a usage error or "error: ..." with exit code 2, nothing lost."""

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mxcube_autocenter.centring.predictor import SHIPPED_REGRESSOR
from mxcube_autocenter.cli import build_parser, main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["heatmap", "x.png", "--pixels-per-mm", "0"], "--pixels-per-mm: '0': expected a finite number greater than 0"),
        (["heatmap", "x.png", "--pixels-per-mm", "nan"], "'nan': expected a finite number greater than 0"),
        (["heatmap", "x.png", "--pixels-per-mm", "100", "--stride", "-6"], "--stride: '-6'"),
        (["heatmap", "x.png", "--pixels-per-mm", "100", "--min-score", "nan"], "--min-score: 'nan': expected a finite"),
        # As the min_score and heatmap_stride_px properties take them.
        (["heatmap", "x.png", "--pixels-per-mm", "100", "--min-score", "-3"], "'-3': expected a finite number of at least 0"),
        (["heatmap", "x.png", "--pixels-per-mm", "100", "--stride", "500"],
         "--stride: '500': expected a finite number greater than 0 and at most 64"),
        (["inspect", "x.h5", "--frames", "0"], "--frames: '0': expected a whole number of at least 1"),
        (["synthesize", "x.h5", "--line-fraction", "2"], "--line-fraction: '2': expected a finite number from 0 to 1"),
        (["synthesize", "x.h5", "--samples", "1.5"], "--samples: '1.5': expected a whole number"),
        (["label", "x.h5", "--out", "y.h5", "--nproc", "0"], "--nproc: '0'"),
        (["label", "x.h5", "--out", "y.h5", "--max-clock-offset", "0"], "--max-clock-offset: '0'"),
        (["simulate", "--images", "0"], "--images: '0'"),
        (["web", "--port", "70000"], "--port: '70000': expected a whole number from 1 to 65535"),
        (["bench", "--only", "renderr"], "invalid choice: 'renderr'"),
        (["inspect", "x.h5", "--frames", "1" + "0" * 400], "expected a whole number of at least 1"),
        (["demo", "--seed", "-1"], "--seed: '-1': expected a whole number of at least 0"),
        # 100000 ended in TensorFlow's out-of-memory traceback, 1 in CropSpec's "input_size must be ...".
        (["train", "x.h5", "--input-size", "100000"], "--input-size: '100000': expected a whole number from 8 to 512"),
        # -1 read as "every one of the training rows has the same class (1) ... label recordings of crystals".
        (["train", "x.h5", "--arch", "classifier", "--threshold", "-1"], "--threshold: '-1': expected a"),
        (["synthesize-regions", "x.h5", "--input-size", "1"], "--input-size: '1': expected a whole number from 8"),
        (["sweep", "x.h5", "--label", "on_ice"], "--label: invalid choice: 'on_ice'"),
        # 1e9 read as "the recording does not cover this collection; if it does, give clock_offset".
        (["label", "x.h5", "--out", "y.h5", "--camera-latency", "1e9"],
         "--camera-latency: '1e9': expected a finite number from 0 to 1"),
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


def test_synthesize_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, capsys):
    # HDF5's message (its whole error record: time, buffer address, bytes) was all the user got; a failed
    # close came as RuntimeError, a traceback. /dev/full refuses every write with ENOSPC, as a full disk does.
    out = tmp_path / "set.h5"
    Path(f"{out}.part").symlink_to("/dev/full")
    assert main(["synthesize", str(out), "--samples", "2", "--crops-per-sample", "4"]) == 2
    err = capsys.readouterr().err
    assert f"error: [Errno {errno.ENOSPC}] No space left on device: '{out}': free space there, choose another " \
           "output" in err
    assert list(tmp_path.iterdir()) == []


def test_demo_checks_its_model_and_configuration_before_it_clears_the_last_report(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("the last report")
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "missing.keras")]) == 2
    err = capsys.readouterr().err
    assert "missing.keras: no such model file" in err and "given with --model" in err
    # An ice network is checked before the training too, with or without --model.
    assert main(["demo", "--out", str(out), "--ice-model", str(tmp_path / "ice.keras")]) == 2
    err = capsys.readouterr().err
    assert "ice.keras: no such model file" in err and "centring_ice_model property; --ice-model" in err
    assert main(["demo", "--out", str(out), "--model", str(SHIPPED_REGRESSOR), "--ice-model",
                 str(tmp_path / "ice.keras")]) == 2  # fmt: skip
    assert "ice.keras: no such model file" in capsys.readouterr().err
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


def test_web_refuses_a_state_directory_whose_copy_would_be_the_configuration(tmp_path, capsys, monkeypatch):
    # The state directory's lookup/ gets a fresh copy of mxcube-web/: here that would delete the one it copies.
    import shutil

    from mxcube_autocenter.beamline import virtual_beamline_dir

    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("the server was started"))
    config = tmp_path / "state" / "lookup"
    shutil.copytree(virtual_beamline_dir(), config)
    before = sorted(p.name for p in (config / "mxcube-web").rglob("*"))
    assert main(["web", "--config", str(config), "--state-dir", str(tmp_path / "state")]) == 2
    assert "holds the configuration itself" in capsys.readouterr().err
    assert sorted(p.name for p in (config / "mxcube-web").rglob("*")) == before


@pytest.mark.parametrize(("server_yaml", "said"), [
    ("", "no server: section"),
    ("mxcube:\n  VIDEO_FORMAT: MJPEG\n", "no server: section"),
    ("server: [PORT, 8081]\n", "no server: section"),
    ("server:\n  PORT: 8081\n   HOST: x\n", "cannot be read as YAML"),
])  # fmt: skip
def test_web_refuses_a_server_yaml_without_a_server_section_naming_it(tmp_path, capsys, monkeypatch, server_yaml,
                                                                      said):  # fmt: skip
    # It ended in a bare KeyError or TypeError traceback.
    import shutil

    from mxcube_autocenter.beamline import virtual_beamline_dir

    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("the server was started"))
    config = tmp_path / "config"
    shutil.copytree(virtual_beamline_dir(), config)
    (config / "mxcube-web" / "server.yaml").write_text(server_yaml)
    assert main(["web", "--config", str(config), "--state-dir", str(tmp_path / "state")]) == 2
    assert f"{config / 'mxcube-web' / 'server.yaml'}: {said}" in capsys.readouterr().err


def test_web_leaves_a_site_configuration_in_the_state_directory_alone(tmp_path, capsys, monkeypatch):
    # The copy of mxcube-web/ is replaced at every start: a site's own folder there was deleted without a word.
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("the server was started"))
    site = tmp_path / "state" / "lookup" / "mxcube-web"
    site.mkdir(parents=True)
    # The same file names as the copy: a site's own folder holds server.yaml and ui.yaml too.
    (site / "server.yaml").write_text("server: {PORT: 8090}\n")
    (site / "ui.yaml").write_text("the site's")
    assert main(["web", "--state-dir", str(tmp_path / "state")]) == 2
    assert "was not written by `mxcube-autocenter web`: choose another --state-dir" in capsys.readouterr().err
    assert (site / "ui.yaml").read_text() == "the site's"
    assert (site / "server.yaml").read_text() == "server: {PORT: 8090}\n"


def test_web_looks_up_only_its_own_copy_in_the_state_directory(tmp_path):
    # The state directory itself was first on mxcubecore's lookup path: a site's beamline.yaml there (--state-dir
    # a configuration folder, or .) booted that site's hardware under the virtual beamline's banner.
    from mxcube_autocenter import web

    state = tmp_path / "state"
    (state / "mxcube-web").mkdir(parents=True)
    (state / "beamline.yaml").write_text("the site's")
    command = web.server_command(state)
    lookup = command[command.index("-r") + 1].split(os.pathsep)
    assert lookup[0] == str((state / "lookup").resolve()) and str(state.resolve()) not in lookup
    assert sorted(p.name for p in (state / "lookup").iterdir()) == ["mxcube-web"]
    assert (state / "beamline.yaml").read_text() == "the site's" and not any((state / "mxcube-web").iterdir())


def test_the_web_servers_secret_key_is_not_the_one_in_the_repository(tmp_path):
    # The virtual beamline's server.yaml holds a public placeholder: with it anyone could sign session cookies.
    import ruamel.yaml

    from mxcube_autocenter import web

    keys = []
    for _ in range(2):
        web.server_command(tmp_path / "state")
        server = ruamel.yaml.YAML().load((tmp_path / "state" / "lookup" / "mxcube-web" / "server.yaml").read_text())
        keys.append((server["server"]["SECRET_KEY"], server["server"]["SECURITY_PASSWORD_SALT"]))
    assert all(len(key) == 64 and not key.startswith(web.SHIPPED_SECRET) for pair in keys for key in pair)
    assert keys[0] != keys[1]
    assert (tmp_path / "state" / "lookup" / "mxcube-web" / "server.yaml").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("row", range(0, 20, 4))  # the samples' first rows: a crystal of each subset
def test_a_corrupt_row_is_an_error_that_names_the_set_and_the_row_before_anything_is_written(tmp_path, capsys, row):
    # Found inside tf.data the error left the program hanging or aborting at its exit; a test row was found only
    # once the training was over; and an earlier model's checkpoint in --out was removed first.
    import h5py
    import numpy as np

    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    dataset = tmp_path / "set.h5"
    synthetic_dataset(dataset, n_samples=5, seed=1, crops_per_sample=4, stored_crop_um=240, progress=False)
    with h5py.File(dataset, "r+") as h5file:
        h5file["samples/image"][row] = np.frombuffer(b"\xff\xd8" + b"\x00" * 100, np.uint8)
    out = tmp_path / "model"
    out.mkdir()
    (out / "checkpoint.keras").write_bytes(b"an earlier run's")
    argv = ["train", str(dataset), "--out", str(out), "--epochs", "1", "--input-size", "32", "--crop-um", "120",
            "--batch-size", "4", "--cache", "none"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {dataset}: row {row}: its stored image is no readable JPEG image: the file is damaged" in err
    assert "write it again" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.keras"]


def test_a_full_disk_names_the_output_and_the_fix(tmp_path, monkeypatch, capsys):
    # Keras' checkpoint and the report's figures raise without a file name: the message was "[Errno 28] No space
    # left on device" alone.
    import errno

    from mxcube_autocenter.learning import evaluate

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate, "evaluate", full)
    out = tmp_path / "report"
    assert main(["evaluate", "model.keras", "set.h5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: [Errno 28] No space left on device (writing {out}): free "
                                               "space there, choose another output")  # fmt: skip

    def read_only(*args, **kwargs):  # a file of its own named: not blamed on --out
        raise OSError(errno.EROFS, "Read-only file system", "/tmp/cache/x")

    monkeypatch.setattr(evaluate, "evaluate", read_only)
    assert main(["evaluate", "model.keras", "set.h5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("error: [Errno 30] Read-only file system: '/tmp/cache/x': it is "
                                               "read-only, choose another output")  # fmt: skip


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
        hits = [True] * len(scorecard.HIT_TEST_OMEGAS)
        outcome = scorecard.Outcome("ml", "s0", True, False, {"sampx": 0.0}, 4.0, hits=hits, dist_um=5.0,
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
    assert (tmp_path / "sample16_gallery.png").is_file()  # gallery.png: each seed replaced the last one's
    assert all(read_recording(p).status == "complete" for p in recordings)
    # A second run into the same --out takes the next run numbers: it replaced the first run's EIGER files,
    # and the first run's recordings were then labelled with the second collection's counts.
    masters = {p.name: p.read_bytes() for p in (tmp_path / "data").glob("*_master.h5")}
    assert main(["simulate", "--seed", "16", "--out", str(tmp_path), "--images", "2"]) == 0
    assert "these are runs 3 and 4" in capsys.readouterr().out
    assert all((tmp_path / "data" / name).read_bytes() == content for name, content in masters.items())
    assert sorted(p.name for p in (tmp_path / "data").glob("*_master.h5")) == [
        f"sample16_{run}_master.h5" for run in (1, 2, 3, 4)]
    # The usual first mistakes with these files: a recording given as the dataset, a text file as the model.
    assert main(["train", str(recordings[0]), "--out", str(tmp_path / "model")]) == 2
    assert "a camera recording, not a dataset: label it first (`mxcube-autocenter label" in capsys.readouterr().err
    (tmp_path / "notes.keras").write_text("not a model")
    assert main(["train", str(recordings[0]), "--initial-model", str(tmp_path / "notes.keras")]) == 2
    assert "notes.keras: the file is not a .keras model" in capsys.readouterr().err


@pytest.mark.parametrize("options, refused", [(["--arch", "classifier", "--transform", "tanh"], "--transform"),
                                              (["--threshold", "3"], "--threshold"),
                                              (["--arch", "a4", "--threshold", "3"], "--threshold")])
def test_train_refuses_an_option_that_does_not_apply_to_the_model_it_trains(tmp_path, capsys, options, refused):
    # Accepted and dropped, the run would not be the one asked for.
    assert main(["train", str(tmp_path / "set.h5"), "--out", str(tmp_path / "model"), *options]) == 2
    assert f"error: {refused} does not apply to a" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("options, refused", [
    (["--transform", "tanh"], "has transform 'log', not 'tanh': train with transform='log'; on the command line "
                              "--transform log"),
    (["--arch", "classifier"], "has task 'regression' and architecture 'fcn', not 'classifier' and 'classifier'"),
    (["--arch", "a5"], "has task 'regression' and architecture 'fcn', not 'regression' and 'a5'"),
    (["--crop-um", "100"], "has crop_um 240.0, not 100.0: train with crop_um=240.0; on the command line --crop-um 240.0"),
    (["--input-size", "64"], "has input_size 128, not 64"),
    (["--arch", "fcn_classifier", "--input-size", "64"], "has input_size 128, not 64"),
])  # fmt: skip
def test_fine_tuning_refuses_an_option_other_than_the_models_own(tmp_path, capsys, options, refused):
    # The shipped regressor is an fcn on 128 px crops of 240 um learning log counts: any other --arch, input or
    # --transform was replaced by the model's without a word (--arch classifier trained a regressor). Refused
    # before the dataset is read (here it is missing).
    out = tmp_path / "model"
    assert main(["train", str(tmp_path / "set.h5"), "--initial-model", "shipped", "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert "the initial model " + refused in err and "fine-tuning keeps the initial model's" in err
    assert not out.exists()


def test_fine_tuning_accepts_the_models_own_settings_given_again(tmp_path, capsys):
    # Reaches the dataset (missing here), so nothing was refused.
    assert main(["train", str(tmp_path / "set.h5"), "--initial-model", "shipped", "--arch", "fcn", "--crop-um", "240",
                 "--input-size", "128", "--transform", "log"]) == 2
    err = capsys.readouterr().err
    assert "fine-tuning keeps" not in err and "set.h5" in err


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
    args = build_parser().parse_args(["train", "set.h5", "--initial-model", "shipped"])
    assert args.initial_model == str(SHIPPED_REGRESSOR)


def test_label_refuses_an_out_under_a_file_before_it_counts_any_spots(tmp_path, capsys):
    # Each recording was spot-found, then failed with "labelling failed (NotADirectoryError ...): please report it".
    (tmp_path / "a_file").write_text("")
    assert main(["label", str(tmp_path / "x_camera.h5"), "--out", str(tmp_path / "a_file" / "set.h5")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a_file'} is a file, not a folder: choose another --out" in err
    assert "please report it" not in err and "Traceback" not in err


def test_outputs_that_a_file_stands_in_the_way_of_are_refused_naming_it(tmp_path, capsys):
    # They ended with a bare "[Errno 17] File exists: '.../a_file'" (or Errno 20), naming no option and no fix;
    # synthesize --overwrite onto a folder rendered every sample before "[Errno 21] Is a directory".
    from mxcube_autocenter.learning.synthetic import synthetic_dataset

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    (tmp_path / "folder").mkdir()
    assert main(["synthesize", str(tmp_path / "folder"), "--samples", "1", "--overwrite"]) == 2
    assert f"{tmp_path / 'folder'} is a folder: give the file to write" in capsys.readouterr().err
    assert main(["synthesize", str(blocker / "set.h5"), "--samples", "1", "--crops-per-sample", "1"]) == 2
    assert f"cannot create the folder {blocker} (it is a file, not a folder): choose another" in capsys.readouterr().err
    dataset = tmp_path / "set.h5"
    synthetic_dataset(dataset, n_samples=5, seed=1, crops_per_sample=4, stored_crop_um=240, progress=False)
    options = ["--epochs", "1", "--input-size", "32", "--crop-um", "120", "--batch-size", "4"]
    assert main(["train", str(dataset), "--out", str(blocker / "model"), *options]) == 2
    assert f"({blocker} is a file, not a folder): choose another --out" in capsys.readouterr().err
    assert main(["sweep", str(dataset), "--out", str(blocker), "--archs", "a1", *options]) == 2
    assert f"cannot create the folder {blocker}: it is a file: choose another --out" in capsys.readouterr().err
    regions = tmp_path / "regions.h5"
    assert main(["synthesize-regions", str(regions), "--samples", "4", "--views-per-sample", "1", "--cells", "3",
                 "--input-size", "32", "--crop-um", "120"]) == 0  # fmt: skip
    assert main(["train-dense", str(regions), "--out", str(blocker), "--epochs", "1", "--batch-size", "2"]) == 2
    assert f"cannot create the folder {blocker} (it is a file, not a folder): choose another --out" in (
        capsys.readouterr().err)
    assert main(["simulate", "--out", str(blocker / "simulate"), "--images", "2"]) == 2
    assert f"({blocker} is a file, not a folder): choose another --out" in capsys.readouterr().err
    images = [str(p) for p in sorted((Path(__file__).parent / "data" / "real_oav").glob("dls_ins_*.png"))]
    assert main(["heatmap", *images, "--pixels-per-mm", "1000", "--json", "--png", str(blocker)]) == 1
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["error"] for e in entries] == [f"cannot create the folder {blocker} (it is a file, not a folder): "
                                             "choose another --png"] * 2
    assert blocker.read_text() == ""


def _synthesize_rendering(tmp_path, **popen_options):
    """``synthesize`` with two rendering workers in a session of its own, once the first samples are in; the
    process, its set's path and its stderr's file."""
    import re
    import time

    out, log = tmp_path / "set.h5", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # a file, not a pipe: gevent's patched pipes are no place for a reader thread
        run = subprocess.Popen(
            [sys.executable, "-m", "mxcube_autocenter.cli", "synthesize", str(out), "--samples", "300",
             "--workers", "2"],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, **popen_options,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    rendering = re.compile(r"\| +[1-9]\d*/300")
    while not rendering.search(log.read_text()) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return run, out, log


def test_synthesize_with_workers_ends_at_ctrl_c_and_leaves_no_part_file(tmp_path):
    # The pool waited for the tasks Ctrl-C had ended in its workers: the command hung for ever, each worker
    # printing a KeyboardInterrupt traceback, and DATASET.h5.part stayed. Nor does it render the samples
    # still queued (minutes of them) before it ends.
    import os
    import signal

    run, out, log = _synthesize_rendering(
        tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal starts it
    try:
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: to every process of the terminal's group
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    err = log.read_text()
    assert run.returncode == 130, err[-2000:]
    assert "mxcube-autocenter synthesize: interrupted" in err and "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.part").exists()


def test_a_command_stopped_with_sigterm_ends_as_at_ctrl_c_and_leaves_no_worker(tmp_path):
    # `timeout`, systemd and batch systems stop with SIGTERM, which Python's default ends at once: the worker
    # processes (spot finding, rendering) were left running, holding their files open, and DATASET.h5.part stayed.
    import os
    import signal
    import time

    run, out, log = _synthesize_rendering(tmp_path)
    try:
        os.kill(run.pid, signal.SIGTERM)  # to the command alone, as `timeout` sends it
        run.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its workers end with it: nothing left in its process group
            try:
                os.killpg(run.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("worker processes still run after the command ended")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    err = log.read_text()
    assert run.returncode == 143, err[-2000:]
    assert "mxcube-autocenter synthesize: terminated" in err and "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.part").exists()


def test_spot_finding_and_rendering_workers_leave_ctrl_c_to_their_parent():
    # Each worker printed its own KeyboardInterrupt traceback under the one-line "interrupted".
    import signal

    from mxcube_autocenter.labelling import pipeline
    from mxcube_autocenter.learning import synthetic

    package_log = logging.getLogger("mxcube_autocenter")
    for initializer in (pipeline._one_thread_per_worker, synthetic.ignore_interrupts):
        previous, level = signal.getsignal(signal.SIGINT), package_log.level
        try:
            initializer()
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        finally:
            # A worker's, not this process's: the spot finder's also quiets the package's warnings.
            signal.signal(signal.SIGINT, previous)
            package_log.setLevel(level)


def test_scorecard_names_the_run_whose_samples_are_damaged(tmp_path, capsys):
    # Of several runs pooled, the error said only "sample s0 has no complete 'ml' outcome".
    good, damaged = tmp_path / "good.json", tmp_path / "damaged.json"
    good.write_text(json.dumps([{"sample": "s1", "has_crystal": True}]))
    damaged.write_text(json.dumps([{"sample": "s0", "has_crystal": True, "ml": {"dist_um": 3.0}}]))
    assert main(["scorecard", str(good), str(damaged)]) == 2
    assert f"error: {damaged}: sample s0 has no complete 'ml' outcome" in capsys.readouterr().err
    assert main(["compare", str(damaged), str(good)]) == 2
    assert f"error: {damaged}: sample s0" in capsys.readouterr().err


@pytest.mark.parametrize("options, refused", [
    (["--clock-offset", "0", "--max-clock-offset", "5"], "--max-clock-offset goes with an estimated clock offset"),
    (["--spots-from", "spots.csv", "--nproc", "2"], "--nproc goes with our spot finder, not with --spots-from"),
])
def test_label_refuses_an_option_the_other_one_leaves_unused(tmp_path, capsys, options, refused):
    # Accepted, they changed nothing: a given clock offset is never checked against the maximum, and counts read
    # from a file start no spot-finding processes.
    out = tmp_path / "set.h5"
    assert main(["label", str(tmp_path / "x_camera.h5"), "--out", str(out), *options]) == 2
    assert f"error: {refused}" in capsys.readouterr().err
    assert not out.exists()


def test_heatmap_refuses_a_beam_position_without_an_overlay(tmp_path, capsys):
    # The beam position only marks the overlay: without --png it was accepted and ignored.
    assert main(["heatmap", str(tmp_path / "frame.png"), "--pixels-per-mm", "1000", "--beam", "640,512"]) == 2
    assert "error: --beam marks the beam on the --png overlay; give --png too" in capsys.readouterr().err


@pytest.mark.parametrize(("arch", "out"), [("fcn", "out/model"), ("a9", "out/model"), ("classifier", "out/classifier"),
                                           ("fcn_classifier", "out/classifier")])  # fmt: skip
def test_train_keeps_regressors_and_classifiers_apart_by_default(tmp_path, monkeypatch, arch, out):
    # Both went to out/model: training the classifier after the regressor replaced the regressor.
    from mxcube_autocenter.learning import training

    given = []

    def stop(out):
        given.append(out)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", lambda dataset, arch, transform, out, **kw: stop(out=out))
    monkeypatch.setattr(training, "train_classifier", lambda dataset, out, **kw: stop(out=out))
    assert main(["train", str(tmp_path / "set.h5"), "--arch", arch]) == 130
    assert given == [out]



@pytest.mark.parametrize(("given", "said"), [("folder", "a folder, not a file: give a file in it"),
                                             ("model.keras", "a zip archive (a .keras model file?), not an HDF5 file"),
                                             ("frame.jpg", "a JPEG image, not an HDF5 file")])  # fmt: skip
def test_a_folder_or_another_kind_of_file_for_an_hdf5_one_is_named_as_such(tmp_path, capsys, given, said):
    # h5py's whole error record was printed ("file read failed: time = ..., buf = 0x7ff..., total read size = 8"),
    # with "check the path and that the file is complete" for a folder, and nothing of a model given as the dataset.
    path = tmp_path / given
    if given == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"PK\x03\x04 a zip" if given.endswith(".keras") else b"\xff\xd8\xff\xe0 a JPEG")
    for argv in (["train", str(path)], ["inspect", str(path)], ["label", str(path), "--out", str(tmp_path / "s.h5")]):
        main(argv)
        said_here = capsys.readouterr()
        text = said_here.out + said_here.err  # label's summary is on stdout
        assert f"{path}: {said}" in text or f"recording {path}: {said}" in text, (argv, text)
        assert "buf =" not in text and "Traceback" not in text


def test_a_classifier_from_a_regressor_without_fcn_classifier_is_refused_naming_the_task(tmp_path):
    # The regressor's architecture was taken for the classifier's: "architecture 'fcn' is a regression model".
    from mxcube_autocenter.learning.training import train_classifier

    with pytest.raises(ValueError, match=r"the initial model has task 'regression' and architecture 'fcn', not "
                                         r"'classifier' and 'classifier'"):  # fmt: skip
        train_classifier(tmp_path / "set.h5", tmp_path / "out", initial_model=SHIPPED_REGRESSOR, verbose=0)


def test_train_dense_refuses_a_transform_other_than_the_initial_models_before_reading_the_regions(tmp_path, capsys):
    assert main(["train-dense", str(tmp_path / "missing.h5"), "--initial-model", "shipped", "--transform", "tanh",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the initial model has transform 'log', not 'tanh'" in err and "missing.h5" not in err


def test_the_heatmap_commands_defaults_are_the_xml_properties_defaults():
    from mxcube_autocenter.config import AutoCenterConfig

    args = build_parser().parse_args(["heatmap", "x.png", "--pixels-per-mm", "1000"])
    config = AutoCenterConfig()
    assert (args.pin_side, args.stride, args.min_score, args.symmetries) == (
        config.pin_side, config.heatmap_stride_px, config.min_score, config.heatmap_symmetries)


def test_bench_json_stays_json_when_a_figure_is_no_number(monkeypatch):
    # A NaN figure printed NaN, which no JSON reader takes: the whole object was lost to a tracker.
    from mxcube_autocenter import bench

    monkeypatch.setattr(bench, "_registry", lambda: [("render", lambda quick: {"a_ms": float("nan"), "b_s": 2.5,
                                                                             "c_pct": float("inf"), "n": 3})])
    figures = bench.run_all(only=["render"], progress=lambda message: None)
    assert figures == {"a_ms": None, "b_s": 2.5, "c_pct": None, "n": 3}
    json.dumps(figures, allow_nan=False)  # as bench --json prints it
