"""The AutoCenter hardware object: the plugin's single point of contact with MXCuBE.

It stays thin: it reads its XML configuration, finds the beamline objects it
works with through ``HWR.beamline`` and connects them to the plain algorithm
modules of this package.

Add it to a beamline with a role in ``beamline.yaml``::

    - auto_centring: auto_centring.xml

and an XML file such as ``hardware_objects_xml/auto_centring.xml``. Reach it
with ``HWR.beamline.get_object_by_role("auto_centring")``.
"""

from __future__ import annotations

from mxcubecore.BaseHardwareObjects import HardwareObject

from mxcube_autocenter.config import AutoCenterConfig


class AutoCenter(HardwareObject):
    """Optical crystal centring and training-frame recording for MXCuBE."""

    HOConfig = AutoCenterConfig

    def init(self):
        super().init()
        self.log.info(
            "AutoCenter configured: %s",
            ", ".join(f"{k}={v!r}" for k, v in self.settings().items()),
        )
        self.update_state(self.STATES.READY)

    def settings(self) -> dict:
        """The validated XML properties, by name."""
        return {name: getattr(self.config, name) for name in AutoCenterConfig.model_fields}
