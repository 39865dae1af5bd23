"""The scorecard's figures on hand-made positions, outcomes and a fake diffraction model."""

import numpy as np
import pytest

from mxcube_autocenter import scorecard
from mxcube_autocenter.geometry import beam_frame, centred_motors
from mxcube_autocenter.scorecard import Outcome
from mxcube_autocenter.simulation.diffraction import JUDGING_OMEGAS

CRYSTAL = np.array([0.05, -0.03, 0.02])  # mm
N_ANGLES = len(scorecard.HIT_TEST_OMEGAS)


class FakeDiffraction:
    """A spherical crystal at CRYSTAL: a hit within RADIUS of the beam, counts a Gaussian of the distance."""

    RADIUS = 0.015
    SIGMA = 0.02

    def __init__(self, centre=CRYSTAL, peak=100.0):
        self.centre = np.asarray(centre)
        self.peak = peak
        self.calls = 0

    def _offset(self, motors):
        x, y, _ = beam_frame(self.centre[None], motors)[0]
        return np.hypot(x, y)

    def crystals_in_beam(self, motors):
        return [self._offset(motors) < self.RADIUS]

    def expected_rc(self, motors):
        self.calls += 1
        return float(self.peak * np.exp(-self._offset(motors) ** 2 / (2 * self.SIGMA**2)))

    def mean_rc_over_rotation(self, motors, omegas=JUDGING_OMEGAS):
        offsets = np.array([self._offset({**motors, "omega": w}) for w in omegas])
        return float(np.mean(self.peak * np.exp(-(offsets**2) / (2 * self.SIGMA**2))))


def test_moved_ignores_omega_and_tiny_changes():
    start = centred_motors(CRYSTAL, 10.0)
    assert not scorecard.moved(start, {**start, "omega": 200.0})
    assert not scorecard.moved(start, {**start, "sampx": start["sampx"] + 0.0005})
    assert scorecard.moved(start, {**start, "phiz": 0.002})


def test_distance_is_zero_when_centred_and_follows_the_offset():
    assert scorecard.distance_um(centred_motors(CRYSTAL, 33.0), CRYSTAL) == pytest.approx(0.0, abs=1e-9)
    off = {**centred_motors(CRYSTAL), "sampx": CRYSTAL[1] + 0.006, "sampy": CRYSTAL[2] - 0.008}
    assert scorecard.distance_um(off, CRYSTAL) == pytest.approx(10.0)
    # phiz moves the goniometer: the point in the beam and in focus moves with it.
    lifted = {**centred_motors(CRYSTAL, 0.0), "phiz": 0.012}
    assert scorecard.distance_um(lifted, CRYSTAL) == pytest.approx(12.0)


def test_score_position_centred_and_off_and_empty():
    model = FakeDiffraction()
    good = scorecard.score_position(model, CRYSTAL, 100.0, centred_motors(CRYSTAL, 77.0))
    assert good["hits"] == [True] * N_ANGLES
    assert good["dist_um"] == pytest.approx(0.0, abs=1e-9)
    assert good["rc_fraction"] == pytest.approx(1.0)
    # 10 um off along the spindle: still inside the 15 um crystal at every angle.
    near = scorecard.score_position(model, CRYSTAL, 100.0, {**centred_motors(CRYSTAL), "phiy": CRYSTAL[0] + 0.01})
    assert all(near["hits"]) and near["dist_um"] == pytest.approx(10.0)
    assert near["rc_fraction"] == pytest.approx(np.exp(-0.5 * (10 / 20) ** 2))
    # 20 um off across the spindle: missed at some angles, not at others.
    across = scorecard.score_position(model, CRYSTAL, 100.0, {**centred_motors(CRYSTAL), "sampx": CRYSTAL[1] + 0.02})
    at_90 = scorecard.HIT_TEST_OMEGAS.index(90.0)
    assert across["hits"][0] and not across["hits"][at_90] and not all(across["hits"])
    # phiz left off the axis: the point in the beam at omega 0 leaves it as omega turns.
    lifted = {**centred_motors(CRYSTAL), "sampy": CRYSTAL[2] + 0.012, "phiz": -0.012}
    assert scorecard.distance_um(lifted, CRYSTAL) == pytest.approx(0.0, abs=1e-9)
    assert scorecard.score_position(model, CRYSTAL, 100.0, lifted)["rc_fraction"] < 0.95
    # A refusal shoots nothing, wherever the sample was left.
    assert scorecard.score_position(model, CRYSTAL, 100.0, centred_motors(CRYSTAL), nothing_shot=True) == {
        "hits": [False] * N_ANGLES, "dist_um": pytest.approx(0.0, abs=1e-9), "rc_fraction": 0.0}
    assert scorecard.score_position(model, None, 0.0, centred_motors(CRYSTAL)) == {
        "hits": None, "dist_um": None, "rc_fraction": None}
    assert scorecard.rc_fraction(model, centred_motors(CRYSTAL), 0.0) is None


