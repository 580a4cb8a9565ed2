"""Sequential regression models: one regressor per checkpoint epoch, with its uncertainty.

As in the follow-up paper, a model's final accuracy is predicted at epoch tau from the
features of :func:`metaqnn.early_stop.curves.features`; the uncertainty is the spread of the
regressor's cross-validated residuals on the models it was trained on (a Gaussian with that
standard deviation).  The regressors are those the paper compares; ``nu_svr`` (RBF kernel) is
the one it recommends.  Everything is seeded and fitted in a fixed order, so the same
examples give the same predictor.

The regressors learn the *gain* still to come, final accuracy minus the best accuracy seen up
to tau, and the prediction adds it back: an RBF kernel regresses to the mean far from its
training points and cannot predict above the best final it was trained on, which is exactly
the model the rule must not stop; the gain of a saturating curve is small and near zero for
every good model, so shrinking it costs little (bench/bench_early_stop.py quality, 297 real
digits curves: nu_svr's held-out R^2 at tau = 5 rises from 0.90 to 0.975, at tau = 10 from 0.93
to 0.998, and fitted on one search and tested on the two others from 0.80 to 0.965 at tau = 5).
The target ``final`` (the paper's) remains for the benchmark.

The uncertainty is *local* by default: sigma is the RMS of the cross-validated residuals of the
training models whose held-out predictions lie nearest the new prediction (the nearest fifth,
at least ten), never below the measurement noise of those same models (the RMS epoch-to-epoch
change over the last ten epochs of their curves, over the square root of two).  The error is
far from uniform: a curve still at 0.3 after the probe may end anywhere, one at 0.95 ends within
a point or two; one sigma for all was five times too wide for the good models on the real
digits curves (held-out RMS error 0.013 on the top quarter, one sigma 0.071, at tau = 2), which
are the only ones the rule has to judge finely.  The floor is a final accuracy that cannot be
predicted more closely than it is measured: a training set of near-identical curves (a search
exploiting one family of models) can make the cross-validated residuals smaller than that (on
the real digits curves it changes no sigma near the top).  ``spread="local"`` (no floor) and
``"global"`` (the paper's: one sigma per checkpoint) remain for the benchmark.
"""

import bisect
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from metaqnn.early_stop.curves import Example, ModelInfo, features

REGRESSORS = ("nu_svr", "nu_svr_linear", "random_forest", "ols")
TARGETS = ("gain", "final")  # what the regressors learn: final - best seen so far, or the final accuracy
SPREADS = ("floored", "local", "global")  # sigma from the residuals of the nearest predictions (floored), or of all
LOCAL_FRACTION = 0.2  # local sigma: the nearest fifth of the training models ...
LOCAL_MIN = 10  # ... and at least ten
MIN_SIGMA = 1e-3  # a perfect cross-validation on few models must not claim certainty


def make_regressor(name: str, seed: int = 0) -> Any:
    """A fresh scikit-learn pipeline (features standardised) for one of :data:`REGRESSORS`."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import NuSVR

    if name == "nu_svr":
        model: Any = NuSVR(kernel="rbf", nu=0.5, C=1.0, gamma="scale")
    elif name == "nu_svr_linear":
        model = NuSVR(kernel="linear", nu=0.5, C=1.0)
    elif name == "random_forest":
        model = RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=seed, n_jobs=1)
    elif name == "ols":
        model = LinearRegression()
    else:
        raise ValueError(f"unknown regressor {name!r}; known: {', '.join(REGRESSORS)}")
    return make_pipeline(StandardScaler(), model)


@dataclass(frozen=True)
class CheckpointModel:
    """The regressor for one checkpoint and the standard deviation of its held-out residuals.

    ``sigma`` is the RMS of all of them; with ``neighbours`` > 0 :meth:`spread` is the RMS of the
    residuals of the ``neighbours`` training models whose held-out predictions (``cv_means``,
    sorted) lie nearest the prediction asked about, and with ``cv_noise`` (their measurement
    noise, in the same order) never below the RMS of their noise.
    """

    epoch: int
    estimator: Any
    sigma: float
    trained_on: int
    cv_means: Tuple[float, ...] = ()
    cv_residuals: Tuple[float, ...] = ()
    neighbours: int = 0
    cv_noise: Tuple[float, ...] = ()

    def spread(self, mean: float) -> float:
        k = min(self.neighbours, len(self.cv_means))
        if k <= 0:
            return self.sigma
        # the k nearest of the sorted held-out predictions form one window; widen it to the nearer side
        lo = hi = bisect.bisect_left(self.cv_means, mean)
        while hi - lo < k:
            if lo > 0 and (hi >= len(self.cv_means) or mean - self.cv_means[lo - 1] <= self.cv_means[hi] - mean):
                lo -= 1
            else:
                hi += 1
        spread = math.sqrt(math.fsum(r * r for r in self.cv_residuals[lo:hi]) / k)
        if self.cv_noise:
            spread = max(spread, math.sqrt(math.fsum(n * n for n in self.cv_noise[lo:hi]) / k))
        return max(MIN_SIGMA, spread)


def measurement_noise(curve: Sequence[float], last: int = 10) -> float:
    """The standard deviation of one accuracy measurement, from the epoch-to-epoch changes of the
    curve's last ``last`` epochs (a plateau: each change is the difference of two noises)."""
    tail = list(curve[-last:])
    if len(tail) < 2:
        return 0.0
    return math.sqrt(math.fsum((b - a) ** 2 for a, b in zip(tail, tail[1:])) / (2 * (len(tail) - 1)))


