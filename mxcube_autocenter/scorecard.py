"""Scoring centring methods against the virtual beamline's ground truth.

Plain functions, no beamline: the demo (:mod:`mxcube_autocenter.demo`)
centres each held-out sample with every method, and this module turns the
goniometer positions it ends at into figures.

Per centring (:func:`score_position`):

- **hit**: the beam centre line passes through the same crystal at every
  angle of the hit test (:data:`HIT_TEST_OMEGAS`: every 2 degrees of a full
  turn, as a rotation collection sees them) with the translation motors
  where the centring left them (``DiffractionModel.crystals_in_beam``);
- **distance**: 3D distance, um, from the sample point in the beam and in
  focus (``geometry.point_in_beam``) to the ground-truth best point
  (``MountedSample.best_point()``);
- **RC fraction**: the mean reflection count over a turn (``JUDGING_OMEGAS``:
  every 2 degrees of a half turn, the angles the best point is judged at)
  with the translation motors where the centring left them
  (``DiffractionModel.mean_rc_over_rotation``) over the best point's (with
  it centred).

A refusal ("no crystal found") shoots nothing: a crystal refused is missed
at every angle with RC fraction 0; so does a centring that failed (an
error, a time-out: not accepted, whether it moved or not), which on an empty
loop is no refusal either; its distance is that of where the
sample was left (so it counts in the median and p90 distance, where
:func:`compare_runs` leaves refusals out of the change in distance).

Per method (:func:`summarise`), over the samples with crystals:
``hit_rate``, ``median_dist_um``, ``p90_dist_um``, ``median_rc_fraction``;
over the empty loops: ``empty_refused_rate`` (the method refused and left
the sample where it was); over all: ``median_wall_s`` and ``exposures``
(X-ray exposures per centring, 0 for optical methods). The hit and
empty-loop rates come with their 95 % Wilson intervals (``hit_rate_ci95``,
``empty_refused_rate_ci95``): over one demo's 16 crystals a hit rate of
81 % is anything from 57 % to 93 %. :func:`pool_outcomes` joins the
samples of several runs (other seeds) into one scorecard, whose intervals
are narrower.

:func:`mesh_scan` is the X-ray reference: a raster of exposures over the
loop at two orthogonal omega angles, the best of each combined into a 3D
point; it needs no camera but costs one exposure per grid point.
:func:`optical_oracle` is the camera's limit: the best point of the same
sample were every crystal of uniform quality and the median capacity, i.e.
what exact knowledge of the crystals' shapes and positions, but not of their
insides, would give.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from mxcube_autocenter.geometry import TRANSLATION_MOTORS, centred_motors, point_in_beam

# Angles at which the beam must pass through a crystal for a hit: every 2 degrees of a full turn, as a rotation
# collection sees them. At the four judging angles alone (0, 45, 90, 135), a point just outside a thin crystal
# counted as hit while the beam left the crystal over up to 22 degrees of the turn (12 of 150 ML hits, 12 seeds).
HIT_TEST_OMEGAS = tuple(float(w) for w in np.arange(0.0, 360.0, 2.0))
# Saved with each outcome (``scoring``): outcomes scored another way mean something else, and are not pooled.
# Before 2026-12-06 a point between two crystals passed, the beam crossing one at some angles and the other at
# the rest, and the best point and RC fraction were judged at omega 0, 45, 90 and 135 degrees alone.
SCORING = ("hit: the beam's centre line through one crystal at every 2 degrees of omega; best point and RC "
           "fraction: mean count over every 2 degrees of a turn")
# A translation motor that moved less than this did not move, mm.
MOVE_TOLERANCE_MM = 1e-3
METHODS = ("ml", "lucid", "loop_centre", "mesh_oracle", "optical_oracle")

# The project's targets for the optical ML centring: (figure, comparison, value).
TARGETS = (
    ("hit_rate", ">=", 0.95),
    ("median_dist_um", "<=", 10.0),
    ("median_rc_fraction", ">=", 0.8),
    ("empty_refused_rate", ">=", 0.95),
    ("exposures", "<=", 0),
    ("median_wall_s", "<=", 10.0),
)

@dataclass
class Outcome:
    """One centring of one sample by one method, scored.

    Attributes
    ----------
    method : str
    sample : str
        The held-out sample's name (e.g. ``seed50003``).
    has_crystal : bool
    refused : bool
        The method declined to centre (no crystal, no loop) and left the
        sample where it was.
    failed : bool
        The centring was not accepted for another reason (an error, a time-out,
        a move stopped half-way): nothing is shot, as after a refusal, but an
        empty loop it happened on is not counted as refused.
    final_motors : dict
        Centring motor positions after the centring.
    wall_s : float or None
        Seconds from start to outcome; None where the method is not timed
        (ground-truth shortcuts).
    exposures : int
        X-ray exposures the method used.
    hits : list of bool or None
        Beam on a crystal at each of :data:`HIT_TEST_OMEGAS` (None: empty loop).
    dist_um : float or None
    rc_fraction : float or None
    message : str
        What the method said (its result or error).
    """

    method: str
    sample: str
    has_crystal: bool
    refused: bool
    final_motors: dict
    wall_s: float | None = None
    exposures: int = 0
    hits: list | None = None
    dist_um: float | None = None
    rc_fraction: float | None = None
    message: str = ""
    failed: bool = False

    @property
    def hit(self) -> bool | None:
        return None if self.hits is None else bool(all(self.hits))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["hit"] = self.hit
        out["scoring"] = SCORING
        out["final_motors"] = {k: float(v) for k, v in self.final_motors.items()}
        return out


def verdict(outcome: dict, has_crystal: bool) -> str:
    """One word for a saved outcome: ``refused``, ``failed``, ``hit``, ``miss`` or (an empty loop centred) ``moved``."""
    if outcome["refused"]:
        return "refused"
    if outcome.get("failed"):
        return "failed"
    if not has_crystal:
        return "moved"
    return "hit" if outcome["hit"] else "miss"


def moved(start: dict, final: dict, tolerance_mm: float = MOVE_TOLERANCE_MM) -> bool:
    """Whether any translation motor moved by more than ``tolerance_mm`` (omega turning does not count)."""
    return any(abs(float(final[m]) - float(start[m])) > tolerance_mm for m in TRANSLATION_MOTORS if m in start and m in final)


def optical_oracle(diffraction):
    """The best point a camera could find: the best point of the crystals' shapes alone.

    The virtual beamline draws no trace of a crystal's quality field (good
    regions, cracks) nor of its diffraction capacity in the camera image, so
    no optical method can do better than knowing every crystal's shape and
    position exactly: the counts of ``DiffractionModel.shapes_only`` (uniform
    quality, the median capacity), the learning report's reference too.

    Parameters
    ----------
    diffraction : DiffractionModel
        The mounted sample's (its sample and beam are kept).

    Returns
    -------
    (3,) ndarray or None
        ``(a, u, v)``, mm; None for an empty loop.
    """
    point, _ = diffraction.shapes_only().best_point()
    return point


def shapes_reference(rc_shapes, rc_expected, fit_rows, rows, threshold: float) -> dict:
    """The learning figures of a prediction from the crystals' shapes alone, on a labelled virtual-beamline set.

    ``rc_shapes`` are the counts exact knowledge of the crystals' shapes
    and positions gives (``DiffractionModel.shapes_only``), without their
    quality fields and capacities, which the camera does not show: a
    reference for what reading the camera images could reach. Not a strict
    bound: quality is taken uniform at its base level, so these counts are
    low, and good regions tend to lie near a crystal's centre, which a model
    could learn.

    Parameters
    ----------
    rc_shapes, rc_expected : (N,) array_like
        Shapes-only and true expected reflection counts of every row.
    fit_rows : array_like of int
        Rows on which the count threshold of the classification is chosen
        (the training rows: a classifier learns its threshold there).
    rows : array_like of int
        Rows scored (the held-out ones).
    threshold : float
        Reflection count from which a crop counts as a crystal.

    Returns
    -------
    dict
        ``spearman_expected`` (rank correlation with the true counts on
        ``rows``; None with fewer than 3 rows or no spread),
        ``classifier_accuracy_expected`` (accuracy of ``rc_shapes >= t``
        against ``rc_expected >= threshold`` on ``rows``; None if no rows),
        ``count_threshold`` (``t``, the best on ``fit_rows``, in the
        shapes-only counts' own scale; ``threshold`` without fit rows).
    """
    from mxcube_autocenter.learning.training import classifier_metrics, regression_metrics

    shapes, truth = np.asarray(rc_shapes, dtype=np.float64), np.asarray(rc_expected, dtype=np.float64)
    fit, rows = np.asarray(fit_rows, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    order = np.argsort(shapes[fit], kind="stable")
    g, crystal = shapes[fit][order], truth[fit][order] >= threshold
    # Calling the rows from k on crystals: the empty ones before k and the crystal ones from k are right.
    right = np.concatenate([[0], np.cumsum(~crystal)]) + crystal.sum() - np.concatenate([[0], np.cumsum(crystal)])
    right[1:-1][g[1:] == g[:-1]] = -1  # no threshold separates equal counts
    k = int(np.argmax(right))
    if not len(g):
        count_threshold = float(threshold)
    elif k == len(g):  # every fit row empty: call none a crystal, with a finite threshold for the JSON
        count_threshold = float(np.nextafter(g[-1], np.inf))
    else:
        count_threshold = float(g[k])
    scored, labels = shapes[rows], truth[rows]
    # Scored as the models are (training.expected_count_metrics).
    return {
        "spearman_expected": regression_metrics(labels, scored)["spearman"],
        "classifier_accuracy_expected": classifier_metrics(labels >= threshold, scored >= count_threshold)["accuracy"],
        "count_threshold": count_threshold,
    }


def distance_um(final_motors: dict, best_point) -> float:
    """3D distance, um, from the point in the beam and in focus to ``best_point`` (mm)."""
    return float(np.linalg.norm(point_in_beam(final_motors) - np.asarray(best_point, dtype=np.float64)) * 1000.0)


def beam_hits(diffraction, final_motors: dict, omegas=HIT_TEST_OMEGAS) -> list:
    """Whether the beam passes through one crystal at each omega, translations as in ``final_motors``.

    The flags are those of the crystal the beam passes through at the most
    angles: a point between two crystals, whose beam crosses one at some
    angles and the other at the rest, is inside neither and must not pass
    for a hit at every angle.
    """
    per_angle = [diffraction.crystals_in_beam({**final_motors, "omega": float(w)}) for w in omegas]
    per_crystal = np.array(per_angle, dtype=bool).reshape(len(omegas), -1).T
    if not per_crystal.size:
        return [False] * len(omegas)
    return per_crystal[np.argmax(per_crystal.sum(axis=1))].tolist()


def rc_fraction(diffraction, final_motors: dict, best_rc: float) -> float | None:
    """Mean reflection count over a rotation at these positions, over the best point's (None if no best).

    The rotation keeps every translation as it is, as a collection after the
    centring would (a ``phiz`` left off the axis moves the point in the beam
    as omega turns), the same positions the hits are judged at, over the
    angles ``best_rc`` was taken over (``DiffractionModel.best_point``:
    ``JUDGING_OMEGAS``).
    """
    if not best_rc or best_rc <= 0:
        return None
    return float(diffraction.mean_rc_over_rotation(final_motors) / best_rc)


def score_position(diffraction, best_point, best_rc: float, final_motors: dict, nothing_shot: bool = False) -> dict:
    """``hits``, ``dist_um`` and ``rc_fraction`` of a goniometer position (all None for an empty loop).

    Parameters
    ----------
    diffraction : DiffractionModel
        Anything with ``crystals_in_beam(motors)`` and ``mean_rc_over_rotation(motors)``.
    best_point : (3,) array_like or None
        The ground-truth best point, mm; None for an empty loop.
    best_rc : float
        Its mean reflection count over a rotation.
    final_motors : dict
        Centring motor positions (omega is replaced by each of
        :data:`HIT_TEST_OMEGAS` for the hit test; the RC fraction is taken
        over ``JUDGING_OMEGAS``, the angles of ``best_rc``).
    nothing_shot : bool
        The method declined (no crystal found) or failed: nothing would be
        shot, so every angle of the hit test is a miss and the RC fraction
        is 0; the distance is still that of where the sample was left.
    """
    if best_point is None:
        return {"hits": None, "dist_um": None, "rc_fraction": None}
    if nothing_shot:
        return {"hits": [False] * len(HIT_TEST_OMEGAS), "dist_um": distance_um(final_motors, best_point), "rc_fraction": 0.0}
    return {
        "hits": beam_hits(diffraction, final_motors),
        "dist_um": distance_um(final_motors, best_point),
        "rc_fraction": rc_fraction(diffraction, final_motors, best_rc),
    }


def _median(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None


def _percentile(values, q):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.percentile(values, q)) if values else None


def _rate(flags):
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list | None:
    """Confidence interval of a rate, successes out of n (Wilson score interval).

    Unlike the normal approximation it stays within [0, 1] and is not empty
    at 0 or n successes, which matters for the few samples of a demo.

    Parameters
    ----------
    successes, n : int
        Successes among n trials, ``0 <= successes <= n``.
    z : float
        Standard normal quantile of the confidence (1.96: 95 %).

    Returns
    -------
    list of float or None
        ``[low, high]``; None for ``n == 0``.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be from 0 to n: got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarise_method(outcomes) -> dict:
    """The figures of one method's outcomes (see the module documentation).

    A rate or median over no samples is None (e.g. ``empty_refused_rate``
    without empty loops).
    """
    outcomes = list(outcomes)
    crystal = [o for o in outcomes if o.has_crystal]
    empty = [o for o in outcomes if not o.has_crystal]
    exposures = [int(o.exposures) for o in outcomes]
    hits = sum(bool(o.hit) for o in crystal)
    empty_refused = sum(bool(o.refused) for o in empty)
    return {
        "n": len(outcomes),
        "n_crystal": len(crystal),
        "n_empty": len(empty),
        "hit_rate": hits / len(crystal) if crystal else None,
        "hit_rate_ci95": wilson_interval(hits, len(crystal)),
        "median_dist_um": _median(o.dist_um for o in crystal),
        "p90_dist_um": _percentile((o.dist_um for o in crystal), 90),
        "median_rc_fraction": _median(o.rc_fraction for o in crystal),
        "empty_refused_rate": empty_refused / len(empty) if empty else None,
        "empty_refused_rate_ci95": wilson_interval(empty_refused, len(empty)),
        "crystal_refused_rate": _rate(o.refused for o in crystal),
        "median_wall_s": _median(o.wall_s for o in outcomes),
        # None for a method not run: a 0 there would meet the "no X-rays" target with no centring at all.
        "exposures": int(np.floor(np.median(exposures) + 0.5)) if exposures else None,  # half up
        "total_exposures": int(sum(exposures)),
    }


def outcome_of(row: dict, method: str) -> Outcome:
    """One method's :class:`Outcome` in a row of a demo's ``samples.json``.

    Raises
    ------
    ValueError
        If the row has no complete outcome of that method, or it was scored
        another way than :data:`SCORING` (an older demo's: its figures would
        mean something else).
    """
    try:
        outcome = Outcome(**{f.name: row[method][f.name] for f in fields(Outcome) if f.name in row[method]})
    except (TypeError, KeyError) as err:
        raise ValueError(f"sample {row.get('sample')} has no complete {method!r} outcome ({err}): "
                         "give the samples.json of a demo run") from None  # fmt: skip
    wrong = _wrongly_typed(outcome)
    if wrong:
        raise ValueError(f"sample {row.get('sample')}: its {method!r} outcome has {', '.join(wrong)}, which a demo "
                         "does not write: give the samples.json of a demo run, unedited")  # fmt: skip
    scored_by = row[method].get("scoring", "an older one")
    if outcome.hits is not None and scored_by != SCORING:
        raise ValueError(f"sample {row.get('sample')}: the {method!r} outcome was scored another way "
                         f"({scored_by}) than this version's ({SCORING}): run the demo again")  # fmt: skip
    if outcome.hits is not None and len(outcome.hits) != len(HIT_TEST_OMEGAS):
        raise ValueError(f"sample {row.get('sample')}: {len(outcome.hits)} {method!r} hits where the hit test takes "
                         f"{len(HIT_TEST_OMEGAS)} angles: give the samples.json of a demo run, unedited")  # fmt: skip
    return outcome


def _wrongly_typed(outcome: Outcome) -> list:
    """``"name = value"`` of each field of an outcome read from JSON whose type is not the one the scores use."""
    def number(v):  # NaN and infinity too are refused: the JSON written from them would be no JSON
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = {
        "method": isinstance(outcome.method, str), "sample": isinstance(outcome.sample, str),
        "message": isinstance(outcome.message, str),
        "has_crystal": isinstance(outcome.has_crystal, bool), "refused": isinstance(outcome.refused, bool),
        "failed": isinstance(outcome.failed, bool),
        "final_motors": isinstance(outcome.final_motors, dict) and all(map(number, outcome.final_motors.values())),
        "exposures": isinstance(outcome.exposures, int) and not isinstance(outcome.exposures, bool),
        "hits": outcome.hits is None or (isinstance(outcome.hits, list)
                                         and all(isinstance(h, bool) for h in outcome.hits)),
        **{name: getattr(outcome, name) is None or number(getattr(outcome, name))
           for name in ("wall_s", "dist_um", "rc_fraction")},
    }  # fmt: skip
    return [f"{name} = {getattr(outcome, name)!r}" for name, ok in checks.items() if not ok]


def pool_outcomes(runs, methods=METHODS) -> list:
    """The outcomes of several demo runs on different held-out samples, as one list.

    Parameters
    ----------
    runs : sequence of sequence of dict
        Per run, its per-sample rows (a demo report's ``samples.json``), each
        with an :meth:`Outcome.to_dict` per method it ran.
    methods : sequence of str
        Methods to take from the rows.

    Returns
    -------
    list of Outcome

    Raises
    ------
    ValueError
        If a sample appears twice (a run given twice, or two runs of the same
        ``--seed``): it would count double. Or if a method ran on some of the
        samples only: its figures would be of other samples than the others'.
    """
    repeated = sorted(name for name, n in Counter(row["sample"] for rows in runs for row in rows).items() if n > 1)
    if repeated:
        raise ValueError(
            f"{len(repeated)} samples are in more than one run (e.g. {repeated[0]}): pool runs of different --seed"
        )
    samples = [row for rows in runs for row in rows]
    for method in methods:
        ran = sum(method in row for row in samples)
        if 0 < ran < len(samples):
            raise ValueError(f"method {method!r} ran on {ran} of the {len(samples)} samples: each method's figures "
                             "must be of the same samples; pool runs that ran the same methods")
    outcomes = [outcome_of(row, method) for rows in runs for row in rows for method in methods if method in row]
    if not outcomes:
        raise ValueError("no outcomes in the runs given: give the report directories of demo runs that centred samples")
    return outcomes


LEARNING_FIGURES = ("spearman", "spearman_expected", "classifier_accuracy", "classifier_accuracy_expected", "train_s")
TRAINED_IN_RUN = "trained in this run"  # a demo scorecard's learning "source" when the run trained its model
SHIPPED_MODEL = "shipped model"  # a demo scorecard's model "source" when it centred with the package's model


def pool_learning(scorecards) -> dict:
    """The learning figures of several demo runs, from their scorecards (``scorecard.json``; None where missing).

    Runs that trained their own models give the mean of each figure over
    them (each run's model is one measurement; where those runs centred
    with another model, ``source`` says so); runs that all centred with
    the same model files (regressor and classifier) and report the same
    figures give them once (their metadata, the same in every run, is a
    single measurement; a file replaced between runs differs); anything
    else gives None. ``runs`` holds each run's figures and source, None for
    a run without a scorecard.
    """
    runs = [None if card is None else {**{k: (card.get("learning") or {}).get(k) for k in LEARNING_FIGURES},
                                       "source": (card.get("learning") or {}).get("source"),
                                       "regressor": (card.get("model") or {}).get("regressor"),
                                       "classifier": (card.get("model") or {}).get("classifier"),
                                       "centred_with": (card.get("model") or {}).get("source")}
            for card in scorecards]  # fmt: skip
    trained = [run for run in runs if run is not None and run["source"] == TRAINED_IN_RUN]
    pooled = dict.fromkeys(LEARNING_FIGURES)
    if trained:
        for key in LEARNING_FIGURES:
            values = [run[key] for run in trained if run[key] is not None]
            pooled[key] = float(np.mean(values)) if values else None
        others = sorted({str(run["centred_with"]) for run in trained if run["centred_with"] not in (TRAINED_IN_RUN, None)})
        pooled["source"] = (f"mean of {len(trained)} run(s) that trained their model"
                            + (f"; the centring used the {' / '.join(others)}, not that model" if others else ""))
    elif (runs and None not in runs
          and len({(run["regressor"], run["classifier"], *(run[k] for k in LEARNING_FIGURES)) for run in runs}) == 1):
        pooled.update({key: runs[0][key] for key in LEARNING_FIGURES}, source=runs[0]["source"])
    else:
        pooled["source"] = None
    return {**pooled, "runs": runs}


def check_one_centring_model(scorecards, names) -> None:
    """Refuse runs that centred with different models: one ML row would mix them.

    Runs that each centred with the model they trained are one procedure
    (train, then centre), pooled as such; runs without a scorecard are not
    checked.

    Parameters
    ----------
    scorecards : sequence of dict or None
        Each run's ``scorecard.json``.
    names : sequence of str
        The runs as given, for the message.

    Raises
    ------
    ValueError
        Naming each model and its runs.
    """
    runs_of = _runs_by((_model_key(card["model"]), name) for card, name in zip(scorecards, names)
                       if (card or {}).get("model"))  # fmt: skip
    if len(runs_of) > 1:
        groups = "; ".join(f"{' + '.join(key) or 'an unnamed model'}: {', '.join(runs)}"
                           for key, runs in runs_of.items())  # fmt: skip
        raise ValueError(f"these runs centred with different models ({groups}): pool the runs of one model, "
                         "and compare two models with `mxcube-autocenter compare`")  # fmt: skip


def _model_key(model: dict) -> tuple:
    """What tells a scorecard's centring models apart from another's, in words."""
    if model.get("source") == TRAINED_IN_RUN:
        # Each run's own regressor, but one ice network for all (by file name, as the shipped one is).
        if "ice" not in model:
            return "each its own trained model", "an ice network not named (an older run)"
        ice = model.get("ice")
        return "each its own trained model", f"ice network {os.path.basename(str(ice))}" if ice else "no ice network"
    if model.get("source") == SHIPPED_MODEL:  # one model wherever the package is installed
        return (f"the shipped {os.path.basename(str(model.get('regressor')))}",)
    return tuple(str(model[k]) for k in ("regressor", "classifier", "ice") if model.get(k))


def _runs_by(keyed_runs) -> dict:
    """``{key: [run, ...]}`` of ``(key, run)`` pairs, in their order."""
    runs_of = {}
    for key, name in keyed_runs:
        runs_of.setdefault(key, []).append(str(name))
    return runs_of


def check_one_centring_setup(scorecards, names) -> None:
    """Refuse runs whose ML centrings ran with different settings: one ML row would mix them.

    Runs whose scorecard names no settings (written before they were kept, or no scorecard) are not
    checked.

    Parameters
    ----------
    scorecards : sequence of dict or None
        Each run's ``scorecard.json``; ``centring`` holds the procedure's settings.
    names : sequence of str
        The runs as given, for the message.

    Raises
    ------
    ValueError
        Naming each differing setting, its values and their runs.
    """
    settings = [(card["centring"], str(name)) for card, name in zip(scorecards, names)
                if isinstance((card or {}).get("centring"), dict)]  # fmt: skip
    differing = []
    for key in sorted({key for values, _ in settings for key in values}):
        runs_of = _runs_by((json.dumps(values.get(key)), name) for values, name in settings)
        if len(runs_of) > 1:
            differing.append(f"{key} " + "; ".join(f"{value} in {', '.join(runs)}" for value, runs in runs_of.items()))
    if differing:
        raise ValueError(f"these runs centred with different settings ({' / '.join(differing)}): pool the runs of "
                         "one configuration, and compare two with `mxcube-autocenter compare`")  # fmt: skip


def code_versions(scorecards, names) -> dict:
    """``{code version: [runs]}``: which code wrote each run's scorecard ("unknown" where it does not say)."""
    return _runs_by((str((card or {}).get("code") or "unknown"), name) for card, name in zip(scorecards, names))


def summarise(outcomes, methods=METHODS) -> dict:
    """``{method: figures}`` for every method in ``methods`` (in that order), then any other seen."""
    outcomes = list(outcomes)
    names = list(methods) + sorted({o.method for o in outcomes} - set(methods))
    return {name: summarise_method(o for o in outcomes if o.method == name) for name in names}


def check_targets(figures: dict, targets=TARGETS) -> list:
    """Each target with the method's value and whether it is met (None: no value to judge).

    Returns
    -------
    list of dict
        ``figure``, ``op``, ``target``, ``value``, ``met`` and, for a rate,
        ``interval`` (its 95 % interval; None otherwise): a target inside the
        interval is not yet decided by these samples.
    """
    rows = []
    for name, op, target in targets:
        value = figures.get(name)
        if value is None:
            met = None
        elif op == ">=":
            met = bool(value >= target)
        else:
            met = bool(value <= target)
        rows.append({"figure": name, "op": op, "target": target, "value": value, "met": met,
                     "interval": figures.get(f"{name}_ci95")})  # fmt: skip
    return rows


@dataclass
class MeshResult:
    """An X-ray mesh scan of the loop at two omega angles.

    Attributes
    ----------
    point : (3,) ndarray or None
        Best sample point, mm; None when refused.
    best_rc : float
        Highest reflection count seen on either grid.
    exposures : int
        Grid points exposed, both grids.
    refused : bool
        ``best_rc`` below the threshold: no crystal worth shooting at.
    grids : list of dict
        Per omega: ``omega``, ``xs`` and ``ys`` (offsets, mm), ``rc`` (2D array).
    """

    point: np.ndarray | None
    best_rc: float
    exposures: int
    refused: bool
    grids: list = field(default_factory=list, repr=False)


def _grid_axis(lo, hi, step):
    n = max(1, int(math.floor((hi - lo) / step + 1e-9)) + 1)
    start = 0.5 * (lo + hi) - 0.5 * (n - 1) * step
    return start + step * np.arange(n)


def mesh_scan(rc_at, loop_points, centre, *, step_um: float = 10.0, margin_um: float = 20.0,
              omegas=(0.0, 90.0), threshold: float = 5.0) -> MeshResult:  # fmt: skip
    """Raster the beam over the loop at two orthogonal omegas and combine the best points.

    At each omega the loop is put on the rotation axis through ``centre``
    (``centred_motors``) and the beam rastered in ``step_um`` steps over the
    loop's projection (its bounding box plus ``margin_um``): ``phiy``
    moves along the spindle, ``phiz`` across it. The best grid point of
    the first omega fixes the sample coordinate seen across the spindle
    there, that of the second the other one; the coordinate along the
    spindle is the mean of the two.

    Parameters
    ----------
    rc_at : callable
        ``rc_at(motors) -> float``: the reflection count of an exposure at
        these centring motor positions (``DiffractionModel.expected_rc``).
    loop_points : (N, 3) array_like
        Points outlining the loop (e.g. ``VirtualSample.film_points()``), mm.
    centre : (3,) array_like
        The loop's centre, mm.
    step_um, margin_um : float
    omegas : (float, float)
        Two angles 90 degrees apart.
    threshold : float
        Refuse (no crystal) when no exposure reaches this count.
    """
    if len(omegas) != 2 or not np.isclose(abs((omegas[1] - omegas[0]) % 180.0), 90.0):
        raise ValueError(f"mesh_scan needs two omegas 90 degrees apart, not {omegas}")
    centre = np.asarray(centre, dtype=np.float64)
    pts = np.asarray(loop_points, dtype=np.float64).reshape(-1, 3)
    step, margin = step_um * 1e-3, margin_um * 1e-3
    grids, best = [], []
    for omega in omegas:
        motors0 = centred_motors(centre, omega)
        w = np.radians(omega)
        along = pts[:, 0] - centre[0]
        across = (pts[:, 1] - centre[1]) * np.sin(w) + (pts[:, 2] - centre[2]) * np.cos(w)
        xs = _grid_axis(along.min() - margin, along.max() + margin, step)
        ys = _grid_axis(across.min() - margin, across.max() + margin, step)
        rc = np.empty((len(ys), len(xs)))
        for i, dy in enumerate(ys):
            for j, dx in enumerate(xs):
                rc[i, j] = rc_at({**motors0, "phiy": motors0["phiy"] + float(dx), "phiz": float(dy)})
        i, j = np.unravel_index(int(np.argmax(rc)), rc.shape)
        grids.append({"omega": float(omega), "xs": xs, "ys": ys, "rc": rc})
        best.append((float(xs[j]), float(ys[i]), float(rc[i, j])))
    exposures = int(sum(g["rc"].size for g in grids))
    best_rc = max(b[2] for b in best)
    if best_rc < threshold:
        return MeshResult(None, best_rc, exposures, True, grids)
    # The beam through the best point of omega w hits the points with
    # (u - cu) sin w + (v - cv) cos w = dy: two such lines 90 degrees apart fix (u, v).
    w1, w2 = np.radians(omegas[0]), np.radians(omegas[1])
    m = np.array([[np.sin(w1), np.cos(w1)], [np.sin(w2), np.cos(w2)]])
    du, dv = np.linalg.solve(m, [best[0][1], best[1][1]])
    a = centre[0] + 0.5 * (best[0][0] + best[1][0])
    return MeshResult(np.array([a, centre[1] + du, centre[2] + dv]), best_rc, exposures, False, grids)


# -- presentation ----------------------------------------------------------------

_COLUMNS = (
    ("method", "method", "{}"),
    ("hit_rate", "hit rate", "{:.0%}"),
    ("median_dist_um", "median dist um", "{:.1f}"),
    ("p90_dist_um", "p90 dist um", "{:.1f}"),
    ("median_rc_fraction", "median RC frac", "{:.2f}"),
    ("empty_refused_rate", "empty refused", "{:.0%}"),
    ("median_wall_s", "s/centring", "{:.1f}"),
    ("exposures", "exposures", "{:d}"),
)


def format_cell(value, fmt="{:.1f}") -> str:
    """A table cell: ``value`` formatted, "-" for None, as text where ``fmt`` does not apply."""
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def value_cell(value, interval, fmt) -> str:
    """A figure, with its 95 % interval in brackets where it has one (e.g. ``81% (57-93%)``)."""
    if value is None or interval is None:
        return format_cell(value, fmt)
    return f"{format_cell(value, fmt)} ({format_cell(interval[0], fmt).rstrip('%')}-{format_cell(interval[1], fmt)})"


def table_rows(methods: dict) -> list:
    """Header and one row of formatted cells per method; rates with their 95 % interval."""
    rows = [[title for _, title, _ in _COLUMNS]]
    for name, figures in methods.items():
        rows.append([name] + [value_cell(figures.get(key), figures.get(f"{key}_ci95"), fmt)
                              for key, _, fmt in _COLUMNS[1:]])  # fmt: skip
    return rows


def format_table(methods: dict) -> str:
    """The scorecard as a fixed-width text table (for the terminal)."""
    rows = table_rows(methods)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(methods: dict) -> str:
    """The scorecard as a Markdown table."""
    rows = table_rows(methods)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def format_targets(checks: list) -> str:
    """Markdown lines: each target, the value reached, met or not."""
    lines = ["| figure | target | ML (95 % interval) | met |", "|---|---|---|---|"]
    fmts = dict((key, fmt) for key, _, fmt in _COLUMNS)
    for c in checks:
        fmt = fmts.get(c["figure"], "{}")
        target = format_cell(c["target"], fmt) if c["figure"] != "exposures" else str(c["target"])
        met = "-" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['figure']} | {c['op']} {target} | {value_cell(c['value'], c.get('interval'), fmt)} | {met} |")
    return "\n".join(lines)


