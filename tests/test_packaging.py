"""What a non-editable install (``pip install <checkout>``, as the staff guide says) carries."""

import glob
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools.config.setupcfg import read_configuration

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mxcube_autocenter"


def test_every_data_file_of_the_package_goes_into_the_wheel():
    # A data file that no package_data glob names stays behind in the checkout: the shipped model (the hardware
    # object's default) or the virtual beamline's XML (the default of simulate, demo and web) would be missing.
    globs = read_configuration(ROOT / "setup.cfg")["options"]["package_data"]["mxcube_autocenter"]
    data_files = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc")}  # fmt: skip
    assert any(name.startswith("virtual_beamline/") for name in data_files)
    # As setuptools globs them: a * stays within its folder.
    carried = {name for pattern in globs for name in glob.glob(pattern, root_dir=PACKAGE)}
    assert not data_files - carried


def test_the_virtual_beamline_is_found_inside_the_package():
    from mxcube_autocenter.beamline import virtual_beamline_dir

    assert virtual_beamline_dir().parent == PACKAGE
    assert (virtual_beamline_dir() / "beamline.yaml").is_file()


def test_the_code_version_names_the_commit_of_a_checkout():
    from mxcube_autocenter import __version__, code_version

    version = code_version()
    assert version.startswith(__version__)
    if (ROOT / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        assert version.split(".dirty")[0] == f"{__version__}+g{head}"


def test_a_tango_object_loaded_after_the_models_does_not_abort_the_process():
    # PyTango and TensorFlow both bundle gRPC: PyTango imported after TensorFlow aborted the process ("Flag
    # 'grpc_experiments' was defined more than once"), as an MXCuBE loading a Tango object after this plugin would.
    script = ("from mxcube_autocenter.centring.predictor import load_predictor; load_predictor(); "
              "from mxcubecore.HardwareObjects.TangoLimaVideo import TangoLimaVideo; print('loaded')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr[-2000:]
    # A script that imports TensorFlow itself first: PyTango, imported after it, would abort it at once.
    script = "import tensorflow; from mxcube_autocenter.learning import training; print('loaded')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr[-2000:]