def _outcome(method, sample, crystal, *, refused=False, hits=None, dist=None, frac=None, wall=1.0, exposures=0):
    return Outcome(method, sample, crystal, refused, centred_motors(CRYSTAL), wall, exposures, hits, dist, frac)


def test_summarise_method_figures():
    outcomes = [
        _outcome("ml", "a", True, hits=[True] * 4, dist=2.0, frac=0.9, wall=4.0),
        _outcome("ml", "b", True, hits=[True, True, False, True], dist=30.0, frac=0.5, wall=6.0),
        _outcome("ml", "c", True, hits=[True] * 4, dist=4.0, frac=1.0, wall=5.0),
        _outcome("ml", "d", True, refused=True, hits=[False] * 4, dist=300.0, frac=0.0, wall=3.0),
        _outcome("ml", "e", False, refused=True, wall=2.0),
        _outcome("ml", "f", False, refused=False, wall=8.0),
    ]
    figures = scorecard.summarise_method(outcomes)
    assert figures["n"] == 6 and figures["n_crystal"] == 4 and figures["n_empty"] == 2
    assert figures["hit_rate"] == pytest.approx(0.5)
    assert figures["median_dist_um"] == pytest.approx(17.0)
    assert figures["p90_dist_um"] == pytest.approx(np.percentile([2, 30, 4, 300], 90))
    assert figures["median_rc_fraction"] == pytest.approx(0.7)
    assert figures["empty_refused_rate"] == pytest.approx(0.5)
    assert figures["crystal_refused_rate"] == pytest.approx(0.25)
    assert figures["median_wall_s"] == pytest.approx(4.5)
    assert figures["exposures"] == 0 and figures["total_exposures"] == 0
    assert figures["hit_rate"] is not None and outcomes[1].hit is False and outcomes[4].hit is None


def test_wilson_interval():
    # 0 or n successes: one bound at the edge, the other z^2 / (n + z^2) away from it.
    assert scorecard.wilson_interval(0, 10) == pytest.approx([0.0, 1.96**2 / (10 + 1.96**2)])
    assert scorecard.wilson_interval(10, 10) == pytest.approx([10 / (10 + 1.96**2), 1.0])
    low, high = scorecard.wilson_interval(13, 16)
    assert low < 13 / 16 < high and (round(low, 3), round(high, 3)) == (0.570, 0.934)
    # More samples, narrower interval around the same rate.
    low_many, high_many = scorecard.wilson_interval(130, 160)
    assert low < low_many < 13 / 16 < high_many < high
    assert scorecard.wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="from 0 to n"):
        scorecard.wilson_interval(5, 4)


@pytest.mark.parametrize("field, value", [("hits", 5), ("dist_um", "5"), ("wall_s", "3"), ("refused", "no"),
                                          ("final_motors", {"phiy": "0.1"}), ("hits", [1] * 180),
                                          ("rc_fraction", float("nan")), ("dist_um", float("inf"))])
def test_an_outcome_of_the_wrong_types_is_refused_naming_the_sample_and_the_field(field, value):
    # A hand-edited or foreign samples.json: a clear error, not a TypeError from inside the scoring.
    row = {"sample": "seed7", "ml": {**_outcome("ml", "seed7", True, hits=[True] * 180).to_dict(), field: value}}
    with pytest.raises(ValueError, match=rf"sample seed7: its 'ml' outcome has {field} = .* a demo does not write"):
        scorecard.outcome_of(row, "ml")


def _card(source, regressor, **figures):
    return {"learning": {"source": source, **figures}, "model": {"regressor": regressor}}


