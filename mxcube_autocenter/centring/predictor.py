"""The trained models, ready to give dense heatmaps of a camera frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mxcube_autocenter.centring.heatmap import (
    DenseEvaluator,
    Heatmap,
    HeatmapError,
    prepare_region,
    symmetric_heatmap,
)

# Package data, so that a plain (non-editable) install has them too.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED_REGRESSOR = MODELS_DIR / "default_regressor.keras"
SHIPPED_CLASSIFIER = MODELS_DIR / "default_classifier.keras"
SHIPPED_ICE_MODEL = MODELS_DIR / "default_ice.keras"


class PredictorError(ValueError):
    """A model that is missing or cannot be used for centring."""


# Where each model is configured, for the messages.
REGRESSOR_SETTING = "the centring_model property; --model on the command line"
CLASSIFIER_SETTING = "the centring_classifier property; --classifier on the command line"
ICE_SETTING = "the centring_ice_model property; --ice-model on the command line"


def _load(path, setting: str):
    from mxcube_autocenter.learning.training import ModelFileError, info_spec, load_model

    try:
        model, info = load_model(path)
    except ModelFileError as err:
        raise PredictorError(f"{err} ({setting})") from err
    return model, info, info_spec(info)


def _load_classifier(path, setting: str, ice: bool) -> tuple:
    """``(path, model, input spec)`` of a crystal/empty classifier, or (``ice``) of an ice network."""
    from mxcube_autocenter.learning.training import ICE_LABEL

    model, info, spec = _load(path, setting)
    if info.get("task") == "classifier" and (info.get("label") == ICE_LABEL) == ice:
        return Path(path), model, spec
    if ice:
        raise PredictorError(f"{path}: not an ice network: give a classifier trained with `mxcube-autocenter train "
                             f"--arch classifier --label {ICE_LABEL}` ({setting})")
    if info.get("label") == ICE_LABEL:
        raise PredictorError(f"{path}: an ice network, not a crystal/empty classifier: give it as the "
                             f"centring_ice_model property (--ice-model), or another classifier ({setting})")
    raise PredictorError(f"{path}: not a crystal/empty classifier: give one trained with `mxcube-autocenter train "
                         f"--arch classifier` or `fcn_classifier` ({setting})")


def check_ice_model(path):
    """Load ``path`` as an ice network, for its errors alone (:class:`PredictorError`), without a regressor."""
    _load_classifier(path, ICE_SETTING, ice=True)


class Predictor:
    """Predicted reflection counts over a region of a frame, and a crystal and an ice check at a point.

    Parameters
    ----------
    regressor_path : path
        Predicts the (transformed) reflection count of the crop centred on
        each point; evaluated densely (:mod:`.heatmap`).
    classifier_path : path, optional
        Predicts the probability that a crop shows a crystal; evaluated on the
        one crop at the heatmap's peak, so it needs no dense form.
    ice_path : path, optional
        The ice network: predicts the probability that the beam at the
        crop's centre is on an ice ball and on no crystal; evaluated at the
        beam in the verification view, where the centred point is in focus.
    """

    def __init__(self, regressor_path, classifier_path=None, ice_path=None):
        from mxcube_autocenter.learning import crops
        from mxcube_autocenter.learning.training import info_transform

        self._crops = crops
        self.regressor_path = Path(regressor_path)
        self.model, self.info, self.spec = _load(regressor_path, REGRESSOR_SETTING)
        if self.info.get("task") != "regression":
            raise PredictorError(
                f"{regressor_path}: a {self.info.get('task')} model, not a regressor: give a regressor "
                f"({REGRESSOR_SETTING})"
            )
        try:
            self.evaluator = DenseEvaluator(self.model)
        except HeatmapError as err:
            raise PredictorError(f"{regressor_path}: {err} ({REGRESSOR_SETTING})") from err
        self.transform = info_transform(self.info)
        self.classifier = _load_classifier(classifier_path, CLASSIFIER_SETTING, ice=False) if classifier_path else None
        self.ice = _load_classifier(ice_path, ICE_SETTING, ice=True) if ice_path else None

    def describe(self) -> str:
        text = f"regressor {self.regressor_path.name} ({self.info['architecture']['name']})"
        if self.classifier is not None:
            text += f", classifier {self.classifier[0].name}"
        if self.ice is not None:
            text += f", ice network {self.ice[0].name}"
        return text


    def crop_px(self, pixels_per_mm) -> tuple[float, float]:
        """Width and height on the frame of the regressor's crop, pixels (square on the sample)."""
        return self._crops.crop_side_px(self.spec.crop_um, pixels_per_mm)

    def predict(self, frame, roi, pixels_per_mm, stride_px, symmetries="none") -> Heatmap:
        """Predicted reflection counts (inverse-transformed) on a grid over ``roi``.

        ``symmetries`` averages the model over turned copies of the region
        (:func:`.heatmap.symmetric_heatmap`).
        """
        prepared = prepare_region(frame, roi, self.crop_px(pixels_per_mm), self.spec.input_size,
                                  self._crops.region_normaliser(self.spec))
        raw = symmetric_heatmap(self.evaluator, *prepared, stride_px, symmetries)
        return Heatmap(np.asarray(self.transform.inverse(raw.values), dtype=np.float32), raw.xs, raw.ys)

    def crystal_probability(self, frame, point, roi, pixels_per_mm) -> float | None:
        """The classifier's probability of a crystal in the crop at ``point`` (None without one).

        Normalised with the statistics of the region of interest itself, as
        the classifier's training crops were with their stored crop's (the
        heatmap's statistics also cover half a crop around it).
        """
        return self._probability(self.classifier, frame, point, roi, pixels_per_mm)

    def ice_probability(self, frame, point, roi, pixels_per_mm) -> float | None:
        """The ice network's probability that the beam at ``point`` is on ice and on no crystal (None without one).

        Normalised as :meth:`crystal_probability`.
        """
        return self._probability(self.ice, frame, point, roi, pixels_per_mm)

    def _probability(self, classifier, frame, point, roi, pixels_per_mm) -> float | None:
        if classifier is None:
            return None
        _, model, spec = classifier
        region = frame[roi.y0 : roi.y1, roi.x0 : roi.x1]
        crop = self._crops.model_input(frame, point, pixels_per_mm, spec, region=region)
        return float(np.asarray(model(crop[None], training=False))[0, 0])


