"""Architecture notation exactly as the paper writes it.

``[C(64,3,1), P(2,2), FC(512), SM(10)]`` -- C(n,f,l) convolution with n filters,
receptive field f and stride l; P(f,l) max pooling; FC(n) fully connected;
GAP global average pooling (always followed by SM); SM(n) the softmax
classifier over n classes.  :func:`format_architecture` gives the one canonical
string per architecture; it is the key of the replay dictionary and of the
experiment store, so formatting must never change for an existing layer.
"""

import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

from qagent.errors import ArchitectureSyntaxError, quote


@dataclass(frozen=True)
class Conv:
    filters: int
    size: int
    stride: int

    def __str__(self) -> str:
        return f"C({self.filters},{self.size},{self.stride})"


@dataclass(frozen=True)
class Pool:
    size: int
    stride: int

    def __str__(self) -> str:
        return f"P({self.size},{self.stride})"


@dataclass(frozen=True)
class FC:
    units: int

    def __str__(self) -> str:
        return f"FC({self.units})"


@dataclass(frozen=True)
class GAP:
    def __str__(self) -> str:
        return "GAP"


@dataclass(frozen=True)
class Softmax:
    classes: int

    def __str__(self) -> str:
        return f"SM({self.classes})"


Layer = Union[Conv, Pool, FC, GAP, Softmax]
Architecture = Tuple[Layer, ...]

_ARITY = {"C": 3, "P": 2, "FC": 1, "GAP": 0, "SM": 1}
_TOKEN = re.compile(r"\s*([A-Za-z]+)\s*(?:\(([^()]*)\))?\s*(,|$)?")


def _build(name: str, args: List[int]) -> Layer:
    if name == "C":
        return Conv(*args)
    if name == "P":
        return Pool(*args)
    if name == "FC":
        return FC(*args)
    if name == "SM":
        return Softmax(*args)
    return GAP()


def parse_architecture(text: str) -> Architecture:
    """Parse the paper's notation; errors name the token and its column."""
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        raise ArchitectureSyntaxError(
            f"architecture must be a bracketed list like '[C(64,3,1), SM(10)]', got {quote(text)}"
        )
    body = stripped[1:-1]
    offset = text.index("[") + 1
    layers: List[Layer] = []
    pos = 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None or m.end() == pos:
            bad = body[pos:].split(",")[0].strip() or body[pos:]
            raise ArchitectureSyntaxError(
                f"cannot parse token {quote(bad)} at column {offset + pos + 1} of {quote(text)}"
            )
        name, argtext = m.group(1), m.group(2)
        token = m.group(0).strip().rstrip(",").strip()
        column = offset + pos + 1 + (len(m.group(0)) - len(m.group(0).lstrip()))
        if name not in _ARITY:
            raise ArchitectureSyntaxError(
                f"unknown layer {quote(name)} in token {quote(token)} at column {column}; expected one of C, P, FC, GAP, SM"
            )
        args: List[int] = []
        if argtext is not None and argtext.strip():
            try:
                args = [int(a) for a in argtext.split(",")]
            except ValueError:
                raise ArchitectureSyntaxError(
                    f"non-integer parameter in token {quote(token)} at column {column}"
                ) from None
        if len(args) != _ARITY[name] or (argtext is not None and _ARITY[name] == 0):
            raise ArchitectureSyntaxError(
                f"{name} takes {_ARITY[name]} integer parameter(s), got {len(args)} in token {quote(token)} at column {column}"
            )
        if any(a <= 0 for a in args):
            raise ArchitectureSyntaxError(f"parameters must be positive in token {quote(token)} at column {column}")
        layers.append(_build(name, args))
        if m.group(3) is None or (m.group(3) == "" and m.end() < len(body)):
            raise ArchitectureSyntaxError(f"expected ',' after token {quote(token)} at column {column}")
        if m.group(3) == "," and not body[m.end() :].strip():
            raise ArchitectureSyntaxError(f"trailing ',' after token {quote(token)} at column {column}")
        pos = m.end()
    check_structure(layers)
    return tuple(layers)


def check_structure(layers: Sequence[Layer]) -> None:
    """Rules every architecture obeys whatever the state space: one SM, last; GAP right before it."""
    if not layers:
        raise ArchitectureSyntaxError("empty architecture: it must end with SM(n)")
    if not isinstance(layers[-1], Softmax):
        raise ArchitectureSyntaxError(f"architecture must end with SM(n), ends with {layers[-1]}")
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, Softmax):
            raise ArchitectureSyntaxError(f"SM may only be the last layer (found at position {i + 1})")
        if isinstance(layer, GAP) and i != len(layers) - 2:
            raise ArchitectureSyntaxError(f"GAP must be directly followed by SM (found at position {i + 1})")


def format_architecture(layers: Sequence[Layer]) -> str:
    """The canonical string: ', '-separated, no blanks inside parentheses."""
    return "[" + ", ".join(str(layer) for layer in layers) + "]"


def canonical(text: str) -> str:
    """Canonical form of any accepted spelling of an architecture."""
    return format_architecture(parse_architecture(text))