def test_pooled_learning_is_the_mean_of_the_runs_that_trained_and_one_model_file_counts_once():
    trained = [_card(scorecard.TRAINED_IN_RUN, f"run{i}/model.keras", spearman_expected=r, train_s=t)
               for i, (r, t) in enumerate([(0.8, 60.0), (0.9, 70.0)])]
    pooled = scorecard.pool_learning([*trained, None])
    assert pooled["spearman_expected"] == pytest.approx(0.85) and pooled["train_s"] == pytest.approx(65.0)
    assert pooled["classifier_accuracy"] is None and "2 run(s)" in pooled["source"]
    assert len(pooled["runs"]) == 3 and pooled["runs"][2] is None
    # Runs centring with one model file repeat its metadata: one measurement, given once.
    given = [_card("model file metadata", "m.keras", spearman_expected=0.79, train_s=1583.0)] * 3
    pooled = scorecard.pool_learning(given)
    assert pooled["spearman_expected"] == 0.79 and pooled["train_s"] == 1583.0
    # Different model files, the same regressor with another classifier, or a run whose model is unknown: no
    # figure stands for them all.
    with_classifier = {**given[0], "model": {"regressor": "m.keras", "classifier": "c.keras"}}
    for cards in ([given[0], _card("model file metadata", "other.keras", spearman_expected=0.7)],
                  [given[0], with_classifier], [given[0], None]):
        pooled = scorecard.pool_learning(cards)
        assert pooled["source"] is None and pooled["spearman_expected"] is None and len(pooled["runs"]) == 2


def test_pooled_learning_says_when_the_runs_centred_with_another_model_and_a_replaced_file_is_no_one_model():
    # `make demo` trains a model and centres with the shipped one: its figures are not the ML row's model's.
    cards = [{**_card(scorecard.TRAINED_IN_RUN, f"run{i}/model.keras", spearman_expected=0.8),
              "model": {"regressor": "shipped.keras", "source": "shipped model"}} for i in range(2)]
    pooled = scorecard.pool_learning(cards)
    assert pooled["spearman_expected"] == pytest.approx(0.8)
    assert pooled["source"] == "mean of 2 run(s) that trained their model; the centring used the shipped model, not that model"
    unknown = [{**card, "model": {"regressor": "shipped.keras"}} for card in cards]  # an older card: no source
    assert scorecard.pool_learning(unknown)["source"] == "mean of 2 run(s) that trained their model"
    # One path whose file was replaced between the runs: two models, whose figures differ.
    replaced = [_card("model file metadata", "m.keras", spearman_expected=r) for r in (0.7, 0.5)]
    assert scorecard.pool_learning(replaced)["source"] is None


def test_runs_that_centred_with_different_models_are_not_pooled():
    def card(source, regressor, classifier=None, ice=None):
        return {"model": {"source": source, "regressor": regressor, "classifier": classifier, "ice": ice}}

    one = [card("given model file", "m.keras"), card("given model file", "m.keras"), None]
    scorecard.check_one_centring_model(one, ["r0", "r1", "r2"])  # a run without a scorecard is not checked
    own = [card(scorecard.TRAINED_IN_RUN, f"r{i}/model.keras") for i in range(2)]
    scorecard.check_one_centring_model(own, ["r0", "r1"])  # each its own trained model: one procedure
    with pytest.raises(ValueError, match=r"different models \(m.keras: r0; m.keras \+ c.keras: r1\): pool the runs"):
        scorecard.check_one_centring_model([one[0], card("given model file", "m.keras", "c.keras")], ["r0", "r1"])
    # Another ice network vetoes other centrings.
    with pytest.raises(ValueError, match=r"m.keras: r0; m.keras \+ i.keras: r1"):
        scorecard.check_one_centring_model([one[0], card("given model file", "m.keras", ice="i.keras")], ["r0", "r1"])
    with pytest.raises(ValueError, match=r"each its own trained model \+ no ice network: r1"):
        scorecard.check_one_centring_model([one[0], own[0]], ["r0", "r1"])
    # Runs that trained their own regressors share one ice network, or another veto would be pooled in.
    iced = [card(scorecard.TRAINED_IN_RUN, f"r{i}/model.keras", ice=ice)
            for i, ice in enumerate(("/a/mxcube_autocenter/models/default_ice.keras", "/b/models/default_ice.keras"))]
    scorecard.check_one_centring_model(iced, ["r0", "r1"])
    with pytest.raises(ValueError, match=r"ice network default_ice.keras: r0; each its own trained model \+ ice "
                                         r"network my_ice.keras: r1"):  # fmt: skip
        scorecard.check_one_centring_model([iced[0], card(scorecard.TRAINED_IN_RUN, "m.keras", ice="/c/my_ice.keras")],
                                           ["r0", "r1"])
    older = {"model": {"source": scorecard.TRAINED_IN_RUN, "regressor": "m.keras"}}  # before the ice network's key
    with pytest.raises(ValueError, match=r"an ice network not named \(an older run\): r1"):
        scorecard.check_one_centring_model([iced[0], older], ["r0", "r1"])
    # The shipped model is one model wherever the package is installed (a laptop, CI).
    shipped = [card(scorecard.SHIPPED_MODEL, f"/{where}/mxcube_autocenter/models/default_regressor.keras")
               for where in ("home", "ci")]
    scorecard.check_one_centring_model(shipped, ["r0", "r1"])
    # A card without a model file named is said so, not a TypeError.
    with pytest.raises(ValueError, match=r"an unnamed model: r1"):
        scorecard.check_one_centring_model([one[0], card("given model file", None)], ["r0", "r1"])


