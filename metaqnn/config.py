"""One typed, strict configuration: TOML presets plus ``section.key=value`` overrides.

A preset (``presets/<name>.toml``) holds everything a search needs; command-line
overrides are parsed as TOML values so lists and booleans work
(``--set 'space.conv_filters=[16,32]'``).  The merged tables are turned, once,
into a frozen :class:`Config` of frozen section dataclasses.  Every key is
checked there against its field's type: an unknown key, a wrong type, a
boolean spelt other than true/false, or 0 where "unlimited" is meant is refused
with the key named -- before anything is created.  The validated object is what
every module receives and what the experiment store records (as
:meth:`Config.to_dict`), so no module looks a value up with a default of its own.
"""

import copy
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from metaqnn.constraints import ConstraintsConfig
from metaqnn.early_stop.rules import EarlyStopConfig
from metaqnn.resources import asset_dir, workspace
from metaqnn.snapshot_policy import SnapshotPolicy
from qagent.agent import AgentConfig
from qagent.errors import ConfigError, quote
from qagent.schedule import EpsilonSchedule
from qagent.space import SpaceConfig

if typing.TYPE_CHECKING:
    from metaqnn.netspec import Transform

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the users' Python 3.8 conda Caffe
    import tomli as tomllib

PROJECT_ROOT = workspace()  # data/, experiments/ and .deps/ live here
PRESETS_DIR = asset_dir("presets")
SOLVERS_DIR = asset_dir("solvers")
SECTIONS = (
    "dataset",
    "space",
    "schedule",
    "agent",
    "render",
    "protocol",
    "early_stop",
    "constraints",
    "snapshots",
    "tensorboard",
)
# Settings of how a run keeps its disk, not of what it searches: they may change when a search is
# resumed, so Config.to_dict (what the store records and compares) leaves them out.
OPERATIONAL_SECTIONS = ("snapshots", "tensorboard")
PREPROCESS = ("none", "mean", "gcn", "lcn", "zca")

# Optional fields whose None is spelt as a word in the files (TOML has no null):
# the word is the only way to ask for None, so 0 can never silently mean "no limit".
NONE_WORDS: Dict[Tuple[str, str], str] = {
    ("space", "max_consecutive_fc"): "unlimited",
    ("space", "fc_max_rsize"): "unlimited",
    ("space", "max_stride_fraction"): "unlimited",
    ("agent", "failure_reward"): "chance",
    ("constraints", "max_params"): "unlimited",
    ("constraints", "max_macs"): "unlimited",
    ("constraints", "max_latency_ms"): "unlimited",
    ("constraints", "target"): "none",
    ("snapshots", "budget_gb"): "unlimited",
}

T = TypeVar("T")


# --- the sections --------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSizes:
    """Image counts of the official release: solvers are written from them when no data is prepared."""

    train: int
    test: int
    extra: int = 0

    def __post_init__(self) -> None:
        if self.train <= 0 or self.test <= 0 or self.extra < 0:
            raise ConfigError(f"dataset.release_sizes must be positive counts, got {self}")


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    channels: int
    validation_size: int = 5000
    preprocess: str = "none"
    pad: int = 0
    seed: int = 0  # the seed of the stratified validation split
    release_sizes: Optional[ReleaseSizes] = None
    # CIFAR-100's label set: "fine" (100 classes) or "coarse" (20 superclasses, with space.num_classes = 20);
    # every other dataset has one label set, "fine".
    labels: str = "fine"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"dataset.name must be a plain name, got {quote(self.name)}")
        if self.channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 or 3, got {self.channels}")
        if self.validation_size <= 0:
            raise ConfigError(f"dataset.validation_size must be a positive integer, got {self.validation_size}")
        if self.preprocess not in PREPROCESS:
            raise ConfigError(
                f"dataset.preprocess must be one of {', '.join(PREPROCESS)}, got {quote(self.preprocess)}"
            )
        if self.pad < 0:
            raise ConfigError(f"dataset.pad must be >= 0, got {self.pad}")
        if self.labels not in ("fine", "coarse"):
            raise ConfigError(f"dataset.labels must be fine or coarse, got {quote(self.labels)}")
        if self.labels == "coarse" and self.name != "cifar100":
            raise ConfigError(
                f"dataset.labels = coarse selects CIFAR-100's 20 superclasses; dataset {self.name} has only fine labels"
            )
        if self.release_sizes is not None and self.validation_size >= self.release_sizes.train:
            raise ConfigError(
                f"dataset.validation_size {self.validation_size} leaves no training images "
                f"(the release has {self.release_sizes.train})"
            )


