"""The rule each launch gets, built from the search's own results (the store), not kept apart.

The examples are the fully trained models in the order their results were committed: read from
the store when a search starts or resumes, then appended as results arrive.  So a search killed
with -9 rebuilds exactly the predictor it had (refits happen at sizes that depend only on the
count of examples, :func:`metaqnn.early_stop.rules.fit_sizes`).
"""

from typing import Any, Callable, List, Mapping, Optional, Tuple

from metaqnn.early_stop.curves import Example, example_from_metrics
from metaqnn.early_stop.rules import EarlyStopConfig, PredictorCache, StopRule, build_rule, fit_sizes
from qagent.status import ModelStatus
from qagent.store import ExperimentStore


class RuleSource:
    def __init__(
        self, config: EarlyStopConfig, epochs: int, seed: int, log: Callable[[str], None] = lambda _m: None
    ) -> None:
        self.config, self.epochs, self.seed, self.log = config, epochs, seed, log
        self.examples: List[Tuple[int, Example]] = []
        self.measured: List[float] = []
        self.cache = PredictorCache()
        self._announced = 0

    def load(self, store: ExperimentStore) -> "RuleSource":
        if self.config.enabled:
            for row in store.in_finish_order(ModelStatus.DONE):
                self.observe(row.id, row.arch, row.metrics)
        return self

    def observe(self, model_id: int, arch: str, metrics: Mapping[str, Any]) -> None:
        """A measured (fully trained) result: a target candidate, and an example when its curve is whole."""
        if not self.config.enabled:
            return
        best = metrics.get("best_accuracy")
        if best is not None:
            self.measured.append(float(best))
        example = example_from_metrics(arch, metrics, self.epochs)
        if example is not None:
            self.examples.append((model_id, example))

    def rule(self) -> Optional[StopRule]:
        """The rule for the next launch (None: off, or still warming up)."""
        if not self.config.enabled:
            return None
        rule = build_rule(self.config, self.examples, self.measured, self.seed, self.cache)
        size = fit_sizes(self.config.warmup, self.config.refit_growth, len(self.examples))
        if rule is not None and size != self._announced:
            self._announced = size
            what = "predictor fitted on" if self.config.rule == "svr" else "medians of"
            self.log(f"early stopping ({self.config.rule}): {what} {size} fully trained models")
        return rule
