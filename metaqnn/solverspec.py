"""Training protocols (solvers/*.toml) -> the ordered fields of a Caffe solver.

Epoch arithmetic follows the published solvers exactly: an epoch is
``floor(train / batch)`` iterations (test_interval, snapshot, max_iter,
stepsize), multistep boundaries are ``floor(epoch * train / batch)`` with one
consecutive stepvalue per halving, and the finetuning test pass is
``floor(test / batch)`` batches.  The search protocol tests the *whole*
validation set (ceil).
"""

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from metaqnn.config import SOLVERS_DIR, read_toml
from qagent.errors import ConfigError, quote


@dataclass(frozen=True)
class Restarts:
    max_restarts: int = 5
    lr_factor: float = 0.4
    pass_threshold: Any = 0.15  # float, or "chance" = 1/num_classes

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"restarts.max_restarts must be >= 0, got {self.max_restarts}")
        if not 0.0 < self.lr_factor <= 1.0:
            raise ConfigError(f"restarts.lr_factor must be in (0, 1], got {self.lr_factor}")
        t = self.pass_threshold
        number = isinstance(t, (int, float)) and not isinstance(t, bool)
        if not (t == "chance" or (number and 0.0 <= t < 1.0)):
            raise ConfigError(f'restarts.pass_threshold must be "chance" or a number in [0, 1), got {quote(t)}')

    def threshold(self, num_classes: int) -> float:
        return 1.0 / num_classes if self.pass_threshold == "chance" else float(self.pass_threshold)


@dataclass(frozen=True)
class Protocol:
    name: str
    type: str
    base_lr: float
    momentum: float
    weight_decay: float
    lr_policy: str
    gamma: float
    epochs: int
    momentum2: Optional[float] = None
    delta: Optional[float] = None
    step_epochs: int = 0
    rates: Tuple[Tuple[float, float], ...] = ()
    display: int = 100
    test_initialization: Optional[bool] = None
    snapshot_prefix: str = "snapshots/model"
    solver_mode: str = "CPU"
    train_set: str = "train"
    test_set: str = "val"
    train_batch: int = 128
    test_batch: int = 100
    random_seed: Optional[int] = None
    restarts: Restarts = field(default_factory=Restarts)
    # The base rate the declared ``rates`` were written against: the number of
    # halvings per boundary stays fixed when a model overrides base_lr (svhn_2).
    rates_base_lr: Optional[float] = None
    # With `metaqnn train --init finetune`: the lr_mult of the layers re-initialised for the
    # target (Caffe's flickr_style convention gives its new layer 10); copied layers keep 1.
    reinit_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in ("SGD", "Adam", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta"):
            raise ConfigError(f"protocol {self.name}: unknown solver type {self.type!r}")
        if self.lr_policy not in ("step", "multistep", "fixed"):
            raise ConfigError(f"protocol {self.name}: lr_policy must be step, multistep or fixed")
        if self.lr_policy == "step" and self.step_epochs <= 0:
            raise ConfigError(f"protocol {self.name}: step policy needs step_epochs > 0")
        if self.lr_policy == "multistep" and not self.rates:
            raise ConfigError(f"protocol {self.name}: multistep policy needs rates = [[epoch, rate], ...]")
        if self.base_lr <= 0 or self.epochs <= 0 or self.train_batch <= 0 or self.test_batch <= 0:
            raise ConfigError(f"protocol {self.name}: base_lr, epochs and batch sizes must be positive")
        if self.solver_mode not in ("CPU", "GPU"):
            raise ConfigError(f"protocol {self.name}: solver_mode must be CPU or GPU")
        if not 0.0 <= self.momentum < 1.0 or (self.momentum2 is not None and not 0.0 <= self.momentum2 < 1.0):
            raise ConfigError(f"protocol {self.name}: momentum and momentum2 must be in [0, 1)")
        if self.weight_decay < 0 or (self.delta is not None and self.delta <= 0):
            raise ConfigError(f"protocol {self.name}: weight_decay must be >= 0 and delta > 0")
        if self.lr_policy != "fixed" and not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"protocol {self.name}: gamma must be in (0, 1] (the rate is multiplied by it)")
        if self.display < 0:
            raise ConfigError(f"protocol {self.name}: display must be >= 0 (0: no training-loss lines)")
        if self.reinit_lr_mult <= 0:
            raise ConfigError(f"protocol {self.name}: reinit_lr_mult must be positive, got {self.reinit_lr_mult}")

    def iters_per_epoch(self, train_size: int) -> int:
        n = train_size // self.train_batch
        if n < 1:
            raise ConfigError(f"training set of {train_size} images is smaller than one batch of {self.train_batch}")
        return n

    def halvings(self) -> List[Tuple[float, int]]:
        """(epoch, number of gamma steps) per rate boundary, from the declared rates."""
        out = []
        prev = self.rates_base_lr or self.base_lr
        for epoch, rate in self.rates:
            out.append((epoch, round(math.log(prev / rate) / math.log(1.0 / self.gamma))))
            prev = rate
        return out

    def with_overrides(self, **values: Any) -> "Protocol":
        """A copy with some fields replaced; each value is checked against its field's type."""
        from metaqnn.config import check_fields

        if "name" in values:
            raise ConfigError(f"protocol {self.name}: 'name' is the protocol file's name, not a setting")
        return replace(self, **check_fields(Protocol, values, f"protocol {self.name}"))


