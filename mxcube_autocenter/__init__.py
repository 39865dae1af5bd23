"""mxcube-autocenter: optical crystal centring for MXCuBE with a neural network."""

import os
import subprocess

__version__ = "0.1.0"


def code_version() -> str:
    """The package's version, with the git commit it runs from when that is a checkout of this package.

    ``0.1.0+g1a2b3c4``, ``0.1.0+g1a2b3c4.dirty`` when tracked files differ from that commit, or ``0.1.0``
    (installed from a wheel, or no git): results written by a run (the demo's scorecard) say which code made
    them, which the version alone does not during development.
    """
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)

    try:
        found = git("rev-parse", "--show-toplevel", "--short=7", "HEAD")
        top, commit = found.stdout.split() if found.returncode == 0 else ("", "")
        # Only this package's own checkout: a wheel installed into a virtual environment inside another
        # repository would otherwise report that repository's commit.
        if os.path.realpath(os.path.join(top, "mxcube_autocenter")) != os.path.realpath(here):
            return __version__
        dirty = git("diff", "--quiet", "HEAD").returncode != 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return __version__
    return f"{__version__}+g{commit}" + (".dirty" if dirty else "")
