"""What a net costs -- learnable parameters and multiply-accumulates of one forward pass at batch 1
-- and the budget barrier that keeps the agent's walk inside a budget (the paper's Section 7).

Costs follow the nets as rendered (metaqnn/netspec.py, Caffe's size arithmetic): a convolution
``f x (d k^2 + 1)`` parameters and ``n_out^2 f d k^2`` MACs; an InnerProduct ``u x (fan_in + 1)``
and ``u x fan_in``, fan_in = d n^2 from a map, d from an FC; the GAP block a 1x1 convolution to the
classes, then the classifier on the classes; pooling, ReLU and dropout cost nothing.  Biases add
parameters but no multiplies.

Params and MACs depend on the path, not only on the agent's state: a state does not know the
previous layer's filters nor Caffe's true map size.  :class:`Barrier` therefore walks with the
path's own (map size, depth, cost so far) and bars an action when no completion of the net
after it -- its cheapest termination included -- stays within every budget.  The completions'
costs are exact: the non-dominated (params, MACs) pairs of all the ways a configuration can
still end, computed once per configuration and memoised.
"""

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from qagent.arch import FC, GAP, Conv, Layer, Pool, Softmax
from qagent.space import (
    TERM,
    Action,
    SpaceConfig,
    State,
    actions,
    conv_output,
    pool_output,
    start,
    transition,
)


class Cost(NamedTuple):
    params: int
    macs: int

    def __add__(self, other: object) -> "Cost":
        assert isinstance(other, Cost)
        return Cost(self.params + other.params, self.macs + other.macs)


ZERO = Cost(0, 0)


class Shape(NamedTuple):
    """What the cost of the next layer depends on: Caffe's map size, the depth, whether flat (after an FC)."""

    size: int
    depth: int
    flat: bool


def layer_cost(layer: Layer, shape: Shape, num_classes: int) -> Tuple[Cost, Shape]:
    """The cost of one layer on ``shape`` and the shape after it (SM and GAP end the net)."""
    n, d, flat = shape
    fan_in = d if flat else d * n * n
    if isinstance(layer, Conv):
        out = conv_output(n, layer.size, layer.stride)
        k2 = layer.size * layer.size
        return Cost(layer.filters * (d * k2 + 1), out * out * layer.filters * d * k2), Shape(out, layer.filters, False)
    if isinstance(layer, Pool):
        return ZERO, Shape(pool_output(n, layer.size, layer.stride), d, False)
    if isinstance(layer, FC):
        return Cost(layer.units * (fan_in + 1), layer.units * fan_in), Shape(1, layer.units, True)
    if isinstance(layer, GAP):  # 1x1 conv to the classes, average pool, then the classifier on the classes
        k = num_classes
        return Cost(k * (d + 1) + k * (k + 1), n * n * k * d + k * k), Shape(1, k, True)
    if isinstance(layer, Softmax):
        return Cost(layer.classes * (fan_in + 1), layer.classes * fan_in), Shape(1, layer.classes, True)
    raise TypeError(f"unknown layer {layer!r}")


def arch_cost(layers: Sequence[Layer], image_size: int, channels: int, num_classes: int) -> Cost:
    """Params and MACs of a whole architecture (GAP, SM(k) is one termination: SM adds nothing after GAP)."""
    total, shape = ZERO, Shape(image_size, channels, False)
    ended = False
    for layer in layers:
        if ended:  # the SM(k) that follows GAP: its classifier was counted with the GAP block
            break
        cost, shape = layer_cost(layer, shape, num_classes)
        total = total + cost
        ended = isinstance(layer, GAP)
    return total


@dataclass(frozen=True)
class Budget:
    """Hard limits (None: no limit)."""

    max_params: Optional[int] = None
    max_macs: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.max_params is not None or self.max_macs is not None

    def fits(self, cost: Cost) -> bool:
        return (self.max_params is None or cost.params <= self.max_params) and (
            self.max_macs is None or cost.macs <= self.max_macs
        )


def _pareto(costs: List[Cost]) -> Tuple[Cost, ...]:
    """The non-dominated pairs (lower is better in both), sorted by params."""
    out: List[Cost] = []
    for c in sorted(set(costs)):
        if not out or c.macs < out[-1].macs:
            out.append(c)
    return tuple(out)


# A walk's position: the agent's state, its size estimate (the agent's own arithmetic), and Caffe's shape.
Position = Tuple[State, int, Shape]


@dataclass
class Barrier:
    """Bars the actions after which no completion fits the budget (see the module docstring)."""

    space: SpaceConfig
    channels: int
    budget: Budget
    _fronts: Dict[Position, Tuple[Cost, ...]] = field(default_factory=dict, repr=False)

    def start(self) -> Position:
        state, n = start(self.space)
        return state, n, Shape(self.space.image_size, self.channels, False)

    def step(self, position: Position, action: Action) -> Tuple[Cost, Position]:
        """The cost of ``action`` from ``position`` and where it leads (the agent's transition, Caffe's sizes)."""
        state, n, shape = position
        cost, after = layer_cost(action, shape, self.space.num_classes)
        next_state, next_n = transition(self.space, state, action, n)
        return cost, (next_state, next_n, after)

    def completions(self, position: Position) -> Tuple[Cost, ...]:
        """The non-dominated costs of every way the net can still end from ``position`` (memoised)."""
        found = self._fronts.get(position)
        if found is not None:
            return found
        state = position[0]
        costs: List[Cost] = []
        for action in actions(self.space, state):
            cost, after = self.step(position, action)
            if after[0].kind == TERM:
                costs.append(cost)
            else:
                costs.extend(cost + rest for rest in self.completions(after))
        # A completion over budget by itself can never be used (what is spent before it is >= 0).
        front = _pareto([c for c in costs if self.budget.fits(c)])
        self._fronts[position] = front
        return front

    def cheapest(self) -> Tuple[Cost, ...]:
        """The non-dominated costs of the whole space: the budget must admit one of them."""
        return self.completions(self.start())

    def allowed(self, position: Position, spent: Cost) -> List[bool]:
        """For each action of the position's state (in catalogue order): can the net still end within budget?"""
        out = []
        for action in actions(self.space, position[0]):
            cost, after = self.step(position, action)
            so_far = spent + cost
            ends = (ZERO,) if after[0].kind == TERM else self.completions(after)
            out.append(any(self.budget.fits(so_far + rest) for rest in ends))
        return out
