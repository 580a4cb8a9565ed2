"""The pure core of early stopping (issue 17) on synthetic learning curves whose answer is known.

No Caffe, no store: curves, predictor and rules only.  The synthetic population rises towards
its final accuracy like the recorded digits curves (most of the gain in the first epochs), with
finals spread from 0.2 to 0.99 and the architecture loosely tied to the final accuracy.
"""

import math
import pickle
import random
from typing import List, Sequence, Tuple

import pytest

from metaqnn.early_stop import (
    EarlyStopConfig,
    Example,
    MedianRule,
    ModelInfo,
    PredictorRule,
    build_rule,
    epoch_curve,
    epochs_trained,
    example_from_metrics,
    fit_sizes,
)
from metaqnn.early_stop.curves import features
from metaqnn.early_stop.predictor import REGRESSORS, CheckpointModel, Predictor, fit_predictor
from metaqnn.early_stop.rules import PredictorCache, kth_best
from qagent.errors import ConfigError

EPOCHS = 20


def shape(final: float, rate: float, epochs: int = EPOCHS) -> List[float]:
    """A saturating curve: half the final accuracy after the probe epoch, then most of the rest fast."""
    return [final * (1.0 - 0.5 * math.exp(-(t - 1) / rate)) for t in range(1, epochs + 1)]


def info(depth: int = 4, params: int = 20000, lr: float = 1e-3, restarts: int = 0) -> ModelInfo:
    return ModelInfo(depth, max(1, depth - 2), 1, 0, 0, params, lr, restarts)


def info_for(final: float) -> ModelInfo:
    """The architecture the synthetic population gives a model of this final accuracy."""
    return info(depth=2 + int(5 * final), params=1000 + int(50000 * final))


