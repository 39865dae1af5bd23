"""Rotational and helical collections on the virtual beamline.

Behaves like mxcubecore's CollectMockup (same signals, same argument lists,
including its duplicated ``collectOscillationFinished``), but moves the
goniometer continuously through the scan, so the camera sees the motion,
draws a reflection count for every detector frame from the mounted sample's
diffraction model, and writes EIGER master and data files. The detector's
clock runs with a configurable offset and jitter from the wall clock, as real
detector and camera clocks do.
"""

from __future__ import annotations

import os
import time

import gevent
import numpy as np
from mxcubecore import HardwareRepository as HWR
from mxcubecore.HardwareObjects.mockup.CollectMockup import CollectMockup

from mxcube_autocenter.collection_recorder import master_file_path
from mxcube_autocenter.simulation import eiger, properties
from mxcube_autocenter.simulation.collection import scan_plan

_MOTION_STEP_S = 0.01
DETECTORS = {"small": eiger.SMALL, "4M": eiger.EIGER_4M, "16M": eiger.EIGER_16M}


class VirtualCollect(CollectMockup):
    """Simulated collect object.

    XML properties: ``detector_clock_offset_s`` (detector clock minus wall
    clock, s), ``detector_clock_jitter_s`` (per-frame timestamp noise, s),
    ``detector`` (``small``, ``4M`` or ``16M`` frames), ``seed``. The
    sample diffracts where the camera draws it: at the readings as the
    diffractometer's wiring turns them into sample positions
    (``VirtualDiffractometer.sample_frame``).
    """

    def init(self):
        super().init()
        self.clock_offset_s = properties.number(self, "detector_clock_offset_s", 0.12, unit="s")
        self.clock_jitter_s = properties.number(self, "detector_clock_jitter_s", 0.002, low=0, high=1, unit="s")
        self.geometry = DETECTORS[properties.choice(self, "detector", "small", tuple(DETECTORS))]
        # Spots that do not fit on a frame are clipped, as a saturated spot finder would (every collection's
        # frames hold as many: the detector's pixel mask is the same whatever the seed).
        simulator = eiger.FrameSimulator(self.geometry)
        self.max_spots, self.max_ice_spots = simulator.capacity, simulator.ice_capacity
        self._rng = np.random.default_rng(properties.number(self, "seed", 0, low=0, whole=True))
        self._helical = False
        self._helical_positions = None
        self._fail_at_image = None
        self.last_collection = None

    def set_helical(self, arg):
        self._helical = bool(arg)

    def set_helical_pos(self, arg):
        self._helical_positions = arg

    def inject_failure(self, at_image: int | None):
        """Make the next collection fail when it reaches image ``at_image`` (None: clear)."""
        self._fail_at_image = at_image

    def do_collect(self, owner):
        # AbstractCollect reports only RuntimeError as a failed collection; any
        # other error would leave the caller waiting for ever.
        try:
            super().do_collect(owner)
        except Exception as err:
            self.log.exception("virtual collection failed")
            self.collection_failed(f"Data collection failed!\n{err}")

    def data_collection_hook(self):
        params = self.current_dc_parameters
        diffr = HWR.beamline.diffractometer
        motors = diffr.all_motors()
        mounted = HWR.beamline.sample_changer.mounted
        plan = scan_plan(params, diffr.get_value_motors(), self._helical_positions if self._helical else None)
        fail_at, self._fail_at_image = self._fail_at_image, None
        # The scan moves the motors itself (update_value), past set_value's limit check.
        for name, value in plan.motors_at(plan.duration).items():
            if not motors[name].validate_value(value):
                raise ValueError(f"the scan ends at {name} = {value:.4g}, beyond its limits {motors[name].get_limits()}: "
                                 "shorten the helical line or the oscillation")  # fmt: skip

        diffr.set_value_motors({"omega": plan.omega_start, **plan.start}, timeout=30)
        self.emit("collectStarted", (None, 1))
        diffr.set_phase(diffr.get_phase_enum.COLLECT)

        counts, ice_spots, frame_starts = [], [], []
        start = time.time()
        # stop_collect kills this greenlet; CollectMockup's aborted_by_user flag,
        # set after the kill and never cleared, is not read.
        for image in range(plan.n_images):
            frame_end = start + (image + 1) * plan.exposure_time
            # The MD3 scan: motors move continuously, not frame by frame.
            while (now := time.time()) < frame_end:
                for name, value in plan.motors_at(now - start).items():
                    motors[name].update_value(value)
                gevent.sleep(min(_MOTION_STEP_S, max(0.0, frame_end - now)))
            if fail_at is not None and image >= fail_at:
                raise RuntimeError(f"simulated detector failure at image {image + 1}")
            mid = diffr.sample_frame(plan.motors_at((image + 0.5) * plan.exposure_time))
            count = mounted.diffraction.sample_rc(mid, self._rng) if mounted else 0
            counts.append(min(count, self.max_spots))
            ice = mounted.diffraction.sample_ice_spots(mid, self._rng) if mounted else 0
            ice_spots.append(min(ice, self.max_ice_spots))
            frame_starts.append(start + image * plan.exposure_time + self.clock_offset_s
                                + self._rng.normal(0.0, self.clock_jitter_s))
            self.emit("collectImageTaken", image + 1)
            self.emit("progressStep", int(100 * (image + 1) / plan.n_images))
        for name, value in plan.motors_at(plan.duration).items():
            motors[name].update_value(value)

        master = master_file_path(params["fileinfo"])
        os.makedirs(os.path.dirname(master), exist_ok=True)
        prefix = os.path.basename(master)[: -len("_master.h5")]
        # Writing the detector files is heavy: keep it off the event loop.
        written = gevent.get_hub().threadpool.apply(
            eiger.write_eiger_collection,
            (os.path.dirname(master), prefix, counts),
            {
                "start_time": frame_starts[0] if frame_starts else start,
                "frame_time": plan.exposure_time,
                "count_time": plan.exposure_time * 0.999,
                "geometry": self.geometry,
                "seed": int(self._rng.integers(2**31)),
                "frame_start_times": frame_starts,
                "ice_spots": ice_spots,
            },
        )
        self.last_collection = {
            "plan": plan,
            "reflection_counts": counts,
            "detector_frame_starts": frame_starts,
            "wall_start": start,
            "master_file": str(written.master_path),
        }
        self.emit_collection_finished()