# RC fractions closer than this count as unchanged in a paired comparison.
RC_FRACTION_TOLERANCE = 0.01
# Relative difference of a sample's best-point count (``best_rc``) beyond which two runs scored it against
# different ground truths (another best-point search), not merely on another machine.
BEST_RC_RTOL = 1e-6


def pair_samples(rows_a, rows_b, method: str = "ml") -> list:
    """One method's outcomes on each held-out sample of two runs, side by side.

    Parameters
    ----------
    rows_a, rows_b : sequence of dict
        The per-sample rows of two runs on the same held-out samples (a demo
        report's ``samples.json``), A the reference.
    method : str
        The method compared (a key of each row).

    Returns
    -------
    list of dict
        Per sample of A, in its order: ``sample``, ``description``,
        ``has_crystal`` and the method's outcomes ``a`` and ``b``.

    Raises
    ------
    ValueError
        If the runs hold different samples, a row lacks the method, or a
        sample started elsewhere or was scored against another ground truth
        (``best_rc``) in the other run.
    """
    rows_a, rows_b = list(rows_a), list(rows_b)
    names_a = [(r["sample"], r.get("description")) for r in rows_a]
    names_b = [(r["sample"], r.get("description")) for r in rows_b]
    if sorted(names_a) != sorted(names_b):
        raise ValueError(
            f"the runs centred different samples ({len(rows_a)} and {len(rows_b)} rows, "
            f"{len(set(names_a) ^ set(names_b))} not in both): run both with the same --seed and --n-heldout"
        )
    by_name = {r["sample"]: r for r in rows_b}
    paired = []
    for row in rows_a:
        other = by_name[row["sample"]]
        if method not in row or method not in other:
            raise ValueError(f"sample {row['sample']} has no {method!r} outcome in both runs: compare a method both ran")
        starts = [r.get("start") for r in (row, other)]
        if None not in starts and any(abs(starts[0][m] - starts[1].get(m, np.inf)) > 1e-9 for m in starts[0]):
            raise ValueError(f"sample {row['sample']} started from other motor positions in the two runs: compare runs "
                             "of the same --seed made by the same version of the demo")  # fmt: skip
        best = [r.get("best_rc") for r in (row, other)]
        if None not in best and not np.isclose(best[0], best[1], rtol=BEST_RC_RTOL, atol=0.0):
            raise ValueError(f"sample {row['sample']} was scored against another ground truth in the two runs (best "
                             f"point's count {best[0]:.6g} and {best[1]:.6g}): its RC fractions are fractions of "
                             "different counts; compare runs scored by the same version of the demo")  # fmt: skip
        a, b = outcome_of(row, method), outcome_of(other, method)
        paired.append({"sample": row["sample"], "description": row.get("description", ""),
                       "has_crystal": a.has_crystal, "a": a.to_dict(), "b": b.to_dict()})  # fmt: skip
    return paired


