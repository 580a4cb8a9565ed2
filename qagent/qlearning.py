"""Tabular Q-learning over the MetaQNN state space (Algorithms 2 and 3).

The table is lazy: a state gets a row (one value per allowed action, all at
``q_init``) the first time it is seen, because the unbinned MNIST space is far
too large to enumerate.  Rows are plain Python lists indexed by integer state
ids so that the 270,000 trajectory replays of a full schedule stay cheap; a
trajectory is encoded once as a list of (state id, action index) pairs.
"""

import random
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from qagent.space import Action, SpaceConfig, State, Step, actions, start, transition

if TYPE_CHECKING:
    from qagent.costs import Barrier

EncodedStep = Tuple[int, int]


class QTable:
    """Q-values for every (state, action) seen so far; also tracks rows changed since the last flush."""

    def __init__(self, space: SpaceConfig, q_init: float = 0.5) -> None:
        self.space = space
        self.q_init = float(q_init)
        self._ids: Dict[State, int] = {}
        self.states: List[State] = []
        self.actions: List[Tuple[Action, ...]] = []
        self._action_pos: List[Dict[Action, int]] = []
        self.values: List[List[float]] = []
        self.dirty: Set[int] = set()

    def mark_clean(self, first_unsaved: int) -> None:
        """Rows before ``first_unsaved`` are stored as they are now; later rows still need writing."""
        self.dirty = set(range(first_unsaved, len(self.states)))

    def __len__(self) -> int:
        return len(self.states)

    def state_id(self, state: State) -> int:
        sid = self._ids.get(state)
        if sid is None:
            sid = len(self.states)
            acts = actions(self.space, state)
            self._ids[state] = sid
            self.states.append(state)
            self.actions.append(acts)
            self._action_pos.append({a: i for i, a in enumerate(acts)})
            self.values.append([self.q_init] * len(acts))
            self.dirty.add(sid)
        return sid

    def load_row(self, state: State, values: Sequence[float]) -> None:
        """Restore a stored row (the experiment store calls this on resume)."""
        sid = self.state_id(state)
        if len(values) != len(self.values[sid]):
            raise ValueError(
                f"stored Q row for {state.key()} has {len(values)} values, space gives {len(self.values[sid])}"
            )
        self.values[sid] = [float(v) for v in values]

    def value(self, state: State, action: Action) -> float:
        sid = self.state_id(state)
        return self.values[sid][self._action_pos[sid][action]]

    def encode(self, steps: Iterable[Step]) -> List[EncodedStep]:
        out = []
        for state, action in steps:
            sid = self.state_id(state)
            out.append((sid, self._action_pos[sid][action]))
        return out

    def update(self, encoded: Sequence[EncodedStep], reward: float, alpha: float, gamma: float) -> None:
        """Algorithm 3: the terminal transition gets the reward, earlier ones bootstrap, in reverse order."""
        values = self.values
        dirty = self.dirty
        sid, a = encoded[-1]
        row = values[sid]
        row[a] = (1.0 - alpha) * row[a] + alpha * reward
        dirty.add(sid)
        for i in range(len(encoded) - 2, -1, -1):
            sid, a = encoded[i]
            row = values[sid]
            row[a] = (1.0 - alpha) * row[a] + alpha * gamma * max(values[encoded[i + 1][0]])
            dirty.add(sid)


def sample_trajectory(
    table: QTable, epsilon: float, rng: random.Random, barrier: "Optional[Barrier]" = None
) -> Tuple[List[Step], List[EncodedStep]]:
    """Algorithm 2: epsilon-greedy walk from the start state, ties among maximal actions broken uniformly.

    With a ``barrier`` (a size budget) the walk chooses only among the actions it allows: the
    greedy step takes the best allowed Q-value, the random step a uniform allowed action.  The
    Q-table keeps every action; without a barrier the walk draws exactly the numbers it always did.
    """
    if barrier is not None:
        return _barred_walk(table, epsilon, rng, barrier)
    space = table.space
    state, n = start(space)
    steps: List[Step] = []
    encoded: List[EncodedStep] = []
    while True:
        sid = table.state_id(state)
        acts = table.actions[sid]
        if rng.random() > epsilon:
            row = table.values[sid]
            best = max(row)
            ties = [i for i, v in enumerate(row) if v == best]
            idx = ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]
        else:
            idx = rng.randrange(len(acts))
        action = acts[idx]
        steps.append((state, action))
        encoded.append((sid, idx))
        state, n = transition(space, state, action, n)
        if state.kind == "term":
            return steps, encoded


def _barred_walk(
    table: QTable, epsilon: float, rng: random.Random, barrier: "Barrier"
) -> Tuple[List[Step], List[EncodedStep]]:
    from qagent.costs import ZERO

    position, spent = barrier.start(), ZERO
    steps: List[Step] = []
    encoded: List[EncodedStep] = []
    while True:
        state = position[0]
        sid = table.state_id(state)
        acts = table.actions[sid]
        open_ = [i for i, ok in enumerate(barrier.allowed(position, spent)) if ok]
        if not open_:  # the barrier keeps every walk to positions that can still end: a bug if reached
            raise RuntimeError(f"every action of {state.key()} is over budget")
        if rng.random() > epsilon:
            row = table.values[sid]
            best = max(row[i] for i in open_)
            ties = [i for i in open_ if row[i] == best]
            idx = ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]
        else:
            idx = open_[rng.randrange(len(open_))]
        action = acts[idx]
        steps.append((state, action))
        encoded.append((sid, idx))
        cost, position = barrier.step(position, action)
        spent = spent + cost
        if position[0].kind == "term":
            return steps, encoded
