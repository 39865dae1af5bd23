"""Datasets written straight from the virtual beamline.

For tests, quick experiments and a first shipped model: each virtual sample
is mounted with its own randomised camera look (domain randomisation), put
at a few random omega angles and zoom levels, and moved so that chosen
points come into the beam:

- points along a line through a crystal (or the loop centre), in a random
  direction on screen, across the whole loop: what a helical scan records,
  from liquid over crystal and back (``line_fraction``);
- points on the crystals' projections (``hit_fraction``);
- points near a crystal, scattered around a point of it by
  :data:`NEAR_SIGMA_UM` on screen (``near_fraction``): the beam on, across
  and just off the crystal's edges, where the count changes fastest and
  which the other kinds seldom sample for a crystal of tens of um;
- points on ice balls (``ice_hit_fraction``): they diffract no
  reflections (ice rings only) but look much like small crystals, and a
  ball seldom lies under the other kinds' points;
- points anywhere in the region a centring searches around the loop
  (:func:`~mxcube_autocenter.centring.loop.loop_roi`: stem, rim and
  background included), where a heatmap's false maxima come from
  (``region_fraction``);
- points anywhere in and around the loop (the rest).

One camera frame is rendered per view (1280 x 1024, a crystal point in the
beam at its centre). Bringing a point into the beam translates the sample,
which shifts the image, so the ``stored_crop_um`` square around the point's
position in that frame stands for the crop the camera would show (as each
crop of a centring's heatmap does); it is stored as JPEG. The label is a
Poisson draw of the ground-truth expected reflection count with the beam on
that point (also stored, as ``rc_expected``); ``on_ice`` marks the points
where the beam's centre falls on an ice ball and finds no crystal (fewer
than :data:`ICE_MAX_RC` expected spots), what a network learns to veto an
ice ball taken for a crystal. The file follows the dataset
contract of :mod:`.data`; the crystal id is the sample's (one id per
sample, empty loops included), so the split by crystal keeps every sample in
one subset.
"""

from __future__ import annotations

import contextlib
import json
import os

import h5py
import numpy as np

from mxcube_autocenter import __version__
from mxcube_autocenter.geometry import centred_motors, sample_to_screen
from mxcube_autocenter.hdf5errors import system_error
from mxcube_autocenter.centring.loop import loop_roi
from mxcube_autocenter.learning import crops
from mxcube_autocenter.outputs import make_directory, write_whole
from mxcube_autocenter.recording import encode_jpeg
from mxcube_autocenter.simulation.diffraction import DiffractionModel
from mxcube_autocenter.simulation.render import DEFAULT_LOOK, Renderer, random_look
from mxcube_autocenter.simulation.sample import make_sample

ZOOM_PX_PER_UM = (0.5, 0.8, 1.3, 2.0, 3.0)  # the virtual MD3's zoom levels 1-5
DATASET_FORMAT_VERSION = 1
# Spread of the "near" points around a crystal point, um on screen: a few beam widths (the beam is 20 x 5 um),
# so that about half of them fall off a needle or a small crystal and the rest on it.
NEAR_SIGMA_UM = 20.0
# Fewer expected spots than the crystal/empty classifier's threshold (training.DEFAULT_THRESHOLD): an ice ball in
# front of a crystal still diffracts, and a point there is no ice to veto.
ICE_MAX_RC = 5.0


def _crystal_point(sample, rng):
    """A random point inside a random crystal (a random convex combination of its corners)."""
    crystal = sample.crystals[rng.integers(len(sample.crystals))]
    w = rng.dirichlet(np.full(len(crystal.vertices), 0.5))
    return w @ crystal.vertices


def crystal_offset(sample, motors, rng) -> np.ndarray:
    """Screen offset from the beam, mm, of a random point of a random crystal."""
    xy, _ = sample_to_screen(_crystal_point(sample, rng)[None], motors, (1.0, 1.0), (0.0, 0.0))
    return xy[0]


def ice_offset(sample, motors, rng) -> np.ndarray:
    """Screen offset from the beam, mm, of a random point on the disc of a random ice ball."""
    ball = sample.ice[rng.integers(len(sample.ice))]
    xy, _ = sample_to_screen(ball[None, :3], motors, (1.0, 1.0), (0.0, 0.0))
    radius, angle = ball[3] * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    return xy[0] + radius * np.array([np.cos(angle), np.sin(angle)])