def test_runs_that_centred_with_different_settings_are_not_pooled():
    def card(**settings):
        return {"centring": {"n_angles": 6, "max_ice_probability": 0.5, **settings}}

    scorecard.check_one_centring_setup([card(), card(), None, {}], ["r0", "r1", "r2", "r3"])  # older cards: unchecked
    with pytest.raises(ValueError, match=r"different settings \(max_ice_probability 0.5 in r0, r2; 1 in r1 / "
                                         r"min_score null in r0, r1; 5 in r2\): pool the runs of one configuration"):
        scorecard.check_one_centring_setup([card(), card(max_ice_probability=1), card(min_score=5)], ["r0", "r1", "r2"])


def test_code_versions_names_each_runs_code():
    cards = [{"code": "0.1.0+g1234567"}, {"code": "0.1.0+g1234567"}, None, {"model": {}}]
    assert scorecard.code_versions(cards, ["r0", "r1", "r2", "r3"]) == {"0.1.0+g1234567": ["r0", "r1"],
                                                                         "unknown": ["r2", "r3"]}


def test_summarise_gives_the_rates_intervals():
    outcomes = [_outcome("ml", "a", True, hits=[True] * 4), _outcome("ml", "b", True, hits=[False] * 4),
                _outcome("ml", "e", False, refused=True)]  # fmt: skip
    figures = scorecard.summarise_method(outcomes)
    assert figures["hit_rate_ci95"] == pytest.approx(scorecard.wilson_interval(1, 2))
    assert figures["empty_refused_rate_ci95"] == pytest.approx(scorecard.wilson_interval(1, 1))
    assert scorecard.summarise_method(outcomes[:2])["empty_refused_rate_ci95"] is None
    assert "50% (9-91%)" in scorecard.format_table({"ml": figures})
    assert "50% (9-91%)" not in scorecard.format_table({"ml": {**figures, "hit_rate": None}})
    checks = {c["figure"]: c for c in scorecard.check_targets(figures)}
    assert checks["hit_rate"]["interval"] == figures["hit_rate_ci95"] and checks["exposures"]["interval"] is None
    assert "| hit_rate | >= 95% | 50% (9-91%) | **no** |" in scorecard.format_targets(list(checks.values()))


def test_pool_outcomes_joins_runs_of_other_samples():
    seed0 = [_outcome("ml", "s0", True, hits=[True] * N_ANGLES, dist=3.0, frac=0.9),
             _outcome("ml", "e0", False, refused=True)]
    seed1 = [_outcome("ml", "s1", True, hits=[False] * N_ANGLES, dist=90.0, frac=0.1)]
    runs = [[{"sample": o.sample, "has_crystal": o.has_crystal, "ml": o.to_dict()} for o in run] for run in (seed0, seed1)]
    pooled = scorecard.pool_outcomes(runs)
    assert pooled == seed0 + seed1
    figures = scorecard.summarise(pooled)["ml"]
    assert (figures["n_crystal"], figures["n_empty"], figures["hit_rate"]) == (2, 1, 0.5)
    with pytest.raises(ValueError, match="1 samples are in more than one run.*s1.*different --seed"):
        scorecard.pool_outcomes([runs[1], runs[1]])
    # A method of one run alone was scored on its samples alone, beside the others' of all: a table that read as
    # the same samples.
    lucid = [{**row, "lucid": {**row["ml"], "method": "lucid"}} for row in runs[1]]
    with pytest.raises(ValueError, match="method 'lucid' ran on 1 of the 3 samples: each method's figures must be "
                                         "of the same samples"):  # fmt: skip
        scorecard.pool_outcomes([runs[0], lucid])
    # An older demo's outcomes (hits of any crystal at each angle, the best point judged at four angles) meant
    # something else: not pooled.
    older = [{**row, "ml": {k: v for k, v in row["ml"].items() if k != "scoring"}} for row in runs[1]]
    with pytest.raises(ValueError, match=r"sample s1: the 'ml' outcome was scored another way \(an older one\) "
                                         r"than this version's .*run the demo again"):  # fmt: skip
        scorecard.pool_outcomes([runs[0], older])
    edited = [{**row, "ml": {**row["ml"], "hits": [True] * 4}} for row in runs[1]]
    with pytest.raises(ValueError, match="sample s1: 4 'ml' hits where the hit test takes 180 angles"):
        scorecard.pool_outcomes([runs[0], edited])


