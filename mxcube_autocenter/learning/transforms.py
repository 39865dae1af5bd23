"""Label transforms: reflection counts to regression targets and back.

Reflection counts are heavy-tailed (most crops see none, a few see
hundreds), so the thesis compared three targets. Each transform is fitted
on the training labels only; its parameters travel in the model file
(:meth:`LabelTransform.to_config`, :func:`transform_from_config`).

``vanilla``
    ``y = (rc - mean) / std``: the z-score over the training set.
``log``
    ``y = (log(rc + offset) - mean) / std`` with ``offset = 1`` by default
    (``log1p``: a zero count maps to 0 before standardising; counts are
    integers >= 0 so no smaller offset is needed), then standardised with
    the mean and standard deviation of ``log(rc + offset)`` over the
    training set so that its targets have the same scale as ``vanilla``'s.
``tanh``
    ``y = tanh((rc - mean) / (scale * std))`` (``scale = 1`` by default):
    the z-score squashed into (-1, 1), which bounds the influence of the
    rare very bright crops. Inverse: ``arctanh`` of ``y`` clipped to
    ``[-(1 - 1e-7), 1 - 1e-7]``, i.e. z-scores beyond +-8.4: a prediction
    outside (-1, 1), which a linear output can make, maps to the clip value,
    and the forward transform of a count beyond mean + 8.4 std cannot be
    inverted exactly (its tanh is within 1e-7 of 1). Hampel's
    "tanh-estimator" (``0.5 (tanh(0.01 z) + 1)``) is this with
    ``scale = 100`` and a shift and halving that do not change a
    regression.

All inverses are exact (to float64 rounding) on the transform's range.
"""

from __future__ import annotations

import numpy as np

TRANSFORMS = ("vanilla", "log", "tanh")
TANH_CLIP = 1.0 - 1e-7


class LabelTransform:
    """A fitted, invertible map from reflection counts to regression targets."""

    name = ""

    def __init__(self, mean: float | None = None, std: float | None = None):
        self.mean = None if mean is None else float(mean)
        self.std = None if std is None else float(std)
        # What fit() never gives: a std of 0 or inf makes infinite targets, a negative one turns every heatmap over.
        if self.mean is not None and not np.isfinite(self.mean):
            raise ValueError(f"the {self.name} transform's mean must be a finite number, not {mean!r}")
        if self.std is not None and not (np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"the {self.name} transform's std must be a positive finite number, not {std!r}")

    @property
    def fitted(self) -> bool:
        return self.mean is not None and self.std is not None

    def _check(self):
        if not self.fitted:
            raise RuntimeError(f"the {self.name} transform is not fitted: call fit(training_counts) first")

    def _pre(self, rc) -> np.ndarray:
        """The count before standardising (identity here)."""
        return np.asarray(rc, dtype=np.float64)

    def _pre_inverse(self, v) -> np.ndarray:
        return v

    def fit(self, rc) -> "LabelTransform":
        """Set the parameters from training counts; returns self."""
        v = self._pre(rc)
        if v.size == 0:
            raise ValueError(f"cannot fit the {self.name} transform on no labels")
        self.mean = float(np.mean(v))
        std = float(np.std(v))
        self.std = std if std > 0 else 1.0
        return self

    def forward(self, rc) -> np.ndarray:
        """Counts to targets (float64)."""
        self._check()
        return (self._pre(rc) - self.mean) / self.std

    def inverse(self, y) -> np.ndarray:
        """Targets (or predictions) to counts (float64)."""
        self._check()
        return self._pre_inverse(np.asarray(y, dtype=np.float64) * self.std + self.mean)

    def to_config(self) -> dict:
        return {"name": self.name, "mean": self.mean, "std": self.std}

    @classmethod
    def from_config(cls, config: dict) -> "LabelTransform":
        config = dict(config)
        name = config.pop("name", cls.name)
        if name != cls.name:
            raise ValueError(f"a {cls.name} transform cannot be made from a {name!r} configuration")
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class VanillaTransform(LabelTransform):
    """``y = (rc - mean) / std``."""

    name = "vanilla"


class LogTransform(LabelTransform):
    """``y = (log(rc + offset) - mean) / std``."""

    name = "log"

    def __init__(self, mean=None, std=None, offset: float = 1.0):
        super().__init__(mean, std)
        if not (offset > 0 and np.isfinite(offset)):
            raise ValueError(f"the log transform's offset must be positive, not {offset!r}")
        self.offset = float(offset)

    def _pre(self, rc):
        rc = np.asarray(rc, dtype=np.float64)
        if np.any(rc + self.offset <= 0):
            raise ValueError(f"the log transform needs counts > -{self.offset}, got {rc.min()}")
        return np.log(rc + self.offset)

    def _pre_inverse(self, v):
        return np.exp(v) - self.offset

    def to_config(self):
        return {**super().to_config(), "offset": self.offset}


class TanhTransform(LabelTransform):
    """``y = tanh((rc - mean) / (scale * std))``."""

    name = "tanh"

    def __init__(self, mean=None, std=None, scale: float = 1.0):
        super().__init__(mean, std)
        if not (scale > 0 and np.isfinite(scale)):
            raise ValueError(f"the tanh transform's scale must be positive, not {scale!r}")
        self.scale = float(scale)

    def forward(self, rc):
        self._check()
        return np.tanh((np.asarray(rc, dtype=np.float64) - self.mean) / (self.scale * self.std))

    def inverse(self, y):
        self._check()
        y = np.clip(np.asarray(y, dtype=np.float64), -TANH_CLIP, TANH_CLIP)
        return np.arctanh(y) * self.scale * self.std + self.mean

    def to_config(self):
        return {**super().to_config(), "scale": self.scale}


_CLASSES = {cls.name: cls for cls in (VanillaTransform, LogTransform, TanhTransform)}


def get_transform(name: str, **params) -> LabelTransform:
    """An unfitted transform by name (one of :data:`TRANSFORMS`)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown label transform {name!r}: choose one of {TRANSFORMS}")
    return _CLASSES[name](**params)


def transform_from_config(config: dict) -> LabelTransform:
    """The transform stored by :meth:`LabelTransform.to_config`."""
    name = config.get("name")
    if name not in _CLASSES:
        raise ValueError(f"unknown label transform {name!r} in a model's metadata: known are {TRANSFORMS}")
    return _CLASSES[name].from_config(config)
