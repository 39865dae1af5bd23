"""The on-axis camera of the virtual beamline.

Renders the mounted virtual sample at the current motor positions and zoom
and serves it like an MD camera: an ``imageReceived(jpeg_bytes, width,
height)`` stream and ``get_last_image() -> (rgb_bytes, width, height)``.
Rendering and JPEG encoding run on gevent's thread pool, so the event loop
never waits for them.
"""

from __future__ import annotations

import time

import cv2
import gevent
import gevent.lock
import numpy as np
from mxcubecore import HardwareRepository as HWR
from mxcubecore.BaseHardwareObjects import HardwareObject

from mxcube_autocenter.geometry import CENTRING_MOTORS
from mxcube_autocenter.recording import encode_jpeg
from mxcube_autocenter.simulation import properties
from mxcube_autocenter.simulation.render import DEFAULT_LOOK, Look, Renderer, random_look


def new_exposure(jpeg: bytes, number: int) -> bytes:
    """The frame as exposure ``number`` of the stream: the same image, with its number in a JPEG comment.

    A real sensor's noise makes every frame of a still scene differ, and the recorder keeps no repeat of an
    image (a frozen camera's); the virtual camera draws a scene once, so each streamed frame is told apart by
    its number instead of by new noise, which would take a new render and encoding per frame.
    """
    comment = f"exposure {number}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


EXPOSURE_MARK_BITS = 32


def mark_exposure(pixels: bytes, number: int) -> bytes:
    """Raw pixels as exposure ``number``: the lowest bit of the first 32 bytes holds the number.

    The raw formats carry no comment (see :func:`new_exposure`); one grey level in the first 32 bytes (the
    frame's top-left corner) tells the exposures apart, as sensor noise would, also to a reader that polls
    fewer frames than the camera exposes.
    """
    marked = np.frombuffer(pixels, dtype=np.uint8).copy()
    bits = (number >> np.arange(EXPOSURE_MARK_BITS)) & 1
    marked[:EXPOSURE_MARK_BITS] = (marked[:EXPOSURE_MARK_BITS] & 0xFE) | bits
    return marked.tobytes()


# TangoLimaVideo's video modes whose pixels it converts and sends: grey, RGB and RGBA, a byte a sample.
RAW_VIDEO_MODES = ("RGB24", "RGB32", "RGB8")


