"""Running collections on the booted virtual beamline, as the MXCuBE queue would."""

from __future__ import annotations

import gevent
import numpy as np

from mxcube_autocenter.geometry import TRANSLATION_MOTORS, centred_motors
from mxcube_autocenter.simulation.collection import collection_parameters


def aim_point(mounted) -> np.ndarray:
    """Where a collection on the sample aims: its best point, or the loop's centre on an empty loop, mm."""
    point, _ = mounted.best_point()
    return mounted.sample.loop_centre if point is None else point


def helical_end_points(mounted, rng, length_mm=None):
    """Start and end motor positions of a helical line through the sample.

    The line crosses the loop through its best point (or the loop centre for
    an empty loop), in a random direction in the loop plane, so the beam
    passes from liquid over crystal and back: many different reflection counts.
    """
    sample = mounted.sample
    centre = aim_point(mounted)
    in_plane = np.cross(sample.loop_normal, [1.0, 0.0, 0.0])
    angle = rng.uniform(0, np.pi)
    direction = np.cos(angle) * np.array([1.0, 0.0, 0.0]) + np.sin(angle) * in_plane
    half = 0.5 * (length_mm or sample.loop_size_um * 1e-3)
    start, end = centre - half * direction, centre + half * direction
    return (
        {m: centred_motors(start)[m] for m in TRANSLATION_MOTORS},
        {m: centred_motors(end)[m] for m in TRANSLATION_MOTORS},
    )


def helical_and_rotation(beamline, mounted, rng, *, helical_range: float, rotation_range: float) -> list:
    """The two collections recorded on a training sample: a helical line through it, then a rotation.

    Returns ``[(experiment_type, keywords of run_collection), ...]``; the
    helical line's ends (:func:`helical_end_points`) as motor readings.
    ``helical_range`` and ``rotation_range`` are the degrees per image.
    """
    ends = helical_end_points(mounted, rng)
    return [
        ("Helical", {"helical": tuple(beamline.diffractometer.readings(end) for end in ends),
                     "osc_range": helical_range}),
        ("OSC", {"osc_range": rotation_range}),
    ]  # fmt: skip


def recorded_collection(beamline, recorder, directory, prefix, **params):
    """:func:`run_collection` with the AutoCenter object's recorder listening: its recording's summary once
    the file is closed (None where ``recorder`` is None: a configuration that records nothing).

    The recorder's ``last_summary`` is cleared first: an earlier collection's
    summary must never pass for this one's.
    """
    if recorder is not None:
        recorder.last_summary = None
    run_collection(beamline, directory, prefix, **params)
    return None if recorder is None else recorder.wait_closed()


def run_collection(beamline, directory, prefix, *, experiment_type="OSC", helical=None, timeout=300, **params):
    """Run one collection through ``beamline.collect`` and wait for it to end.

    Parameters
    ----------
    beamline : Beamline
        The booted virtual beamline.
    directory, prefix : str
        Where the detector files go and their prefix.
    experiment_type : {"OSC", "Helical"}
    helical : (dict, dict), optional
        Start and end translation motor positions of a helical scan.
    timeout : float
        Seconds to wait for the collection, s.
    **params
        Passed to :func:`collection_parameters` (n_images, exposure_time,
        osc_start, osc_range, sample_id, crystal_id, run_number).

    Returns
    -------
    dict
        The collection parameters used.
    """
    collect = beamline.collect
    dc_params = collection_parameters(directory, prefix, experiment_type=experiment_type, **params)
    collect.set_helical(experiment_type == "Helical")
    if experiment_type == "Helical":
        start, end = helical
        collect.set_helical_pos({"1": start, "2": end})
    with gevent.Timeout(timeout, TimeoutError(f"collection {prefix} did not end within {timeout} s")):
        task = collect.collect("mxcube-autocenter", [dc_params])
        task.join()
    return dc_params


# An MD3's position read: an exporter request over the network, s (a few ms to tens of ms on a loaded server).
MD3_READ_LATENCY_S = 0.012


def recording_benchmark(quick: bool = False) -> dict:
    """The camera's rate while the AutoCenter object records a collection whose motors are read as an MD3's are.

    Boots the virtual beamline, counts the camera's frames for 2 s, then
    records a rotation (4 s; 10 s without ``quick``) with every motor read
    waiting :data:`MD3_READ_LATENCY_S`, and counts them during it: the
    recording must not slow the camera (and so the web UI's video) down.

    Returns
    -------
    dict
        ``record_camera_idle_fps`` and ``record_camera_md3_fps`` (frames the
        camera delivered per second before and during the recording),
        ``record_camera_md3_ratio`` (during over before) and
        ``record_md3_kept_fps`` (frames the recording kept per second).
    """
    import tempfile
    import time

    from mxcube_autocenter.beamline import auto_centring, hardware_repository
    from mxcube_autocenter.recording import read_recording
    from mxcube_autocenter.simulation.sample import make_sample

    duration_s = 4.0 if quick else 10.0
    with hardware_repository() as bl, tempfile.TemporaryDirectory() as directory:
        recorder = auto_centring(bl).recorder
        bl.sample_changer.mount(make_sample(16))
        delivered = []

        def count(*args):
            delivered.append(time.time())

        # Held here: mxcubecore's dispatcher keeps only a weak reference to a receiver.
        bl.sample_view.camera.connect("imageReceived", count)
        gevent.sleep(2.0)
        idle_fps = len(delivered) / 2.0
        with bl.diffractometer.read_latency(MD3_READ_LATENCY_S):
            summary = recorded_collection(bl, recorder, directory, "bench", n_images=int(duration_s / 0.05),
                                          exposure_time=0.05, osc_range=0.1)  # fmt: skip
        if summary is None:
            raise RuntimeError("the virtual beamline's collection was not recorded: the recording benchmark has "
                               "nothing to time")  # fmt: skip
        record = bl.collect.last_collection
        start, end = record["wall_start"], record["wall_start"] + record["plan"].duration
        kept = read_recording(summary.path).timestamps
    during_fps = sum(start <= t <= end for t in delivered) / (end - start)
    return {
        "record_camera_idle_fps": idle_fps,
        "record_camera_md3_fps": during_fps,
        "record_camera_md3_ratio": during_fps / idle_fps,
        "record_md3_kept_fps": float(np.count_nonzero((kept >= start) & (kept <= end))) / (end - start),
    }
