"""Early stopping by performance prediction (Baker, Gupta, Raskar & Naik, arXiv 1705.10823).

A search may stop a model at a few checkpoint epochs when it is unlikely to beat the best
model measured so far; its reward is then the predicted final accuracy.  The pieces are pure
(no Caffe, no store): :mod:`.curves` turns stored results into examples and features,
:mod:`.predictor` fits the sequential regressors, :mod:`.rules` decides.  The search builds a
rule from the store before each launch (:func:`.rules.build_rule`), so the predictor's training
set is the store itself and survives kill -9.
"""

from metaqnn.early_stop.curves import Example, ModelInfo, epoch_curve, epochs_trained, example_from_metrics, model_info
from metaqnn.early_stop.rules import (
    EarlyStopConfig,
    MedianRule,
    PredictorRule,
    StopDecision,
    StopRule,
    build_rule,
    fit_sizes,
)

__all__ = [
    "EarlyStopConfig",
    "Example",
    "MedianRule",
    "ModelInfo",
    "PredictorRule",
    "StopDecision",
    "StopRule",
    "build_rule",
    "epoch_curve",
    "epochs_trained",
    "example_from_metrics",
    "fit_sizes",
    "model_info",
]
