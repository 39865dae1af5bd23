"""``mxcube-autocenter bench``: speed and memory figures, printed, never asserted.

Each benchmark is a function ``(quick: bool) -> dict[str, float]`` that times
the real code path (and, where the issue asks, the slow reference path in the
same run, so that ratios survive noisy machines). ``run_all`` merges their
figures into one flat dictionary, the JSON object of ``bench --json``.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Callable

Benchmark = Callable[[bool], dict]

# In the order they run.
NAMES = ("render", "eiger_write", "recording", "recorder_md3", "spotfinding", "centring")


def _registry() -> list[tuple[str, Benchmark]]:
    # Imported here: each benchmark pulls in its own heavy dependencies.
    from mxcube_autocenter import recording
    from mxcube_autocenter.centring import benchmark as centring
    from mxcube_autocenter.labelling import spotfinder
    from mxcube_autocenter.simulation import eiger, experiments, render

    benchmarks = (render.benchmark, eiger.benchmark, recording.benchmark, experiments.recording_benchmark,
                  spotfinder.benchmark, centring.benchmark)  # fmt: skip
    return list(zip(NAMES, benchmarks))


def run_all(quick: bool = False, only: list[str] | None = None, progress=print) -> dict:
    """Run the benchmarks and return all their figures in one dictionary.

    A figure that is no finite number (NaN, infinite) is None, as one this machine cannot measure: ``bench
    --json`` must stay JSON, which has no NaN.
    """
    figures: dict = {}
    for name, bench in _registry():
        if only and name not in only:
            continue
        progress(f"[bench] {name} ...")
        start = time.perf_counter()
        figures.update(bench(quick))
        progress(f"[bench] {name} done in {time.perf_counter() - start:.1f} s")
    return {name: None if isinstance(value, numbers.Real) and not math.isfinite(value) else value
            for name, value in figures.items()}