def _left(outcome: dict) -> bool:
    """Whether a centring left the sample where it was (refused or failed)."""
    return bool(outcome["refused"] or outcome.get("failed"))


def compare_runs(pairs, method: str = "ml") -> dict:
    """How one method's outcomes changed, crystal by crystal, between runs on the same held-out samples.

    A change to the centring (a setting, a model) is judged on the same
    samples, seen the same way, crystal by crystal: the medians of one run's
    16 crystals move by several um and a few hundredths of RC fraction when
    only the heatmaps' noise changes; the mean of the paired differences
    and its standard error show whether the change helps. Pairs of runs of
    other seeds are pooled.

    Parameters
    ----------
    pairs : sequence of (rows_a, rows_b)
        Per pair, the per-sample rows of the reference run A and of run B
        on the same samples (:func:`pair_samples`).
    method : str

    Returns
    -------
    dict
        ``method``, ``n_crystal``, ``n_empty``; ``hits_a``, ``hits_b``,
        ``hits_gained``, ``hits_lost`` (sample names), ``hits_sign_test_p``
        (:func:`sign_test_p` of their counts); ``rc_fraction_diff_mean``
        and ``rc_fraction_diff_se`` (B - A over the crystals, a refusal
        counting as 0; se None for fewer than two), ``rc_fraction_up``,
        ``rc_fraction_down`` (changes beyond :data:`RC_FRACTION_TOLERANCE`);
        ``dist_diff_median_um`` (B - A where neither run refused or failed: both
        leave the sample where it was, so their distance is the start's);
        ``empty_refused_a``, ``empty_refused_b``; ``wall_s_median_a``,
        ``wall_s_median_b``; ``samples`` (:func:`pair_samples` of every pair).

    Raises
    ------
    ValueError
        As :func:`pair_samples`.
    """
    samples = [s for rows_a, rows_b in pairs for s in pair_samples(rows_a, rows_b, method)]
    repeated = sorted(name for name, n in Counter(s["sample"] for s in samples).items() if n > 1)
    if repeated:
        raise ValueError(f"{len(repeated)} samples are in more than one pair (e.g. {repeated[0]}): they would count "
                         "twice; pair runs of different --seed")  # fmt: skip
    crystals = [s for s in samples if s["has_crystal"]]
    empty = [s for s in samples if not s["has_crystal"]]
    d_rc = np.array([(s["b"]["rc_fraction"] or 0.0) - (s["a"]["rc_fraction"] or 0.0) for s in crystals], dtype=float)
    d_dist = [s["b"]["dist_um"] - s["a"]["dist_um"] for s in crystals if not (_left(s["a"]) or _left(s["b"]))]
    return {
        "method": method,
        "n_crystal": len(crystals),
        "n_empty": len(empty),
        "hits_a": sum(bool(s["a"]["hit"]) for s in crystals),
        "hits_b": sum(bool(s["b"]["hit"]) for s in crystals),
        "hits_gained": [s["sample"] for s in crystals if s["b"]["hit"] and not s["a"]["hit"]],
        "hits_lost": [s["sample"] for s in crystals if s["a"]["hit"] and not s["b"]["hit"]],
        "hits_sign_test_p": sign_test_p(sum(bool(s["b"]["hit"] and not s["a"]["hit"]) for s in crystals),
                                        sum(bool(s["a"]["hit"] and not s["b"]["hit"]) for s in crystals)),
        "rc_fraction_diff_mean": float(d_rc.mean()) if d_rc.size else None,
        "rc_fraction_diff_se": float(d_rc.std(ddof=1) / np.sqrt(d_rc.size)) if d_rc.size > 1 else None,
        "rc_fraction_up": int(np.sum(d_rc > RC_FRACTION_TOLERANCE)),
        "rc_fraction_down": int(np.sum(d_rc < -RC_FRACTION_TOLERANCE)),
        "dist_diff_median_um": _median(d_dist),
        "empty_refused_a": sum(bool(s["a"]["refused"]) for s in empty),
        "empty_refused_b": sum(bool(s["b"]["refused"]) for s in empty),
        "wall_s_median_a": _median(s["a"]["wall_s"] for s in samples),
        "wall_s_median_b": _median(s["b"]["wall_s"] for s in samples),
        "samples": samples,
    }