def on_ice_ball(sample, motors, pixels_per_mm, beam, positions) -> np.ndarray:
    """Whether each screen position lies on the disc an ice ball of ``sample`` projects, (N,) bool.

    Parameters
    ----------
    sample : Sample
        Its ``ice`` rows are ``(a, u, v, radius)`` in mm.
    motors : dict
        Centring motor positions (omega in degrees, translations in mm).
    pixels_per_mm : (float, float)
        Image scale, px/mm.
    beam : (float, float)
        Beam position on screen, px.
    positions : (N, 2) array_like
        Screen positions, px.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if not len(sample.ice):
        return np.zeros(len(positions), dtype=bool)
    centres, _ = sample_to_screen(sample.ice[:, :3], motors, pixels_per_mm, beam)
    offset_mm = (positions[:, None, :] - centres[None]) / np.asarray(pixels_per_mm, dtype=np.float64)
    return (np.linalg.norm(offset_mm, axis=2) <= sample.ice[None, :, 3]).any(axis=1)


def virtual_sample(sample_seed, look_seed, *, random_looks=True, frame_size=(1280, 1024), empty_fraction=0.15,
                   ice_fraction=0.3):
    """``(sample, diffraction, renderer, rng)`` of one virtual sample with its camera look.

    ``rng`` (seeded by ``look_seed``, after drawing the look) draws the views and positions.
    """
    rng = np.random.default_rng(look_seed)
    sample = make_sample(int(sample_seed), empty_fraction=empty_fraction, ice_fraction=ice_fraction)
    look = random_look(rng) if random_looks else DEFAULT_LOOK
    renderer = Renderer(frame_size[0], frame_size[1], look, seed=int(look_seed) % (2**31))
    return sample, DiffractionModel(sample), renderer, rng


def random_view(sample, rng, zoom_levels=ZOOM_PX_PER_UM):
    """A random view: a random omega and zoom level, a crystal point (the loop centre if none) in the beam.

    Returns
    -------
    omega : float
        Degrees.
    level : int
        0-based index into ``zoom_levels``.
    pixels_per_mm : (float, float)
    motors : dict
        Centring motor positions of the view.
    loop_xy : (N, 2) ndarray
        The loop outline on screen as offsets from the beam, mm.
    """
    omega = float(rng.uniform(0, 360))
    level = int(rng.integers(len(zoom_levels)))
    ppmm = (zoom_levels[level] * 1000.0, zoom_levels[level] * 1000.0)
    ref = sample.loop_centre if sample.is_empty else _crystal_point(sample, rng)
    motors = centred_motors(ref, omega)
    loop_xy, _ = sample_to_screen(sample.film_points(), motors, (1.0, 1.0), (0.0, 0.0))
    return omega, level, ppmm, motors, loop_xy


def centring_region(loop_xy, pixels_per_mm, beam, frame_shape):
    """The region a centring searches (:func:`loop_roi`), behind the loop's tip (pin on the left), stem included."""
    tip = loop_xy[np.argmax(loop_xy[:, 0])] * np.asarray(pixels_per_mm) + beam
    return loop_roi(tip, frame_shape, pixels_per_mm)


def position_counts(n_points: int, shares) -> tuple:
    """How many of a view's ``n_points`` positions each kind gets, by its share, and the rest (around the loop).

    Largest remainders, so that the counts add up to ``n_points`` (each rounded on its own, 3 positions with
    shares of 0.5 and 0.5 made 2 + 2).
    """
    quotas = np.array([*shares, max(1.0 - sum(shares), 0.0)]) * n_points
    counts = np.floor(quotas + 1e-9).astype(int)
    for i in np.argsort(-(quotas - counts), kind="stable")[: n_points - counts.sum()]:
        counts[i] += 1
    return tuple(int(c) for c in counts)


