"""The X-ray beam of the virtual beamline, as mxcubecore's beam object reports it."""

from __future__ import annotations

from mxcubecore.HardwareObjects.abstract.AbstractBeam import BeamShape
from mxcubecore.HardwareObjects.mockup.BeamMockup import BeamMockup

from mxcube_autocenter.simulation import properties
from mxcube_autocenter.simulation.diffraction import Beam


class VirtualBeam(BeamMockup):
    """BeamMockup whose size and shape are those of the beam the diffraction model integrates over.

    XML properties: ``beam_width_um``, ``beam_height_um`` (FWHM of a
    Gaussian, full size of a top-hat), ``beam_profile`` (``gaussian`` or
    ``tophat``), and BeamMockup's ``beam_position``. The aperture does not
    change the beam: the sample changer's diffraction models use :attr:`xray`.
    """

    def init(self):
        self.xray = Beam(
            width_um=properties.number(self, "beam_width_um", 20.0, low=0.1, unit="um"),
            height_um=properties.number(self, "beam_height_um", 5.0, low=0.1, unit="um"),
            profile=properties.choice(self, "beam_profile", "gaussian", ("gaussian", "tophat")),
        )
        super().init()

    def evaluate_beam_info(self) -> dict:
        shape = BeamShape.RECTANGULAR if self.xray.profile == "tophat" else BeamShape.ELLIPTICAL
        self._beam_width, self._beam_height = self.xray.width_um / 1000.0, self.xray.height_um / 1000.0
        self._beam_shape = shape
        self._beam_info_dict.update(
            size_x=self._beam_width, size_y=self._beam_height, shape=shape,
            label=f"{self.xray.width_um:g}x{self.xray.height_um:g}",
        )  # fmt: skip
        return self._beam_info_dict
