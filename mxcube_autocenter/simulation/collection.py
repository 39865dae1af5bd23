"""Rotational and helical scans: motor trajectories and collection parameters.

Plain functions shared by the simulated collect object, the recorder and the
tests, so that all of them agree on what a scan does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mxcube_autocenter.geometry import TRANSLATION_MOTORS


@dataclass(frozen=True)
class ScanPlan:
    """Where the goniometer is at each moment of a scan.

    Attributes
    ----------
    experiment_type : {"OSC", "Helical"}
    omega_start : float
        Omega at the start of the first image, degrees.
    omega_range : float
        Rotation per image, degrees.
    n_images : int
    exposure_time : float
        Per image, seconds.
    start, end : dict
        Translation motor positions (mm) at the start and end of the scan;
        equal for a rotational scan.
    """

    experiment_type: str
    omega_start: float
    omega_range: float
    n_images: int
    exposure_time: float
    start: dict
    end: dict

    @property
    def duration(self) -> float:
        return self.n_images * self.exposure_time

    def motors_at(self, t: float) -> dict:
        """Motor positions ``t`` seconds after the scan started (clipped to the scan)."""
        f = float(np.clip(t / self.duration, 0.0, 1.0)) if self.duration > 0 else 0.0
        positions = {m: self.start[m] + f * (self.end[m] - self.start[m]) for m in TRANSLATION_MOTORS}
        positions["omega"] = self.omega_start + f * self.n_images * self.omega_range
        return positions


def scan_plan(dc_params: dict, current: dict, helical_positions: dict | None = None) -> ScanPlan:
    """The scan described by mxcubecore collection parameters.

    Parameters
    ----------
    dc_params : dict
        mxcubecore data collection parameters (``oscillation_sequence``,
        ``experiment_type``).
    current : dict
        Current translation motor positions, used for a rotational scan.
    helical_positions : dict, optional
        ``{"1": start, "2": end}`` as given to ``collect.set_helical_pos``.
    """
    osc = dc_params["oscillation_sequence"][0]
    start = {m: float(current[m]) for m in TRANSLATION_MOTORS}
    end = dict(start)
    kind = dc_params.get("experiment_type", "OSC")
    if kind == "Helical":
        if not helical_positions:
            raise ValueError("helical collection without set_helical_pos start and end positions")
        start = {m: float(helical_positions["1"].get(m, start[m])) for m in TRANSLATION_MOTORS}
        end = {m: float(helical_positions["2"].get(m, start[m])) for m in TRANSLATION_MOTORS}
    return ScanPlan(
        experiment_type=kind,
        omega_start=float(osc["start"]),
        omega_range=float(osc["range"]),
        n_images=int(osc["number_of_images"]),
        exposure_time=float(osc["exposure_time"]),
        start=start,
        end=end,
    )


def collection_parameters(
    directory,
    prefix: str,
    *,
    experiment_type: str = "OSC",
    run_number: int = 1,
    n_images: int = 40,
    exposure_time: float = 0.05,
    osc_start: float = 0.0,
    osc_range: float = 0.5,
    sample_id: str | None = None,
    crystal_id: str | None = None,
) -> dict:
    """Data collection parameters as the MXCuBE queue passes them to ``collect.collect``."""
    directory = str(directory)
    return {
        "experiment_type": experiment_type,
        "in_interleave": False,
        "take_snapshots": 0,
        "motors": {m: None for m in ("omega", *TRANSLATION_MOTORS)},
        "sample_reference": {"blSampleId": sample_id, "crystal_id": crystal_id},
        "fileinfo": {
            "directory": directory,
            "process_directory": os.path.join(directory, "process"),
            "archive_directory": os.path.join(directory, "archive"),
            "prefix": prefix,
            "run_number": run_number,
            "template": f"{prefix}_{run_number}_%06d.h5",
        },
        "oscillation_sequence": [
            {
                "start": osc_start,
                "range": osc_range,
                "number_of_images": n_images,
                "exposure_time": exposure_time,
                "overlap": 0,
                "offset": 0,
                "number_of_passes": 1,
                "start_image_number": 1,
            }
        ],
        "transmission": None,
        "energy": None,
        "resolution": None,
        "detector_distance": None,
    }