def test_summarise_without_empties_or_timings_gives_none():
    outcomes = [
        _outcome("mesh_oracle", "a", True, hits=[True] * 4, dist=3.0, frac=0.95, wall=None, exposures=1200),
        _outcome("mesh_oracle", "b", True, hits=[True] * 4, dist=5.0, frac=0.9, wall=None, exposures=800),
        _outcome("loop_centre", "a", True, hits=[False] * 4, dist=80.0, frac=0.1, wall=None),
    ]
    summary = scorecard.summarise(outcomes)
    assert list(summary) == list(scorecard.METHODS)
    mesh = summary["mesh_oracle"]
    assert mesh["empty_refused_rate"] is None and mesh["median_wall_s"] is None
    assert mesh["exposures"] == 1000 and mesh["total_exposures"] == 2000
    assert summary["ml"]["n"] == 0 and summary["ml"]["hit_rate"] is None
    # A method not run used no X-rays only because it did nothing: no figure, and no target met by it.
    assert summary["ml"]["exposures"] is None
    assert {c["figure"]: c["met"] for c in scorecard.check_targets(summary["ml"])}["exposures"] is None
    # The median exposures per centring is rounded half up, not cut: 999.5 -> 1000, 998.5 -> 999.
    assert scorecard.summarise_method([_outcome("mesh_oracle", k, True, exposures=e) for k, e in
                                       zip("ab", (999, 1000))])["exposures"] == 1000
    assert scorecard.summarise_method([_outcome("mesh_oracle", k, True, exposures=e) for k, e in
                                       zip("ab", (998, 999))])["exposures"] == 999
    assert summary["loop_centre"]["hit_rate"] == 0.0


def test_check_targets():
    figures = {"hit_rate": 1.0, "median_dist_um": 12.0, "median_rc_fraction": 0.8, "empty_refused_rate": None,
               "exposures": 0, "median_wall_s": 4.0}
    checks = {c["figure"]: c for c in scorecard.check_targets(figures)}
    assert checks["hit_rate"]["met"] is True
    assert checks["median_dist_um"]["met"] is False
    assert checks["median_rc_fraction"]["met"] is True  # the bound itself meets the target
    assert checks["empty_refused_rate"]["met"] is None
    assert checks["exposures"]["met"] is True and checks["median_wall_s"]["met"] is True
    text = scorecard.format_targets(list(checks.values()))
    assert "**no**" in text and "median_dist_um" in text


def test_mesh_scan_finds_the_crystal_in_3d_and_counts_exposures():
    model = FakeDiffraction()
    loop = np.array([[a, u, v] for a in (-0.15, 0.15) for u in (-0.1, 0.1) for v in (-0.1, 0.1)])
    result = scorecard.mesh_scan(model.expected_rc, loop, np.zeros(3), step_um=10.0, margin_um=20.0)
    assert not result.refused
    # Grids of 35 x 25 points at omega 0 (and 90): the loop's 300 x 200 um projection plus margins.
    assert [g["rc"].shape for g in result.grids] == [(25, 35), (25, 35)]
    assert result.exposures == 2 * 25 * 35 == model.calls
    assert np.all(np.abs(result.point - CRYSTAL) <= 0.005 + 1e-9)  # within half a step per axis
    assert result.best_rc > 80.0


def test_mesh_scan_other_angles_and_refusal():
    model = FakeDiffraction()
    loop = np.array([[a, u, v] for a in (-0.1, 0.1) for u in (-0.1, 0.1) for v in (-0.1, 0.1)])
    result = scorecard.mesh_scan(model.expected_rc, loop, [0.01, 0.0, 0.0], step_um=5.0, omegas=(30.0, 120.0))
    assert np.all(np.abs(result.point - CRYSTAL) <= 0.0025 + 1e-9)
    weak = FakeDiffraction(peak=3.0)
    refused = scorecard.mesh_scan(weak.expected_rc, loop, np.zeros(3), threshold=5.0)
    assert refused.refused and refused.point is None and refused.exposures > 0
    with pytest.raises(ValueError, match="90 degrees"):
        scorecard.mesh_scan(weak.expected_rc, loop, np.zeros(3), omegas=(0.0, 45.0))


