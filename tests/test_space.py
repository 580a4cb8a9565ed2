import random

import pytest
from conftest import TABLE_A2, TABLE_A3, TABLE_A4

from metaqnn.config import build_config
from qagent.arch import FC, GAP, Conv, Pool, Softmax, format_architecture, parse_architecture
from qagent.errors import ConfigError, InvalidArchitectureError
from qagent.qlearning import QTable, sample_trajectory
from qagent.space import (
    CONV,
    FCL,
    POOL,
    SpaceConfig,
    State,
    actions,
    architecture_of,
    conv_output,
    pool_output,
    start,
    trajectory_of,
    transition,
)

SVHN = build_config("svhn").space
CIFAR = build_config("cifar10").space
MNIST = build_config("mnist").space


def kinds(acts):
    out = {"conv": 0, "pool": 0, "fc": 0, "gap": 0, "sm": 0}
    for a in acts:
        key = {Conv: "conv", Pool: "pool", FC: "fc", GAP: "gap", Softmax: "sm"}[type(a)]
        out[key] += 1
    return out


# Hand-counted from Table 1: conv f in {1,3,5} x d in {64,128,256,512}; pools (5,3),(3,2),(2,2);
# FC {512,256,128} only from bins (8,4] and (4,1]; receptive field <= the bin's size.
@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (State("start", 0, rsize=8), {"conv": 12, "pool": 3, "fc": 0, "gap": 1, "sm": 1}),
        (State(CONV, 1, 64, 3, 1, 0, 8), {"conv": 12, "pool": 3, "fc": 0, "gap": 1, "sm": 1}),
        (State(CONV, 1, 64, 3, 1, 0, 4), {"conv": 8, "pool": 2, "fc": 3, "gap": 1, "sm": 1}),
        (State(CONV, 1, 64, 3, 1, 0, 1), {"conv": 4, "pool": 0, "fc": 3, "gap": 1, "sm": 1}),
        (State(POOL, 2, 0, 2, 2, 0, 8), {"conv": 12, "pool": 0, "fc": 0, "gap": 1, "sm": 1}),
        (State(POOL, 2, 0, 2, 2, 0, 4), {"conv": 8, "pool": 0, "fc": 3, "gap": 1, "sm": 1}),
        (State(POOL, 2, 0, 2, 2, 0, 1), {"conv": 4, "pool": 0, "fc": 3, "gap": 1, "sm": 1}),
        (State(FCL, 3, 512, 0, 0, 1, 1), {"conv": 0, "pool": 0, "fc": 3, "gap": 0, "sm": 1}),
        (State(FCL, 3, 256, 0, 0, 1, 1), {"conv": 0, "pool": 0, "fc": 2, "gap": 0, "sm": 1}),
        (State(FCL, 4, 512, 0, 0, 2, 1), {"conv": 0, "pool": 0, "fc": 0, "gap": 0, "sm": 1}),
        (State(CONV, 12, 64, 3, 1, 0, 4), {"conv": 0, "pool": 0, "fc": 0, "gap": 1, "sm": 1}),
        (State(FCL, 12, 128, 0, 0, 1, 1), {"conv": 0, "pool": 0, "fc": 0, "gap": 0, "sm": 1}),
    ],
)
def test_table1_action_counts(state, expected):
    assert kinds(actions(SVHN, state)) == expected


def test_start_state_and_depths():
    s, n = start(SVHN)
    assert (s.kind, s.depth, s.rsize, n) == ("start", 0, 8, 32)
    assert SVHN.max_depth == 12 and CIFAR.max_depth == 18 and MNIST.max_depth == 15


def test_caffe_size_arithmetic():
    assert conv_output(32, 5, 1) == 32 and conv_output(32, 1, 1) == 32
    assert conv_output(28, 4, 1) == 29  # even kernels with pad f//2 grow by one, as Caffe computes
    assert conv_output(26, 5, 3) == 9
    assert pool_output(32, 3, 2) == 16 and pool_output(32, 5, 3) == 10
    assert pool_output(7, 2, 2) == 4  # Caffe 1.0 rounds pooling up (floor would give 3)
    assert pool_output(10, 3, 2) == 5