def _sample_rows(k, sample_seed, look_seed, *, crops_per_sample, omegas_per_sample, stored_crop_um, zoom_levels,
                 random_looks, frame_size, jpeg_quality, empty_fraction, ice_fraction, line_fraction, hit_fraction,
                 near_fraction, ice_hit_fraction, region_fraction, label_seed):
    """All rows of one virtual sample, as a dict of lists."""
    sample, model, renderer, rng = virtual_sample(sample_seed, look_seed, random_looks=random_looks,
                                                  frame_size=frame_size, empty_fraction=empty_fraction,
                                                  ice_fraction=ice_fraction)
    width, height = frame_size
    beam = (width / 2.0, height / 2.0)
    label_rng = np.random.default_rng(label_seed)
    crystal_id = f"sim-{int(sample_seed):06d}"
    rows = {name: [] for name in ("image", "beam_xy", "pixels_per_mm", "zoom", "omega", "rc", "rc_expected",
                                  "on_ice", "scan_id", "crystal_id", "scan_type", "timestamp", "detector_frame",
                                  "recording_frame")}
    per_omega = np.diff(np.linspace(0, crops_per_sample, omegas_per_sample + 1).round().astype(int))
    for j, n_points in enumerate(per_omega):
        omega, level, ppmm, motors0, loop_xy = random_view(sample, rng, zoom_levels)
        lo, hi = loop_xy.min(axis=0), loop_xy.max(axis=0)
        margin = 0.3 * (hi - lo)
        # An empty loop's crystal positions, and the ice positions of a sample without ice, go around the loop.
        n_line, n_hit, n_near, n_ice, n_region, n_rand = position_counts(n_points, (
            line_fraction, 0 if sample.is_empty else hit_fraction, 0 if sample.is_empty else near_fraction,
            ice_hit_fraction if len(sample.ice) else 0, region_fraction))  # fmt: skip
        angle = rng.uniform(0, np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        half = 0.5 * rng.uniform(0.6, 1.2) * max(sample.loop_size_um * 1e-3, 0.05)
        offsets = [direction * t for t in np.linspace(-half, half, n_line)]
        kinds = ["line"] * n_line
        for _ in range(n_hit):
            offsets.append(crystal_offset(sample, motors0, rng))
            kinds.append("hit")
        for _ in range(n_near):
            offsets.append(crystal_offset(sample, motors0, rng) + rng.normal(0.0, NEAR_SIGMA_UM * 1e-3, size=2))
            kinds.append("near")
        for _ in range(n_ice):
            offsets.append(ice_offset(sample, motors0, rng))
            kinds.append("ice")
        for _ in range(n_rand):
            offsets.append(rng.uniform(lo - margin, hi + margin))
            kinds.append("random")
        roi = centring_region(loop_xy, ppmm, beam, (height, width))
        for _ in range(n_region):
            xy = rng.uniform((roi.x0, roi.y0), (max(roi.x1, roi.x0 + 1), max(roi.y1, roi.y0 + 1)))
            offsets.append((xy - beam) / np.asarray(ppmm))
            kinds.append("region")
        # One image per view: translating the sample to bring a point into the beam shifts the image, so
        # the crop around the point's position stands for it, as each crop of a centring's heatmap does.
        frame = renderer.render(sample, motors0, ppmm, beam)
        positions = np.clip(beam + np.asarray(offsets).reshape(-1, 2) * np.asarray(ppmm), 0, (width - 1, height - 1))
        expected = model.expected_rc_on_screen(motors0, ppmm, beam, positions)
        on_ice = on_ice_ball(sample, motors0, ppmm, beam, positions) & (expected < ICE_MAX_RC)
        scan_id = f"{crystal_id}-w{j}"
        side_px = crops.crop_side_px(stored_crop_um, ppmm)
        for i, (position, kind) in enumerate(zip(positions, kinds)):
            stored = crops.crop_centred(frame, position, side_px)
            # The point inside the stored crop: where its frame pixel landed.
            x0 = np.floor(position[0] - round(side_px[0]) / 2 + 0.5)
            y0 = np.floor(position[1] - round(side_px[1]) / 2 + 0.5)
            rows["image"].append(np.frombuffer(encode_jpeg(stored, jpeg_quality), dtype=np.uint8))
            rows["beam_xy"].append((position[0] - x0, position[1] - y0))
            rows["pixels_per_mm"].append(ppmm)
            rows["zoom"].append(float(level + 1))
            rows["omega"].append(omega)
            rows["rc"].append(float(label_rng.poisson(expected[i])))
            rows["rc_expected"].append(float(expected[i]))
            rows["on_ice"].append(float(on_ice[i]))
            rows["scan_id"].append(scan_id)
            rows["crystal_id"].append(crystal_id)
            rows["scan_type"].append("Helical" if kind == "line" else f"synthetic-{kind}")
            rows["timestamp"].append(float(k * 10000 + j * 1000 + i))
            rows["detector_frame"].append(i)
            rows["recording_frame"].append(i)
    return rows


def _worker(args):
    kwargs = args[-1]
    return _sample_rows(*args[:-1], **kwargs)


TEXT = h5py.string_dtype()
JPEG = h5py.vlen_dtype(np.uint8)


def sample_jobs(n_samples: int, seed: int, kwargs: dict) -> list:
    """One job per virtual sample, all drawn from ``seed``: ``(index, sample seed, look seed, kwargs + label seed)``."""
    root = np.random.default_rng(seed)
    sample_seeds = root.integers(0, 10**6, size=n_samples)
    look_seeds = root.integers(0, 2**62, size=n_samples)
    label_seeds = root.integers(0, 2**62, size=n_samples)
    return [(k, int(sample_seeds[k]), int(look_seeds[k]), kwargs | {"label_seed": int(label_seeds[k])})
            for k in range(n_samples)]


def set_provenance(generator: str, seed: int, n_samples: int, kwargs: dict, **notes) -> dict:
    """Where a generated set comes from: the generator, its version, seed and arguments, and notes on columns."""
    return {
        "generator": generator,
        "package_version": __version__,
        "seed": int(seed),
        "n_samples": int(n_samples),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
        "rc": "Poisson draw of rc_expected, the ground-truth expected reflection count",
        **notes,
    }


def write_per_sample(path, worker, jobs, group: str, columns: dict, attrs: dict, *, workers=1, progress=True) -> int:
    """Append each job's rows (``worker(job)``: a dict of lists) to the columns of ``/group`` in a new HDF5 file.

    ``columns`` maps a name to ``(dtype, shape)`` of one row (:data:`JPEG`:
    encoded image bytes, :data:`TEXT`: strings). The file is written as
    ``path.part`` and renamed when complete, so ``path`` is whole or absent.
    Returns the number of rows.
    """
    make_directory(os.path.dirname(os.path.abspath(path)), "output path")
    n = 0

    def write(partial):
        nonlocal n
        with per_sample(worker, jobs, workers, progress) as results, h5py.File(partial, "w") as f:
            f.attrs.update(attrs)
            g = f.create_group(group)
            for name, (dtype, shape) in columns.items():
                g.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(64, *shape))
            for rows in results:
                m = len(rows[next(iter(columns))])
                for name, (dtype, _) in columns.items():
                    ds = g[name]
                    ds.resize(n + m, axis=0)
                    if dtype is JPEG:
                        for i, buf in enumerate(rows[name]):
                            ds[n + i] = buf
                    else:
                        ds[n : n + m] = np.asarray(rows[name], dtype=object if dtype is TEXT else dtype)
                n += m

    try:
        write_whole(path, write)
    except (OSError, RuntimeError) as err:
        system = system_error(path, err)
        if system is None:
            raise
        raise system from err
    return n


