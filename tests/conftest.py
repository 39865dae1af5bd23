"""Test harness: a real mxcubecore HardwareRepository booted from our XML.

gevent is monkey-patched first, exactly as MXCuBE does, so that mxcubecore's
greenlets (camera polling, motor moves) run as they do in production.
"""

from gevent import monkey

monkey.patch_all(thread=False)

import pytest  # noqa: E402

from mxcube_autocenter.beamline import hardware_repository  # noqa: E402


@pytest.fixture(scope="module")
def beamline():
    """The virtual beamline with the AutoCenter object, booted once per test module."""
    with hardware_repository() as bl:
        yield bl