def test_pooling_can_land_in_different_bins():
    """Appendix B: the same binned state and action, different true sizes, different next states."""
    s = State(CONV, 3, 64, 3, 1, 0, 8)
    a = Pool(2, 2)
    big, _ = transition(SVHN, s, a, 16)
    small, _ = transition(SVHN, s, a, 10)
    assert big.rsize == 8 and small.rsize == 4 and big != small


def _independent_check(space, layers):
    """The Section 4.2 constraints, re-derived here without qagent.space.reject_reason."""
    n, prev, n_fc, depth = space.image_size, None, 0, 0
    hidden = [x for x in layers if isinstance(x, (Conv, Pool, FC))]
    assert len(hidden) <= space.max_depth
    assert isinstance(layers[-1], Softmax) and layers[-1].classes == space.num_classes
    for layer in layers[:-1]:
        binned = space.bin(n)
        if isinstance(layer, GAP):
            assert not isinstance(prev, FC)
            continue
        depth += 1
        if isinstance(prev, FC):
            assert isinstance(layer, FC)
        if isinstance(layer, Conv):
            assert layer.size <= binned and layer.filters in space.conv_filters and layer.stride == 1
            n = conv_output(n, layer.size, layer.stride)
        elif isinstance(layer, Pool):
            assert not isinstance(prev, Pool)
            assert (layer.size, layer.stride) in space.pool_pairs and layer.size <= binned
            n = pool_output(n, layer.size, layer.stride)
        else:
            n_fc = n_fc + 1 if isinstance(prev, FC) else 1
            assert n_fc <= space.max_consecutive_fc
            if isinstance(prev, FC):
                assert layer.units <= prev.units
            else:
                assert binned < 8
            n = 1
        prev = layer


@pytest.mark.parametrize("space", [SVHN, CIFAR], ids=["svhn", "cifar10"])
def test_thousands_of_sampled_architectures_obey_every_constraint(space):
    rng = random.Random(7)
    table = QTable(space)
    for i in range(3000):
        for row in table.values:  # random Q-values so greedy steps explore too
            for j in range(len(row)):
                row[j] = rng.random()
        steps, _ = sample_trajectory(table, [1.0, 0.5, 0.1][i % 3], rng)
        layers = architecture_of(space, steps)
        _independent_check(space, layers)
        assert trajectory_of(space, layers) == steps


@pytest.mark.parametrize(
    ("space", "table"),
    [(CIFAR, TABLE_A2), (SVHN, TABLE_A3), (MNIST, TABLE_A4)],
    ids=["A2-cifar10", "A3-svhn", "A4-mnist"],
)
def test_paper_top_models_are_valid_trajectories(space, table):
    for text, _params in table:
        layers = parse_architecture(text)
        steps = trajectory_of(space, layers)
        assert format_architecture(architecture_of(space, steps)) == text


def test_invalid_architectures_say_why():
    with pytest.raises(InvalidArchitectureError, match="no pooling directly after pooling"):
        trajectory_of(SVHN, parse_architecture("[C(64,3,1), P(2,2), P(2,2), SM(10)]"))
    with pytest.raises(InvalidArchitectureError, match="FC only from representation size"):
        trajectory_of(SVHN, parse_architecture("[C(64,3,1), FC(512), SM(10)]"))
    with pytest.raises(InvalidArchitectureError, match="sizes must not grow"):
        trajectory_of(SVHN, parse_architecture("[C(64,3,1), P(5,3), C(64,3,1), P(2,2), FC(128), FC(256), SM(10)]"))
    with pytest.raises(InvalidArchitectureError, match="maximum depth"):
        trajectory_of(SVHN, parse_architecture("[" + ", ".join(["C(64,3,1)"] * 13) + ", SM(10)]"))
    with pytest.raises(InvalidArchitectureError, match="exceeds the representation size"):
        trajectory_of(SVHN, parse_architecture("[P(5,3), C(64,3,1), P(5,3), C(64,5,1), SM(10)]"))