def test_tables_show_every_method_and_dashes_for_missing_values():
    outcomes = [
        _outcome("ml", "a", True, hits=[True] * 4, dist=2.0, frac=0.9, wall=4.0),
        _outcome("ml", "e", False, refused=True, wall=2.0),
    ]
    summary = scorecard.summarise(outcomes)
    text = scorecard.format_table(summary)
    lines = text.splitlines()
    assert lines[0].startswith("method") and set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(scorecard.METHODS)
    assert "100%" in lines[2] and "2.0" in lines[2]
    assert lines[3].split()[1] == "-"  # lucid: nothing run
    md = scorecard.markdown_table(summary).splitlines()
    assert md[0].startswith("| method") and len(md) == 2 + len(scorecard.METHODS)
    assert all(o.to_dict()["method"] == "ml" for o in outcomes)


def test_a_point_just_outside_a_thin_crystal_is_no_hit_though_the_beam_crosses_it_at_0_45_90_135():
    from dataclasses import replace

    from mxcube_autocenter.simulation.diffraction import Beam, DiffractionModel
    from mxcube_autocenter.simulation.sample import Crystal, make_sample

    # A plate 200 x 100 um, 5 um thick, lying at 20 degrees in the (u, v) plane; the point 4 um off its middle
    # plane, 1.5 um outside it: the beam through the point runs along the plate near omega 160 and 340 and misses.
    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    along, normal = np.array([0.0, c, s]), np.array([0.0, -s, c])
    corners = np.array([[i, j, k] for i in (-0.05, 0.05) for j in (-0.1, 0.1) for k in (-0.0025, 0.0025)])
    plate = Crystal(corners[:, :1] * [1.0, 0.0, 0.0] + corners[:, 1:2] * along + corners[:, 2:] * normal, "plate", 0.03,
                    np.zeros((0, 4)), np.zeros((0, 4)), 0.001, np.ones(3))  # fmt: skip
    model = DiffractionModel(replace(make_sample(3, n_crystals=0), crystals=[plate]), Beam(), points_per_crystal=500)
    outside = centred_motors(0.004 * normal, 0.0)
    assert all(scorecard.beam_hits(model, outside, omegas=(0.0, 45.0, 90.0, 135.0)))
    score = scorecard.score_position(model, np.zeros(3), model.mean_rc_centred(np.zeros(3)), outside)
    missed = [w for w, hit in zip(scorecard.HIT_TEST_OMEGAS, score["hits"]) if not hit]
    assert missed and all(abs(w - 160.0) < 5 or abs(w - 340.0) < 5 for w in missed)
    assert all(scorecard.score_position(model, np.zeros(3), 1.0, centred_motors(0.002 * normal, 0.0))["hits"])


def test_a_point_between_two_crystals_is_no_hit_though_the_beam_crosses_one_of_them_at_every_angle():
    from dataclasses import replace

    from mxcube_autocenter.simulation.diffraction import Beam, DiffractionModel
    from mxcube_autocenter.simulation.sample import Crystal, make_sample

    def plate(centre, half_sizes):
        corners = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)]) * half_sizes + centre
        return Crystal(corners, "plate", 0.03, np.zeros((0, 4)), np.zeros((0, 4)), 0.001, np.ones(3))

    # Two plates 200 um long and 5 um thick, crossed at right angles in the plane across the spindle and each
    # 4 um beside the origin: a beam through the origin runs along one of them only near two omegas, and then
    # crosses the other.
    plates = [plate([0.0, 0.0, 0.004], [0.05, 0.1, 0.0025]), plate([0.0, 0.004, 0.0], [0.05, 0.0025, 0.1])]
    model = DiffractionModel(replace(make_sample(3, n_crystals=0), crystals=plates), Beam(), points_per_crystal=50)
    origin = centred_motors(np.zeros(3), 0.0)
    each = np.array([model.crystals_in_beam({**origin, "omega": w}) for w in scorecard.HIT_TEST_OMEGAS])
    assert each.any(axis=1).all() and not each.all(axis=0).any()
    hits = scorecard.beam_hits(model, origin)
    assert not all(hits) and sum(hits) == each.sum(axis=0).max()
    inside = centred_motors(np.array([0.0, 0.0, 0.004]), 0.0)
    assert all(scorecard.beam_hits(model, inside))


