"""The MetaQNN state and action spaces (paper Section 4, Table 1, Table A1).

Everything here is a pure function of a :class:`SpaceConfig`.  A state is the
tuple of the last layer's parameters plus its depth and *binned*
representation size; the true size is tracked beside it (with Caffe's own
output-size arithmetic) so that a pooling action can land in different binned
states (Appendix B).  :func:`reject_reason` is the single source of truth for
the Section 4.2 constraints: :func:`actions` is "every catalogue layer it does
not reject", and validation of a user's architecture reports its reason.
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

from qagent.arch import FC, GAP, Architecture, Conv, Layer, Pool, Softmax, check_structure
from qagent.errors import ConfigError, InvalidArchitectureError

START, CONV, POOL, FCL, TERM = "start", "conv", "pool", "fc", "term"
POOL_ARITHMETIC = ("caffe", "authors")


class State(NamedTuple):
    """(kind, depth, filters, size, stride, consecutive_fc, rsize) -- hashable and cheap.

    ``n_fc`` counts consecutive FC layers; ``rsize`` is the *binned* representation size.
    """

    kind: str
    depth: int
    filters: int = 0
    size: int = 0
    stride: int = 0
    n_fc: int = 0
    rsize: int = 0

    def key(self) -> str:
        """Stable text key used by the experiment store."""
        return ",".join(str(v) for v in self)

    @classmethod
    def from_key(cls, key: str) -> "State":
        kind, *rest = key.split(",")
        depth, filters, size, stride, n_fc, rsize = (int(v) for v in rest)
        return cls(kind, depth, filters, size, stride, n_fc, rsize)


# An action is the layer it adds; GAP and Softmax are the two termination actions.
Action = Layer


def _ints(name: str, values: Sequence[int], allow_empty: bool = False) -> Tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a list of integers, got {values!r}") from None
    if not out and not allow_empty:
        raise ConfigError(f"{name} must not be empty")
    if any(v <= 0 for v in out):
        raise ConfigError(f"{name} must hold positive integers, got {list(out)}")
    return out


@dataclass(frozen=True)
class SpaceConfig:
    """One state-action space; validated when built (ConfigError on bad values).

    ``rsize_bins`` are the lower edges of the representation-size bins in
    descending order ((inf,8], (8,4], (4,1] -> [8, 4, 1]); empty means no
    binning (the MNIST experiment: one state per true size).  Pooling is either
    the explicit (f, l) pairs of Table 1 or sizes x strides filtered like convs.

    The last four settings are choices where the authors' code differs from the
    paper's text; the defaults follow the paper, and each can be set to the
    code's value (docs/deviations.md): ``allow_initial_pool`` (code: false),
    ``strict_receptive_field`` (f < R; code: true), ``pool_arithmetic``
    (``"authors"``: ceil((n - f + 1)/l); default ``"caffe"``: ceil((n - f)/l) + 1)
    and ``only_softmax_at_max_depth`` (code: true, no GAP at the maximum depth).
    """

    image_size: int
    num_classes: int
    max_depth: int
    conv_filters: Tuple[int, ...]
    conv_sizes: Tuple[int, ...]
    conv_strides: Tuple[int, ...] = (1,)
    pool_pairs: Tuple[Tuple[int, int], ...] = ()
    pool_sizes: Tuple[int, ...] = ()
    pool_strides: Tuple[int, ...] = ()
    max_stride_fraction: Optional[float] = None
    fc_units: Tuple[int, ...] = (512, 256, 128)
    max_consecutive_fc: Optional[int] = 2
    fc_max_rsize: Optional[int] = 7
    rsize_bins: Tuple[int, ...] = (8, 4, 1)
    allow_gap: bool = True
    allow_pool_after_pool: bool = False
    allow_initial_pool: bool = True
    strict_receptive_field: bool = False
    pool_arithmetic: str = "caffe"
    only_softmax_at_max_depth: bool = False
    _catalogue: Tuple[Action, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("image_size", "num_classes", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"space.{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ConfigError(f"space.num_classes must be at least 2, got {self.num_classes}")
        set_ = object.__setattr__
        set_(self, "conv_filters", _ints("space.conv_filters", self.conv_filters))
        set_(self, "conv_sizes", _ints("space.conv_sizes", self.conv_sizes))
        set_(self, "conv_strides", _ints("space.conv_strides", self.conv_strides))
        set_(self, "fc_units", _ints("space.fc_units", self.fc_units, allow_empty=True))
        set_(self, "pool_sizes", _ints("space.pool_sizes", self.pool_sizes, allow_empty=True))
        set_(self, "pool_strides", _ints("space.pool_strides", self.pool_strides, allow_empty=True))
        try:
            pairs = tuple((int(f), int(s)) for f, s in self.pool_pairs)
        except (TypeError, ValueError):
            raise ConfigError(
                f"space.pool_pairs must be a list of [size, stride] pairs, got {self.pool_pairs!r}"
            ) from None
        if any(f <= 0 or s <= 0 for f, s in pairs):
            raise ConfigError(f"space.pool_pairs must hold positive integers, got {pairs}")
        if pairs and (self.pool_sizes or self.pool_strides):
            raise ConfigError("give either space.pool_pairs or space.pool_sizes/pool_strides, not both")
        if bool(self.pool_sizes) != bool(self.pool_strides):
            raise ConfigError("space.pool_sizes and space.pool_strides must be given together")
        set_(self, "pool_pairs", pairs)
        bins = _ints("space.rsize_bins", self.rsize_bins, allow_empty=True)
        if list(bins) != sorted(set(bins), reverse=True) or (bins and bins[-1] != 1):
            raise ConfigError(f"space.rsize_bins must be strictly descending lower edges ending at 1, got {list(bins)}")
        set_(self, "rsize_bins", bins)
        if self.max_consecutive_fc is not None and self.max_consecutive_fc < 1:
            raise ConfigError(f"space.max_consecutive_fc must be >= 1 or null, got {self.max_consecutive_fc}")
        if self.max_stride_fraction is not None and not 0 < self.max_stride_fraction <= 1:
            raise ConfigError(f"space.max_stride_fraction must be in (0, 1], got {self.max_stride_fraction}")
        if self.pool_arithmetic not in POOL_ARITHMETIC:
            raise ConfigError(
                f"space.pool_arithmetic must be one of {', '.join(POOL_ARITHMETIC)}, got {self.pool_arithmetic!r}"
            )
        set_(self, "_catalogue", tuple(self._build_catalogue()))

    def _strides_for(self, size: int, strides: Sequence[int]) -> List[int]:
        if self.max_stride_fraction is None:
            return list(strides)
        limit = math.ceil(size * self.max_stride_fraction)
        return [s for s in strides if s <= limit]

    def _build_catalogue(self) -> List[Action]:
        out: List[Action] = []
        for f in self.conv_sizes:
            for s in self._strides_for(f, self.conv_strides):
                out.extend(Conv(d, f, s) for d in self.conv_filters)
        if self.pool_pairs:
            out.extend(Pool(f, s) for f, s in self.pool_pairs)
        for f in self.pool_sizes:
            out.extend(Pool(f, s) for s in self._strides_for(f, self.pool_strides))
        out.extend(FC(d) for d in self.fc_units)
        if self.allow_gap:
            out.append(GAP())
        out.append(Softmax(self.num_classes))
        return out

    @property
    def catalogue(self) -> Tuple[Action, ...]:
        """Every layer the space knows, in the fixed order actions are listed in."""
        return self._catalogue

    def bin(self, size: int) -> int:
        """The representative (lower edge) of the bin holding a true size; the size itself if unbinned."""
        if not self.rsize_bins:
            return size
        for edge in self.rsize_bins:
            if size >= edge:
                return edge
        return self.rsize_bins[-1]


# --- Caffe's output-size arithmetic (see docs/paper-map.md) ------------------


def conv_output(size: int, kernel: int, stride: int) -> int:
    """SAME-padded convolution as rendered (pad = kernel // 2): floor((n + 2p - k)/s) + 1."""
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1


def pool_output(size: int, kernel: int, stride: int) -> int:
    """Caffe 1.0 pooling without padding rounds up: ceil((n - k)/s) + 1."""
    return -(-(size - kernel) // stride) + 1


def authors_pool_output(size: int, kernel: int, stride: int) -> int:
    """The authors' agent's estimate, ceil((n - k + 1)/s): one less than Caffe's when s divides n - k."""
    return -(-(size - kernel + 1) // stride)


def agent_pool_output(space: SpaceConfig, size: int, kernel: int, stride: int) -> int:
    """The size the agent tracks after pooling (its bins follow it); rendering always uses Caffe's."""
    if space.pool_arithmetic == "authors":
        return authors_pool_output(size, kernel, stride)
    return pool_output(size, kernel, stride)


def _field_too_large(space: SpaceConfig, size: int, rsize: int) -> Optional[str]:
    """Paper: f <= R; the authors' code (``strict_receptive_field``): f < R."""
    if size > rsize:
        return f"receptive field {size} exceeds the representation size {rsize}"
    if space.strict_receptive_field and size == rsize:
        return f"receptive field {size} must be smaller than the representation size {rsize}"
    return None


def reject_reason(space: SpaceConfig, state: State, action: Action) -> Optional[str]:
    """Why ``action`` is not allowed from ``state`` (Section 4.2), or None if it is."""
    kind = state.kind
    if kind == TERM:
        return "no action follows termination"
    if isinstance(action, Softmax):
        return None if action.classes == space.num_classes else f"SM must have {space.num_classes} classes"
    if isinstance(action, GAP):
        if not space.allow_gap:
            return "GAP termination is disabled in this space"
        if space.only_softmax_at_max_depth and state.depth >= space.max_depth:
            return f"maximum depth {space.max_depth} reached: only SM is allowed"
        return (
            None if kind in (START, CONV, POOL) else "GAP may only follow the input, a convolution or a pooling layer"
        )
    if state.depth >= space.max_depth:
        return f"maximum depth {space.max_depth} reached: only termination is allowed"
    if isinstance(action, Conv):
        if kind == FCL:
            return "a fully connected layer may only be followed by FC or termination"
        if action.filters not in space.conv_filters:
            return f"conv filters must be one of {list(space.conv_filters)}"
        if action.size not in space.conv_sizes:
            return f"conv receptive field must be one of {list(space.conv_sizes)}"
        if action.stride not in space._strides_for(action.size, space.conv_strides):
            return f"conv stride {action.stride} not allowed for receptive field {action.size}"
        return _field_too_large(space, action.size, state.rsize)
    if isinstance(action, Pool):
        if kind == FCL:
            return "a fully connected layer may only be followed by FC or termination"
        if kind == POOL and not space.allow_pool_after_pool:
            return "no pooling directly after pooling"
        if kind == START and not space.allow_initial_pool:
            return "no pooling as the first layer"
        allowed = (action.size, action.stride) in space.pool_pairs or (
            action.size in space.pool_sizes and action.stride in space._strides_for(action.size, space.pool_strides)
        )
        if not allowed:
            return f"pooling {action} is not in this space"
        return _field_too_large(space, action.size, state.rsize)
    if isinstance(action, FC):
        if action.units not in space.fc_units:
            return f"FC units must be one of {list(space.fc_units)}"
        if kind == FCL:
            if space.max_consecutive_fc is not None and state.n_fc >= space.max_consecutive_fc:
                return f"at most {space.max_consecutive_fc} consecutive FC layers"
            if action.units > state.filters:
                return f"FC({action.units}) may not follow FC({state.filters}): sizes must not grow"
            return None
        if space.fc_max_rsize is not None and state.rsize > space.fc_max_rsize:
            return f"FC only from representation size <= {space.fc_max_rsize} (state has {state.rsize})"
        return None
    return f"unknown action {action!r}"


@lru_cache(maxsize=None)
def actions(space: SpaceConfig, state: State) -> Tuple[Action, ...]:
    """The allowed actions from a state, in catalogue order (stable: Q rows align with it)."""
    return tuple(a for a in space.catalogue if reject_reason(space, state, a) is None)


def transition(space: SpaceConfig, state: State, action: Action, true_size: int) -> Tuple[State, int]:
    """Next state and next true representation size."""
    depth = state.depth + 1
    if isinstance(action, (Softmax, GAP)):
        return State(TERM, depth), 1
    if isinstance(action, Conv):
        n = conv_output(true_size, action.size, action.stride)
        return State(CONV, depth, action.filters, action.size, action.stride, 0, space.bin(n)), n
    if isinstance(action, Pool):
        n = agent_pool_output(space, true_size, action.size, action.stride)
        return State(POOL, depth, 0, action.size, action.stride, 0, space.bin(n)), n
    n_fc = state.n_fc + 1 if state.kind == FCL else 1
    return State(FCL, depth, action.units, 0, 0, n_fc, space.bin(1)), 1


Step = Tuple[State, Action]


def start(space: SpaceConfig) -> Tuple[State, int]:
    """The start state carries the image's binned size."""
    return State(START, 0, 0, 0, 0, 0, space.bin(space.image_size)), space.image_size


def architecture_of(space: SpaceConfig, steps: Sequence[Step]) -> Architecture:
    """Layers of a trajectory; a GAP termination expands to GAP, SM(k)."""
    layers: List[Layer] = []
    for _, action in steps:
        layers.append(action)
        if isinstance(action, GAP):
            layers.append(Softmax(space.num_classes))
    return tuple(layers)


def trajectory_of(space: SpaceConfig, layers: Union[Architecture, Sequence[Layer]]) -> List[Step]:
    """Validate an architecture against the space and return its (state, action) steps."""
    check_structure(layers)
    acts: List[Action] = list(layers)
    if len(acts) >= 2 and isinstance(acts[-2], GAP):
        acts = acts[:-1]  # GAP, SM(k) is one termination action
    state, n = start(space)
    steps: List[Step] = []
    for i, action in enumerate(acts):
        reason = reject_reason(space, state, action)
        if reason is not None:
            raise InvalidArchitectureError(f"layer {i + 1} ({action}) not allowed: {reason}")
        steps.append((state, action))
        state, n = transition(space, state, action, n)
    return steps


def size_problem(space: SpaceConfig, layers: Sequence[Layer]) -> Optional[str]:
    """Why an architecture found in some space cannot run on ``space``'s images, or None.

    Only what the images decide is checked -- each receptive field against the representation
    size (binned as the agent bins it), and an FC layer fed by a map no larger than
    ``fc_max_rsize`` -- not the menu of the space (filters, depth), which belongs to the search
    that found it.  The sizes follow Caffe's arithmetic, as rendered.
    """
    check_structure(layers)
    n, flat = space.image_size, False
    for i, layer in enumerate(layers):
        where = f"layer {i + 1} ({layer}) on {space.image_size}x{space.image_size} images"
        if isinstance(layer, (Conv, Pool)):
            if flat:
                return f"{where}: a convolution or pooling layer cannot follow an FC layer"
            reason = _field_too_large(space, layer.size, space.bin(n))
            if reason is not None:
                return f"{where}: {reason}"
            output = conv_output if isinstance(layer, Conv) else pool_output
            n = output(n, layer.size, layer.stride)
            if n < 1:
                return f"{where}: nothing is left of the image"
        elif isinstance(layer, FC):
            if not flat and space.fc_max_rsize is not None and space.bin(n) > space.fc_max_rsize:
                return f"{where}: an FC layer is fed a {n}x{n} map, more than this space's {space.fc_max_rsize}"
            flat = True
    return None