def test_config_is_validated_when_built():
    with pytest.raises(ConfigError, match="max_depth must be a positive integer"):
        SpaceConfig(image_size=32, num_classes=10, max_depth=0, conv_filters=(64,), conv_sizes=(3,))
    with pytest.raises(ConfigError, match="rsize_bins"):
        SpaceConfig(
            image_size=32, num_classes=10, max_depth=3, conv_filters=(64,), conv_sizes=(3,), rsize_bins=(4, 8, 1)
        )
    with pytest.raises(ConfigError, match="unknown key"):
        build_config("svhn", ["space.max_dept=3"])
    with pytest.raises(ConfigError, match="unknown dataset/preset"):
        build_config("imagenet")
    assert build_config("svhn", ["space.max_depth=8"]).space.max_depth == 8


AUTHORS_CODE = [  # the authors' values for the four settings where their code and the paper differ
    "space.allow_initial_pool=false",
    "space.strict_receptive_field=true",
    "space.pool_arithmetic='authors'",
    "space.only_softmax_at_max_depth=true",
]
SVHN_CODE = build_config("svhn", AUTHORS_CODE).space


# Hand-counted as the SVHN cases above: the start offers 12 convs + 3 pools + GAP + SM = 17, the code
# 14 (no pooling); after a conv at bin 1 convs f = 1 <= 1 are 4 of the 9, gone under f < R (5); at the
# maximum depth GAP and SM, the code only SM; bins 8 and 4 hold no f equal to the bin, so no change.
@pytest.mark.parametrize(
    ("state", "ours", "theirs"),
    [
        (State("start", 0, rsize=8), 17, {"conv": 12, "pool": 0, "fc": 0, "gap": 1, "sm": 1}),
        (State(CONV, 1, 64, 3, 1, 0, 1), 9, {"conv": 0, "pool": 0, "fc": 3, "gap": 1, "sm": 1}),
        (State(POOL, 2, 0, 2, 2, 0, 1), 9, {"conv": 0, "pool": 0, "fc": 3, "gap": 1, "sm": 1}),
        (State(CONV, 1, 64, 3, 1, 0, 4), 15, {"conv": 8, "pool": 2, "fc": 3, "gap": 1, "sm": 1}),
        (State(CONV, 1, 64, 3, 1, 0, 8), 17, {"conv": 12, "pool": 3, "fc": 0, "gap": 1, "sm": 1}),
        (State(CONV, 12, 64, 3, 1, 0, 4), 2, {"conv": 0, "pool": 0, "fc": 0, "gap": 0, "sm": 1}),
    ],
)
def test_the_authors_code_settings_action_counts(state, ours, theirs):
    assert len(actions(SVHN, state)) == ours
    assert kinds(actions(SVHN_CODE, state)) == theirs


def test_the_authors_pooling_arithmetic_moves_bins():
    """P(3,2) on 16: Caffe ceil(13/2)+1 = 8 (bin 8); the authors' agent ceil(14/2) = 7 (bin 4)."""
    s = State(CONV, 3, 64, 3, 1, 0, 8)
    ours, n_ours = transition(SVHN, s, Pool(3, 2), 16)
    theirs, n_theirs = transition(SVHN_CODE, s, Pool(3, 2), 16)
    assert (n_ours, ours.rsize, n_theirs, theirs.rsize) == (8, 8, 7, 4)
    with pytest.raises(ConfigError, match="pool_arithmetic must be one of caffe, authors"):
        build_config("svhn", ["space.pool_arithmetic='floor'"])


def test_the_authors_code_settings_say_why():
    with pytest.raises(InvalidArchitectureError, match="no pooling as the first layer"):
        trajectory_of(SVHN_CODE, parse_architecture("[P(2,2), C(64,3,1), SM(10)]"))
    with pytest.raises(InvalidArchitectureError, match="must be smaller than the representation size 1"):
        trajectory_of(SVHN_CODE, parse_architecture("[C(64,3,1), P(5,3), C(64,3,1), P(5,3), C(64,1,1), SM(10)]"))
    deep = "[" + ", ".join(["C(64,3,1)"] * 12) + ", GAP, SM(10)]"
    assert len(trajectory_of(SVHN, parse_architecture(deep))) == 13
    with pytest.raises(InvalidArchitectureError, match="only SM is allowed"):
        trajectory_of(SVHN_CODE, parse_architecture(deep))