@dataclass(frozen=True)
class RenderConfig:
    mirror: bool = False
    crop_size: int = 0  # 0 = no crop line
    scale: float = 0.0  # 0 = no scale line
    mean_file: str = ""
    dropout: str = "paper"

    def __post_init__(self) -> None:
        from metaqnn.netspec import DROPOUT_RULES

        if self.dropout not in DROPOUT_RULES:
            raise ConfigError(f"render.dropout must be one of {', '.join(DROPOUT_RULES)}, got {quote(self.dropout)}")
        if self.crop_size < 0:
            raise ConfigError(f"render.crop_size must be >= 0, got {self.crop_size}")
        if self.scale < 0:
            raise ConfigError(f"render.scale must be >= 0, got {self.scale}")

    def transform(self) -> "Transform":
        from metaqnn.netspec import Transform

        return Transform(mirror=self.mirror, crop_size=self.crop_size, scale=self.scale, mean_file=self.mean_file)


@dataclass(frozen=True)
class ProtocolChoice:
    """Which solvers/*.toml protocol each role uses; both are loaded (and so checked) when built."""

    finetune: str
    search: str = "search"

    def __post_init__(self) -> None:
        from metaqnn.solverspec import load_protocol

        for role in ("search", "finetune"):
            load_protocol(getattr(self, role))

    def load(self, role: str) -> Any:
        from metaqnn.solverspec import load_protocol

        return load_protocol(getattr(self, role))


@dataclass(frozen=True)
class TensorboardConfig:
    """Event files for TensorBoard under ``<experiment>/tensorboard/`` (README "Watching a search").

    Written by the search's own process when tensorboardX is installed (the ``tensorboard`` extra);
    without it the search runs unchanged and says once how to turn them on.  ``flush_seconds``
    bounds how long a new point waits before it reaches the file, and how often the logs of the
    models in flight are read for their live curves."""

    enabled: bool = True
    flush_seconds: float = 15.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.flush_seconds <= 120.0:
            raise ConfigError(
                f"tensorboard.flush_seconds must be between 1 and 120 seconds, got {self.flush_seconds:g}"
            )


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig
    space: SpaceConfig
    schedule: EpsilonSchedule
    agent: AgentConfig
    render: RenderConfig
    protocol: ProtocolChoice
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    snapshots: SnapshotPolicy = field(default_factory=SnapshotPolicy)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)

    def __post_init__(self) -> None:
        self.early_stop.check_epochs(self.protocol.load("search").epochs)
        if self.render.crop_size > self.space.image_size + 2 * self.dataset.pad:
            raise ConfigError(
                f"render.crop_size {self.render.crop_size} is larger than the stored images "
                f"({self.space.image_size} + 2 x dataset.pad {self.dataset.pad})"
            )

    @property
    def name(self) -> str:
        return self.dataset.name

    def to_dict(self) -> Dict[str, Any]:
        """The canonical, JSON-able form: what the store records and compares on resume."""
        return {s: _section_to_dict(s, getattr(self, s)) for s in SECTIONS if s not in OPERATIONAL_SECTIONS}


# --- strict conversion of TOML values to field types -------------------------------------


def _fields(cls: Any) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        inner = args[0]
        if typing.get_origin(inner) is tuple:
            return f"a list of [{', '.join(_type_name(a).split(' ', 1)[-1] for a in typing.get_args(inner))}] pairs"
        return f"a list of {_type_name(inner).split(' ', 1)[-1]}s"
    if origin is tuple:
        return f"a [{', '.join(_type_name(a).split(' ', 1)[-1] for a in args)}] pair"
    if dataclasses.is_dataclass(tp):
        return "a table {" + ", ".join(f.name for f in _fields(tp)) + "}"
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the field type ``tp`` requires, or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]: its None has a word (NONE_WORDS)
        if value is None:  # only from Python callers: TOML cannot write a null
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, key)
    if tp is Any:
        return value
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        ok = isinstance(value, (list, tuple))
        if ok:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif origin is tuple:
        ok = isinstance(value, (list, tuple)) and len(value) == len(args)
        if ok:
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, typing.cast(type, tp)):  # already built (a Python caller)
            return value
        ok = isinstance(value, dict)
        if ok:
            return build_section(typing.cast(type, tp), value, key)
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {quote(value)}")
    return value


