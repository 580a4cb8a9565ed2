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
every good model, so shrinking it costs little (bench/bench_early_stop.py quality: nu_svr's
held-out R^2 on the real digits curves rises from about 0.5 to 0.99 at tau = 5).  The target
``final`` (the paper's) remains for the benchmark.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from metaqnn.early_stop.curves import Example, ModelInfo, features

REGRESSORS = ("nu_svr", "nu_svr_linear", "random_forest", "ols")
TARGETS = ("gain", "final")  # what the regressors learn: final - best seen so far, or the final accuracy
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
    """The regressor for one checkpoint and the standard deviation of its held-out residuals."""

    epoch: int
    estimator: Any
    sigma: float
    trained_on: int


@dataclass(frozen=True)
class Predictor:
    models: Dict[int, CheckpointModel]
    regressor: str
    target: str = "gain"

    def predict(self, prefix: Sequence[float], info: ModelInfo) -> Tuple[float, float]:
        """(mean, sigma) of the final accuracy of a model whose curve so far is ``prefix``."""
        cp = self.models[len(prefix)]
        mean = float(cp.estimator.predict([features(prefix, info)])[0])
        return mean + _offset(prefix, self.target), cp.sigma


def _offset(prefix: Sequence[float], target: str) -> float:
    return max(prefix) if target == "gain" else 0.0


def design(examples: Sequence[Example], epoch: int, target: str = "gain") -> Tuple[List[List[float]], List[float]]:
    return (
        [features(e.curve[:epoch], e.info) for e in examples],
        [e.final - _offset(e.curve[:epoch], target) for e in examples],
    )


def cv_residuals(xs: List[List[float]], ys: List[float], regressor: str, folds: int, seed: int) -> List[float]:
    """Held-out residuals (true - predicted) of a k-fold split in a seeded order."""
    import numpy as np
    from sklearn.model_selection import KFold

    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    out: List[float] = []
    k = min(folds, len(ys))
    for train, test in KFold(n_splits=k, shuffle=True, random_state=seed).split(x):
        est = make_regressor(regressor, seed).fit(x[train], y[train])
        out.extend((y[test] - est.predict(x[test])).tolist())
    return out


def fit_predictor(
    examples: Sequence[Example],
    checkpoints: Sequence[int],
    regressor: str = "nu_svr",
    folds: int = 5,
    seed: int = 0,
    target: str = "gain",
) -> Predictor:
    """One regressor per checkpoint, fitted on every example; sigma from ``folds``-fold residuals."""
    import numpy as np

    if len(examples) < 2:
        raise ValueError("a predictor needs at least two fully trained models")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    models: Dict[int, CheckpointModel] = {}
    for epoch in checkpoints:
        xs, ys = design(examples, epoch, target)
        residuals = cv_residuals(xs, ys, regressor, folds, seed)
        sigma = max(MIN_SIGMA, float(np.sqrt(np.mean(np.square(residuals)))))
        est = make_regressor(regressor, seed).fit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
        models[epoch] = CheckpointModel(epoch, est, sigma, len(examples))
    return Predictor(models, regressor, target)
