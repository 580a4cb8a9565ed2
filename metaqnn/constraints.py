"""``[constraints]``: searching under a budget (the paper's Section 7), off unless asked.

Two mechanisms, as the paper's conclusion names them:

* **hard budgets in the state-action space** -- ``max_params`` and ``max_macs`` bar, during the
  agent's walk, every action after which the net can no longer end within budget
  (:class:`qagent.costs.Barrier`); ``max_latency_ms`` can only be checked once a net is rendered
  and timed by ``caffe time``, so an over-budget net is *rejected* before training
  (``ModelStatus.REJECTED``: rewarded with the failure reward, not a trained model);
* **a soft objective in the reward** -- ``reward = "mnas"``: accuracy x (cost / target)^w with
  w = ``alpha`` when cost <= target, else ``beta`` (MnasNet: alpha = beta = -0.07 soft; alpha = 0,
  beta = -1 hard).  The Q-table learns the shaped reward; the store keeps the accuracy beside it,
  and rankings use the accuracy unless asked for the reward.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from qagent.arch import Layer
from qagent.costs import Budget, arch_cost
from qagent.errors import ConfigError, quote

REWARDS = ("accuracy", "mnas")
COSTS = ("params", "macs", "latency")
LATENCY_DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class ConstraintsConfig:
    max_params: Optional[int] = None
    max_macs: Optional[int] = None
    max_latency_ms: Optional[float] = None
    reward: str = "accuracy"
    cost: str = "params"  # the cost of the mnas objective
    target: Optional[float] = None  # the mnas objective's target T, in the cost's unit
    alpha: float = -0.07
    beta: float = -0.07
    # Latency: `caffe time` on the rendered deploy net (metaqnn/latency.py), measured on the
    # machine that trains the model; "gpu" needs a search that trains on GPUs.
    measure_latency: bool = False  # measure and keep it even when no budget or reward needs it
    latency_device: str = "cpu"
    latency_batch: int = 1
    latency_iterations: int = 20
    latency_warmup: int = 5

    def __post_init__(self) -> None:
        for name in ("max_params", "max_macs", "max_latency_ms", "target"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f'constraints.{name} must be a positive number or "unlimited", got {value}')
        if self.reward not in REWARDS:
            raise ConfigError(f"constraints.reward must be one of {', '.join(REWARDS)}, got {quote(self.reward)}")
        if self.cost not in COSTS:
            raise ConfigError(f"constraints.cost must be one of {', '.join(COSTS)}, got {quote(self.cost)}")
        if self.reward == "mnas" and self.target is None:
            raise ConfigError(f'constraints.reward = "mnas" needs constraints.target (the target {self.cost})')
        if self.latency_device not in LATENCY_DEVICES:
            raise ConfigError(
                f"constraints.latency_device must be one of {', '.join(LATENCY_DEVICES)}, got {quote(self.latency_device)}"
            )
        if self.latency_batch < 1 or self.latency_iterations < 1 or self.latency_warmup < 0:
            raise ConfigError("constraints.latency_batch and latency_iterations must be >= 1, latency_warmup >= 0")

    @property
    def budget(self) -> Budget:
        return Budget(self.max_params, self.max_macs)

    @property
    def needs_latency(self) -> bool:
        """Whether each model is timed with `caffe time` before it trains."""
        return (
            self.measure_latency
            or self.max_latency_ms is not None
            or (self.reward == "mnas" and self.cost == "latency")
        )

    @property
    def active(self) -> bool:
        return self.budget.active or self.needs_latency or self.reward != "accuracy"

    def shaped(self, accuracy: float, cost: float) -> float:
        """The agent's reward for a net of this accuracy and cost (``reward = "mnas"``), else the accuracy."""
        if self.reward == "accuracy":
            return accuracy
        assert self.target is not None
        return mnas_reward(accuracy, cost, self.target, self.alpha, self.beta)


@dataclass(frozen=True)
class LatencyPlan:
    """How a trainer times its model before training it (shipped with the job, to Ray workers too)."""

    batch: int = 1
    iterations: int = 20
    warmup: int = 5
    on_gpu: bool = False
    max_ms: Optional[float] = None

    @classmethod
    def of(cls, config: ConstraintsConfig) -> Optional["LatencyPlan"]:
        if not config.needs_latency:
            return None
        return cls(
            config.latency_batch,
            config.latency_iterations,
            config.latency_warmup,
            config.latency_device == "gpu",
            config.max_latency_ms,
        )

    def settings(self) -> Dict[str, Any]:
        """What a measurement depends on: a cached one with other settings is measured again."""
        return {"batch": self.batch, "iterations": self.iterations, "warmup": self.warmup, "on_gpu": self.on_gpu}


@dataclass(frozen=True)
class Scorer:
    """What the search adds to each result: the net's costs, and the reward the agent learns from."""

    config: ConstraintsConfig
    image_size: int
    channels: int
    num_classes: int

    def costs(self, layers: Sequence[Layer]) -> Dict[str, int]:
        cost = arch_cost(layers, self.image_size, self.channels, self.num_classes)
        return {"params": cost.params, "macs": cost.macs}

    @property
    def shaping(self) -> bool:
        return self.config.reward != "accuracy"

    def reward(self, accuracy: float, metrics: Dict[str, Any]) -> float:
        """The shaped reward of an accuracy, from the costs in ``metrics`` (latency: its forward_ms)."""
        if not self.shaping:
            return accuracy
        if self.config.cost == "latency":
            latency = metrics.get("latency") or {}
            cost = float(latency["forward_ms"])
        else:
            cost = float(metrics[self.config.cost])
        return self.config.shaped(accuracy, cost)


def mnas_reward(accuracy: float, cost: float, target: float, alpha: float, beta: float) -> float:
    """MnasNet's ACC x (cost / T)^w, w = alpha if cost <= T else beta (Tan et al. 2019, Eq. 2)."""
    if cost <= 0 or target <= 0:
        raise ValueError(f"costs and targets are positive, got cost {cost}, target {target}")
    w = alpha if cost <= target else beta
    return accuracy * (cost / target) ** w
