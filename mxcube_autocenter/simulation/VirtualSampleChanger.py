"""A sample changer that mounts virtual samples on the virtual goniometer."""

from __future__ import annotations

from dataclasses import dataclass, field

from mxcubecore.HardwareObjects.mockup.SampleChangerMockup import SampleChangerMockup

from mxcube_autocenter.simulation.diffraction import Beam, DiffractionModel
from mxcube_autocenter.simulation.sample import VirtualSample, make_sample


@dataclass
class MountedSample:
    """The sample on the goniometer with its diffraction ground truth."""

    sample: VirtualSample
    diffraction: DiffractionModel
    crystal_id: str = ""
    _best: tuple = field(default=None, repr=False)

    def best_point(self):
        """``(point, rc)``: where to centre for the most reflections (cached)."""
        if self._best is None:
            self._best = self.diffraction.best_point()
        return self._best


def sample_seed(seed: int, basket: int, position: int) -> int:
    """Seed of the virtual sample at ``basket``, ``position`` of a changer configured with ``seed``."""
    return int(seed) + 100 * int(basket) + int(position)


class VirtualSampleChanger(SampleChangerMockup):
    """SampleChangerMockup whose positions hold reproducible virtual samples.

    The sample at basket ``b``, position ``p`` is made from seed
    ``seed + 100 * b + p``; :meth:`mount` puts any sample on the goniometer
    directly (tests and the demo use it). XML: the ``seed`` property, and the
    beam object (:class:`VirtualBeam`, role ``beam``) whose size and profile
    the diffraction models use.
    """

    def init(self):
        super().init()
        self.mounted = None
        beam = self.get_object_by_role("beam")
        if not isinstance(getattr(beam, "xray", None), Beam):
            raise ValueError("VirtualSampleChanger needs the virtual beam object (VirtualBeam) with role 'beam' in its XML: "
                             "the beam the diffraction models integrate over is the one the beamline reports")
        # The beam the beamline's beam object reports (its size is in recordings and on screen) is the one that diffracts.
        self.beam = beam.xray

    def seed_at(self, basket: int, position: int) -> int:
        return sample_seed(self.get_property("seed", 1000), basket, position)

    def load(self, sample, wait=False):
        loaded = super().load(sample, wait)
        basket, position = self._selected_basket, self._selected_sample
        self.mount(make_sample(self.seed_at(basket, position)), crystal_id=f"{basket}:{position}")
        return loaded

    def unload(self, sample_slot=None, wait=None):
        try:
            # A sample put on with mount() (the demo, tests) is no sample the changer loaded: nothing to give back.
            if self.get_loaded_sample() is not None:
                super().unload(sample_slot, wait)
        finally:
            self.mount(None)

    def mount(self, sample: VirtualSample | None, crystal_id: str | None = None) -> MountedSample | None:
        """Put ``sample`` on the goniometer (None: nothing mounted) and announce it."""
        if sample is None:
            self.mounted = None
        else:
            self.mounted = MountedSample(
                sample=sample,
                diffraction=DiffractionModel(sample, self.beam),
                crystal_id=crystal_id or f"seed{sample.seed}",
            )
        self.emit("virtualSampleMounted", (self.mounted,))
        return self.mounted
