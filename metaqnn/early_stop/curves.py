"""Learning curves and model descriptions as the predictor sees them.

A stored result holds its validation curve as ``(iteration, accuracy)`` pairs, one test per
epoch (the first after epoch 1, the probe).  The predictor works per epoch: ``curve[0]`` is the
accuracy after epoch 1.  The features are those of the follow-up paper: the accuracies up to
the checkpoint with their first and second differences, the architecture (depth, layers of
each type, parameter count) and the hyperparameters the protocol chose (the learning rate
after restarts, the number of restarts).
"""

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from qagent.arch import FC, GAP, Conv, Layer, Pool, parse_architecture


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model before it trains: its architecture and protocol settings."""

    depth: int
    convs: int
    pools: int
    fcs: int
    gaps: int
    param_count: int
    learning_rate: float
    restarts: int

    def vector(self) -> List[float]:
        return [
            float(self.depth),
            float(self.convs),
            float(self.pools),
            float(self.fcs),
            float(self.gaps),
            math.log10(max(self.param_count, 1)),
            math.log10(self.learning_rate) if self.learning_rate > 0 else -12.0,
            float(self.restarts),
        ]


def model_info(layers: Sequence[Layer], param_count: int, learning_rate: float, restarts: int) -> ModelInfo:
    return ModelInfo(
        depth=len(layers),
        convs=sum(isinstance(x, Conv) for x in layers),
        pools=sum(isinstance(x, Pool) for x in layers),
        fcs=sum(isinstance(x, FC) for x in layers),
        gaps=sum(isinstance(x, GAP) for x in layers),
        param_count=int(param_count),
        learning_rate=float(learning_rate),
        restarts=int(restarts),
    )


def epoch_curve(points: Sequence[Sequence[float]], iters_per_epoch: Optional[int] = None) -> List[float]:
    """Per-epoch accuracies from ``(iteration, accuracy)`` tests, up to the first missing epoch.

    Without ``iters_per_epoch`` the first test's iteration is taken as one epoch (the protocol
    tests after every epoch and never at iteration 0).
    """
    pts = sorted((int(it), float(acc)) for it, acc in points)
    if not pts:
        return []
    ipe = iters_per_epoch or pts[0][0]
    if ipe <= 0:
        return []
    by_epoch = {it // ipe: acc for it, acc in pts if it % ipe == 0}
    out: List[float] = []
    while len(out) + 1 in by_epoch:
        out.append(by_epoch[len(out) + 1])
    return out


def features(prefix: Sequence[float], info: ModelInfo) -> List[float]:
    """The regressor's input at checkpoint ``len(prefix)``: accuracies, their differences, the model."""
    y = [float(v) for v in prefix]
    d1 = [b - a for a, b in zip(y, y[1:])]
    d2 = [b - a for a, b in zip(d1, d1[1:])]
    return y + d1 + d2 + info.vector()


@dataclass(frozen=True)
class Example:
    """A fully trained model: its curve (per epoch), what was known before training, its reward."""

    curve: Tuple[float, ...]
    info: ModelInfo
    final: float  # the reward: the best validation accuracy of the whole training


def example_from_metrics(arch: str, metrics: Mapping[str, Any], epochs: int) -> Optional[Example]:
    """A training example from a stored result, if it was trained (measured) for all ``epochs``."""
    curve = epoch_curve(metrics.get("curve") or [], metrics.get("iters_per_epoch"))
    best = metrics.get("best_accuracy")
    if len(curve) < epochs or best is None or metrics.get("failure"):
        return None
    info = model_info(
        parse_architecture(arch),
        int(metrics.get("param_count") or 0),
        float(metrics.get("learning_rate") or 0.0),
        int(metrics.get("restarts") or 0),
    )
    return Example(tuple(curve[:epochs]), info, float(best))


def epochs_trained(metrics: Mapping[str, Any]) -> float:
    """Training epochs a result cost, probes included: each probe is one epoch, then the full run.

    A result that records its own count (``epochs_trained``) is taken at its word; older records
    are counted from the restarts and the curve, which is exact for runs never interrupted.
    """
    recorded = metrics.get("epochs_trained")
    if recorded is not None:
        return float(recorded)
    probes = int(metrics.get("restarts") or 0) + 1
    measured = len(epoch_curve(metrics.get("curve") or [], metrics.get("iters_per_epoch")))
    return float(probes + max(0, measured - 1))