@dataclass(frozen=True)
class Predictor:
    models: Dict[int, CheckpointModel]
    regressor: str
    target: str = "gain"

    def predict(self, prefix: Sequence[float], info: ModelInfo) -> Tuple[float, float]:
        """(mean, sigma) of the final accuracy of a model whose curve so far is ``prefix``."""
        cp = self.models[len(prefix)]
        mean = float(cp.estimator.predict([features(prefix, info)])[0]) + _offset(prefix, self.target)
        return mean, cp.spread(mean)


def _offset(prefix: Sequence[float], target: str) -> float:
    return max(prefix) if target == "gain" else 0.0


def design(examples: Sequence[Example], epoch: int, target: str = "gain") -> Tuple[List[List[float]], List[float]]:
    return (
        [features(e.curve[:epoch], e.info) for e in examples],
        [e.final - _offset(e.curve[:epoch], target) for e in examples],
    )


def cv_predictions(xs: List[List[float]], ys: List[float], regressor: str, folds: int, seed: int) -> List[float]:
    """Each example's prediction by the regressor fitted on the other folds of a seeded k-fold split."""
    import numpy as np
    from sklearn.model_selection import KFold

    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    out = np.zeros(len(ys))
    k = min(folds, len(ys))
    for train, test in KFold(n_splits=k, shuffle=True, random_state=seed).split(x):
        out[test] = make_regressor(regressor, seed).fit(x[train], y[train]).predict(x[test])
    return [float(v) for v in out]


def cv_residuals(xs: List[List[float]], ys: List[float], regressor: str, folds: int, seed: int) -> List[float]:
    """Held-out residuals (true - predicted) of a k-fold split in a seeded order, in input order."""
    return [y - p for y, p in zip(ys, cv_predictions(xs, ys, regressor, folds, seed))]


def fit_predictor(
    examples: Sequence[Example],
    checkpoints: Sequence[int],
    regressor: str = "nu_svr",
    folds: int = 5,
    seed: int = 0,
    target: str = "gain",
    spread: str = "floored",
) -> Predictor:
    """One regressor per checkpoint, fitted on every example; sigma from ``folds``-fold residuals."""
    import numpy as np

    if len(examples) < 2:
        raise ValueError("a predictor needs at least two fully trained models")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    if spread not in SPREADS:
        raise ValueError(f"unknown spread {spread!r}; known: {', '.join(SPREADS)}")
    neighbours = max(LOCAL_MIN, math.ceil(LOCAL_FRACTION * len(examples))) if spread != "global" else 0
    noise = [measurement_noise(e.curve) for e in examples] if spread == "floored" else []
    models: Dict[int, CheckpointModel] = {}
    for epoch in checkpoints:
        xs, ys = design(examples, epoch, target)
        held_out = cv_predictions(xs, ys, regressor, folds, seed)
        finals = [e.final for e in examples]
        means = [p + (f - y) for p, f, y in zip(held_out, finals, ys)]  # back from the target to the final
        residuals = [f - m for f, m in zip(finals, means)]
        sigma = max(MIN_SIGMA, math.sqrt(math.fsum(r * r for r in residuals) / len(residuals)))
        order = sorted(range(len(means)), key=lambda i: means[i])
        est = make_regressor(regressor, seed).fit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
        models[epoch] = CheckpointModel(
            epoch,
            est,
            sigma,
            len(examples),
            tuple(means[i] for i in order),
            tuple(residuals[i] for i in order),
            neighbours,
            tuple(noise[i] for i in order) if noise else (),
        )
    return Predictor(models, regressor, target)
