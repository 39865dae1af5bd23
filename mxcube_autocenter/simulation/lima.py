"""A Lima camera's Tango device, as mxcubecore's TangoLimaVideo reads it, showing the virtual camera's frames.

TangoLimaVideo cannot run here as configured (it needs a Tango database and a
Lima server); given this object as its ``device``, it polls and converts the
virtual beamline's frames as it would a real camera's.
"""

from __future__ import annotations

import struct

import gevent

# Lima's VIDEO_IMAGE header: magic, header version, image mode, frame number, width, height, endianness,
# header size, padding (two).
_HEADER = struct.Struct(">IHHqiiHHHH")
_MAGIC = 0x5644454F
_RGB24 = 6


class VirtualLimaDevice:
    """The ``video_last_image`` and ``video_exposure`` attributes of a Lima device in RGB24 video mode.

    Parameters
    ----------
    camera : VirtualCamera
        Whose current frame ``video_last_image`` holds.
    exposure_s : float
        ``video_exposure``: TangoLimaVideo's time between polls, s.

    Attributes
    ----------
    reads : int
        How often ``video_last_image`` was read.
    """

    def __init__(self, camera, exposure_s: float = 0.04):
        self._camera = camera
        self._exposure_s = exposure_s
        self.reads = 0

    @property
    def video_exposure(self) -> float:
        gevent.sleep(0)  # a read of the device: PyTango in gevent green mode yields
        return self._exposure_s

    @property
    def video_last_image(self) -> tuple[str, bytes]:
        gevent.sleep(0)
        self.reads += 1
        rgb, width, height = self._camera.get_last_image()
        header = _HEADER.pack(_MAGIC, 1, _RGB24, self.reads, width, height, 0, _HEADER.size, 0, 0)
        return "VIDEO_IMAGE", header + rgb
