"""The MXCuBE web server (mxcubeweb, the ``web`` extra) on the virtual beamline.

``mxcube-autocenter web`` and the end-to-end tests start the real
``mxcubeweb-server`` from PyPI with the virtual beamline's configuration,
in which the AutoCenter object runs the web UI's auto-centring button and
the queue's auto loop centring on mount. The configuration directory holds
``mxcube-web/server.yaml`` and ``ui.yaml``; :func:`server_command` writes a
copy of ``mxcube-web/`` whose ``server.yaml`` has the host, port and user
database asked for, and puts it first on mxcubecore's lookup path, so the
shipped files stay untouched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

from mxcube_autocenter.beamline import mxcubecore_mockup_dir, virtual_beamline_dir

WEB_CONFIG = "mxcube-web"
# The state directory's folder on mxcubecore's lookup path, which holds the copy of WEB_CONFIG alone: the state
# directory itself may hold anything (a site's beamline.yaml would come before the virtual beamline's).
LOOKUP = "lookup"
# How the virtual beamline's server.yaml begins its secret key and salt, public placeholders.
SHIPPED_SECRET = "virtual-beamline-"
# In the copy of WEB_CONFIG: the command's own, which it may replace.
WRITTEN_HERE = "WRITTEN_BY_MXCUBE_AUTOCENTER"
DEFAULT_HOST = "127.0.0.1"
# mxcubeweb's default, and where its UI development server sends API calls.
DEFAULT_PORT = 8081
API = "/mxcube/api/v0.1"
# What the lims mockup (lims.xml: ISPyBClientMockup) accepts: this proposal,
# and any password except "wrong".
LOGIN_PROPOSAL = "idtest0"
LOGIN_PASSWORD = "idtest0"


class WebSetupError(RuntimeError):
    """mxcubeweb is missing, or the configuration directory cannot serve it."""


def server_executable() -> Path:
    """The ``mxcubeweb-server`` script of this Python environment.

    Raises
    ------
    WebSetupError
        If mxcubeweb is not installed.
    """
    beside = Path(sys.executable).with_name("mxcubeweb-server")
    found = beside if beside.is_file() else shutil.which("mxcubeweb-server")
    if not found:
        raise WebSetupError(
            "mxcubeweb-server not found: install the web extra (`pip install -e '.[web]'`; `make test` does it)"
        )
    return Path(found)


def server_command(state_dir, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, config_dir=None,
                   ui_build=None) -> list:  # fmt: skip
    """Write the server's run-time configuration and return the command that starts it.

    Parameters
    ----------
    state_dir : path
        Directory for the run-time ``lookup/mxcube-web/`` copy and the user
        database (created; reused by later runs).
    host, port
        Where the server listens.
    config_dir : path, optional
        Beamline configuration directory with ``mxcube-web/``; default: the
        virtual beamline.
    ui_build : path, optional
        A built mxcubeweb UI (its ``ui/build`` folder) for the server to serve.

    Returns
    -------
    list of str
        ``mxcubeweb-server -r <lookup path> [-s <ui_build>]``.

    Raises
    ------
    WebSetupError
        If mxcubeweb is missing, ``config_dir`` has no ``mxcube-web/server.yaml``,
        ``ui_build`` is not a built UI or ``state_dir`` cannot be written.
    """
    executable = server_executable()
    import ruamel.yaml  # mxcubeweb's own YAML reader, installed with it

    config_dir = Path(config_dir) if config_dir else virtual_beamline_dir()
    source = config_dir / WEB_CONFIG
    if not (source / "server.yaml").is_file():
        raise WebSetupError(
            f"{source / 'server.yaml'} not found: mxcubeweb needs a {WEB_CONFIG}/ folder with server.yaml and "
            "ui.yaml in the beamline configuration directory (see mxcube_autocenter/virtual_beamline/)"
        )
    if ui_build and not (Path(ui_build) / "index.html").is_file():
        raise WebSetupError(f"{ui_build} holds no index.html: give the ui/build folder of a built mxcubeweb UI")
    state_dir = Path(state_dir).resolve()
    target = state_dir / LOOKUP / WEB_CONFIG
    if target == source.resolve():
        # The copy below replaces target: here that would delete the configuration it copies.
        raise WebSetupError(
            f"--state-dir {state_dir} holds the configuration itself ({source}): choose another --state-dir"
        )
    if target.exists() and not (target / WRITTEN_HERE).is_file():
        # Replaced at every start: a site's own mxcube-web/ there would be lost, and would come first on the
        # lookup path (its beamline.yaml, too, before the virtual beamline's). Its file names tell nothing: a
        # site's own holds server.yaml and ui.yaml, as the copy does.
        raise WebSetupError(f"{target} was not written by `mxcube-autocenter web`: choose another --state-dir "
                            "(the command replaces its mxcube-web/ at every start), or delete that folder if "
                            "an earlier version of the command wrote it")  # fmt: skip
    yaml = ruamel.yaml.YAML()
    settings = _server_settings(yaml, source / "server.yaml")
    settings["server"].update(HOST=host, PORT=int(port), USER_DB_PATH=str(state_dir / "mxcube-user.db"))
    for key in ("SECRET_KEY", "SECURITY_PASSWORD_SALT"):
        # The virtual beamline's are in the repository for all to read, and mxcubeweb's own defaults (where none
        # is given) in its source: with them anyone could sign the server's session cookies. Fresh ones each start
        # (the sessions of the last start end); a site's own are kept.
        if not settings["server"].get(key) or str(settings["server"][key]).startswith(SHIPPED_SECRET):
            settings["server"][key] = secrets.token_hex(32)
    try:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)  # with its parents
        (target / WRITTEN_HERE).write_text("written by `mxcube-autocenter web`, replaced at its next start\n")
        # Readable by its owner alone, from its first byte: the session cookies are signed with the secrets in it.
        (target / "server.yaml").unlink()  # the copy's, readable by all
        with os.fdopen(os.open(target / "server.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            yaml.dump(settings, out)
    except OSError as err:
        raise WebSetupError(f"cannot write the server's configuration into {state_dir} ({err}): choose another --state-dir") from None
    # The first directory holding mxcube-web/ wins; the mockup directory holds the camera images.
    lookup = os.pathsep.join(str(p) for p in (target.parent, config_dir.resolve(), mxcubecore_mockup_dir()))
    command = [str(executable), "-r", lookup]
    if ui_build:
        command += ["-s", str(Path(ui_build).resolve())]
    return command


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nobody listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, process, timeout: float = 120.0):
    """Wait until the server at ``url`` answers its login-info route.

    Parameters
    ----------
    url : str
        ``http://host:port``.
    process : subprocess.Popen
        The server: if it exits, waiting stops with its exit status.
    timeout : float
        Seconds (loading the beamline and the models takes 10-40 s).

    Raises
    ------
    WebSetupError
        If the server exited or did not answer in time.
    """
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise WebSetupError(f"mxcubeweb-server exited with status {process.returncode} before it was ready")
        try:
            # A server still loading may accept the connection and not answer yet.
            wait_s = min(5.0, max(0.5, deadline - time.monotonic()))
            if requests.get(f"{url}{API}/login/login_info", timeout=wait_s).ok:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.5)
    raise WebSetupError(f"mxcubeweb-server at {url} not ready after {timeout:.0f} s")


def _server_settings(yaml, path: Path):
    """mxcubeweb's server.yaml, refused naming the file unless it parses and has a ``server:`` section."""
    import ruamel.yaml

    try:
        settings = yaml.load(path.read_text())
    except (OSError, UnicodeDecodeError, ruamel.yaml.YAMLError) as err:
        raise WebSetupError(f"{path}: cannot be read as YAML ({err}): fix it (see the virtual beamline's "
                            f"{WEB_CONFIG}/server.yaml)") from err  # fmt: skip
    if not isinstance(settings, dict) or not isinstance(settings.get("server"), dict):
        raise WebSetupError(f"{path}: no server: section (mxcubeweb's HOST, PORT, ... go there): add one, as in the "
                            f"virtual beamline's {WEB_CONFIG}/server.yaml")  # fmt: skip
    return settings
