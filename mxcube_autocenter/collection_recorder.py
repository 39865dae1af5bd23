"""Recording camera frames during collections: the scan bookkeeping.

:class:`CollectionRecorder` turns the collect object's signals into one
frame store per collection (see :mod:`mxcube_autocenter.recording` and
``docs/data-formats.md``). It is driven by the AutoCenter hardware object and
runs entirely in the gevent loop, where its only work per camera frame is a
timestamp, five motor positions and a non-blocking hand-off to the writer
thread. Collect implementations differ in the arguments of their signals and
may repeat the finish signals; the recorder relies on neither.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref

import cv2
import gevent
import gevent.lock
import numpy as np

from mxcube_autocenter.geometry import CENTRING_MOTORS
from mxcube_autocenter.imagefiles import pixel_bits, scale_to_8_bits
from mxcube_autocenter.recording import JPEG_MAGIC, FrameStore, RecordingWriter, names_a_sample

DEFAULT_MASTER_FILE_TEMPLATE = "{directory}/{prefix}_{run_number}_master.h5"

# How often the recording's watchdog looks at the camera and the writer, s.
WATCH_TICK_S = 0.25

# mxcubecore's TangoLimaVideo (and its subclasses) starts polling its Lima device on the first connection to
# imageReceived and never stops; each poll converts a whole frame on the event loop. mxcubeweb does not listen,
# so on a web-only MXCuBE it is this plugin's connection that starts it: the pollers ours started, by camera.
_LIMA_POLLER = "_TangoLimaVideo__polling"
_pollers_started = weakref.WeakKeyDictionary()
# Its connect_notify reads the device (a yield) between looking for a poller and starting one: two first listeners
# at once started two, one of them lost. Ours connect and disconnect one at a time.
_listening = gevent.lock.RLock()


def listen_to_camera(camera, slot) -> None:
    """Connect ``slot`` to the camera's ``imageReceived``, noting a poller the connection starts.

    Raises what the camera's ``connect`` raises (TangoLimaVideo reads its Lima device).
    """
    with _listening:
        before = getattr(camera, _LIMA_POLLER, None)
        camera.connect("imageReceived", slot)
        poller = getattr(camera, _LIMA_POLLER, None)
        if before is None and poller is not None:
            _pollers_started[camera] = poller


def stop_listening_to_camera(camera, slot) -> None:
    """Disconnect ``slot``; stop the camera's poller if a connection of ours started it and no one listens now.

    A later :func:`listen_to_camera` starts it again (the camera's own ``connect_notify``).
    """
    from mxcubecore.dispatcher import dispatcher

    with _listening:
        camera.disconnect("imageReceived", slot)
        poller = _pollers_started.get(camera)
        if poller is None or getattr(camera, _LIMA_POLLER, None) is not poller:
            return
        if not list(dispatcher.liveReceivers(dispatcher.getReceivers(camera, "imageReceived"))):
            poller.kill(block=False)
            setattr(camera, _LIMA_POLLER, None)
            del _pollers_started[camera]


def master_file_path(fileinfo: dict, template: str = DEFAULT_MASTER_FILE_TEMPLATE) -> str:
    """The EIGER master file of a collection.

    Parameters
    ----------
    fileinfo : dict
        ``dc_params["fileinfo"]``: ``directory``, ``prefix``, ``run_number``.
    template : str
        Format string over the ``fileinfo`` keys; the EIGER detector objects
        of mxcubecore write ``<prefix>_<run>_master.h5`` in the data directory.
    """
    return os.path.normpath(template.format(**fileinfo))


# Why the recording of a failed collection ended (its file's ``error`` begins so): the user has heard of it.
COLLECTION_FAILED = "the collection failed"


def recording_directory(template: str, fileinfo: dict) -> str:
    """Where a collection's recording goes: ``template`` with ``{data_directory}`` filled in."""
    return os.path.normpath(template.format(data_directory=fileinfo["directory"]))


def recording_name(fileinfo: dict) -> str:
    """File name (without suffix) of a collection's recording, after its detector files."""
    return f"{fileinfo['prefix']}_{fileinfo['run_number']}_camera"


def find_dc_params(args, fallback=None):
    """The data collection parameters among a signal's arguments.

    Collect objects pass them at different positions (CollectMockup: the 5th
    of 6); take the first dictionary that describes a collection.
    """
    for arg in args:
        if isinstance(arg, dict) and "oscillation_sequence" in arg:
            return arg
    return fallback


def _grey(pixels):
    """Grey pixels, H x W or H x W x 1, as an H x W x 3 RGB view (no copy)."""
    height, width = pixels.shape[:2]
    return np.broadcast_to(pixels.reshape(height, width, 1), (height, width, 3))


# The Lima video modes the recording decodes (TangoLimaVideo's ``video_mode``
# property), by the samples a pixel, the bytes a sample, and the conversion of
# the H x W x samples array (8-bit) to RGB. TangoLimaVideo passes Lima's pixel
# bytes on unchanged in every mode (its PIL conversions keep them).
# OpenCV names a Bayer pattern by the second and third pixels of its second
# row: Lima's BAYER_RG, a sensor whose rows run R G R G, G B G B, is OpenCV's
# BayerBG, and BAYER_BG is its BayerRG.
VIDEO_MODES = {
    "RGB24": (3, 1, lambda pixels: pixels),
    "BGR24": (3, 1, lambda pixels: pixels[:, :, ::-1]),
    "RGB32": (4, 1, lambda pixels: pixels[:, :, :3]),
    "BGR32": (4, 1, lambda pixels: pixels[:, :, 2::-1]),
    "RGB8": (1, 1, _grey),
    "Y8": (1, 1, _grey),
    "Y16": (1, 2, _grey),
    "YUV422": (2, 1, lambda pixels: cv2.cvtColor(pixels, cv2.COLOR_YUV2RGB_UYVY)),
    "BAYER_RG8": (1, 1, lambda pixels: cv2.cvtColor(pixels, cv2.COLOR_BayerBG2RGB)),
    "BAYER_BG8": (1, 1, lambda pixels: cv2.cvtColor(pixels, cv2.COLOR_BayerRG2RGB)),
    "BAYER_RG16": (1, 2, lambda pixels: cv2.cvtColor(pixels, cv2.COLOR_BayerBG2RGB)),
    "BAYER_BG16": (1, 2, lambda pixels: cv2.cvtColor(pixels, cv2.COLOR_BayerRG2RGB)),
}


class BitDepth:
    """A camera's bit depth as its 16-bit frames show it: that of the brightest pixel so far, never lowered.

    Guessed frame by frame, a 12-bit frame whose brightest pixel is 1100 comes out at 68 grey levels and the same
    scene 9 % dimmer, read as 10-bit, at 249. Never lowered, the scale changes at most once per power of two the
    brightest pixel crosses (a backlit view fills the camera's range from the first frame); only a depth read
    from the camera would fix it before the first frame.
    """

    def __init__(self):
        self.bits = 8

    def of(self, image: np.ndarray) -> int:
        """The bit depth for ``image`` (uint16), raised to the bits it uses."""
        self.bits = max(self.bits, pixel_bits(image))
        return self.bits


def decode_raw_frame(data, width: int, height: int, video_mode: str, depth: BitDepth | None = None) -> np.ndarray:
    """A Lima camera's raw frame as RGB.

    Parameters
    ----------
    data : bytes-like
        The pixels as TangoLimaVideo sends them in ``video_mode``.
    width, height : int
        The frame size, pixels.
    video_mode : str
        One of :data:`VIDEO_MODES`. 16-bit pixels are scaled to 8 bits by the
        bits they use (:func:`~mxcube_autocenter.imagefiles.scale_to_8_bits`).
    depth : BitDepth, optional
        The recording's bit depth, which 16-bit frames share; by default each
        frame's own.

    Returns
    -------
    ndarray of uint8, shape (height, width, 3)
        The image, RGB channel order; a view of ``data`` where the mode allows.

    Raises
    ------
    ValueError
        If ``data`` has another size than such a frame.
    """
    samples, sample_bytes, to_rgb = VIDEO_MODES[video_mode]
    pixels = np.frombuffer(data, np.uint8)
    size = width * height * samples * sample_bytes
    if pixels.size != size:
        raise ValueError(
            f"a {video_mode} frame of {width} x {height} pixels is {size} bytes, the camera sent {pixels.size}: "
            "check the camera's video_mode property"
        )
    if sample_bytes == 2:
        # Lima sends 16-bit samples little-endian.
        samples16 = pixels.view("<u2").reshape(height, width * samples)
        pixels = scale_to_8_bits(samples16, None if depth is None else depth.of(samples16))
    return to_rgb(pixels.reshape(height, width, samples))


def stream_frame(image, args, video_mode=None, depth=None):
    """An ``imageReceived`` payload as the writer takes it: JPEG bytes, raw pixels as an HxWx3 RGB array, or
    a function that decodes raw pixels to one.

    MDCameraMockup-like cameras send ``(jpeg_bytes, width, height)``;
    mxcubecore's TangoLimaVideo sends the raw pixels of its video mode,
    ``(pixel_bytes, width, height, False)``. With ``video_mode`` (the camera's
    property) given, the result is a function that decodes the pixels by it
    (:func:`decode_raw_frame`, 16-bit ones by the recording's ``depth``), called on the writer thread: some modes take a
    demosaic or a colour conversion, which must not hold up the event loop.
    Without it, the layout is guessed from the size: 3 bytes a pixel are RGB
    (RGB24), 4 RGBA (RGB32), 1 grey (RGB8), each made an HxWx3 view (no copy)
    which the writer encodes. Anything else is passed on, and the writer
    refuses it.
    """
    if not isinstance(image, (bytes, bytearray, memoryview)) or len(args) < 2:
        return image
    try:
        width, height = int(args[0]), int(args[1])
    except (TypeError, ValueError):
        return image
    if width <= 0 or height <= 0:
        return image
    if video_mode is not None:
        return functools.partial(decode_raw_frame, image, width, height, video_mode, depth)
    pixels, size = np.frombuffer(image, np.uint8), width * height
    # No JPEG takes 3 bytes a pixel: a raw frame whose first pixel happens to read
    # like the JPEG start marker is still raw.
    if len(pixels) in (3 * size, 4 * size):
        return pixels.reshape(height, width, -1)[:, :, :3]
    if len(pixels) == size and bytes(pixels[:2]) != JPEG_MAGIC:
        return _grey(pixels.reshape(height, width))
    return image


def clock_origin(tries: int = 5) -> tuple[float, float]:
    """``(time.time(), time.monotonic())`` as at one moment, s.

    Another thread may take the GIL between two clock reads (5 ms at a
    time, Python's switch interval, on a loaded machine), and every frame's
    wall-clock time, counted from this pair, would be off by as much. So the
    wall clock is read between two monotonic reads, their midpoint taken,
    and the closest of a few such triples kept.
    """
    best = None
    for _ in range(tries):
        before, wall, after = time.monotonic(), time.time(), time.monotonic()
        if best is None or after - before < best[0]:
            best = (after - before, wall, 0.5 * (before + after))
    return best[1], best[2]


def payload_reference(image):
    """An ``imageReceived`` payload as kept to compare the next with: a copy where the camera may reuse its buffer."""
    return bytes(image) if isinstance(image, (bytearray, memoryview)) else image


def same_payload(image, previous) -> bool:
    """Whether an ``imageReceived`` payload repeats the previous one (None: there was none)."""
    if previous is None:
        return False
    if isinstance(image, np.ndarray) and isinstance(previous, np.ndarray):
        return np.array_equal(image, previous)
    if isinstance(image, (bytes, bytearray, memoryview)) and isinstance(previous, bytes):
        return image == previous
    return False


def same_collection(a: dict, b: dict) -> bool:
    """Whether two sets of data collection parameters describe the same collection (its files' name and place).

    Collect objects may pass a copy of the parameters with the end signal.
    """
    key = ("directory", "prefix", "run_number")
    return a is b or [(a.get("fileinfo") or {}).get(k) for k in key] == [(b.get("fileinfo") or {}).get(k) for k in key]


def crystal_id(sample_reference: dict, loaded_sample: str | None):
    """What tells this collection's crystal from others, for the split by crystal.

    The collection's own ``crystal_id`` where it has one, else the LIMS
    sample id (``blSampleId``; mxcubecore's -1 without LIMS is none), else
    the sample's name with the sample changer position it is mounted from:
    a position alone is every crystal mounted from it.
    """
    if names_a_sample(sample_reference.get("crystal_id")):
        return sample_reference["crystal_id"]
    lims = sample_reference.get("blSampleId")
    if names_a_sample(lims):
        return lims
    named = " @ ".join(str(part) for part in (sample_reference.get("sample_name"), loaded_sample) if part)
    return named or None


def collection_metadata(dc_params: dict, helical_positions, context: dict, master_template: str) -> dict:
    """The ``/collection`` attributes of a recording (see docs/data-formats.md)."""
    osc = dc_params["oscillation_sequence"][0]
    sample = dc_params.get("sample_reference") or {}
    kind = dc_params.get("experiment_type")
    metadata = {
        "experiment_type": kind,
        "osc_start": osc.get("start"),
        "osc_range": osc.get("range"),
        "number_of_images": osc.get("number_of_images"),
        "exposure_time": osc.get("exposure_time"),
        "file_template": dc_params["fileinfo"].get("template"),
        "master_file": master_file_path(dc_params["fileinfo"], master_template),
        "collection_start": time.time(),
        "sample_id": sample.get("blSampleId"),
        "crystal_id": crystal_id(sample, context.get("loaded_sample")),
        **{k: v for k, v in context.items() if k != "loaded_sample"},
    }
    if kind == "Helical" and helical_positions:
        metadata["helical_start"] = helical_positions.get("1")
        metadata["helical_end"] = helical_positions.get("2")
    return metadata


def _scale(pixels_per_mm) -> np.ndarray:
    """Pixels per mm as numbers, NaN where there are none: an uncalibrated camera's (None, None) is no scale."""
    try:
        return np.asarray(pixels_per_mm, dtype=float)
    except (TypeError, ValueError):
        return np.array(np.nan)


class CollectionRecorder:
    """Records the camera during collections of the configured types.

    Parameters
    ----------
    settings : callable
        Returns the current AutoCenter configuration (read at each collection start).
    camera : HardwareObject
        The sample-view camera (``imageReceived`` stream). Its ``video_mode``
        property, if it has one (TangoLimaVideo), says how to decode its raw
        frames; see :data:`VIDEO_MODES`.
    snapshot : callable
        Returns the current frame as an RGB array, for the ``poll`` source.
    read_motors : callable
        Returns the centring motor positions by name.
    context : callable
        Returns beamline metadata for the recording (beamline, zoom,
        pixels_per_mm, beam_position, beam_size_um, loaded_sample).
    log : logging.Logger
    make_data_directory : callable, optional
        ``make_data_directory(path)`` makes a collection's data directory as
        the collect object does (its ``create_directories``, with the site's
        permissions). A recording inside the data directory is announced
        before the collect object makes it (after the shutters and the LIMS):
        made by the recording, it would get the process's umask, and a
        collect object that makes it with other permissions skips one that
        exists.
    """

    def __init__(self, settings, camera, snapshot, read_motors, context, log=None, make_data_directory=None):
        self._settings = settings
        self._make_data_directory = make_data_directory
        self._camera = camera
        self._snapshot = snapshot
        self._read_motors = read_motors
        self._context = context
        self.log = log or logging.getLogger("HWR")
        self._writer = None
        self._dc_params = None
        self._tasks = []
        # Scheduling and the watchdog run on time.monotonic: a clock step (NTP)
        # must neither skip frames nor stop the recording.
        self._next_due = 0.0
        self._last_frame_time = 0.0
        self._last_received = None
        self._bit_depth = BitDepth()
        self._clock_origin = (0.0, 0.0)
        self._streamed = False
        self._video_mode = None
        self._motors_failing = False
        self._pixels_per_mm = None  # the camera's scale at the recording's start
        self._reading_since = None  # when the motor read in progress began (monotonic s)
        self._longest_read_s = 0.0
        self._missing_said = False
        self.last_summary = None
        self._latest = None  # the writer of the collection started last, if it was recorded

    @property
    def recording(self) -> bool:
        return self._writer is not None

    @property
    def current(self):
        """The running recording (an opaque token for :meth:`stop_later`), or None."""
        return self._writer

    def start(self, dc_params: dict, helical_positions=None):
        """Begin recording a collection if its type is configured.

        A second start signal for the collection being recorded is ignored;
        a new collection closes the previous recording, in the background,
        as ``aborted`` (its end was never signalled).
        """
        if self._writer is not None and same_collection(dc_params, self._dc_params):
            return
        # Whether or not this one is recorded, the previous collection has ended.
        self.stop_later("aborted", reason="another collection started before this one's end was signalled")
        self._latest = None
        cfg = self._settings()
        kind = dc_params.get("experiment_type")
        if not cfg.recording_enabled or kind not in cfg.record_scan_types:
            self.log.debug("AutoCenter: not recording a %s collection", kind)
            return
        fileinfo = dc_params["fileinfo"]
        streamed = cfg.record_source == "stream"
        # Read once a recording: the property is fixed when the camera is loaded.
        video_mode = self._camera.get_property("video_mode") if streamed else None
        if video_mode is not None and video_mode not in VIDEO_MODES:
            self.log.error(
                "AutoCenter: not recording %s collection %s: the camera's video_mode property is %r, which the "
                "recording cannot decode; set it to one of %s", kind, fileinfo["prefix"], video_mode,
                ", ".join(VIDEO_MODES),
            )  # fmt: skip
            return
        directory = recording_directory(cfg.record_directory, fileinfo)
        if "{data_directory}" in cfg.record_directory:
            self._make_data_directory_first(fileinfo["directory"])
        metadata = collection_metadata(dc_params, helical_positions, self._context(), cfg.master_file_template)
        self._pixels_per_mm = metadata.get("pixels_per_mm")
        writer = self._writer = self._latest = RecordingWriter(
            lambda: FrameStore.create(
                directory, recording_name(fileinfo), metadata, storage=cfg.record_storage,
                min_free_mb=cfg.record_min_free_mb,
            ),
            max_queue=max(8, int(2 * cfg.record_frame_rate)),
            max_frames=cfg.record_max_frames,
            log=self.log,
        )
        self._dc_params = dc_params
        self._missing_said = False
        self._motors_failing = False  # said once a recording: a fault that outlasts one must be said in the next
        self._reading_since = None
        self._longest_read_s = cfg.record_camera_timeout_s
        self._period = 1.0 / cfg.record_frame_rate
        self._next_due = 0.0
        self._last_frame_time = time.monotonic()
        self._last_received = None
        self._bit_depth = BitDepth()  # decoded on the writer's one thread, in order
        self._clock_origin = clock_origin()
        self._streamed = streamed
        self._video_mode = video_mode
        self._tasks.append(gevent.spawn(self._watch, writer, cfg.record_camera_timeout_s))
        try:
            if self._streamed:
                # mxcubecore's connect asks the camera (TangoLimaVideo reads its Lima device): it may raise.
                listen_to_camera(self._camera, self.frame_received)
            else:
                self._tasks.append(gevent.spawn(self._poll, writer))
        except Exception as err:
            self.stop_later("failed", only=writer, reason=f"could not listen to the camera ({err})")
            raise
        self.log.info("AutoCenter: recording the camera during %s collection %s to %s", kind, fileinfo["prefix"], directory)

    def _make_data_directory_first(self, path: str):
        """The collection's data directory made as the collect object makes it, unless it exists; on failure the
        recording makes it itself, as any other ``record_directory``."""
        if self._make_data_directory is None or os.path.isdir(path):
            return
        try:
            self._make_data_directory(path)
        except Exception as err:
            self.log.warning("AutoCenter: the collect object could not make the data directory %s for the camera "
                             "recording (%s): the recording makes it", path, err)  # fmt: skip

    def frame_received(self, image, *args):
        """``imageReceived`` slot: keep frames at the configured rate, each a new image."""
        now = time.monotonic()
        writer = self._writer
        if writer is None:
            return
        if not isinstance(image, (bytes, bytearray, memoryview, np.ndarray)):
            # A Qt camera's QPixmap (AbstractVideoDevice): no bytes to store, nor to read off the GUI thread.
            reason = (f"the camera sends {type(image).__name__} images, which the recording cannot store: set "
                      "record_source to 'poll'")  # fmt: skip
            self.log.error("AutoCenter: recording stopped: %s", reason)
            self.stop_later("failed", only=writer, reason=reason)
            return
        # TangoLimaVideo sends its last image on every poll, changed or not: a frozen camera must reach the
        # watchdog, and only an image's first arrival is kept: a repeat's time and motors are later than its
        # exposure, so it would be labelled with another moment's count.
        new = not same_payload(image, self._last_received)
        if new:
            self._last_received = image = payload_reference(image)
            self._last_frame_time = now
        if not new or now < self._next_due or self._reading(now):
            return
        stamp = self._wall_clock(now)
        # Schedule on a fixed grid so the rate does not drift with camera jitter.
        self._next_due = max(self._next_due + self._period, now + 0.5 * self._period)
        self._reading_since = now
        # The motors are read in a greenlet of their own: on an MD3 each read waits on the network, which must not
        # hold up the camera's greenlet (its poller, and every other listener of its frames). The image is the copy
        # kept to compare with, where the camera may reuse its buffer meanwhile.
        gevent.spawn(self._keep_frame, writer, image, args, stamp)

    def _keep_frame(self, writer, image, args, stamp: float):
        """Read the motors for a frame kept and hand both to ``writer`` (still the recording's)."""
        try:
            motors = self._frame_motors()
        except Exception:
            if self._writer is writer:  # not a recording begun meanwhile: its own failures are its to say
                self._motors_failed(writer)
            return
        finally:
            if self._writer is writer:  # a recording begun meanwhile may be reading for its own frame
                self._reading_since = None
        self._motors_failing = False
        # Reading the motors yields (an MD3's exporter): the recording may have ended, or another begun, meanwhile.
        if self._writer is writer:
            writer.submit(stream_frame(image, args, self._video_mode, self._bit_depth), stamp, motors)

    def _reading(self, now: float) -> bool:
        """Whether the last frame's motors are being read: a frame arriving meanwhile (network waits on an MD3)
        would be written before it, with positions read after its. A read that hangs holds up the frames for
        ``record_camera_timeout_s`` at most, each frame then reading for itself."""
        return self._reading_since is not None and now - self._reading_since < self._longest_read_s

    def _poll(self, writer):
        """The ``poll`` source: snapshot the sample view at the configured rate."""
        pool = gevent.get_hub().threadpool
        failing = False
        previous = None
        while self._writer is writer:
            start = time.monotonic()
            try:
                rgb = self._snapshot()
                # The frame's moment is once the snapshot is in (a Lima read takes tens of ms), its motors then.
                taken = time.monotonic()
                # A camera slower than the poll, or a frozen one, hands out its last image again: recorded, it
                # would be labelled with another moment's count, and a frozen camera must reach the watchdog.
                new = not pool.apply(same_payload, (rgb, previous))
            except Exception:
                # Logged once; the watchdog ends the recording if the camera stays silent.
                if not failing:
                    self.log.exception("AutoCenter: the sample view's snapshot failed; recording waits for it")
                failing = True
                gevent.sleep(self._period)
                continue
            failing = False
            if new:
                previous = rgb
                self._last_frame_time = taken
                try:
                    motors = self._frame_motors()
                except Exception:
                    self._motors_failed(writer)
                else:
                    self._motors_failing = False
                    if self._writer is writer:
                        # The pixels themselves: raw storage keeps them, JPEG storage encodes on the writer thread.
                        writer.submit(rgb, self._wall_clock(taken), motors)
            gevent.sleep(max(0.0, self._period - (time.monotonic() - start)))

    def _motors_failed(self, writer):
        """A frame whose motors could not be read: dropped (it cannot be labelled), the fault said once, not a
        traceback a frame."""
        if not self._motors_failing:
            self.log.exception("AutoCenter: reading the centring motors failed; frames are not recorded meanwhile")
        self._motors_failing = True
        writer.drop("reading the centring motors failed")

    def _frame_motors(self) -> dict:
        """The centring motors' positions for a frame; one missing from them is recorded as NaN, said once a recording."""
        motors = self._read_motors()
        missing = [name for name in CENTRING_MOTORS if name not in motors]
        if missing and not self._missing_said:
            self._missing_said = True
            self.log.warning(
                "AutoCenter: the diffractometer's get_motors() has no %s (a motor its server reports Disable or "
                "Unknown, or one with another role name, e.g. phi): this recording stores NaN for it%s",
                ", ".join(missing),
                "; labelling times frames by omega's motion, so this recording can be labelled only with the clock offset "
                "given (label --clock-offset: detector minus camera clock, s)" if "omega" in missing else "",
            )
        return motors

    def _wall_clock(self, monotonic: float) -> float:
        """Unix time of a ``time.monotonic`` reading: the wall clock at the recording's start plus the time
        since, so that the frames' timestamps run on steadily through a clock step during the collection."""
        wall, origin = self._clock_origin
        return wall + (monotonic - origin)

    def _watch(self, writer, camera_timeout_s):
        """Stop the recording on a writer error or when the camera falls silent."""
        while True:
            slept_from = time.monotonic()
            gevent.sleep(WATCH_TICK_S)
            now = time.monotonic()
            # Woken late, the event loop was held up (a blocking call elsewhere), and the camera's frames with it:
            # that time is no silence of the camera's.
            late = now - slept_from - WATCH_TICK_S
            if late > WATCH_TICK_S:
                self._last_frame_time = min(self._last_frame_time + late, now)
            if self._writer is not writer:
                return
            if writer.error is not None:
                # The writer said why as it stopped, and the closing summary says it again: no third line.
                self.stop("failed", reason=str(writer.error))
            elif time.monotonic() - self._last_frame_time > camera_timeout_s:
                self.log.error(
                    "AutoCenter: the camera sent no new frame for %g s; recording stopped (check the sample-view "
                    "camera%s)", camera_timeout_s, "" if not self._streamed else ", or set record_source to 'poll'",
                )  # fmt: skip
                self.stop("failed", reason=f"the camera sent no new frame for {camera_timeout_s:g} s")

    def stop(self, status: str = "complete", reason: str | None = None):
        """End the current recording and wait until its file is closed (nothing when none is running).

        ``reason`` says why a recording ends failed or aborted (the file's ``error``)."""
        writer = self._detach()
        return None if writer is None else self._close(writer, status, reason)

    def wait_closed(self, timeout: float = 60.0):
        """The summary of the last recording once it is over and its file closed.

        For scripts that run a collection and then use (or tear down with) its
        recording: an end signal closes the file in the background. Set
        :attr:`last_summary` to None before the collection: only the
        recording of the collection started last sets it (an earlier one,
        closed late, does not).

        Returns
        -------
        RecordingSummary or None
            None if no recording ended and closed within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.recording and self.last_summary is not None:
                return self.last_summary
            gevent.sleep(0.05)
        return None

    def end_if_rescaled(self, pixels_per_mm, zoom) -> None:
        """End the recording, failed, its frames so far kept, if the camera's scale is no longer its start's.

        Its frames are cropped at the scale of its start: later ones would be labelled at another (a zoom changed
        in the web UI during the collection).
        """
        if self._writer is None:
            return
        scale, start = _scale(pixels_per_mm), _scale(self._pixels_per_mm)
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(start))) or np.allclose(scale, start):
            return
        reason = (f"the camera's scale changed during the collection (zoom {zoom}: {scale[0]:.0f} pixels/mm, not "
                  f"{start[0]:.0f}): later frames are not recorded; keep the zoom while collecting")
        self.log.warning("AutoCenter: recording ended: %s", reason)
        self.stop_later("failed", reason=reason)

    def stop_later(self, status: str, only=None, dc_params=None, reason: str | None = None):
        """End the current recording now and close its file in the background.

        For collect-object signals: the recording is over at once, so that a
        collection starting next gets a recording of its own whatever the
        close still has to write. With ``only`` (a :attr:`current` token),
        only that recording is ended; with ``dc_params`` (an end signal's),
        only the recording of that collection: the late end of a collection
        whose recording the next one's start already closed ends nothing.
        """
        if self._writer is None or (only is not None and only is not self._writer):
            return
        if dc_params is not None and not same_collection(dc_params, self._dc_params):
            self.log.info("AutoCenter: end of collection %s signalled while recording %s: ignored",
                          (dc_params.get("fileinfo") or {}).get("prefix"), self._dc_params["fileinfo"].get("prefix"))  # fmt: skip
            return
        gevent.spawn(self._close, self._detach(), status, reason)

    def _detach(self):
        writer, self._writer = self._writer, None
        self._dc_params = None
        if writer is None:
            return None
        if self._streamed:
            try:
                stop_listening_to_camera(self._camera, self.frame_received)
            except Exception:
                # Never connected (a camera whose connect failed before it registered the slot): nothing to undo,
                # and the recording must still close.
                self.log.debug("AutoCenter: the recorder was not listening to the camera", exc_info=True)
        current = gevent.getcurrent()
        for task in self._tasks:
            if task is not current:
                task.kill(block=False)
        self._tasks = []
        return writer

    def _close(self, writer, status, reason=None):
        summary = writer.close(status, reason=reason)
        if writer is self._latest:
            self.last_summary = summary
        level = logging.ERROR if summary.status in ("failed", "recording") else logging.INFO
        self.log.log(
            level,
            "AutoCenter: recording %s: %d frames kept, %d dropped in %s%s",
            summary.status, summary.frames_kept, summary.frames_dropped, summary.path or "no file",
            f" ({summary.error})" if summary.error else "",
        )
        if summary.status == "failed" and summary.error and not summary.error.startswith(COLLECTION_FAILED):
            # MXCuBE's web UI shows the user log alone: a zoom changed mid-collection, or a full disk, is theirs to know.
            logging.getLogger("user_level_log").warning(
                "Camera recording for the optical ML centring failed: %s", summary.error)
        return summary
