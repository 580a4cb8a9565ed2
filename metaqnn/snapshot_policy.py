"""``[snapshots]``: what a search keeps of its models' weights on disk, and what that costs.

Without early stopping a finished model keeps one file, its best weights (``final_prune``); a
model that failed keeps nothing.  A model stopped early keeps, besides, the snapshot it could be
finished from: weights *and* Adam's solver state (two more copies of the weights), about 3x its
weights on disk.  At SVHN scale that is the difference between ~66 GB and ~146 GB, mostly for
stopped models that will never be finished.  The policy says what may go:

* ``keep_stopped``: ``all`` (default: every stopped model can be finished), ``within_reach``
  (only a model whose prediction + ``reach`` reaches the ``top_k``-th best accuracy measured or
  predicted so far: the only ones ``finish --top`` could turn into a top model), ``none``;
* ``keep_solverstate = false``: a stopped model keeps its weights only (it can be restarted from
  them with ``metaqnn train --weights``, not finished where it stopped);
* ``budget_gb``: an upper bound on the snapshots of the committed models (trainings in flight come on top).  Over it, finish
  snapshots go first (lowest prediction first), then the best weights of models outside the
  ``top_k`` (lowest accuracy first); the ``top_k`` best weights are never deleted.

The decision (:func:`plan_drops`) is a pure function of the store's committed models and the
files on disk; the edge (:func:`apply_policy`) records each deletion in the model's folder
(``snapshots-dropped.json``, written before the files go) so that ``finish`` and ``export`` can
say why a file is missing.  Only committed models are looked at: a model in flight or set aside
(deferred) keeps everything it may continue from.  The policy is a disk setting, not part of what
is searched: it may change when a search is resumed (the store does not record it).
"""

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from qagent.errors import ConfigError, quote
from qagent.status import ModelStatus

KEEP_STOPPED = ("all", "within_reach", "none")
DROPPED = "snapshots-dropped.json"
POLICY_FILE = "snapshot-policy.json"  # the policy the last search run applied (status shows it)
GB = 1e9


@dataclass(frozen=True)
class SnapshotPolicy:
    keep_stopped: str = "all"
    top_k: int = 10  # the models whose best weights always stay, and the rank "within reach" is measured to
    reach: float = 0.02  # how far below the top_k-th accuracy a prediction may be and still be kept
    keep_solverstate: bool = True  # a stopped model's solver state (finishing continues where it stopped)
    budget_gb: Optional[float] = None  # the committed models' snapshots; None: unlimited

    def __post_init__(self) -> None:
        if self.keep_stopped not in KEEP_STOPPED:
            raise ConfigError(
                f"snapshots.keep_stopped must be one of {', '.join(KEEP_STOPPED)}, got {quote(self.keep_stopped)}"
            )
        if self.top_k < 1:
            raise ConfigError(f"snapshots.top_k must be >= 1, got {self.top_k}")
        if not (math.isfinite(self.reach) and 0.0 <= self.reach <= 1.0):
            raise ConfigError(f"snapshots.reach must be in [0, 1], got {self.reach}")
        if self.budget_gb is not None and not (math.isfinite(self.budget_gb) and self.budget_gb > 0):
            raise ConfigError(f'snapshots.budget_gb must be a positive number or "unlimited", got {self.budget_gb}')

    @property
    def deletes_anything(self) -> bool:
        return self.keep_stopped != "all" or not self.keep_solverstate or self.budget_gb is not None

    def describe(self) -> str:
        parts = [f"keep_stopped {self.keep_stopped}"]
        if self.keep_stopped == "within_reach":
            parts.append(f"reach {self.reach:g} of the top {self.top_k}")
        parts.append("solver states kept" if self.keep_solverstate else "solver states dropped")
        parts.append("no budget" if self.budget_gb is None else f"budget {self.budget_gb:g} GB (top {self.top_k} kept)")
        return ", ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "keep_stopped": self.keep_stopped,
            "top_k": self.top_k,
            "reach": self.reach,
            "keep_solverstate": self.keep_solverstate,
            "budget_gb": "unlimited" if self.budget_gb is None else self.budget_gb,
        }


# --- what is on disk -------------------------------------------------------------------


