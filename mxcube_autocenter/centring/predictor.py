"""The trained models, ready to give dense heatmaps of a camera frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mxcube_autocenter.centring.heatmap import (
    DenseEvaluator,
    Heatmap,
    HeatmapError,
    dense_heatmap,
    prepare_region,
)

MODELS_DIR = Path(__file__).resolve().parent.parent.parent / "models"
DEFAULT_REGRESSOR = MODELS_DIR / "default_regressor.keras"
DEFAULT_CLASSIFIER = MODELS_DIR / "default_classifier.keras"


class PredictorError(ValueError):
    """A model that is missing or cannot be used for centring."""


class DenseModel:
    """One model file evaluated densely over a region of a frame."""

    def __init__(self, path):
        from mxcube_autocenter.learning import crops
        from mxcube_autocenter.learning.training import ModelFileError, info_spec, load_model

        try:
            self.model, self.info = load_model(path)
            self.evaluator = DenseEvaluator(self.model)
        except (ModelFileError, HeatmapError) as err:
            raise PredictorError(f"{path}: {err}") from err
        self.path = Path(path)
        self.spec = info_spec(self.info)
        self._crops = crops

    def normalise(self, region) -> np.ndarray:
        """The model's input normalisation, applied once to the whole region."""
        coloured = self._crops.to_colour(region, self.spec.colour)
        return self._crops.apply_stats(coloured, self._crops.region_stats(coloured, self.spec.normalisation))

    def prepare(self, frame, roi, pixels_per_mm):
        crop_px = self.spec.crop_um * pixels_per_mm[0] / 1000.0
        return prepare_region(frame, roi, crop_px, self.spec.input_size, self.normalise)

    def heatmap(self, prepared, stride_px) -> Heatmap:
        return dense_heatmap(self.evaluator, *prepared, stride_px)


class Predictor:
    """Predicted reflection counts (and crystal probabilities) over a region of a frame.

    Parameters
    ----------
    regressor : DenseModel
        Predicts the transformed reflection count of the crop centred on each point.
    classifier : DenseModel, optional
        Predicts the probability that the crop shows a crystal.
    """

    def __init__(self, regressor: DenseModel, classifier: DenseModel | None = None):
        from mxcube_autocenter.learning.training import info_transform

        self.regressor = regressor
        self.classifier = classifier
        self.transform = info_transform(regressor.info)

    def describe(self) -> str:
        text = f"regressor {self.regressor.path.name} ({self.regressor.info['architecture']})"
        if self.classifier is not None:
            text += f", classifier {self.classifier.path.name}"
        return text

    def predict(self, frame, roi, pixels_per_mm, stride_px):
        """Heatmaps over ``roi``: reflection counts, and crystal probability (or None).

        The classifier's grid is sampled at the regressor's grid points
        (nearest), so both maps share coordinates.
        """
        raw = self.regressor.heatmap(self.regressor.prepare(frame, roi, pixels_per_mm), stride_px)
        counts = Heatmap(np.asarray(self.transform.inverse(raw.values), dtype=np.float32), raw.xs, raw.ys)
        if self.classifier is None:
            return counts, None
        prob = self.classifier.heatmap(self.classifier.prepare(frame, roi, pixels_per_mm), stride_px)
        cols = np.abs(prob.xs[None, :] - counts.xs[:, None]).argmin(axis=1)
        rows = np.abs(prob.ys[None, :] - counts.ys[:, None]).argmin(axis=1)
        return counts, Heatmap(prob.values[np.ix_(rows, cols)], counts.xs, counts.ys)


def load_predictor(regressor_path=None, classifier_path=None) -> Predictor:
    """The centring models: the configured files, or the ones shipped in ``models/``.

    Raises
    ------
    PredictorError
        A file that is missing, not a model of this package, or not
        evaluable as a dense heatmap; the message names the file and the fix.
    """
    regressor_path = Path(regressor_path) if regressor_path else DEFAULT_REGRESSOR
    if not regressor_path.exists():
        raise PredictorError(
            f"{regressor_path}: no such model file: set the centring_model property to a model trained with "
            "`mxcube-autocenter train`, or restore the shipped models/ directory"
        )
    regressor = DenseModel(regressor_path)
    if regressor.info.get("task") != "regression":
        raise PredictorError(f"{regressor_path}: a {regressor.info.get('task')} model, not a regressor: set centring_model to a regressor")
    classifier = None
    if classifier_path or DEFAULT_CLASSIFIER.exists():
        classifier = DenseModel(classifier_path or DEFAULT_CLASSIFIER)
        if classifier.info.get("task") != "classifier":
            raise PredictorError(f"{classifier.path}: not a crystal/empty classifier: fix centring_classifier")
    return Predictor(regressor, classifier)