@contextlib.contextmanager
def per_sample(worker, jobs, workers: int = 1, progress: bool = True):
    """The results of ``worker(job)`` for each job, in order, from ``workers`` processes, with a progress bar."""
    pool = None
    if workers > 1:
        import multiprocessing

        with _interrupts_ignored():  # inherited by the workers: a Ctrl-C while they start up is the parent's too
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=ignore_interrupts)
        results = pool.imap(worker, jobs)
    else:
        results = map(worker, jobs)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(jobs), desc="virtual samples", unit="sample")
    try:
        yield results
    except BaseException:
        # Ctrl-C or an error: the samples still queued are not wanted, and waiting for them to be rendered
        # (close, join) hung for ever once Ctrl-C had also ended the tasks the workers were running.
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()


@contextlib.contextmanager
def _interrupts_ignored():
    """Ctrl-C ignored meanwhile (from the main thread, the only one that may set signal handlers)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ignore_interrupts():
    """A worker process's initializer: Ctrl-C, sent to every process of the terminal, is the parent's to handle.

    Each worker would otherwise end its task with a KeyboardInterrupt traceback of its own.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def synthetic_dataset(
    path,
    n_samples: int = 80,
    seed: int = 0,
    *,
    crops_per_sample: int = 96,
    omegas_per_sample: int = 4,
    stored_crop_um: float = 240.0,
    zoom_levels=ZOOM_PX_PER_UM,
    random_looks: bool = True,
    frame_size=(1280, 1024),
    jpeg_quality: int = 90,
    empty_fraction: float = 0.15,
    ice_fraction: float = 0.3,
    line_fraction: float = 0.4,
    hit_fraction: float = 0.35,
    near_fraction: float = 0.0,
    ice_hit_fraction: float = 0.0,
    region_fraction: float = 0.0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write a ``dataset.h5`` of ``n_samples`` virtual samples; returns a summary.

    Parameters
    ----------
    path : str
        The file to write (replaced).
    n_samples : int
        Virtual samples (= crystal ids).
    seed : int
        Everything follows from it: samples, looks, positions, labels.
    crops_per_sample : int
        Rows per sample, spread over ``omegas_per_sample`` omega angles.
    stored_crop_um : float
        Side of the stored crops, um (models can use any ``crop_um`` up to it).
    zoom_levels : sequence of float
        Image scales to draw from, pixels per micrometre; the row's ``zoom``
        is the 1-based index into this list.
    random_looks : bool
        Domain randomisation: a random camera look per sample.
    frame_size : (int, int)
        Rendered frame size; the beam is at its centre.
    jpeg_quality : int
        Of the stored crops.
    empty_fraction : float
        Share of empty loops.
    ice_fraction : float
        Share of samples with ice balls (no Bragg spots: ice-ring spots only).
    line_fraction, hit_fraction, near_fraction, ice_hit_fraction, region_fraction : float
        Shares of positions on a line through the crystal, on the crystals,
        near them, on ice balls and anywhere in the centring region (see the
        module documentation); the rest are anywhere around the loop. Their
        sum is at most 1. On empty loops the hit and near positions, and on
        samples without ice the ice positions, are anywhere around the loop too.
    workers : int
        Processes rendering samples in parallel.
    progress : bool
        Show a tqdm progress bar.
    """
    if max(zoom_levels) * stored_crop_um > min(frame_size):
        raise ValueError(
            f"a {stored_crop_um} um crop at {max(zoom_levels)} px/um does not fit in a {frame_size} frame: "
            "lower stored_crop_um or the zoom levels"
        )
    fractions = {"line_fraction": line_fraction, "hit_fraction": hit_fraction, "near_fraction": near_fraction,
                 "ice_hit_fraction": ice_hit_fraction, "region_fraction": region_fraction}
    if min(fractions.values()) < 0 or sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"position shares {fractions}: each must be >= 0 and their sum at most 1: lower some of them")
    kwargs = dict(crops_per_sample=crops_per_sample, omegas_per_sample=omegas_per_sample,
                  stored_crop_um=stored_crop_um, zoom_levels=tuple(zoom_levels), random_looks=random_looks,
                  frame_size=tuple(frame_size), jpeg_quality=jpeg_quality, empty_fraction=empty_fraction,
                  ice_fraction=ice_fraction, line_fraction=line_fraction, hit_fraction=hit_fraction,
                  near_fraction=near_fraction, ice_hit_fraction=ice_hit_fraction, region_fraction=region_fraction)
    provenance = set_provenance("mxcube_autocenter.learning.synthetic.synthetic_dataset", seed, n_samples, kwargs,
                                zoom="1-based index into zoom_levels (px/um)",
                                on_ice=f"1 where the beam's centre lies on an ice ball and rc_expected < {ICE_MAX_RC:g}, else 0")
    columns = {
        "image": (JPEG, ()),
        "beam_xy": (np.float64, (2,)),
        "pixels_per_mm": (np.float64, (2,)),
        "zoom": (np.float64, ()),
        "omega": (np.float64, ()),
        "rc": (np.float64, ()),
        "rc_expected": (np.float64, ()),
        "on_ice": (np.float64, ()),
        "scan_id": (TEXT, ()),
        "crystal_id": (TEXT, ()),
        "scan_type": (TEXT, ()),
        "timestamp": (np.float64, ()),
        "detector_frame": (np.int64, ()),
        "recording_frame": (np.int64, ()),
    }
    attrs = {"format_version": DATASET_FORMAT_VERSION, "provenance": json.dumps(provenance),
             "stored_crop_um": float(stored_crop_um)}
    n = write_per_sample(path, _worker, sample_jobs(n_samples, seed, kwargs), "samples", columns, attrs,
                         workers=workers, progress=progress)
    with h5py.File(path, "r") as f:
        rc = f["samples/rc"][()]
    return {
        "path": os.path.abspath(path),
        "rows": int(n),
        "samples": int(n_samples),
        "stored_crop_um": float(stored_crop_um),
        "rc_mean": float(rc.mean()) if n else None,
        "rc_zero_fraction": float(np.mean(rc == 0)) if n else None,
        "rc_ge_5_fraction": float(np.mean(rc >= 5)) if n else None,
    }
