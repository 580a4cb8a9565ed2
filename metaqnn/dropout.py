"""The authors' dropout rule (``render.dropout = "authors"``), derived from their released code.

In the authors' code one function decides where dropout goes and at what ratio
(``add_drop_out_states`` in ``libs/grammar/state_string_utils.py`` of
bowenbaker/metaqnn, called once per sampled net).  It walks the agent's state
list, which is not our layer list: it holds one state per layer *plus the
terminal state*, and the terminal state is a copy of the last layer's state
with a terminate flag, so it has that layer's type (``fc`` after an FC layer,
``gap`` after GAP, ``start`` for the empty net).  Hence the counting:

* ``count = (states - gap_states - fc_states) // 2 + fc_states`` -- integer
  division (Python 2), and an FC or GAP net counts its terminal state among the
  FC or GAP states;
* walking the states with index ``i`` (0-based), a dropout follows state ``i``
  if ``i`` is odd (every second layer) or the state is an FC layer, unless the
  state is the terminal one or a GAP, and only while fewer than ``count``
  dropouts have been placed;
* the k-th dropout placed (k = 1, 2, ...) gets ratio ``0.5 * k / count``
  (their Caffe generator, ``string_to_model.py``).

``count`` is not the number of dropouts placed: with an odd number of
conv/pool layers, or with any FC layer, it is one more, so the last ratio is
below 0.5 (e.g. [C, C, P, C, C, SM]: count 3, two dropouts, 1/6 and 1/3).
"""

from typing import Dict, List, Sequence, Tuple

from qagent.arch import FC, GAP, Conv, Layer, Pool, Softmax

# The authors' state types; the terminal state carries the type of the state before it.
_START, _CONV, _POOL, _FC, _GAP = "start", "conv", "pool", "fc", "gap"


def authors_states(layers: Sequence[Layer]) -> List[Tuple[str, bool]]:
    """(type, is_terminal) per state of the authors' state list for an architecture.

    Our architectures end with ``SM(n)`` (after ``GAP`` for a GAP net); theirs end
    with a terminal state typed like the layer before it, so SM becomes that.
    """
    states: List[Tuple[str, bool]] = []
    for layer in layers:
        if isinstance(layer, Softmax):
            states.append((states[-1][0] if states else _START, True))
            break
        states.append((_type_of(layer), False))
    return states


def _type_of(layer: Layer) -> str:
    if isinstance(layer, Conv):
        return _CONV
    if isinstance(layer, Pool):
        return _POOL
    if isinstance(layer, FC):
        return _FC
    if isinstance(layer, GAP):
        return _GAP
    raise TypeError(f"no authors' state type for {layer!r}")


def authors_dropout_count(states: Sequence[Tuple[str, bool]]) -> int:
    """Their ``number_drop_layers``: half the non-FC, non-GAP states (rounded down) plus the FC states."""
    n_fc = sum(1 for kind, _ in states if kind == _FC)
    n_gap = sum(1 for kind, _ in states if kind == _GAP)
    return (len(states) - n_gap - n_fc) // 2 + n_fc


def authors_dropout(layers: Sequence[Layer]) -> Dict[int, float]:
    """Index of each layer followed by a dropout -> that dropout's ratio, as the authors' code renders them.

    Indices count the layers of ``layers``; only conv, pool and FC layers can be
    followed by one, and they come before GAP and SM, so the indices are the
    same in the list of hidden layers.
    """
    states = authors_states(layers)
    count = authors_dropout_count(states)
    out: Dict[int, float] = {}
    placed = 0
    for i, (kind, terminal) in enumerate(states):
        every_second = (i + 1) % 2 == 0 and i != 0
        if (every_second or kind == _FC) and not terminal and kind != _GAP and placed + 1 <= count:
            placed += 1
            out[i] = 0.5 * placed / count
    return out
