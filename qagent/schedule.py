"""The epsilon schedule of Table 2 as a small typed object.

The position in the schedule is never stored: it is derived from how many
*unique* models were trained at each epsilon (as the authors' code did), so a
resumed search cannot disagree with its own history.
"""

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

from qagent.errors import ConfigError

PAPER_SCHEDULE: Tuple[Tuple[float, int], ...] = (
    (1.0, 1500),
    (0.9, 100),
    (0.8, 100),
    (0.7, 100),
    (0.6, 150),
    (0.5, 150),
    (0.4, 150),
    (0.3, 150),
    (0.2, 150),
    (0.1, 150),
)


@dataclass(frozen=True)
class EpsilonSchedule:
    """Ordered (epsilon, unique models to train at it) pairs."""

    steps: Tuple[Tuple[float, int], ...] = PAPER_SCHEDULE

    def __post_init__(self) -> None:
        try:
            steps = tuple((float(e), int(n)) for e, n in self.steps)
        except (TypeError, ValueError):
            raise ConfigError(f"schedule must be a list of [epsilon, models] pairs, got {self.steps!r}") from None
        if not steps:
            raise ConfigError("schedule must not be empty")
        for eps, n in steps:
            if not 0.0 <= eps <= 1.0:
                raise ConfigError(f"schedule epsilon must be in [0, 1], got {eps}")
            if n < 0:
                raise ConfigError(f"schedule model counts must be >= 0, got {n}")
        if len({e for e, _ in steps}) != len(steps):
            raise ConfigError("schedule epsilons must be distinct (counts are kept per epsilon)")
        object.__setattr__(self, "steps", steps)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Sequence[float]]) -> "EpsilonSchedule":
        return cls(tuple((p[0], p[1]) for p in pairs))  # type: ignore[misc]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.steps)

    def current(self, trained_per_epsilon: Mapping[float, int]) -> Optional[float]:
        """The epsilon to sample at now, or None when the schedule is complete."""
        for eps, n in self.steps:
            if trained_per_epsilon.get(eps, 0) < n:
                return eps
        return None