def load_predictor(regressor_path=None, classifier_path=None, ice_path=None) -> Predictor:
    """The centring models: the configured files, or the ones shipped in ``models/``.

    With no (or an empty) ``regressor_path``, ``models/default_regressor.keras``;
    with no (or an empty) ``classifier_path``, ``models/default_classifier.keras``
    where it exists, else no classifier (empty loops are then refused by
    ``min_score`` alone); with no (or an empty) ``ice_path``,
    ``models/default_ice.keras`` where it exists, else no ice network.

    Raises
    ------
    PredictorError
        A file that is missing, not a model of this package, or a regressor
        that cannot be evaluated as a dense heatmap; the message names the
        file and the fix.
    """
    regressor_path = Path(regressor_path) if regressor_path else SHIPPED_REGRESSOR
    if not regressor_path.exists():
        raise PredictorError(
            f"{regressor_path}: no such model file: give a model trained with `mxcube-autocenter train` "
            f"({REGRESSOR_SETTING}), or reinstall mxcube-autocenter to restore its shipped models"
        )
    if not classifier_path and SHIPPED_CLASSIFIER.exists():  # an empty XML property means the shipped one too
        classifier_path = SHIPPED_CLASSIFIER
    if not ice_path and SHIPPED_ICE_MODEL.exists():
        ice_path = SHIPPED_ICE_MODEL
    return Predictor(regressor_path, classifier_path, ice_path)