@dataclass(frozen=True)
class SnapFile:
    name: str  # relative to the model folder
    size: int
    role: str  # "best" (the best weights) | "finish" (the stopped model's snapshot) | "other"


@dataclass(frozen=True)
class ModelSnapshots:
    """One committed model's snapshot files and what ranks them."""

    model_id: int
    status: ModelStatus
    value: Optional[float]  # measured accuracy, or the prediction of a stopped model
    files: Tuple[SnapFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Drop:
    model_id: int
    name: str
    size: int
    reason: str


def _iteration(name: str) -> Optional[int]:
    stem = name.rsplit(".", 1)[0]
    _head, sep, tail = stem.rpartition("_iter_")
    return int(tail) if sep and tail.isdigit() else None


def role_of(name: str, best: Optional[int], resume: Optional[int]) -> str:
    it = _iteration(name)
    if it is not None and it == best and name.endswith(".caffemodel"):
        return "best"
    if it is not None and it == resume:
        return "finish"
    return "other"


def scan_model(
    folder: Path, model_id: int, status: ModelStatus, metrics: Dict[str, Any], value: Optional[float]
) -> ModelSnapshots:
    """The snapshot files of a committed model (``os.scandir``: one directory read, sizes from it)."""
    best, resume = metrics.get("best_iteration"), metrics.get("resume_iteration")
    files: List[SnapFile] = []
    try:
        with os.scandir(folder / "snapshots") as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False) and e.name.endswith((".caffemodel", ".solverstate")):
                    files.append(
                        SnapFile(
                            f"snapshots/{e.name}", e.stat(follow_symlinks=False).st_size, role_of(e.name, best, resume)
                        )
                    )
    except FileNotFoundError:
        pass
    return ModelSnapshots(model_id, status, value, tuple(sorted(files, key=lambda f: f.name)))


COMMITTED = (ModelStatus.DONE, ModelStatus.STOPPED, ModelStatus.FAILED, ModelStatus.OOM, ModelStatus.REJECTED)


def scan_experiment(exp_dir: Path, rows: Iterable[Any]) -> List[ModelSnapshots]:
    """Every committed model's snapshots (rows: the store's ModelRow objects)."""
    from metaqnn.experiment import model_dir

    return [
        scan_model(model_dir(exp_dir, m.id), m.id, m.status, m.metrics, m.accuracy)
        for m in rows
        if m.status in COMMITTED
    ]


# --- the decision ------------------------------------------------------------------------


def _ranked(m: ModelSnapshots) -> bool:
    """A model with an accuracy, measured or predicted (a failure's reward is no accuracy)."""
    return m.value is not None and m.status in (ModelStatus.DONE, ModelStatus.STOPPED)


def kth_best(models: Sequence[ModelSnapshots], k: int) -> float:
    """The k-th highest accuracy, measured or predicted (-inf while fewer than k models have one)."""
    values = sorted((float(m.value) for m in models if m.value is not None and _ranked(m)), reverse=True)
    return values[k - 1] if len(values) >= k else -math.inf


