import random
from collections import Counter

import pytest

from metaqnn.config import build_config
from qagent.agent import Agent, AgentConfig
from qagent.arch import Conv, Softmax
from qagent.errors import ConfigError
from qagent.qlearning import QTable, sample_trajectory
from qagent.schedule import PAPER_SCHEDULE, EpsilonSchedule
from qagent.space import actions, start, trajectory_of

SVHN = build_config("svhn").space


def test_worked_example_of_algorithm_3():
    """Q init 0.5, alpha 0.01, gamma 1: [C(64,3,1), SM(10)] rewarded 0.9."""
    table = QTable(SVHN, 0.5)
    steps = trajectory_of(SVHN, (Conv(64, 3, 1), Softmax(10)))
    enc = table.encode(steps)
    table.update(enc, 0.9, alpha=0.01, gamma=1.0)
    last = table.value(*steps[1])
    first = table.value(*steps[0])
    assert last == pytest.approx(0.99 * 0.5 + 0.01 * 0.9)  # 0.504
    assert first == pytest.approx(0.99 * 0.5 + 0.01 * 0.504)  # bootstraps on max Q of the next state
    table.update(enc, 0.9, alpha=0.01, gamma=1.0)  # reverse order: the first step sees the new last value
    assert table.value(*steps[0]) == pytest.approx(0.99 * first + 0.01 * (0.99 * last + 0.009))
    # gamma scales the bootstrap
    t2 = QTable(SVHN, 0.5)
    t2.update(t2.encode(steps), 0.9, alpha=0.01, gamma=0.5)
    assert t2.value(*steps[0]) == pytest.approx(0.99 * 0.5 + 0.01 * 0.5 * 0.504)


def test_greedy_picks_the_maximum_and_breaks_ties_uniformly():
    table = QTable(SVHN)
    s0, _ = start(SVHN)
    first_actions = actions(SVHN, s0)
    rng = random.Random(1)
    counts = Counter(sample_trajectory(table, 0.0, rng)[0][0][1] for _ in range(3400))
    assert set(counts) == set(first_actions)  # all tied at 0.5: every action is drawn ...
    assert max(counts.values()) / min(counts.values()) < 1.6  # ... about uniformly (200 each)
    sid = table.state_id(s0)
    table.values[sid][5] = 0.9
    picks = {sample_trajectory(table, 0.0, rng)[0][0][1] for _ in range(200)}
    assert picks == {first_actions[5]}
    # with epsilon 1 the Q-values are ignored
    picks = Counter(sample_trajectory(table, 1.0, rng)[0][0][1] for _ in range(1700))
    assert picks[first_actions[5]] < 250


def _run(seed, rewards_offset=0.0, n=300):
    cfg = build_config("svhn", ["schedule.steps=[[1.0, 100], [0.5, 100], [0.1, 100]]"], seed=seed)
    agent = Agent(cfg.space, cfg.schedule, cfg.agent)
    archs = []
    while not agent.done and len(archs) < n:
        p = agent.propose()
        reward = p.known_reward if p.known_reward is not None else (hash(p.arch) % 1000) / 1000 + rewards_offset
        agent.observe(p.arch, p.encoded, reward, p.epsilon)
        archs.append(p.arch)
    return archs, agent


def test_one_seed_drives_everything():
    a, agent_a = _run(3)
    b, agent_b = _run(3)
    c, _ = _run(4)
    assert a == b and a != c
    assert agent_a.q.values == agent_b.q.values


def test_replay_dictionary_and_schedule_counts_unique_models():
    cfg = build_config("svhn", ["schedule.steps=[[1.0, 5], [0.1, 5]]"])
    agent = Agent(cfg.space, cfg.schedule, cfg.agent)
    p = agent.propose()
    assert agent.observe(p.arch, p.encoded, 0.8, p.epsilon) is True
    assert agent.observe(p.arch, p.encoded, 0.8, p.epsilon) is False  # a duplicate: no new unique model
    assert agent.trained_per_epsilon == {1.0: 1}
    assert len(agent.replay) == 2  # ... but it is replayed again
    while agent.epsilon == 1.0:
        q = agent.propose()
        agent.observe(q.arch, q.encoded, 0.5, q.epsilon)
    assert agent.trained_per_epsilon[1.0] == 5 and agent.epsilon == 0.1


def test_schedule():
    s = EpsilonSchedule()
    assert s.steps == PAPER_SCHEDULE and s.total == 2700
    assert s.current({}) == 1.0 and s.current({1.0: 1500}) == 0.9
    assert s.current({e: n for e, n in PAPER_SCHEDULE}) is None
    with pytest.raises(ConfigError):
        EpsilonSchedule(((1.5, 10),))
    with pytest.raises(ConfigError):
        AgentConfig(alpha=0.0)
    with pytest.raises(ConfigError):
        AgentConfig(replays_per_model=-1)
