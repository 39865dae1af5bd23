"""An "optical ML centring" task for the MXCuBE queue and scripted workflows.

Queue it like any task node::

    from mxcube_autocenter.queue_entry import OpticalMLCentring, OpticalMLCentringQueueEntry

    entry = OpticalMLCentringQueueEntry(data_model=OpticalMLCentring(n_angles=3))

When executed it runs ``AutoCenter.centre()`` on the mounted sample and fails
the queue entry, with the reason, when no crystal is found or the centring
fails (the sample is then back where it started).
"""

from __future__ import annotations

from mxcubecore import HardwareRepository as HWR
from mxcubecore.model.queue_model_objects import TaskNode
from mxcubecore.queue_entry.base_queue_entry import BaseQueueEntry, QueueExecutionException

from mxcube_autocenter.beamline import auto_centring


class OpticalMLCentring(TaskNode):
    """Task data: how many omega angles to use (None: the AutoCenter property)."""

    def __init__(self, n_angles: int | None = None):
        super().__init__()
        self.set_name("Optical ML centring")
        self.n_angles = n_angles
        self.result = None


class OpticalMLCentringQueueEntry(BaseQueueEntry):
    """Centres the mounted crystal with the AutoCenter object."""

    def execute(self):
        super().execute()
        model = self.get_data_model()
        result = auto_centring(HWR.beamline).centre(n_angles=model.n_angles)
        model.result = result
        if not result.success:
            raise QueueExecutionException(f"Optical ML centring: {result.message}", self)

    def get_type_str(self):
        return "Optical ML centring"
