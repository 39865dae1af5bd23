"""Centring benchmarks: dense heatmap against crop-by-crop, lucid3, a full centring."""

from __future__ import annotations

import time

import numpy as np

from mxcube_autocenter.centring.heatmap import dense_heatmap, prepare_region, reference_heatmap
from mxcube_autocenter.centring.loop import Roi, find_loop
from mxcube_autocenter.centring.predictor import load_predictor
from mxcube_autocenter.config import AutoCenterConfig
from mxcube_autocenter.learning import crops


def added_memory_mb(fn) -> float | None:
    """Peak resident memory while ``fn()`` runs, over the resident memory before it, MB.

    The kernel's peak (``VmHWM``) is reset first (``/proc/self/clear_refs``),
    so earlier peaks of the process do not count. None where that cannot be
    done (not Linux, or a kernel that refuses it). Memory the allocator kept
    resident from earlier work and hands to ``fn`` adds nothing: the figure is
    what the call adds to the process, which depends on what ran before.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        fn()  # run all the same: callers rely on the call (heatmap_figures' warm-up)
        return None
    before = _status_mb("VmRSS")
    fn()
    return max(_status_mb("VmHWM") - before, 0.0)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def heatmap_figures(predictor, frame, quick: bool) -> dict:
    """A 512 x 512-pixel region at a 4-pixel stride, fast path and reference path, same model and grid.

    The frame's scale is chosen so that one crop is the model's input size
    (no resampling); the reference path's time is measured on a sample of
    the grid's crops and scaled to the whole grid (its cost is per crop).
    """
    spec = predictor.spec
    ppmm = (spec.input_size / spec.crop_um * 1000.0,) * 2
    roi = Roi(384, 256, 384 + 512, 256 + 512)
    evaluator = predictor.evaluator
    normalise = crops.region_normaliser(spec)
    crop_px = predictor.crop_px(ppmm)[0]  # square pixels: the side is input_size
    region, origin, scale = prepare_region(frame, roi, crop_px, spec.input_size, normalise)
    # The first call builds and traces the dense twin; later calls reuse its buffers.
    first_mb = added_memory_mb(lambda: dense_heatmap(evaluator, region, origin, scale, 4.0))
    runs = 2 if quick else 5
    start = time.perf_counter()
    for _ in range(runs):
        fast = dense_heatmap(evaluator, region, origin, scale, 4.0)
    fast_s = (time.perf_counter() - start) / runs
    peak_mb = added_memory_mb(lambda: dense_heatmap(evaluator, region, origin, scale, 4.0))
    n_grid = fast.values.size
    sample = 256 if quick else 2048
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(fast.ys), size=int(np.sqrt(sample)), replace=False))
    cols = np.sort(rng.choice(len(fast.xs), size=int(np.sqrt(sample)), replace=False))
    # Warm-up, as the fast path's first call above: the model's first batch costs more
    # than later ones (about 1.4 times, 256 crops), and would be scaled to the whole grid.
    side = min(16, len(rows))
    reference_heatmap(predictor.model, region, origin, scale, spec.input_size, fast.xs[cols[:side]], fast.ys[rows[:side]])
    start = time.perf_counter()
    ref = reference_heatmap(predictor.model, region, origin, scale, spec.input_size, fast.xs[cols], fast.ys[rows])
    per_crop = (time.perf_counter() - start) / ref.values.size
    reference_s = per_crop * n_grid
    return {
        "heatmap_grid_points": float(n_grid),
        "heatmap_fast_s": fast_s,
        "heatmap_reference_s": reference_s,
        "heatmap_reference_crops_per_s": 1.0 / per_crop,
        "heatmap_speedup": reference_s / fast_s,
        "heatmap_max_abs_diff": float(np.abs(ref.values - fast.values[np.ix_(rows, cols)]).max()),
        "heatmap_peak_mem_mb": peak_mb,
        "heatmap_first_call_mem_mb": first_mb,
    }


def lucid_s(frame, runs: int) -> float:
    """Mean time of one lucid3 call on ``frame``, s, after an untimed first call
    (its one-time set-up took 0.28 s against 0.10 s for later calls)."""
    find_loop(frame)
    start = time.perf_counter()
    for _ in range(runs):
        find_loop(frame)
    return (time.perf_counter() - start) / runs


def fusion_s(predictor, sample, motors, renderer, runs: int) -> float:
    """Mean time to fuse the default number of views of ``sample`` into one point and refine it on the images, s.

    The views are ``centring_angles`` (the default) frames over half a turn
    from ``motors``, each analysed as the procedure does; only
    :func:`.procedure.fuse_and_refine` (:func:`.fusion.fuse_views` and
    :func:`.fusion.refine_on_image`) is timed.
    """
    from mxcube_autocenter.centring.loop import loop_tips
    from mxcube_autocenter.centring.procedure import CentringSettings, analyse_frame, fuse_and_refine
    from mxcube_autocenter.geometry import sample_frame

    settings = CentringSettings.from_config(AutoCenterConfig())
    ppmm, beam = (1300.0, 1300.0), (640, 512)
    angles = []
    for k in range(settings.n_angles):
        at = {**motors, "omega": motors["omega"] + k * 180.0 / settings.n_angles}
        frame = renderer.render(sample, at, ppmm, beam)
        angle = analyse_frame(predictor, frame, loop_tips(frame, ppmm, settings.pin_side)[1], ppmm, settings, at,
                              classify=False)  # fmt: skip
        angle.sample_frame = sample_frame(at, {})  # the virtual goniometer's motors all turn the +1 way
        angles.append(angle)

    fuse_and_refine(angles, ppmm, beam, settings)  # the first call of the process pays for imports and allocations
    start = time.perf_counter()
    for _ in range(runs):
        fuse_and_refine(angles, ppmm, beam, settings)
    return (time.perf_counter() - start) / runs


def full_gc_figures() -> dict:
    """A full garbage collection with the model loaded, with the AutoCenter object's
    freeze (``full_gc_ms``) and without it (``full_gc_unfrozen_ms``), ms.

    The event loop waits for the whole collection.
    """
    import gc

    from mxcube_autocenter.AutoCenter import freeze_long_lived_objects

    def full_gc_ms() -> float:
        start = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - start) * 1000.0

    gc.unfreeze()
    unfrozen = full_gc_ms()
    freeze_long_lived_objects()
    return {"full_gc_ms": full_gc_ms(), "full_gc_unfrozen_ms": unfrozen, "gc_frozen_objects": float(gc.get_freeze_count())}


def centring_wall_s(n: int = 3, n_angles: int | None = None) -> float:
    """Median wall time of ``n`` full centrings on the virtual beamline, moves included.

    ``n_angles`` views each (None: the ``centring_angles`` default). Only
    centrings that end centred count (a refusal skips the move and the
    verification view): samples are mounted until ``n`` did, at most ``4 n``.

    Raises
    ------
    RuntimeError
        If none of the samples was centred.
    """
    from mxcube_autocenter.beamline import auto_centring, hardware_repository, set_zoom
    from mxcube_autocenter.simulation.sample import make_sample

    times = []
    with hardware_repository() as bl:
        ho = auto_centring(bl)
        set_zoom(bl)
        for seed in range(90000, 90000 + 4 * n):
            mounted = bl.sample_changer.mount(make_sample(seed, n_crystals=1))
            centre = mounted.sample.loop_centre
            bl.diffractometer.set_value_motors(bl.diffractometer.readings(
                {"omega": 0.0, "phiy": float(centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}), timeout=30
            )
            start = time.perf_counter()
            centred = ho.centre(n_angles=n_angles, save=False).success
            if centred:
                times.append(time.perf_counter() - start)
            if len(times) == n:
                break
    if not times:
        raise RuntimeError(f"none of {4 * n} virtual samples was centred: the centring wall time has nothing to time")
    return float(np.median(times))


def benchmark(quick: bool = False) -> dict:
    """Heatmap fast/reference/speed-up/memory, lucid3 time and centring wall time (the shipped model)."""
    from mxcube_autocenter.simulation.render import Renderer
    from mxcube_autocenter.simulation.sample import make_sample

    predictor = load_predictor()
    sample = make_sample(3, n_crystals=1)
    motors = {"omega": 30.0, "phiy": float(sample.loop_centre[0]), "phiz": 0.0, "sampx": 0.0, "sampy": 0.0}
    renderer = Renderer()
    frame = renderer.render(sample, motors, (1300.0, 1300.0), (640, 512))
    figures = heatmap_figures(predictor, frame, quick)
    figures["lucid_s"] = lucid_s(frame, runs=3 if quick else 10)
    figures["fusion_s"] = fusion_s(predictor, sample, motors, renderer, runs=2 if quick else 5)
    figures.update(full_gc_figures())
    # The default configuration's, as a beamline centres; three views (the default until 2026-12-06) beside it.
    figures["centring_wall_s"] = centring_wall_s(n=2 if quick else 5)
    figures["centring_default_angles"] = AutoCenterConfig.model_fields["centring_angles"].default
    figures["centring_3_angles_wall_s"] = centring_wall_s(n=2 if quick else 5, n_angles=3)
    return figures