def plan_drops(models: Sequence[ModelSnapshots], policy: SnapshotPolicy) -> List[Drop]:
    """The files the policy deletes, in order.  Pure: the same models and policy, the same answer.

    ``other`` files of a committed model are left to the trainer's own pruning (recovery redoes it)."""
    drops: List[Drop] = []
    gone = set()

    def drop(m: ModelSnapshots, f: SnapFile, reason: str) -> None:
        if (m.model_id, f.name) not in gone:
            gone.add((m.model_id, f.name))
            drops.append(Drop(m.model_id, f.name, f.size, reason))

    kth = kth_best(models, policy.top_k)
    stopped = [m for m in models if m.status == ModelStatus.STOPPED]
    for m in sorted(stopped, key=lambda m: (m.value if m.value is not None else -math.inf, m.model_id)):
        finish = [f for f in m.files if f.role == "finish"]
        value = m.value if m.value is not None else -math.inf
        if policy.keep_stopped == "none":
            for f in finish:
                drop(m, f, "snapshots.keep_stopped = none")
        elif policy.keep_stopped == "within_reach" and value + policy.reach < kth:
            for f in finish:
                drop(
                    m, f, f"prediction {value:.4f} + reach {policy.reach:g} < the top-{policy.top_k} accuracy {kth:.4f}"
                )
        if not policy.keep_solverstate:
            for f in finish:
                if f.name.endswith(".solverstate"):
                    drop(m, f, "snapshots.keep_solverstate = false")
    if policy.budget_gb is None:
        return drops
    budget = policy.budget_gb * GB
    total = sum(f.size for m in models for f in m.files if (m.model_id, f.name) not in gone)

    def lowest_first(ms: Iterable[ModelSnapshots]) -> List[ModelSnapshots]:
        return sorted(ms, key=lambda m: (m.value if m.value is not None else -math.inf, m.model_id))

    for m in lowest_first(stopped):
        for f in sorted((f for f in m.files if f.role == "finish"), key=lambda f: not f.name.endswith(".solverstate")):
            if total <= budget:
                return drops
            if (m.model_id, f.name) not in gone:
                drop(m, f, f"over snapshots.budget_gb {policy.budget_gb:g}")
                total -= f.size
    ranked = lowest_first(m for m in models if _ranked(m))
    unranked = [m for m in models if not _ranked(m)]  # a failure's best weights go first
    for m in unranked + ranked[: max(0, len(ranked) - policy.top_k)]:
        for f in m.files:
            if total <= budget:
                return drops
            if f.role == "best" and (m.model_id, f.name) not in gone:
                drop(m, f, f"over snapshots.budget_gb {policy.budget_gb:g} (not in the top {policy.top_k})")
                total -= f.size
    return drops


# --- the edge ----------------------------------------------------------------------------


def dropped_record(folder: Path) -> List[Dict[str, Any]]:
    """What the policy deleted from a model folder (empty when nothing, or unreadable)."""
    try:
        data = json.loads((folder / DROPPED).read_text())
    except (OSError, ValueError):
        return []
    entries = data.get("dropped") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return []  # not a record this module wrote: it only explains, so nothing depends on it
    out = []
    for d in entries:
        if isinstance(d, dict) and isinstance(d.get("name"), str):
            size = d.get("bytes")
            ok = isinstance(size, int) and not isinstance(size, bool) and size >= 0
            out.append({"name": d["name"], "bytes": size if ok else 0, "reason": str(d.get("reason", "?"))})
    return out


def why_dropped(folder: Path, pattern: str) -> Optional[str]:
    """The policy's reason for deleting a file matching ``pattern`` (relative to the model folder), if it did."""
    return next(
        (str(d.get("reason")) for d in dropped_record(folder) if fnmatch.fnmatchcase(str(d.get("name", "")), pattern)),
        None,
    )


def apply_policy(exp_dir: Path, rows: Iterable[Any], policy: SnapshotPolicy, log: Callable[[str], None]) -> List[Drop]:
    """Delete what the policy drops; each deletion is recorded in its model's folder first.

    Idempotent and safe to kill anywhere: a file recorded but still there is deleted next time."""
    from metaqnn.experiment import model_dir
    from metaqnn.trainer import write_atomic

    if not policy.deletes_anything:
        return []
    drops = plan_drops(scan_experiment(exp_dir, rows), policy)
    by_model: Dict[int, List[Drop]] = {}
    for d in drops:
        by_model.setdefault(d.model_id, []).append(d)
    for model_id, ds in by_model.items():
        folder = model_dir(exp_dir, model_id)
        known = {d["name"]: d for d in dropped_record(folder)}
        known.update({d.name: {"name": d.name, "bytes": d.size, "reason": d.reason} for d in ds})
        write_atomic(
            folder / DROPPED, json.dumps({"dropped": sorted(known.values(), key=lambda d: d["name"])}, indent=1)
        )
        for d in ds:
            (folder / d.name).unlink(missing_ok=True)
    if drops:
        freed = sum(d.size for d in drops) / GB
        log(
            f"snapshots: the policy ({policy.describe()}) deleted {len(drops)} files of {len(by_model)} models, {freed:.2f} GB"
        )
    return drops


def write_policy(exp_dir: Path, policy: SnapshotPolicy) -> None:
    from metaqnn.trainer import write_atomic

    write_atomic(Path(exp_dir) / POLICY_FILE, json.dumps(policy.to_dict(), indent=1))