def load_protocol(name: str) -> Protocol:
    path = Path(name) if Path(name).suffix else SOLVERS_DIR / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SOLVERS_DIR.glob("*.toml")))
        raise ConfigError(f"unknown protocol {name!r}; known: {known}")
    from metaqnn.config import build_section

    values: Dict[str, Any] = dict(read_toml(path))
    if "name" in values:
        raise ConfigError(f"{path}: 'name' is the file's name, not a setting")
    values.setdefault("rates_base_lr", values.get("base_lr"))
    try:
        return build_section(Protocol, {"name": path.stem, **values}, "protocol")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def solver_fields(
    protocol: Protocol,
    *,
    net: str,
    train_size: int,
    test_size: int,
    whole_test_set: bool,
    max_epochs: Optional[int] = None,
) -> List[Tuple[str, Any]]:
    """Ordered solver fields; ``max_epochs`` cuts training short (the search's first epoch)."""
    ipe = protocol.iters_per_epoch(train_size)
    test_iter = -(-test_size // protocol.test_batch) if whole_test_set else test_size // protocol.test_batch
    epochs = protocol.epochs if max_epochs is None else max_epochs
    f: List[Tuple[str, Any]] = [
        ("net", net),
        ("test_iter", max(1, test_iter)),
        ("test_interval", ipe),
        ("base_lr", float(protocol.base_lr)),
        ("momentum", float(protocol.momentum)),
    ]
    if protocol.momentum2 is not None:
        f.append(("momentum2", float(protocol.momentum2)))
    if protocol.delta is not None:
        f.append(("delta", float(protocol.delta)))
    f += [
        ("weight_decay", float(protocol.weight_decay)),
        ("display", protocol.display),
        ("max_iter", epochs * ipe),
        ("snapshot", ipe),
        ("snapshot_prefix", protocol.snapshot_prefix),
        ("solver_mode", protocol.solver_mode),
        ("type", protocol.type),
        ("lr_policy", protocol.lr_policy),
    ]
    if protocol.lr_policy != "fixed":
        f.append(("gamma", float(protocol.gamma)))
    if protocol.lr_policy == "step":
        f.append(("stepsize", protocol.step_epochs * ipe))
    elif protocol.lr_policy == "multistep":
        for epoch, steps in protocol.halvings():
            first = math.floor(epoch * train_size / protocol.train_batch)
            f.extend(("stepvalue", first + k) for k in range(steps))
    if protocol.test_initialization is not None:
        f.append(("test_initialization", bool(protocol.test_initialization)))
    if protocol.random_seed is not None:
        f.append(("random_seed", int(protocol.random_seed)))
    return f