def check_fields(cls: type, values: Mapping[str, Any], section: str) -> Dict[str, Any]:
    """``values`` converted to the field types of ``cls``; the one unknown-key and type check."""
    fields = {f.name: f for f in _fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known in [{section}]: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for name, value in values.items():
        word = NONE_WORDS.get((section, name))
        if word is not None and value == word:
            kwargs[name] = None
            continue
        if word == "unlimited" and value == 0 and not isinstance(value, bool):
            raise ConfigError(f"{section}.{name} = 0 is ambiguous: write {word!r} for no limit, or a positive value")
        kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
        if _is_seed(name) and isinstance(kwargs[name], int) and kwargs[name] < 0:
            raise ConfigError(f"{section}.{name} must be an integer >= 0, got {kwargs[name]}")
    return kwargs


def _is_seed(name: str) -> bool:
    """A seed field (``seed``, ``split_seed``, ...): seeds are integers >= 0, like ``--seed``."""
    return name == "seed" or name.endswith("_seed")


def build_section(cls: Type[T], values: Mapping[str, Any], section: str) -> T:
    """Instantiate a section dataclass from a TOML table: unknown keys and wrong types refused by name."""
    fields = {f.name: f for f in _fields(cls)}
    kwargs = check_fields(cls, values, section)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing key {section}.{missing[0]} (required in [{section}])")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - the checks above leave nothing for the constructor
        raise ConfigError(f"[{section}]: {exc}") from None


def _section_to_dict(section: str, obj: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        word = NONE_WORDS.get((section, f.name))
        out[f.name] = word if (value is None and word is not None) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _fields(type(value))}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# --- files and overrides -----------------------------------------------------------------


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_toml(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix:
        return path
    if "/" in name_or_path or not name_or_path:
        raise ConfigError(f"unknown dataset/preset {quote(name_or_path)}; known: {', '.join(preset_names())}")
    path = PRESETS_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ConfigError(f"unknown dataset/preset {quote(name_or_path)}; known: {', '.join(preset_names())}")
    return path


def load_preset(name_or_path: str) -> Dict[str, Any]:
    path = preset_path(name_or_path)
    config = read_toml(path)
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    for section, table in config.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a [{section}] table")
    return config


def parse_override(text: str) -> Tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, TOML-parsed value); bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {quote(text)} must look like section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {quote(text)}: unknown section {quote(section)}; known: {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return section, key.strip(), value


def apply_overrides(config: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Overrides on the raw tables; keys and types are checked when the result is built."""
    out = copy.deepcopy(config)
    for text in overrides:
        section, key, value = parse_override(text)
        out.setdefault(section, {})[key] = value
    return out


# --- building ----------------------------------------------------------------------------


def config_from_dict(tables: Mapping[str, Any], name: Optional[str] = None) -> Config:
    """The typed config from TOML-like tables (a preset with overrides, or a store's record)."""
    unknown = sorted(set(tables) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    t = {s: dict(tables.get(s, {})) for s in SECTIONS}
    if name is not None:
        t["dataset"].setdefault("name", name)
    schedule = build_section(_ScheduleTable, t["schedule"], "schedule")
    return Config(
        dataset=build_section(DatasetConfig, t["dataset"], "dataset"),
        space=build_section(SpaceConfig, t["space"], "space"),
        schedule=EpsilonSchedule(schedule.steps) if schedule.steps is not None else EpsilonSchedule(),
        agent=build_section(AgentConfig, t["agent"], "agent"),
        render=build_section(RenderConfig, t["render"], "render"),
        protocol=build_section(ProtocolChoice, t["protocol"], "protocol"),
        early_stop=build_section(EarlyStopConfig, t["early_stop"], "early_stop"),
        constraints=build_section(ConstraintsConfig, t["constraints"], "constraints"),
        snapshots=build_section(SnapshotPolicy, t["snapshots"], "snapshots"),
        tensorboard=build_section(TensorboardConfig, t["tensorboard"], "tensorboard"),
    )


@dataclass(frozen=True)
class _ScheduleTable:
    steps: Optional[Tuple[Tuple[float, int], ...]] = field(default=None)


def build_config(preset: str, overrides: Sequence[str] = (), seed: Optional[int] = None) -> Config:
    """Preset + overrides -> Config; every error names the key and where it came from."""
    path = preset_path(preset)
    tables = load_preset(preset)
    name = path.stem
    try:
        config_from_dict(tables, name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    merged = apply_overrides(tables, overrides)
    if seed is not None:
        merged.setdefault("agent", {})["seed"] = seed
    try:
        return config_from_dict(merged, name)
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None


def stored_config(record: Mapping[str, Any]) -> Config:
    """The typed config an experiment recorded (records of earlier versions are upgraded first)."""
    return config_from_dict(upgrade_record(record))


def upgrade_record(record: Mapping[str, Any]) -> Dict[str, Any]:
    """Earlier versions recorded the raw preset tables, with 0 for "no limit"; make them canonical."""
    tables = copy.deepcopy(dict(record))
    for (section, key), word in NONE_WORDS.items():
        table = tables.get(section, {})
        if table.get(key) == 0 and not isinstance(table.get(key), bool):
            table[key] = word
    try:
        return config_from_dict(tables).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"the experiment's recorded config is not valid any more: {exc}") from None