def test_optical_oracle_centres_the_crystals_shape_not_its_hidden_quality():
    from mxcube_autocenter.simulation.diffraction import Beam, DiffractionModel
    from mxcube_autocenter.simulation.sample import make_sample

    sample = make_sample(16)
    real = DiffractionModel(sample, Beam())
    best, best_rc = real.best_point()
    point = scorecard.optical_oracle(real)
    score = scorecard.score_position(real, best, best_rc, centred_motors(point, 0.0))
    assert all(score["hits"]) and 0.5 < score["rc_fraction"] <= 1.0 + 1e-9
    assert scorecard.optical_oracle(DiffractionModel(make_sample(16, n_crystals=0), Beam())) is None
    # Nor their capacities: two crystals of other capacities are told apart by their shapes alone.
    from mxcube_autocenter.simulation.sample import MEDIAN_CAPACITY, uniform_crystals

    pair = make_sample(11, n_crystals=2)
    shapes, _ = DiffractionModel(uniform_crystals(pair, MEDIAN_CAPACITY), Beam()).best_point()
    own_capacities, _ = DiffractionModel(uniform_crystals(pair), Beam()).best_point()
    np.testing.assert_allclose(scorecard.optical_oracle(DiffractionModel(pair, Beam())), shapes)
    assert np.linalg.norm(shapes - own_capacities) > 0.01  # mm: the two definitions differ on this sample


def test_shapes_reference_fits_its_threshold_on_the_training_rows_and_scores_the_held_out_ones():
    shapes = np.array([0.0, 0.5, 2.0, 3.0, 8.0, 40.0, 0.2, 1.0, 2.5, 30.0])
    truth = np.array([0.0, 0.5, 1.0, 6.0, 20.0, 90.0, 0.0, 4.0, 7.0, 60.0])
    train, held_out = np.arange(6), np.arange(6, 10)
    reference = scorecard.shapes_reference(shapes, truth, train, held_out, 5.0)
    # On the training rows a crystal (true count >= 5) starts at shapes-only count 3.
    assert reference["count_threshold"] == 3.0
    # Held out: 0.2, 1.0 and 2.5 called empty, 30 a crystal: 2.5 (7 true spots) is the one error.
    assert reference["classifier_accuracy_expected"] == 0.75
    assert reference["spearman_expected"] == pytest.approx(1.0)
    assert scorecard.shapes_reference(shapes, truth, train, [8, 7], 5.0)["spearman_expected"] is None  # 2 rows
    # Equal counts cannot be split: a threshold between them is not offered.
    tied = scorecard.shapes_reference(np.ones(4), np.array([0.0, 0.0, 9.0, 9.0]), np.arange(4), np.arange(4), 5.0)
    assert tied["classifier_accuracy_expected"] == 0.5 and tied["spearman_expected"] is None
    # Neighbouring floats are split exactly.
    close = scorecard.shapes_reference(np.array([1.0, np.nextafter(1.0, 2.0)]), np.array([0.0, 9.0]), [0, 1], [0, 1], 5.0)
    assert close["classifier_accuracy_expected"] == 1.0
    # Only empty training rows: nothing is called a crystal, with a finite threshold (scorecard.json is JSON).
    empty = scorecard.shapes_reference(shapes, np.zeros(10), train, held_out, 5.0)
    assert np.isfinite(empty["count_threshold"]) and empty["count_threshold"] > shapes[train].max()
    # No training rows: the count threshold is the crystal threshold itself.
    assert scorecard.shapes_reference(shapes, truth, [], held_out, 5.0)["count_threshold"] == 5.0


def _row(name, has_crystal, hit=False, dist=None, rc=None, refused=False, wall=4.0, failed=False):
    outcome = scorecard.Outcome("ml", name, has_crystal, refused, {"sampx": 0.0}, wall, hits=[hit] * N_ANGLES if has_crystal else None,
                                dist_um=dist, rc_fraction=rc, failed=failed)  # fmt: skip
    return {"sample": name, "description": f"loop of {name}", "has_crystal": has_crystal, "ml": outcome.to_dict()}


