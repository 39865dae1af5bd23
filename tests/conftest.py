"""Test harness: a real mxcubecore HardwareRepository booted from our XML.

gevent is monkey-patched first, exactly as MXCuBE does, so that mxcubecore's
greenlets (camera polling, motor moves) run as they do in production.
"""

from gevent import monkey

monkey.patch_all(thread=False)

import pytest  # noqa: E402

from mxcube_autocenter.beamline import hardware_repository  # noqa: E402


@pytest.fixture(scope="module")
def beamline():
    """The virtual beamline with the AutoCenter object, booted once per test module."""
    with hardware_repository() as bl:
        yield bl


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small real regressor trained for two epochs on virtual-beamline crops (about 20 s)."""
    from mxcube_autocenter.learning.synthetic import synthetic_dataset
    from mxcube_autocenter.learning.training import train

    root = tmp_path_factory.mktemp("tiny_model")
    synthetic_dataset(root / "data.h5", n_samples=6, seed=1, crops_per_sample=24, stored_crop_um=240, progress=False)
    result = train(root / "data.h5", "fcn", "log", root / "model", crop_um=120, input_size=48, epochs=2, batch_size=16, verbose=0)
    return result.model_path


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """A small real crystal/empty classifier trained for one epoch on virtual-beamline crops."""
    from mxcube_autocenter.learning.synthetic import synthetic_dataset
    from mxcube_autocenter.learning.training import train_classifier

    root = tmp_path_factory.mktemp("tiny_classifier")
    synthetic_dataset(root / "data.h5", n_samples=6, seed=2, crops_per_sample=16, stored_crop_um=240, progress=False)
    return train_classifier(root / "data.h5", root / "model", crop_um=120, input_size=48, epochs=1, batch_size=16,
                            verbose=0).model_path  # fmt: skip


@pytest.fixture(scope="session")
def tiny_ice_model(tmp_path_factory):
    """A small real ice network (a classifier of the ``on_ice`` label) trained for one epoch on virtual samples with ice."""
    from mxcube_autocenter.learning.synthetic import synthetic_dataset
    from mxcube_autocenter.learning.training import train_classifier

    root = tmp_path_factory.mktemp("tiny_ice_model")
    synthetic_dataset(root / "data.h5", n_samples=8, seed=3, crops_per_sample=16, ice_fraction=1.0, line_fraction=0.1,
                      ice_hit_fraction=0.5, stored_crop_um=240, progress=False)  # fmt: skip
    return train_classifier(root / "data.h5", root / "model", label="on_ice", crop_um=80, input_size=32, epochs=1,
                            batch_size=16, verbose=0).model_path  # fmt: skip
