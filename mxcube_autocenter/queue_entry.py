"""An "optical ML centring" task for the MXCuBE queue and scripted workflows.

Add the task to the queue model like any task node, under a sample's task
group::

    from mxcube_autocenter.queue_entry import OpticalMLCentring

    HWR.beamline.queue_model.add_child(task_group, OpticalMLCentring(n_angles=3))

The AutoCenter object registers :class:`OpticalMLCentringQueueEntry` in
``mxcubecore.queue_entry.MODEL_QUEUE_ENTRY_MAPPINGS`` when it loads, so
``QueueModel.queue_model_child_added`` (which mxcubeweb's queue connects to
the model's ``child_added`` signal) creates and enqueues the entry. When
executed it runs ``AutoCenter.centre()`` on the mounted sample and fails the
entry, with the reason, when no crystal is found or the centring fails (the
sample is then back where it started); the queue goes on with the next entry.
Stopping the queue stops the centring and puts the sample back.
"""

from __future__ import annotations

import gevent
from mxcubecore import HardwareRepository as HWR
from mxcubecore import queue_entry
from mxcubecore.model.queue_model_objects import TaskNode
from mxcubecore.queue_entry.base_queue_entry import (
    BaseQueueEntry,
    QueueAbortedException,
    QueueExecutionException,
)

from mxcube_autocenter.beamline import auto_centring
from mxcube_autocenter.config import check_centring_angles

TASK_NAME = "Optical ML centring"


class OpticalMLCentring(TaskNode):
    """Task data: how many omega angles to use (None: the AutoCenter ``centring_angles`` property).

    Raises
    ------
    ValueError
        If ``n_angles`` is outside the range the ``centring_angles`` property allows.
    """

    def __init__(self, n_angles: int | None = None):
        super().__init__()
        self.set_name(TASK_NAME)
        self.n_angles = None if n_angles is None else check_centring_angles(n_angles)
        self.result = None


class OpticalMLCentringQueueEntry(BaseQueueEntry):
    """Centres the mounted crystal with the AutoCenter object."""

    def __init__(self, view=None, data_model=None, view_set_queue_entry=True):
        super().__init__(view, data_model, view_set_queue_entry)
        self.type_str = TASK_NAME
        self._centring = None

    def execute(self):
        super().execute()
        model = self.get_data_model()
        # Its own greenlet, so that stop() can end the centring however the
        # queue runs this entry (the whole queue, or this entry alone).
        centring = self._centring = gevent.spawn(self._centre, model.n_angles)
        try:
            result = centring.get()
        except Exception as err:
            raise QueueExecutionException(f"{TASK_NAME} failed: {err}", self) from err
        except gevent.Timeout as err:
            if centring.exception is not err:
                raise  # the caller's time-out, not the centring's
            # A motor's own wait (mxcubecore raises gevent.Timeout, no Exception) failed the centring:
            # the sample is back, and the queue must go on, as after any other failure.
            raise QueueExecutionException(f"{TASK_NAME} failed: a motor timed out ({err})", self) from err
        finally:
            # Killed itself (the queue's greenlet), this entry takes the centring
            # down with it; kill() returns once the sample is back.
            centring.kill()
            self._centring = None
        if isinstance(result, gevent.GreenletExit):
            raise QueueAbortedException(f"{TASK_NAME} stopped", self)
        model.result = result.without_images()  # the node lives as long as the queue: no camera frames on it
        if not result.success:
            raise QueueExecutionException(f"{TASK_NAME}: {result.message}", self)

    @staticmethod
    def _centre(n_angles):
        return auto_centring(HWR.beamline).centre(n_angles=n_angles)

    def stop(self):
        """Stop the centring; returns once the sample is back where it started."""
        if self._centring is not None:
            self._centring.kill()
        if self.get_view() is not None:
            super().stop()


def register_queue_entry():
    """Let mxcubecore's queue model create entries for :class:`OpticalMLCentring` nodes.

    ``QueueManager.init`` replaces the mapping, so this must run after the
    queue manager has loaded (the AutoCenter object calls it from its init).
    """
    queue_entry.MODEL_QUEUE_ENTRY_MAPPINGS[OpticalMLCentring] = OpticalMLCentringQueueEntry
