"""The MetaQNN agent: Algorithm 1 without the training.

It proposes architectures and consumes rewards; it never trains, renders or
touches a disk.  One ``random.Random`` seeded once drives every choice (the
epsilon-greedy walk and the replay sampling), and its state travels with the
agent's other state through the experiment store, so a resumed search draws
exactly the numbers an uninterrupted one would.
"""

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from qagent.arch import Architecture, format_architecture, parse_architecture
from qagent.costs import Barrier
from qagent.errors import ConfigError
from qagent.qlearning import EncodedStep, QTable, sample_trajectory
from qagent.schedule import EpsilonSchedule
from qagent.space import SpaceConfig, State, architecture_of, trajectory_of


@dataclass(frozen=True)
class AgentConfig:
    """Section 4.3 values by default; ``failure_reward`` None means 1/num_classes (a random predictor)."""

    alpha: float = 0.01
    gamma: float = 1.0
    q_init: float = 0.5
    replays_per_model: int = 100
    seed: int = 0
    failure_reward: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"agent.alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"agent.gamma must be in [0, 1], got {self.gamma}")
        if self.replays_per_model < 0:
            raise ConfigError(f"agent.replays_per_model must be >= 0, got {self.replays_per_model}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"agent.seed must be an integer, got {self.seed!r}")
        if self.failure_reward is not None and not 0.0 <= self.failure_reward <= 1.0:
            raise ConfigError(f"agent.failure_reward must be in [0, 1] or 'chance', got {self.failure_reward}")


@dataclass
class AgentState:
    """Everything an agent has learned, in the order a store keeps it (see :meth:`Agent.restore`).

    ``samples`` are (iteration, architecture, reward) in iteration order; a reward of None is a
    sample that taught nothing (an out-of-memory net).  ``rng`` is :meth:`Agent.rng_state`.
    """

    q_rows: List[Tuple[State, Sequence[float]]]
    rewards: Dict[str, float]
    skipped: Set[str]
    trained_per_epsilon: Dict[float, int]
    samples: List[Tuple[int, str, Optional[float]]]
    rng: Optional[List[Any]] = None


@dataclass(frozen=True)
class Proposal:
    """One sampled architecture. ``known_reward`` is set when the replay dictionary already has it."""

    arch: str
    layers: Architecture
    epsilon: float
    encoded: Tuple[EncodedStep, ...]
    known_reward: Optional[float]


class Agent:
    def __init__(
        self, space: SpaceConfig, schedule: EpsilonSchedule, config: AgentConfig, barrier: Optional[Barrier] = None
    ) -> None:
        self.space = space
        # A size budget (qagent.costs): the walk chooses only among actions that can still end within it.
        self.barrier = barrier
        self.schedule = schedule
        self.config = config
        self.q = QTable(space, config.q_init)
        self.rng = random.Random(config.seed)
        self.replay: List[Tuple[Tuple[EncodedStep, ...], float]] = []
        self.rewards: Dict[str, float] = {}
        self.trained_per_epsilon: Dict[float, int] = {}
        self.skipped: Set[str] = set()
        self.iteration = 0
        # Models sampled but not yet rewarded, per epsilon: they hold a place in the schedule so
        # that N models in flight do not overshoot an epsilon's quota.
        self.in_flight: Dict[str, float] = {}

    # -- schedule -----------------------------------------------------------------
    @property
    def epsilon(self) -> Optional[float]:
        if not self.in_flight:
            return self.schedule.current(self.trained_per_epsilon)
        counts = dict(self.trained_per_epsilon)
        for eps in self.in_flight.values():
            counts[eps] = counts.get(eps, 0) + 1
        return self.schedule.current(counts)

    @property
    def done(self) -> bool:
        return self.epsilon is None and not self.in_flight

    def launch(self, proposal: Proposal) -> None:
        """A new architecture goes out for training: no other copy of it is handed out until it returns."""
        self.in_flight[proposal.arch] = proposal.epsilon

    @property
    def failure_reward(self) -> float:
        fr = self.config.failure_reward
        return 1.0 / self.space.num_classes if fr is None else fr

    # -- Algorithm 2 --------------------------------------------------------------
    def propose(self) -> Proposal:
        eps = self.epsilon
        if eps is None:
            raise RuntimeError("the epsilon schedule is complete")
        steps, encoded = sample_trajectory(self.q, eps, self.rng, self.barrier)
        layers = architecture_of(self.space, steps)
        arch = format_architecture(layers)
        return Proposal(arch, layers, eps, tuple(encoded), self.rewards.get(arch))

    def encode(self, arch: str) -> Tuple[EncodedStep, ...]:
        return tuple(self.q.encode(trajectory_of(self.space, parse_architecture(arch))))

    # -- Algorithm 1's bookkeeping and Algorithm 3 ------------------------------------
    def observe(
        self, arch: str, encoded: Tuple[EncodedStep, ...], reward: float, epsilon: float, trained: bool = True
    ) -> bool:
        """Store the result, then replay ``replays_per_model`` uniform samples of the memory.

        A re-sampled architecture is not retrained: its stored reward is appended to the
        memory again (so frequently chosen nets weigh more) but does not advance the schedule.
        ``trained`` False: a net rejected before training (over a latency budget) teaches its
        reward but is no trained model of the schedule.  Returns True when this was a new unique model.
        """
        self.in_flight.pop(arch, None)
        new = arch not in self.rewards
        if new:
            self.rewards[arch] = reward
            if trained:
                self.trained_per_epsilon[epsilon] = self.trained_per_epsilon.get(epsilon, 0) + 1
        self.replay.append((encoded, reward))
        self.iteration += 1
        self._replay()
        return new

    def _replay(self) -> None:
        memory = self.replay
        size = len(memory)
        randrange = self.rng.randrange
        update = self.q.update
        alpha, gamma = self.config.alpha, self.config.gamma
        for _ in range(self.config.replays_per_model):
            encoded, reward = memory[randrange(size)]
            update(encoded, reward, alpha, gamma)

    def pass_over(self, arch: str, count: bool = True) -> None:
        """A model set aside without a reward (no longer in flight); ``count``: a sample of it was drawn."""
        self.in_flight.pop(arch, None)
        if count:
            self.iteration += 1

    def skip(self, arch: str) -> None:
        """An architecture that cannot be trained at all (out of memory): never hand it out again."""
        self.in_flight.pop(arch, None)
        self.skipped.add(arch)
        self.iteration += 1

    # -- persistence --------------------------------------------------------------------
    def restore(self, state: AgentState) -> None:
        """Become the agent that produced ``state`` (a fresh agent only): Q rows, memory, counts, RNG.

        The replay memory is rebuilt from the samples, so a resumed search replays exactly
        what an uninterrupted one would.  Restored Q rows count as saved.
        """
        if self.iteration or len(self.q):
            raise RuntimeError("restore() needs a fresh agent")
        for s, values in state.q_rows:
            self.q.load_row(s, values)
        loaded = len(self.q)
        self.rewards = dict(state.rewards)
        self.skipped = set(state.skipped)
        self.trained_per_epsilon = dict(state.trained_per_epsilon)
        encodings: Dict[str, Tuple[EncodedStep, ...]] = {}
        for iteration, arch, reward in state.samples:
            self.iteration = iteration
            if reward is None:
                continue
            enc = encodings.get(arch)
            if enc is None:
                enc = encodings[arch] = self.encode(arch)
            self.replay.append((enc, reward))
        self.q.mark_clean(loaded)  # states first seen while re-encoding still need writing
        if state.rng is not None:
            self.set_rng_state(state.rng)

    def state(self) -> AgentState:
        """A copy of what :meth:`restore` needs (samples other than the replay memory are the store's)."""
        return AgentState(
            q_rows=[(s, list(self.q.values[i])) for i, s in enumerate(self.q.states)],
            rewards=dict(self.rewards),
            skipped=set(self.skipped),
            trained_per_epsilon=dict(self.trained_per_epsilon),
            samples=[],
            rng=self.rng_state(),
        )

    # -- persistence helpers --------------------------------------------------------
    def rng_state(self) -> List[Any]:
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def set_rng_state(self, state: List[Any]) -> None:
        self.rng.setstate((state[0], tuple(state[1]), state[2]))
