"""Booting an mxcubecore beamline from a configuration directory.

Used by the command line and the tests; MXCuBE itself boots the beamline in
production, and the plugin only lives inside it as a hardware object.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

AUTO_CENTRING_ROLE = "auto_centring"


def virtual_beamline_dir() -> Path:
    """The configuration directory of the virtual beamline, shipped inside the package."""
    return Path(__file__).resolve().parent / "virtual_beamline"


def mxcubecore_mockup_dir() -> Path:
    """mxcubecore's mockup directory, which holds the images its mockup camera serves."""
    import mxcubecore

    return Path(mxcubecore.__file__).resolve().parent / "HardwareObjects" / "mockup"


@contextlib.contextmanager
def hardware_repository(config_dir: str | os.PathLike | None = None):
    """Boot a real mxcubecore HardwareRepository and yield ``HWR.beamline``.

    gevent must already be monkey-patched as MXCuBE does
    (``gevent.monkey.patch_all(thread=False)``) before anything else is
    imported; the command line and the test suite do this first.

    Parameters
    ----------
    config_dir : path, optional
        Directory holding ``beamline.yaml``; the virtual beamline by default.

    Yields
    ------
    mxcubecore.HardwareObjects.Beamline.Beamline
        The booted beamline; it is torn down when the block ends.
    """
    from mxcubecore import HardwareRepository as HWR

    config_dir = Path(config_dir) if config_dir else virtual_beamline_dir()
    if not (config_dir / "beamline.yaml").is_file():
        raise FileNotFoundError(
            f"{config_dir} holds no beamline.yaml: pass the directory of an mxcubecore "
            "beamline configuration"
        )
    lookup_path = os.pathsep.join([str(config_dir), str(mxcubecore_mockup_dir())])
    try:
        # A configuration that fails part-way leaves the repository initialised: the next boot would be refused.
        HWR.init_hardware_repository(lookup_path)
        yield HWR.beamline
    finally:
        HWR.uninit_hardware_repository()


def auto_centring(beamline):
    """The AutoCenter hardware object of ``beamline``.

    Raises
    ------
    LookupError
        If the beamline has no loaded object with the ``auto_centring`` role
        (missing from ``beamline.yaml``, or its configuration was refused:
        the MXCuBE log says why).
    """
    obj = beamline.get_object_by_role(AUTO_CENTRING_ROLE)
    if obj is None:
        raise LookupError(
            f"no '{AUTO_CENTRING_ROLE}' object loaded: add '- {AUTO_CENTRING_ROLE}: "
            "auto_centring.xml' to beamline.yaml and check the log for configuration errors"
        )
    return obj


# 1.3 pixels per um on the virtual beamline: a 985 x 788 um view, the loop fills a good part of it.
ZOOM_LEVEL = "LEVEL3"


def set_zoom(beamline, level: str = ZOOM_LEVEL, timeout: float = 10.0):
    """Set the diffractometer's zoom and wait until it is there (the mockup zoom returns before it moves).

    Raises
    ------
    TimeoutError
        If the zoom is not at ``level`` within ``timeout`` seconds.
    """
    import gevent

    zoom = beamline.diffractometer.zoom
    target = zoom.VALUES[level]
    zoom.set_value(target, timeout=timeout)
    with gevent.Timeout(timeout, TimeoutError(f"the zoom did not reach {level} within {timeout} s")):
        while zoom.get_value() != target:
            gevent.sleep(0.02)