def sign_test_p(gained: int, lost: int) -> float:
    """Two-sided exact sign test (McNemar's, exact) of paired outcomes: the probability of a split at least as
    uneven as ``gained`` against ``lost`` were either run as likely to win each discordant pair (1 for none)."""
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def format_comparison(comparison: dict) -> str:
    """A paired comparison (:func:`compare_runs`) as text: one line per sample, then the summary."""

    def outcome(o, has_crystal):
        word = verdict(o, has_crystal)
        if word not in ("hit", "miss"):
            return word
        return f"{word:<4} {format_cell(o['dist_um'], '{:.1f}'):>6} um  RC {format_cell(o['rc_fraction'], '{:.2f}')}"

    width = max([len(s["sample"]) for s in comparison["samples"]] + [6])
    lines = [f"{'sample':<{width}}  {'A':<26}  {'B':<26}  description"]
    for s in comparison["samples"]:
        a, b = (outcome(s[k], s["has_crystal"]) for k in ("a", "b"))
        lines.append(f"{s['sample']:<{width}}  {a:<26}  {b:<26}  {s['description']}")
    c = comparison
    se = "" if c["rc_fraction_diff_se"] is None else f" +- {c['rc_fraction_diff_se']:.3f}"
    mean = "-" if c["rc_fraction_diff_mean"] is None else f"{c['rc_fraction_diff_mean']:+.3f}{se}"
    dist = "-" if c["dist_diff_median_um"] is None else f"{c['dist_diff_median_um']:+.1f} um"
    lines += [
        "",
        f"{c['method']}, B against A (samples with crystals: {c['n_crystal']}, empty loops: {c['n_empty']}):",
        f"  crystals hit: {c['hits_a']} -> {c['hits_b']}"
        f" (gained: {', '.join(c['hits_gained']) or 'none'}; lost: {', '.join(c['hits_lost']) or 'none'};"
        f" sign test p = {c['hits_sign_test_p']:.2g})",
        f"  RC fraction, mean change per crystal: {mean} ({c['rc_fraction_up']} up, {c['rc_fraction_down']} down)",
        f"  distance to the best point, median change: {dist}",
        f"  empty loops refused: {c['empty_refused_a']} -> {c['empty_refused_b']}",
        f"  median s per centring: {format_cell(c['wall_s_median_a'], '{:.1f}')} -> {format_cell(c['wall_s_median_b'], '{:.1f}')}",
    ]
    return "\n".join(lines)
