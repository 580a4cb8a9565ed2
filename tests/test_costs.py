"""Issue 22, the pure part: what a net costs, and the budget barrier in the agent's walk.

The barrier must never let an over-budget architecture through and never leave a walk with no
action (a dead end), whatever the Q-values and epsilon; checked over thousands of sampled paths
and, on a small space, against every architecture the space holds."""

import random
from typing import List, Set

import pytest
from conftest import TABLE_A2, TABLE_A3

from metaqnn.config import build_config
from metaqnn.netspec import build_net
from qagent.arch import format_architecture, parse_architecture
from qagent.costs import Barrier, Budget, Cost, arch_cost
from qagent.qlearning import QTable, sample_trajectory
from qagent.space import TERM, actions, architecture_of, start, transition


def macs_by_hand(arch: str, size: int, channels: int, classes: int) -> int:
    """Multiply-accumulates layer by layer, written out independently of qagent.costs."""
    from qagent.arch import FC, GAP, Conv, Pool, Softmax
    from qagent.space import conv_output, pool_output

    total, n, d, flat = 0, size, channels, False
    for layer in parse_architecture(arch):
        if isinstance(layer, Conv):
            n = conv_output(n, layer.size, layer.stride)
            total += n * n * layer.filters * d * layer.size**2
            d = layer.filters
        elif isinstance(layer, Pool):
            n = pool_output(n, layer.size, layer.stride)
        elif isinstance(layer, GAP):
            total += n * n * classes * d + classes * classes
            break
        elif isinstance(layer, (FC, Softmax)):
            units = layer.units if isinstance(layer, FC) else layer.classes
            total += units * (d if flat else d * n * n)
            d, flat = units, True
    return total


@pytest.mark.parametrize(
    "arch, size, channels",
    [(a, 32, 3) for a, _ in TABLE_A2]
    + [(a, 32, 3) for a, _ in TABLE_A3]
    + [("[C(16,3,1), P(2,2), GAP, SM(10)]", 8, 1)],
)
def test_costs_are_the_rendered_nets(arch, size, channels):
    layers = parse_architecture(arch)
    net = build_net(layers, image_size=size, channels=channels, num_classes=10, train_source="a", test_source="b")
    cost = arch_cost(layers, size, channels, 10)
    assert cost == Cost(net.param_count, macs_by_hand(arch, size, channels, 10))


def test_table_a2_best_network_macs():
    """The Table 5 source: 11.31M parameters and 4.30 G multiply-accumulates per 32x32 image."""
    cost = arch_cost(parse_architecture(TABLE_A2[0][0]), 32, 3, 10)
    assert cost == Cost(11_309_834, 4_302_435_328)


def walks(preset: str, budget: Budget, n: int, seed: int = 0) -> List[str]:
    """n walks at random epsilons over a Q-table with random values: greedy and random steps both barred."""
    cfg = build_config(preset)
    barrier = Barrier(cfg.space, cfg.dataset.channels, budget)
    table = QTable(cfg.space, 0.5)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps, _ = sample_trajectory(table, rng.choice([1.0, 0.5, 0.1, 0.0]), rng, barrier)
        out.append(format_architecture(architecture_of(cfg.space, steps)))
        for sid in rng.sample(range(len(table)), min(5, len(table))):  # shuffle the greedy choices
            table.values[sid] = [rng.random() for _ in table.values[sid]]
    return out


@pytest.mark.parametrize(
    "preset, budget",
    [
        ("digits", Budget(max_params=2_000)),
        ("digits", Budget(max_macs=20_000)),
        ("digits", Budget(max_params=5_000, max_macs=60_000)),
        ("cifar10", Budget(max_params=200_000)),
        ("cifar10", Budget(max_params=1_000_000, max_macs=20_000_000)),
    ],
)
def test_no_sampled_path_is_over_budget_and_none_is_a_dead_end(preset, budget):
    cfg = build_config(preset)
    archs = walks(preset, budget, 3000 if preset == "digits" else 1000)
    for arch in set(archs):
        assert budget.fits(arch_cost(parse_architecture(arch), cfg.space.image_size, cfg.dataset.channels, 10)), arch
    assert len(set(archs)) > 50  # the barrier bars, it does not collapse the space


def every_architecture(preset: str, max_depth: int) -> Set[str]:
    cfg = build_config(preset, [f"space.max_depth={max_depth}"])
    space = cfg.space
    found: Set[str] = set()

    def walk(state, n, steps):
        for action in actions(space, state):
            nxt, m = transition(space, state, action, n)
            if nxt.kind == TERM:
                found.add(format_architecture(architecture_of(space, [*steps, (state, action)])))
            else:
                walk(nxt, m, [*steps, (state, action)])

    walk(*start(space), [])
    return found


def test_the_barrier_allows_exactly_the_architectures_within_budget():
    """On a small space, by brute force: the barred walk can reach every within-budget net, and only those."""
    cfg = build_config("digits", ["space.max_depth=3"])
    budget = Budget(max_params=3_000, max_macs=40_000)
    barrier = Barrier(cfg.space, 1, budget)
    within = {a for a in every_architecture("digits", 3) if budget.fits(arch_cost(parse_architecture(a), 8, 1, 10))}
    reachable: Set[str] = set()

    def walk(position, spent, steps):
        allowed = barrier.allowed(position, spent)
        assert any(allowed), position  # never a dead end
        for ok, action in zip(allowed, actions(cfg.space, position[0])):
            if not ok:
                continue
            cost, after = barrier.step(position, action)
            path = [*steps, (position[0], action)]
            if after[0].kind == TERM:
                reachable.add(format_architecture(architecture_of(cfg.space, path)))
            else:
                walk(after, spent + cost, path)

    walk(barrier.start(), Cost(0, 0), [])
    assert reachable == within and 0 < len(within) < len(every_architecture("digits", 3))


def test_the_cheapest_net_of_a_space_is_known_before_a_search():
    cfg = build_config("cifar10")
    cheapest = Barrier(cfg.space, 3, Budget()).cheapest()
    assert min(c.params for c in cheapest) == 150  # GAP on the input: 10 x (3 + 1) + 10 x 11
    assert Barrier(cfg.space, 3, Budget(max_params=149)).cheapest() == ()