def population(n: int = 40, seed: int = 0) -> List[Tuple[int, Example]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        final = 0.2 + 0.79 * i / (n - 1)  # 0.2 .. 0.99, every model distinct
        curve = [min(1.0, max(0.0, v + rng.gauss(0.0, 0.003))) for v in shape(final, 1.5 + rng.random())]
        out.append((i, Example(tuple(curve), info_for(final), max(curve))))
    return out


EXAMPLES = population()
BEST = max(ex.final for _, ex in EXAMPLES)
MEASURED = [ex.final for _, ex in EXAMPLES]


def svr_rule(**kw) -> PredictorRule:
    config = EarlyStopConfig(**{"rule": "svr", **kw})
    rule = build_rule(config, EXAMPLES, MEASURED, seed=0)
    assert isinstance(rule, PredictorRule)
    return rule


# ---------------------------------------------------------------- the rules on known answers


def test_a_clearly_bad_curve_is_stopped_at_the_first_checkpoint():
    rule = svr_rule()
    bad = shape(0.3, 2.0)
    decision = rule.decide(bad, info(depth=3, params=16000))
    assert decision is not None
    assert decision.epoch == 2
    assert decision.rule == "svr"
    assert decision.target == pytest.approx(BEST)
    assert decision.probability is not None and decision.probability < 0.01
    assert max(bad[:2]) <= decision.predicted < 0.5  # the reward: the prediction, never below what it reached


def test_a_rising_curve_that_can_still_beat_the_best_is_not_stopped():
    rule = svr_rule()
    rising = shape(0.995, 2.0)  # on the best models' course: far below the best at epoch 2, above it at the end
    assert rising[1] < BEST - 0.25 < BEST < rising[-1]
    for epoch in (2, 5, 10, 20):
        assert rule.decide(rising[:epoch], info_for(0.995)) is None


def test_the_target_is_the_kth_best_measured_accuracy():
    assert kth_best([0.5, 0.9, 0.7], 1) == 0.9
    assert kth_best([0.5, 0.9, 0.7], 2) == 0.7
    assert kth_best([0.5], 2) is None
    third = svr_rule(kth_best=3)
    assert third.target == pytest.approx(sorted(MEASURED)[-3])
    # a model a little below the best: stopped when it must beat the best, kept when the 10th best will do
    almost = shape(0.9, 1.8)
    assert svr_rule(delta=0.9).decide(almost, info_for(0.9)) is not None
    assert svr_rule(delta=0.9, kth_best=10).decide(almost, info_for(0.9)) is None


class Constant:
    """A stand-in estimator that predicts the same value for every input."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict(self, xs):
        return [self.value for _ in xs]


def test_the_reward_of_a_stopped_model_is_the_prediction_never_below_what_it_reached():
    def rule(gain: float, target: str = "gain") -> PredictorRule:
        predictor = Predictor({2: CheckpointModel(2, Constant(gain), 0.01, 10)}, "nu_svr", target)
        return PredictorRule(predictor, 0.99, 0.99, (2,))

    assert rule(0.05).predictor.predict([0.5, 0.7], info()) == (pytest.approx(0.75), 0.01)  # best seen + gain
    assert rule(0.6, "final").predictor.predict([0.5, 0.7], info()) == (0.6, 0.01)
    decision = rule(0.05).decide([0.5, 0.7, 0.9], info())
    assert decision is not None and decision.epoch == 2 and decision.predicted == pytest.approx(0.75)
    # a prediction below the accuracy the model already reached: the reward is what it reached
    assert rule(-0.3).decide([0.5, 0.7], info()).predicted == 0.7
    assert rule(0.3, "final").decide([0.5, 0.7], info()).predicted == 0.7
    # close to the target: P(beats 0.99) = P(z > 1) = 0.16 with sigma 0.01, kept
    assert rule(0.28).decide([0.5, 0.7], info()) is None


def test_a_prediction_above_one_is_rewarded_as_accuracy_one():
    """A small delta stops models predicted above the target; an SVR's mean may then pass 1
    (seen in the Ray test's search: 1.09, 1.16), a reward the store rightly refuses as damaged."""
    predictor = Predictor({2: CheckpointModel(2, Constant(0.4), 0.5, 10)}, "nu_svr", "gain")
    decision = PredictorRule(predictor, 0.95, 0.1, (2,)).decide([0.8, 0.9], info())
    assert decision is not None and decision.predicted == 1.0  # 0.9 + 0.4, capped
    assert decision.probability == pytest.approx(0.7580, abs=1e-3)  # P(z > -0.7): decided on its own mean


def test_delta_one_never_stops():
    rule = svr_rule(delta=1.0)
    for final in (0.05, 0.2, 0.3, 0.6, 0.99):
        assert rule.decide(shape(final, 2.0), info()) is None
    assert rule.decide([0.0] * EPOCHS, info()) is None


def test_smaller_delta_stops_more():
    finals = [0.2 + 0.795 * k / 30 for k in range(31)]

    def stopped(delta: float) -> int:
        rule = svr_rule(delta=delta)
        return sum(rule.decide(shape(f, 2.0), info_for(f)) is not None for f in finals)

    counts = [stopped(d) for d in (0.5, 0.9, 0.99, 0.999999)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1] > 0


def test_decide_looks_only_at_the_checkpoints_the_curve_has_reached():
    rule = svr_rule(checkpoints=(2, 5, 10))
    bad = shape(0.3, 2.0)
    assert rule.decide(bad[:1], info()) is None  # before the first checkpoint: nothing to decide
    assert rule.decide(bad[:2], info()).epoch == 2
    # a curve that looks fine at epoch 2 and collapses later is stopped at the checkpoint that sees it
    late = shape(0.99, 2.0)[:2] + [0.25] * 18
    assert rule.decide(late[:4], info_for(0.99)) is None
    decision = rule.decide(late, info_for(0.99))
    assert decision is not None and decision.epoch == 5


def test_the_median_rule_stops_below_the_median_and_not_above():
    config = EarlyStopConfig(rule="median", checkpoints=(2, 5))
    rule = build_rule(config, EXAMPLES, MEASURED)
    assert isinstance(rule, MedianRule)
    median2 = sorted(max(ex.curve[:2]) for _, ex in EXAMPLES)[len(EXAMPLES) // 2 - 1 : len(EXAMPLES) // 2 + 1]
    assert rule.medians[2] == pytest.approx(sum(median2) / 2)
    below = [rule.medians[2] - 0.05] * EPOCHS
    above = [rule.medians[5] + 0.05] * EPOCHS
    decision = rule.decide(below, info())
    assert decision is not None and decision.epoch == 2 and decision.predicted == pytest.approx(below[0])
    assert decision.probability is None and decision.rule == "median"
    assert rule.decide(above, info()) is None
    # above the median at 2, below it at 5: stopped at 5
    mixed = [rule.medians[2] + 0.01] * 2 + [rule.medians[2] + 0.01] * 18
    assert rule.medians[5] > rule.medians[2] + 0.01
    assert rule.decide(mixed, info()).epoch == 5


def test_no_rule_while_off_or_warming_up():
    assert build_rule(EarlyStopConfig(), EXAMPLES, MEASURED) is None  # off by default
    assert build_rule(EarlyStopConfig(rule="svr", warmup=41), EXAMPLES, MEASURED) is None
    assert build_rule(EarlyStopConfig(rule="median", warmup=41), EXAMPLES, MEASURED) is None
    assert build_rule(EarlyStopConfig(rule="svr", warmup=40), EXAMPLES, MEASURED) is not None
    assert build_rule(EarlyStopConfig(rule="svr", warmup=5), EXAMPLES[:10], []) is None  # nothing measured


# ---------------------------------------------------------------- refits and caching


def test_fit_sizes_are_a_pure_function_of_the_models_available():
    sizes = [fit_sizes(25, 0.1, n) for n in range(0, 60)]
    assert sizes[:25] == [0] * 25
    assert sizes == [fit_sizes(25, 0.1, n) for n in range(0, 60)]  # no hidden state
    refits = sorted({s for s in sizes if s})
    assert refits == [25, 28, 31, 35, 39, 43, 48, 53, 59]  # each the previous grown by 10%, rounded up
    assert all(s <= n for n, s in enumerate(sizes))
    assert sizes == sorted(sizes)
    assert [fit_sizes(5, 0.0, n) for n in range(3, 9)] == [0, 0, 5, 6, 7, 8]  # growth 0: every new model
    assert fit_sizes(3, 0.5, 4) == 3 and fit_sizes(3, 0.5, 5) == 5  # at least one more


def test_the_cache_refits_only_at_refit_points():
    config = EarlyStopConfig(rule="svr", warmup=20, refit_growth=0.2)
    cache = PredictorCache()
    fits = []
    for n in range(20, 41):
        rule = build_rule(config, EXAMPLES[:n], MEASURED[:n], seed=0, cache=cache)
        assert isinstance(rule, PredictorRule)
        fits.append(rule.predictor)
        assert next(iter(rule.predictor.models.values())).trained_on == fit_sizes(20, 0.2, n)
    distinct = {id(p) for p in fits}
    assert len(distinct) == len({fit_sizes(20, 0.2, n) for n in range(20, 41)}) == 4  # 20, 24, 29, 35


# ---------------------------------------------------------------- determinism and pickling


@pytest.mark.parametrize("regressor", REGRESSORS)
def test_a_predictor_is_deterministic(regressor):
    exs = [ex for _, ex in EXAMPLES]
    a = fit_predictor(exs, (2, 5), regressor, folds=5, seed=3)
    b = fit_predictor(list(exs), (2, 5), regressor, folds=5, seed=3)
    probes = [shape(f, 2.0) for f in (0.3, 0.6, 0.95)]
    for cp in (2, 5):
        assert a.models[cp].sigma == b.models[cp].sigma
        for c in probes:
            assert a.predict(c[:cp], info()) == b.predict(c[:cp], info())
    assert set(a.models) == {2, 5}
    assert all(m.trained_on == len(exs) and m.sigma > 0 for m in a.models.values())


def test_the_predictor_learns_the_curves():
    """Held-out synthetic models are predicted within a few points, with a calibrated sigma."""
    train = [ex for _, ex in EXAMPLES]
    test = [ex for _, ex in population(20, seed=7)]
    pred = fit_predictor(train, (5,), "nu_svr", folds=5, seed=0)
    errors = [abs(pred.predict(ex.curve[:5], ex.info)[0] - ex.final) for ex in test]
    assert max(errors) < 0.08
    assert sum(e <= 2 * pred.models[5].sigma for e in errors) >= 0.8 * len(errors)


def test_the_local_sigma_follows_the_error_of_similar_models():
    """Low curves end anywhere, high ones where they are: the local sigma is narrow only at the top."""
    rng = random.Random(3)
    exs = []
    for i in range(60):
        start = 0.1 + 0.85 * i / 59
        final = start + 0.3 * rng.random() if start < 0.5 else start + rng.gauss(0.0, 0.003)
        exs.append(Example(tuple([start] * 5 + [final] * 15), info(), final))
    local = fit_predictor(exs, (2,), "nu_svr", folds=5, seed=0)
    flat = fit_predictor(exs, (2,), "nu_svr", folds=5, seed=0, spread="global")
    low, high = local.predict([0.2, 0.2], info()), local.predict([0.9, 0.9], info())
    assert high[1] < flat.models[2].sigma / 3 < low[1]
    assert flat.predict([0.2, 0.2], info())[1] == flat.predict([0.9, 0.9], info())[1] == flat.models[2].sigma
    assert local.models[2].neighbours == 12 and len(local.models[2].cv_means) == 60
    # the window is the neighbours nearest the prediction: here the twelve highest held-out predictions
    cp = local.models[2]
    top = cp.cv_residuals[-12:]
    assert cp.spread(cp.cv_means[-1] + 1.0) == pytest.approx(math.sqrt(sum(r * r for r in top) / 12))


def test_the_local_window_is_the_nearest_held_out_predictions():
    means = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    residuals = (0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

    def rms(*rs: float) -> float:
        return math.sqrt(sum(r * r for r in rs) / len(rs))

    cp = CheckpointModel(2, None, 9.0, 7, means, residuals, 3)
    assert cp.spread(0.41) == pytest.approx(rms(0.5, 0.4, 0.3))  # 0.3, 0.4, 0.5
    assert cp.spread(0.54) == pytest.approx(rms(0.4, 0.3, 0.2))  # 0.5, 0.6, then 0.4 (nearer than 0.7)
    assert cp.spread(0.0) == pytest.approx(rms(0.7, 0.6, 0.5))  # below all: the three lowest
    assert cp.spread(2.0) == pytest.approx(rms(0.3, 0.2, 0.1))
    assert CheckpointModel(2, None, 9.0, 7, means, residuals, 0).spread(0.41) == 9.0  # no window: global
    floored = CheckpointModel(2, None, 9.0, 7, means, residuals, 3, (0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0))
    assert floored.spread(0.41) == pytest.approx(rms(0.0, 0.9, 0.0))  # the noise of the window, above its residuals
    assert floored.spread(0.65) == pytest.approx(rms(0.3, 0.2, 0.1))


def test_the_floored_sigma_is_never_below_the_measurement_noise():
    """Near-identical training curves make the cross-validated residuals tiny; the noise of the
    curves themselves (here +-0.01 from epoch to epoch) bounds the sigma from below."""
    exs = []
    for i in range(40):
        level = 0.6 + 0.35 * (i // 2) / 19  # every curve twice
        curve = shape(level, 2.0)[:10] + [level + (0.005 if k % 2 else -0.005) for k in range(10)]
        exs.append(Example(tuple(curve), info_for(level), max(curve)))
    local = fit_predictor(exs, (5,), "nu_svr", folds=5, seed=0, spread="local")
    floored = fit_predictor(exs, (5,), "nu_svr", folds=5, seed=0, spread="floored")
    probe = shape(0.9, 2.0)[:5]
    mean_l, sigma_l = local.predict(probe, info_for(0.9))
    mean_f, sigma_f = floored.predict(probe, info_for(0.9))
    assert mean_l == mean_f  # the same regressor; only the spread differs
    assert sigma_f == pytest.approx(0.01 / math.sqrt(2))  # RMS change 0.01 -> one measurement 0.0071
    assert sigma_l < sigma_f
    assert local.models[5].cv_noise == () and len(floored.models[5].cv_noise) == 40


def test_a_rule_pickles_with_its_decisions():
    curves = [shape(f, r) for f in (0.1, 0.3, 0.5, 0.8, 0.9, 0.97, 0.995) for r in (1.5, 2.5)]
    for rule in (svr_rule(), build_rule(EarlyStopConfig(rule="median"), EXAMPLES, MEASURED)):
        copy = pickle.loads(pickle.dumps(rule))
        decisions = [rule.decide(c, info_for(c[-1])) for c in curves]
        assert [copy.decide(c, info_for(c[-1])) for c in curves] == decisions
        assert any(d is None for d in decisions) and any(d is not None for d in decisions)


# ---------------------------------------------------------------- curves and features


def test_epoch_curve_takes_epochs_in_order_up_to_the_first_gap():
    assert epoch_curve([[74, 0.6], [37, 0.5], [111, 0.7]]) == [0.5, 0.6, 0.7]  # unsorted input
    assert epoch_curve([[37, 0.5], [74, 0.6], [148, 0.8]]) == [0.5, 0.6]  # epoch 3 missing: stop there
    assert epoch_curve([[37, 0.5], [50, 0.55], [74, 0.6]]) == [0.5, 0.6]  # a test between epochs is ignored
    assert epoch_curve([[74, 0.6], [148, 0.8]], iters_per_epoch=37) == []  # no epoch 1
    assert epoch_curve([[37, 0.5], [74, 0.6]], iters_per_epoch=37) == [0.5, 0.6]
    assert epoch_curve([]) == []


def test_features_are_the_curve_its_differences_and_the_model():
    model = info(depth=5, params=1000, lr=0.01, restarts=2)
    f = features([0.5, 0.7, 0.8], model)
    assert f[:3] == [0.5, 0.7, 0.8]
    assert f[3:5] == pytest.approx([0.2, 0.1])
    assert f[5:6] == pytest.approx([-0.1])
    assert f[6:] == model.vector()
    assert model.vector()[5:] == pytest.approx([3.0, -2.0, 2.0])  # log10 params, log10 lr, restarts
    assert len(features([0.5], model)) == 1 + len(model.vector())


def metrics(curve: Sequence[float], restarts: int = 0, failure=None) -> dict:
    return {
        "curve": [[37 * (k + 1), a] for k, a in enumerate(curve)],
        "best_accuracy": max(curve) if curve else None,
        "restarts": restarts,
        "learning_rate": 0.001,
        "param_count": 20554,
        "failure": failure,
    }


def test_examples_only_from_fully_trained_models():
    full = shape(0.9, 2.0)
    ex = example_from_metrics("[C(32,1,1), P(2,2), FC(64), SM(10)]", metrics(full, restarts=1), EPOCHS)
    assert ex is not None and ex.curve == tuple(full) and ex.final == max(full)
    assert (ex.info.depth, ex.info.convs, ex.info.pools, ex.info.fcs, ex.info.restarts) == (4, 1, 1, 1, 1)
    assert example_from_metrics("[C(32,1,1), SM(10)]", metrics(full[:10]), EPOCHS) is None  # stopped early
    assert example_from_metrics("[SM(10)]", metrics([0.09], 5, "no_learning"), EPOCHS) is None


def test_epochs_trained_counts_probes():
    assert epochs_trained(metrics(shape(0.9, 2.0))) == 20
    assert epochs_trained(metrics(shape(0.9, 2.0), restarts=2)) == 22
    assert epochs_trained(metrics([0.09], restarts=5)) == 6  # failed after six probes
    assert epochs_trained(metrics(shape(0.9, 2.0)[:5], restarts=1)) == 6  # stopped at epoch 5
    assert epochs_trained({"epochs_trained": 7.5, "curve": []}) == 7.5


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "bad",
    [
        {"rule": "hyperband"},
        {"regressor": "gp"},
        {"delta": 0.0},
        {"delta": 1.5},
        {"delta": -0.5},
        {"checkpoints": (5, 2)},
        {"checkpoints": (0,)},
        {"checkpoints": (2, 2)},
        {"checkpoints": ()},
        {"warmup": 4},
        {"warmup": 9, "cv_folds": 10},
        {"cv_folds": 1},
        {"kth_best": 0},
        {"refit_growth": -0.1},
    ],
)
def test_bad_configuration_is_refused(bad):
    with pytest.raises(ConfigError):
        EarlyStopConfig(**{"rule": "svr", **bad})


def test_good_configuration_is_accepted():
    assert not EarlyStopConfig().enabled
    config = EarlyStopConfig(rule="median", delta=1.0, checkpoints=(1, 2, 5, 10), warmup=5, kth_best=3)
    assert config.enabled
    config.check_epochs(20)
    with pytest.raises(ConfigError):
        config.check_epochs(10)
    EarlyStopConfig(checkpoints=(30,)).check_epochs(20)  # off: the checkpoints are not checked