class UnreadablePolicy(ValueError):
    """snapshot-policy.json exists but is not one this module wrote."""


def read_policy(exp_dir: Path) -> Optional[SnapshotPolicy]:
    """The policy the experiment's last search applied; None when no search wrote one.

    Raises UnreadablePolicy when the file is there but damaged: its defaults are no stand-in for
    what was applied (the store does not record the policy)."""
    path = Path(exp_dir) / POLICY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        budget = data.get("budget_gb")
        return SnapshotPolicy(
            keep_stopped=str(data["keep_stopped"]),
            top_k=int(data["top_k"]),
            reach=float(data["reach"]),
            keep_solverstate=bool(data["keep_solverstate"]),
            budget_gb=None if budget == "unlimited" else float(budget),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise UnreadablePolicy(f"{path} is unreadable ({type(exc).__name__})") from None


# --- what it costs ------------------------------------------------------------------------


@dataclass
class DiskUsage:
    """An experiment's disk, as ``status`` and ``report`` show it."""

    total: int = 0  # everything under the experiment folder
    best: int = 0
    best_models: int = 0
    finish: int = 0
    finish_solverstate: int = 0
    finish_models: int = 0
    other: int = 0  # snapshots of models in flight or set aside, and leftovers
    dropped_files: int = 0
    dropped_bytes: int = 0
    committed: int = 0
    by_status: Dict[str, int] = field(default_factory=dict)

    def lines(self, remaining_models: int, policy: Optional[SnapshotPolicy], policy_note: str = "") -> List[str]:
        snaps = self.best + self.finish + self.other
        out = [
            f"disk: {self.total / GB:.2f} GB in the experiment folder, {snaps / GB:.2f} GB of it snapshots: "
            f"best weights of {self.best_models} models {self.best / GB:.2f} GB, finish snapshots of "
            f"{self.finish_models} stopped models {self.finish / GB:.2f} GB "
            f"(solver states {self.finish_solverstate / GB:.2f} GB), in flight/other {self.other / GB:.2f} GB"
        ]
        if self.dropped_files:
            out.append(
                f"  deleted by the snapshot policy: {self.dropped_files} files, {self.dropped_bytes / GB:.2f} GB"
            )
        if self.committed and remaining_models > 0:
            per = self.total / self.committed
            out.append(
                f"  at {per / 1e6:.1f} MB per model so far, the schedule's {remaining_models} remaining models "
                f"need about {per * remaining_models / GB:.1f} GB more"
            )
        if policy_note:
            out.append(f"  snapshot policy: {policy_note}")
        if policy is not None:
            out.append(f"  snapshot policy: {policy.describe()}")
            if policy.budget_gb is not None and self.best + self.finish > policy.budget_gb * GB:
                out.append(
                    f"  OVER the budget of {policy.budget_gb:g} GB: the top {policy.top_k} models' weights alone are kept"
                )
        return out


def _tree_size(folder: Path) -> int:
    total = 0
    stack = [str(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def disk_usage(exp_dir: Path, rows: Sequence[Any]) -> DiskUsage:
    """What the experiment holds on disk now: one walk of its folder, one read of each model's snapshots."""
    from metaqnn.experiment import model_dir

    usage = DiskUsage(total=_tree_size(Path(exp_dir)))
    for m in rows:
        folder = model_dir(exp_dir, m.id)
        if m.status in COMMITTED:
            usage.committed += 1
            snaps = scan_model(folder, m.id, m.status, m.metrics, m.accuracy)
            best = [f for f in snaps.files if f.role == "best"]
            finish = [f for f in snaps.files if f.role == "finish"]
            usage.best += sum(f.size for f in best)
            usage.best_models += bool(best)
            usage.finish += sum(f.size for f in finish)
            usage.finish_solverstate += sum(f.size for f in finish if f.name.endswith(".solverstate"))
            usage.finish_models += bool(finish)
            usage.other += sum(f.size for f in snaps.files if f.role == "other")
        else:
            usage.other += sum(f.size for f in scan_model(folder, m.id, m.status, {}, None).files)
        for d in dropped_record(folder):
            usage.dropped_files += 1
            usage.dropped_bytes += int(d.get("bytes", 0) or 0)
    return usage
