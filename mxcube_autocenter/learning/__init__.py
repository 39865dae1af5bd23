"""Learning the reflection count from on-axis camera crops.

The pipeline (see ``docs/learning.md``):

- :mod:`.crops`: crop geometry around the beam and per-region normalisation
  (numpy and OpenCV only: shared by training and centring);
- :mod:`.transforms`: label transforms (vanilla z-score, log, tanh) with
  exact inverses and their parameters stored in the model file;
- :mod:`.augment`: the 8 dihedral flips and rotations and optional jitter,
  on the fly in ``tf.data``;
- :mod:`.split`: the 60/20/20 split by crystal;
- :mod:`.data`: streaming a ``dataset.h5`` (read by
  :func:`mxcube_autocenter.labelling.dataset.read_table`) with ``tf.data``;
- :mod:`.architectures`: the thesis' regressors ``a1``-``a10``, the
  crystal/empty classifier and compact fully convolutional regressors;
- :mod:`.training`: ``train``, ``train_classifier`` and the self-describing
  ``.keras`` model files (``load_model``);
- :mod:`.evaluate`: Markdown reports with figures and the architecture x
  transform sweep;
- :mod:`.synthetic`: datasets written straight from the virtual beamline;
- :mod:`.experiment`: the reference measurement (``python -m
  mxcube_autocenter.learning.experiment``).

Importing this package does not import TensorFlow; the modules that need it
(``augment``, ``data``, ``architectures``, ``training``, ``evaluate``) do.
Unless TensorFlow is imported already, it imports PyTango first, where it is
installed (mxcubecore requires it): both bundle gRPC, and PyTango imported
after TensorFlow aborts the process ("Flag 'grpc_experiments' was defined
more than once"), as an MXCuBE that loads a Tango object after this plugin's
models would. Imported after TensorFlow (a script of its own), PyTango would
abort it at once, so it is not.
"""

import sys

if "tensorflow" not in sys.modules:
    try:
        import tango  # noqa: F401
    except ImportError:
        pass
