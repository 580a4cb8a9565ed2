"""When to stop a model early, and the reward it gets then.

:class:`PredictorRule` is the follow-up paper's rule: at a checkpoint epoch tau, stop when the
probability that the model's final accuracy beats the best accuracy measured so far (or the
k-th best) is below ``1 - delta``; the reward is the predicted final accuracy, never less than
what the model already reached.  :class:`MedianRule` is the baseline users of Ray Tune or
Vizier would pick: stop when the model's best accuracy at tau is below the median of the
completed models' best accuracies at tau; the reward is the best accuracy seen.

A rule is a small frozen object built by the search from the store before a launch and sent
with the training job (it pickles, for the process pool and Ray); ``decide`` is a pure
function of the curve so far, so a training resumed after kill -9 reaches the same decision.
"""

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

from metaqnn.early_stop.curves import Example, ModelInfo
from metaqnn.early_stop.predictor import REGRESSORS, Predictor, fit_predictor
from qagent.errors import ConfigError, quote

RULES = ("off", "svr", "median")


@dataclass(frozen=True)
class EarlyStopConfig:
    """The ``[early_stop]`` section: off by default, so the paper's protocol is the default."""

    rule: str = "off"  # off | svr (the follow-up paper's predictor) | median (the median stopping rule)
    regressor: str = "nu_svr"  # the predictor's model (svr rule): nu_svr | nu_svr_linear | random_forest | ols
    delta: float = 0.99  # stop when P(final beats the target) < 1 - delta; 1 never stops
    checkpoints: Tuple[int, ...] = (2, 5, 10)  # epochs (1 = the probe) at which a model may be stopped
    warmup: int = 25  # fully trained models before any model is stopped
    kth_best: int = 1  # the target: the k-th best accuracy measured so far
    cv_folds: int = 5  # folds of the cross-validated residuals (the predictor's uncertainty)
    refit_growth: float = 0.1  # refit when the fully trained models grew by this fraction (at least one)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"early_stop.rule must be one of {', '.join(RULES)}, got {quote(self.rule)}")
        if self.regressor not in REGRESSORS:
            raise ConfigError(
                f"early_stop.regressor must be one of {', '.join(REGRESSORS)}, got {quote(self.regressor)}"
            )
        if not 0.0 < self.delta <= 1.0:
            raise ConfigError(f"early_stop.delta must be in (0, 1], got {self.delta}")
        if not self.checkpoints:
            raise ConfigError("early_stop.checkpoints must name at least one epoch")
        if any(c < 1 for c in self.checkpoints) or list(self.checkpoints) != sorted(set(self.checkpoints)):
            raise ConfigError(f"early_stop.checkpoints must be increasing epochs >= 1, got {list(self.checkpoints)}")
        if self.cv_folds < 2:
            raise ConfigError(f"early_stop.cv_folds must be >= 2, got {self.cv_folds}")
        if self.warmup < max(3, self.cv_folds):
            raise ConfigError(
                f"early_stop.warmup must be >= max(3, early_stop.cv_folds = {self.cv_folds}), got {self.warmup}"
            )
        if self.kth_best < 1:
            raise ConfigError(f"early_stop.kth_best must be >= 1, got {self.kth_best}")
        if self.refit_growth < 0:
            raise ConfigError(f"early_stop.refit_growth must be >= 0, got {self.refit_growth}")

    @property
    def enabled(self) -> bool:
        return self.rule != "off"

    def check_epochs(self, epochs: int) -> None:
        """Every checkpoint must leave training to save: called with the search protocol's epochs."""
        if self.enabled and self.checkpoints[-1] >= epochs:
            raise ConfigError(
                f"early_stop.checkpoints must be below the protocol's {epochs} epochs, got {list(self.checkpoints)}"
            )