def test_compare_runs_pairs_each_crystal_and_pools_the_seeds():
    seed0_a = [_row("s0", True, True, 10.0, 0.8), _row("s1", True, False, 50.0, 0.1), _row("e0", False, refused=True)]
    seed0_b = [_row("e0", False), _row("s1", True, True, 8.0, 0.9, wall=7.0), _row("s0", True, True, 12.0, 0.7)]
    seed1_a = [_row("t0", True, True, 5.0, 0.9)]  # another seed's run: its own samples
    seed1_b = [_row("t0", True, False, 30.0, 0.0, refused=True)]
    c = scorecard.compare_runs([(seed0_a, seed0_b), (seed1_a, seed1_b)])
    assert (c["n_crystal"], c["n_empty"], c["hits_a"], c["hits_b"]) == (3, 1, 2, 2)
    assert c["hits_gained"] == ["s1"] and c["hits_lost"] == ["t0"]
    diffs = np.array([-0.1, 0.8, -0.9])  # a refusal counts as RC fraction 0
    assert c["rc_fraction_diff_mean"] == pytest.approx(diffs.mean())
    assert c["rc_fraction_diff_se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert (c["rc_fraction_up"], c["rc_fraction_down"]) == (1, 2)
    assert c["dist_diff_median_um"] == pytest.approx(-20.0)  # +2 and -42; the refused one is left out
    assert (c["empty_refused_a"], c["empty_refused_b"]) == (1, 0)
    assert [s["sample"] for s in c["samples"]] == ["s0", "s1", "e0", "t0"]
    text = scorecard.format_comparison(c)
    assert "crystals hit: 2 -> 2 (gained: s1; lost: t0; sign test p = 1)" in text and "1 up, 2 down" in text
    # The same samples in two pairs (a rerun of the seed paired again) would count twice.
    with pytest.raises(ValueError, match="3 samples are in more than one pair.*count twice"):
        scorecard.compare_runs([(seed0_a, seed0_b), (seed0_b, seed0_a)])
    # A failed centring left the sample at its start, as a refusal does: its distance is no change of method.
    failed = [_row("s0", True, False, 90.0, 0.0, failed=True), seed0_b[1]]
    assert scorecard.compare_runs([(seed0_a[:2], failed)])["dist_diff_median_um"] == pytest.approx(-42.0)


def test_the_sign_test_of_gained_and_lost_crystals_is_exact():
    # The figures quoted in docs/centring.md: 19 gained and 4 lost, 4 and 0, 24 and 10.
    assert scorecard.sign_test_p(19, 4) == pytest.approx(0.0026, abs=1e-4)
    assert scorecard.sign_test_p(4, 0) == scorecard.sign_test_p(0, 4) == pytest.approx(0.125)
    assert scorecard.sign_test_p(24, 10) == pytest.approx(0.0243, abs=1e-4)
    assert scorecard.sign_test_p(0, 0) == scorecard.sign_test_p(5, 5) == 1.0


def test_compare_runs_refuses_runs_of_other_samples_or_without_the_method():
    with pytest.raises(ValueError, match="different samples.*same --seed and --n-heldout"):
        scorecard.compare_runs([([_row("s0", True)], [_row("s9", True)])])
    with pytest.raises(ValueError, match="no 'lucid' outcome"):
        scorecard.compare_runs([([_row("s0", True)], [_row("s0", True)])], method="lucid")
    moved = [{**_row("s0", True), "start": {"omega": 10.0}}], [{**_row("s0", True), "start": {"omega": 20.0}}]
    with pytest.raises(ValueError, match="sample s0 started from other motor positions in the two runs"):
        scorecard.compare_runs([moved])
    incomplete = {"sample": "s0", "description": "loop of s0", "ml": {"method": "ml"}}
    with pytest.raises(ValueError, match="sample s0 has no complete 'ml' outcome .*give the samples.json of a demo run"):
        scorecard.compare_runs([([_row("s0", True)], [incomplete])])


def test_compare_runs_refuses_a_sample_scored_against_another_ground_truth():
    # The same centring scored by two versions of the best-point search: RC fractions of different counts.
    a, b = {**_row("s0", True, True, 10.0, 0.8), "best_rc": 1015.32}, {**_row("s0", True, True, 10.0, 0.8), "best_rc": 1018.74}
    with pytest.raises(ValueError, match="sample s0 was scored against another ground truth.*1015.32 and 1018.74"):
        scorecard.compare_runs([([a], [b])])
    # The same count up to rounding (another machine), and empty loops (no best point), pair up.
    same = {**b, "best_rc": 1018.74 * (1 + 1e-9)}
    empty = [{**_row("e0", False), "best_rc": 0.0}]
    assert scorecard.compare_runs([([b] + empty, [same] + empty)])["n_crystal"] == 1