class VirtualCamera(HardwareObject):
    """Simulated MD3 sample-view camera.

    XML properties: ``width``, ``height`` (pixels), ``fps`` (exposures per
    second, default 25), ``jpeg_quality``, ``latency_s`` (delay between
    exposure and delivery), ``look`` (``default`` or ``random``),
    ``look_seed``. The scene is drawn at the diffractometer's motor readings
    as its wiring turns them into sample positions
    (``VirtualDiffractometer.sample_frame``).

    The ``imageReceived`` stream is MDCameraMockup's, ``(jpeg_bytes, width,
    height)``, each exposure sent once; with TangoLimaVideo's properties it is
    that camera's: ``video_mode`` (``RGB24``, ``RGB32`` or ``RGB8``) sends the
    raw pixels, ``(pixel_bytes, width, height, False)``, and ``interval``
    (ms) polls, sending the last exposure at every poll, new or not
    (:meth:`set_stream` changes both while it runs).
    """

    def init(self):
        super().init()
        self._width = properties.number(self, "width", 1280, low=16, high=8192, whole=True, unit="pixels")
        self._height = properties.number(self, "height", 1024, low=16, high=8192, whole=True, unit="pixels")
        self.fps = properties.number(self, "fps", 25, low=1, high=100, unit="frames per second")
        self._jpeg_quality = properties.number(self, "jpeg_quality", 90, low=1, high=100, whole=True)
        self._latency_s = properties.number(self, "latency_s", 0.02, low=0, high=1, unit="s")
        video_mode = self.get_property("video_mode")
        if video_mode is not None:
            video_mode = properties.choice(self, "video_mode", None, RAW_VIDEO_MODES)
        interval = self.get_property("interval")
        if interval is not None:
            interval = properties.number(self, "interval", None, low=1, high=10000, unit="ms")
        self.set_stream(video_mode, interval)
        look = DEFAULT_LOOK
        if properties.choice(self, "look", "default", ("default", "random")) == "random":
            look = random_look(np.random.default_rng(properties.number(self, "look_seed", 0, low=0, whole=True)))
        self._lock = gevent.lock.BoundedSemaphore()
        self.set_look(look)
        self.frame_number = 0
        # mxcubeweb's sample view reads it (the video streamer's stream id);
        # this camera feeds no video streamer, so it only names the camera.
        self.stream_hash = self.load_name
        self._repository = HWR.get_hardware_repository()
        self._stream_task = None
        self._exposures = 0
        self.start_streaming()
        self.update_state(self.STATES.READY)

    def set_look(self, look: Look):
        """Change the optics and lighting (the next frame is rendered anew)."""
        with self._lock:
            self.look = look
            self._renderer = Renderer(self._width, self._height, look)
            self._key = None
            self._rgb = None
            self._jpeg = None

    def _scene(self):
        """Everything a frame depends on, as a hashable key and its parts."""
        bl = HWR.beamline
        diffr = bl.diffractometer
        # A motor that reads None (VirtualMotor's "unreadable" fault) is NaN: the camera keeps its last frame.
        readings = {name: float(np.nan if (value := diffr.all_motors()[name].reading()) is None else value)
                    for name in CENTRING_MOTORS}  # fmt: skip
        motors = diffr.sample_frame(readings)
        ppmm = tuple(diffr.get_pixels_per_mm())
        beam = tuple(bl.beam.get_beam_position_on_screen())
        mounted = bl.sample_changer.mounted
        key = (tuple(motors.values()), ppmm, beam, id(mounted), id(self.look))
        return key, motors, ppmm, beam, mounted

    def _render(self, motors, ppmm, beam, mounted):
        if mounted is None:
            rgb = self._renderer.render_empty()
        else:
            rgb = self._renderer.render(mounted.sample, motors, ppmm, beam)
        return rgb, encode_jpeg(rgb, self._jpeg_quality)

    def _update(self):
        """Render a new frame if the scene changed since the last one."""
        with self._lock:
            key, motors, ppmm, beam, mounted = self._scene()
            # A scale or position that reads no number (a failing diffractometer, as tests make one) cannot be
            # drawn: the camera keeps showing its last frame.
            if key != self._key and np.all(np.isfinite([*motors.values(), *ppmm, *beam])):
                pool = gevent.get_hub().threadpool
                self._rgb, self._jpeg = pool.apply(self._render, (motors, ppmm, beam, mounted))
                # The sample and look drawn are held with their ids: a new sample cannot get a freed one's id.
                self._key, self._drawn = key, (mounted, self.look)
                self.frame_number += 1

    def set_stream(self, video_mode: str | None = None, interval_ms: float | None = None):
        """Stream as MDCameraMockup (both None) or as TangoLimaVideo with these ``video_mode`` and ``interval``.

        ``video_mode`` is also this camera's property, which the recorder reads as TangoLimaVideo's.
        """
        if video_mode is not None and video_mode not in RAW_VIDEO_MODES:
            raise ValueError(f"video_mode {video_mode!r}: give one of {', '.join(RAW_VIDEO_MODES)}, or None for JPEG")
        if interval_ms is not None and not interval_ms > 0:
            raise ValueError(f"interval {interval_ms!r}: give the poll period in ms, or None to send each exposure once")
        configured = self.get_properties()  # the XML's: the recorder reads video_mode there
        if video_mode is None:
            configured.pop("video_mode", None)
        else:
            configured["video_mode"] = video_mode
        self.video_mode, self.interval_ms = video_mode, interval_ms

    def _expose(self):
        """The next exposure: the scene as the motors are now, as the stream sends it."""
        self._update()
        self._exposures += 1
        if self.video_mode is None:
            return new_exposure(self._jpeg, self._exposures), self._width, self._height
        return mark_exposure(_pixels(self._rgb, self.video_mode), self._exposures), self._width, self._height, False

    def _stream(self):
        exposed_at, image = -np.inf, None  # the last exposure, which a poll sends again
        # Ends with the HardwareRepository that loaded this camera (torn down by
        # tests and the demo): a camera left streaming into the next repository
        # would render for nobody and take the GIL from its event loop.
        while self._loaded_repository_alive():
            start = time.monotonic()
            period = 1.0 / self.fps  # read at every turn: a test slows the sensor down
            try:
                polled = self.interval_ms is not None
                if not polled or image is None or start - exposed_at >= period - 1e-3:
                    exposed_at = start
                    # This exposure's frame: a snapshot asked for while it is delivered renders a later scene.
                    image = self._expose()
                    # Delivered latency_s after the exposure, rendering included, as labelling assumes.
                    gevent.sleep(max(0.0, self._latency_s - (time.monotonic() - start)))
                    self.emit("imageReceived", *image)
                else:
                    self.emit("imageReceived", *image)  # TangoLimaVideo's poll: the last image again
            except Exception:
                self.log.exception("virtual camera: could not render a frame")
                image = None
            wait = self.interval_ms / 1000.0 if self.interval_ms is not None else period
            gevent.sleep(max(0.0, wait - (time.monotonic() - start)))

    def get_latency(self) -> float:
        """Delay from a frame's exposure to its delivery, s (the ``latency_s`` property)."""
        return self._latency_s

    def _loaded_repository_alive(self) -> bool:
        try:
            return HWR.get_hardware_repository() is self._repository
        except RuntimeError:
            return False

    def start_streaming(self, *args, **kwargs):
        """Start the ``imageReceived`` stream (it starts with the object)."""
        if self._stream_task is None:
            self._stream_task = gevent.spawn(self._stream)

    def stop_streaming(self):
        """Stop the ``imageReceived`` stream, as a camera that fails would."""
        if self._stream_task is not None:
            self._stream_task.kill()
            self._stream_task = None

    def get_last_image(self):
        """The current frame as ``(rgb_bytes, width, height)``, like MDCameraMockup.

        Marked as the last exposure (:func:`mark_exposure`): snapshots polled while the scene stands still
        differ from one exposure to the next, as a real sensor's, and not while the stream is stopped (a
        frozen camera's).
        """
        self._update()
        return mark_exposure(self._rgb.tobytes(), self._exposures), self._width, self._height

    def get_width(self) -> int:
        return self._width

    def get_height(self) -> int:
        return self._height

    def set_live(self, state) -> bool:
        return True

    def get_available_stream_sizes(self):
        return [(self._width, self._height), (self._width // 2, self._height // 2)]


def _pixels(rgb, video_mode: str) -> bytes:
    """A frame's pixels as TangoLimaVideo sends them in ``video_mode`` (one of :data:`RAW_VIDEO_MODES`)."""
    if video_mode == "RGB8":
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif video_mode == "RGB32":
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA)
    return rgb.tobytes()