class StopDecision(NamedTuple):
    epoch: int  # the checkpoint at which the model was stopped
    predicted: float  # its reward: the predicted final accuracy (median rule: the best seen)
    probability: Optional[float]  # P(final beats the target) under the predictor (None: median rule)
    target: float  # the accuracy it had to be able to beat
    rule: str


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class PredictorRule:
    predictor: Predictor
    target: float
    delta: float
    checkpoints: Tuple[int, ...]
    name: str = "svr"

    def decide(self, curve: Sequence[float], info: ModelInfo) -> Optional[StopDecision]:
        """The first checkpoint reached by ``curve`` at which the model is stopped, or None."""
        for epoch in self.checkpoints:
            if epoch > len(curve) or epoch not in self.predictor.models:
                break
            mean, sigma = self.predictor.predict(curve[:epoch], info)
            predicted = max(mean, max(curve[:epoch]))
            probability = _normal_sf((self.target - predicted) / sigma)
            if probability < 1.0 - self.delta:
                # the reward is an accuracy: a regressor's mean may pass 1 (a small delta stops such models)
                return StopDecision(epoch, min(1.0, predicted), probability, self.target, self.name)
        return None


@dataclass(frozen=True)
class MedianRule:
    medians: Dict[int, float] = field(default_factory=dict)  # checkpoint -> median best-so-far
    name: str = "median"

    def decide(self, curve: Sequence[float], info: ModelInfo) -> Optional[StopDecision]:
        for epoch in sorted(self.medians):
            if epoch > len(curve):
                break
            seen = max(curve[:epoch])
            if seen < self.medians[epoch]:
                return StopDecision(epoch, seen, None, self.medians[epoch], self.name)
        return None


StopRule = Union[PredictorRule, MedianRule]


def fit_sizes(warmup: int, growth: float, available: int) -> int:
    """How many of the first fully trained models the predictor is fitted on (0: still warming up).

    The refit points are warmup, then each grown by ``growth`` (at least one): a pure function
    of how many models are available, so a resumed search refits exactly where it would have.
    """
    if available < warmup:
        return 0
    size = warmup
    while True:
        nxt = max(size + 1, math.ceil(size * (1.0 + growth)))
        if nxt > available:
            return size
        size = nxt


def kth_best(measured: Sequence[float], k: int) -> Optional[float]:
    ranked = sorted(measured, reverse=True)
    return ranked[k - 1] if len(ranked) >= k else None


class PredictorCache:
    """Fitted predictors by the examples they were fitted on: a search refits only at refit points."""

    def __init__(self) -> None:
        self._fits: Dict[Tuple[int, ...], Predictor] = {}

    def get(self, key: Tuple[int, ...], fit: Callable[[], Predictor]) -> Predictor:
        if key not in self._fits:
            self._fits = {key: fit()}  # only the newest fit is ever asked for again
        return self._fits[key]


def build_rule(
    config: EarlyStopConfig,
    examples: Sequence[Tuple[int, Example]],
    measured: Sequence[float],
    seed: int = 0,
    cache: Optional[PredictorCache] = None,
) -> Optional[StopRule]:
    """The rule for the next launch, from the fully trained models so far, or None (off, warming up).

    ``examples``: (model id, example) of the fully trained models in the order they finished;
    ``measured``: every measured reward (the target is their k-th best).
    """
    if not config.enabled:
        return None
    size = fit_sizes(config.warmup, config.refit_growth, len(examples))
    target = kth_best(measured, config.kth_best)
    if size == 0 or target is None:
        return None
    if config.rule == "median":
        medians = {cp: statistics.median(max(ex.curve[:cp]) for _, ex in examples) for cp in config.checkpoints}
        return MedianRule(medians)
    chosen = list(examples[:size])
    key = tuple(i for i, _ in chosen)

    def fit() -> Predictor:
        return fit_predictor([ex for _, ex in chosen], config.checkpoints, config.regressor, config.cv_folds, seed)

    predictor = cache.get(key, fit) if cache is not None else fit()
    return PredictorRule(predictor, target, config.delta, tuple(config.checkpoints))


def describe(decision: StopDecision) -> str:
    """One line for logs and reports."""
    if decision.probability is None:
        return (
            f"stopped at epoch {decision.epoch}: best {decision.predicted:.4f} below the median {decision.target:.4f}"
        )
    return (
        f"stopped at epoch {decision.epoch}: predicted {decision.predicted:.4f}, "
        f"P(beats {decision.target:.4f}) = {decision.probability:.3g}"
    )
