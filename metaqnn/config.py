"""Declarative configuration: TOML presets plus ``section.key=value`` overrides.

A preset (``presets/<name>.toml``) holds everything a search needs; command-line
overrides are parsed as TOML values so lists and booleans work
(``--set 'space.conv_filters=[16,32]'``).  The merged dict is what the experiment
store records, so a resumed search can refuse a changed config.
"""

import copy
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from qagent.agent import AgentConfig
from qagent.errors import ConfigError
from qagent.schedule import EpsilonSchedule
from qagent.space import SpaceConfig, space_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the users' Python 3.8 conda Caffe
    import tomli as tomllib

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = PROJECT_ROOT / "presets"
SOLVERS_DIR = PROJECT_ROOT / "solvers"
SECTIONS = ("dataset", "space", "schedule", "agent", "render", "protocol")
# Keys whose 0 means "no limit" (TOML has no null).
_ZERO_IS_NONE = {("space", "max_consecutive_fc"), ("space", "fc_max_rsize"), ("agent", "failure_reward")}


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_toml(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def load_preset(name_or_path: str) -> Dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(f"unknown dataset/preset {name_or_path!r}; known: {', '.join(preset_names())}")
    config = read_toml(path)
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return config


def parse_override(text: str) -> Any:
    """``section.key=value`` -> (section, key, TOML-parsed value); bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return section, key.strip(), value


def apply_overrides(config: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    out = copy.deepcopy(config)
    for text in overrides:
        section, key, value = parse_override(text)
        table = out.setdefault(section, {})
        if section != "schedule" and key not in table:
            raise ConfigError(
                f"override {text!r}: unknown key {key!r} in [{section}]; known: {', '.join(sorted(table))}"
            )
        table[key] = value
    return out


def build_config(preset: str, overrides: Sequence[str] = (), seed: Optional[int] = None) -> Dict[str, Any]:
    config = apply_overrides(load_preset(preset), overrides)
    if seed is not None:
        config.setdefault("agent", {})["seed"] = seed
    config.setdefault("dataset", {}).setdefault("name", preset)
    space_of(config)  # validate now, not hours into a search
    schedule_of(config)
    agent_config_of(config)
    return config


def _section(config: Dict[str, Any], name: str) -> Dict[str, Any]:
    values = dict(config.get(name, {}))
    for section, key in _ZERO_IS_NONE:
        if section == name and values.get(key) == 0:
            values[key] = None
    return values


def space_of(config: Dict[str, Any]) -> SpaceConfig:
    values = _section(config, "space")
    for key in ("conv_filters", "conv_sizes", "conv_strides", "pool_sizes", "pool_strides", "fc_units", "rsize_bins"):
        if key in values:
            values[key] = tuple(values[key])
    if "pool_pairs" in values:
        values["pool_pairs"] = tuple(tuple(p) for p in values["pool_pairs"])
    return space_from_dict(values)


def schedule_of(config: Dict[str, Any]) -> EpsilonSchedule:
    steps = config.get("schedule", {}).get("steps")
    if steps is None:
        return EpsilonSchedule()
    return EpsilonSchedule.from_pairs(steps)


def agent_config_of(config: Dict[str, Any]) -> AgentConfig:
    values = _section(config, "agent")
    known = set(AgentConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown agent setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return AgentConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"agent config: {exc}") from None
