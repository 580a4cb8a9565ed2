"""Train one sampled network with the exploration protocol of Section 5.

1. Probe: train one epoch at base_lr. If validation accuracy does not beat the
   "random predictor" threshold (protocol setting), multiply the rate by 0.4
   and start over, at most ``max_restarts`` times.
2. Full: continue from the probe's epoch-1 snapshot to 20 epochs with the
   x0.2-every-5-epochs decay.  Reward = best validation accuracy.

Failures are results: divergence, a net Caffe rejects, a crash, a timeout or
out of memory each end as a :class:`TrainResult` with a status, never as an
exception (except Ctrl-C and missing data, which stop the whole search).  The
model folder holds the rendered files, one log per caffe run, CSV curves and
the pruned snapshots; ``state.json`` lets a crashed search resume a half-trained
model from its last snapshot.

Crash consistency (kill -9 anywhere): caffe's log reaches the disk before anything acts on it;
the reward and the snapshots to keep are decided from the model's *complete* history (every run
of its lineage, parsed from the logs) and the snapshot files, never from how far a live reader
got; ``result.json`` is written atomically before the final pruning, and a model whose
``result.json`` exists is recovered from it instead of being trained again.
"""

import hashlib
import json
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

from data_prep.lmdb_check import lmdb_file_problem
from metaqnn import faults
from metaqnn.caffe.logparse import LogState, merge_states, parse_lines, split_runs, write_csvs
from metaqnn.caffe.runner import RunOutcome, Stall, fsync_file, measured_epoch_seconds, run_caffe, train_argv
from metaqnn.constraints import LatencyPlan
from metaqnn.early_stop import ModelInfo, StopDecision, StopRule, epoch_curve, model_info
from metaqnn.early_stop.rules import describe
from metaqnn.experiment import IDENTITY, read_identity
from metaqnn.failures import FailureKind, InfrastructureError, infrastructure_reason
from metaqnn.netspec import NetSpec, Transform, build_net
from metaqnn.render import render_net, write_training_files
from metaqnn.solverspec import Protocol, solver_fields
from qagent.arch import Layer, format_architecture
from qagent.errors import StoreError
from qagent.status import ModelStatus

ACCURACY = "Accuracy1"
_SNAP_ITER = re.compile(r"_iter_(\d+)\.(caffemodel|solverstate)$")


def caffe_seed(seed: int, arch: str) -> int:
    """Caffe's random_seed for one model: a pure function of the experiment seed and the architecture."""
    digest = hashlib.sha256(f"{seed}|{arch}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


class DataMissingError(InfrastructureError):
    """The LMDBs are gone or unreadable: every model would fail, so the search stops instead."""


@dataclass(frozen=True)
class TrainJob:
    layers: Tuple[Layer, ...]
    model_dir: Path
    caffe: Path
    train_lmdb: Path
    val_lmdb: Path
    train_size: int
    val_size: int
    image_size: int
    channels: int
    num_classes: int
    protocol: Protocol
    transform: Transform = field(default_factory=Transform)
    dropout: str = "paper"
    gpu: Optional[int] = None
    timeout: Optional[float] = None
    retries: int = 1  # extra attempts for a timeout or a stall
    crash_retries: int = 2  # extra attempts for a caffe killed by a signal (docs/deviations.md)
    seed: Optional[int] = None  # Caffe's random_seed (weight fillers, dropout): CPU training is then repeatable
    stall: Optional[Stall] = field(default_factory=Stall)  # watchdog for a hung or stopped caffe; None: off
    env: Tuple[Tuple[str, str], ...] = ()  # extra environment of caffe, e.g. the GPU it sees (metaqnn.packing)
    early_stop: Optional[StopRule] = None  # may stop the full training at a checkpoint epoch (metaqnn.early_stop)
    experiment_id: str = ""  # the store's experiment id: the model folder must carry it (identity.json)
    model_id: Optional[int] = None
    latency: Optional[LatencyPlan] = None  # time the model with `caffe time` first ([constraints])

    def __post_init__(self) -> None:
        # caffe runs inside the model folder: a relative path would point somewhere else there
        for name in ("model_dir", "train_lmdb", "val_lmdb"):
            object.__setattr__(self, name, Path(getattr(self, name)).resolve())


@dataclass
class TrainResult:
    status: ModelStatus  # done | failed | oom
    best_accuracy: Optional[float] = None
    last_accuracy: Optional[float] = None
    best_iteration: Optional[int] = None
    learning_rate: Optional[float] = None
    restarts: int = 0
    failure: Optional[FailureKind] = None
    message: str = ""
    curve: List[Tuple[int, float]] = field(default_factory=list)
    wall_time: float = 0.0
    caffe_time: float = 0.0
    images_per_sec: Optional[float] = None
    param_count: int = 0
    worker: str = ""  # host:pid (and Ray node) that trained it
    caffe_seed: Optional[int] = None
    iters_per_epoch: Optional[int] = None
    # status "stopped" (an early-stopping rule): the reward is ``predicted_accuracy``, not a measurement
    predicted_accuracy: Optional[float] = None
    stopped_epoch: Optional[int] = None
    stop_probability: Optional[float] = None  # P(final beats stop_target) under the predictor
    stop_target: Optional[float] = None
    stop_rule: str = ""
    resume_iteration: Optional[int] = None  # the snapshot kept to finish the training later
    notes: List[str] = field(default_factory=list)  # what the search should say about this training
    latency: Optional[Dict[str, Any]] = None  # metaqnn.latency.Latency.to_dict(), when [constraints] times models

    def __post_init__(self) -> None:  # a result read back from result.json holds plain strings
        self.status = ModelStatus(self.status)
        self.failure = FailureKind(self.failure) if self.failure else None

    def metrics(self) -> Dict[str, Any]:
        return asdict(self)


class Verdict(NamedTuple):
    """How a caffe run failed, when it did: the model's status, the kind of failure, a message."""

    status: ModelStatus
    failure: FailureKind
    message: str

    @classmethod
    def failed(cls, failure: FailureKind, message: str) -> "Verdict":
        return cls(ModelStatus.FAILED, failure, message)

    def transient(self, outcome: RunOutcome) -> bool:
        """Worth one more attempt: a timeout, a stall, or a crash by a signal (a killed caffe)."""
        if self.failure in (FailureKind.TIMEOUT, FailureKind.STALLED):
            return True
        return self.signal_death(outcome)

    def signal_death(self, outcome: RunOutcome) -> bool:
        return self.failure == FailureKind.CRASHED and outcome.signal is not None

    def result(self, **fields: Any) -> "TrainResult":
        return TrainResult(self.status, failure=self.failure, message=self.message, **fields)


def _accuracy_curve(states: Sequence[LogState]) -> List[Tuple[int, float]]:
    """(iteration, accuracy) over runs given oldest first; a later measurement of an iteration wins."""
    by_iter: Dict[int, float] = {}
    for st in states:
        for row in st.test_rows:
            v = row.get(ACCURACY)
            it = int(row["NumIters"])
            if v is not None and math.isfinite(v) and not row.get("_nan_before"):
                by_iter[it] = v
            else:
                by_iter.pop(it, None)
    return sorted(by_iter.items())


def best_of(curve: Sequence[Tuple[int, float]]) -> Optional[Tuple[int, float]]:
    """The highest accuracy, the earliest iteration among ties (the result and the pruning agree)."""
    return max(curve, key=lambda p: (p[1], -p[0])) if curve else None


def snapshot_files(folder: Path) -> Dict[int, List[Path]]:
    """A snapshots folder's files by iteration (caffemodel and solverstate of each)."""
    out: Dict[int, List[Path]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SNAP_ITER.search(p.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(p)
    return out


def prune_snapshots(folder: Path, keep: Sequence[int]) -> None:
    """Delete every snapshot whose iteration is not in ``keep``."""
    for it, paths in snapshot_files(folder).items():
        if it not in keep:
            for p in paths:
                p.unlink(missing_ok=True)


@dataclass
class SnapshotFacts:
    """What a model's history says about its snapshot files."""

    best: Optional[int]  # iteration of the best accuracy over the whole history
    tested: Set[int]  # iterations whose latest snapshot was tested afterwards
    complete: Set[int]  # iterations whose latest solverstate write is confirmed by a later log line


def snapshot_facts(states: Sequence[LogState]) -> SnapshotFacts:
    last_snap: Dict[int, int] = {}
    last_test: Dict[int, int] = {}
    complete: Dict[int, bool] = {}
    for idx, st in enumerate(states):
        for n, path in enumerate(st.snapshots):
            m = _SNAP_ITER.search(path)
            if m:
                it = int(m.group(1))
                last_snap[it] = idx
                if m.group(2) == "solverstate":
                    complete[it] = n < st.snapshots_complete
        for row in st.test_rows:
            if ACCURACY in row:  # a row still being read has no accuracy yet: not measured
                last_test[int(row["NumIters"])] = idx
    best = best_of(_accuracy_curve(states))
    return SnapshotFacts(
        best=best[0] if best else None,
        tested={it for it, idx in last_test.items() if idx >= last_snap.get(it, -1)},
        complete={it for it, ok in complete.items() if ok},
    )


def resume_point(
    folder: Path, facts: SnapshotFacts, min_iter: int = 0, max_iter: Optional[int] = None
) -> Optional[int]:
    """Newest iteration whose weights and solver state are both on disk and completely written.

    Completely written means: the log shows caffe's solver-state line *and* a later line.  A
    snapshot no parsed line mentions yet is never trusted: caffe logs before it writes, so it
    may still be writing it, or the log reader lags behind caffe.
    """
    files = snapshot_files(folder)
    ok = [
        it
        for it, paths in files.items()
        if it >= min_iter
        and (max_iter is None or it <= max_iter)
        and {p.suffix for p in paths} >= {".caffemodel", ".solverstate"}
        and it in facts.complete
    ]
    return max(ok) if ok else None


def prune_by_history(folder: Path, facts: SnapshotFacts, keep: Iterable[int] = ()) -> None:
    """Delete only what can never matter: a snapshot whose accuracy is known and is not the best,
    unless it is the resume point.  Untested snapshots (caffe may be ahead of the log reader, or
    was killed before testing them) and the best weights over *all* runs always stay."""
    resume = resume_point(folder, facts)
    for it, paths in snapshot_files(folder).items():
        if it == resume or it in keep or it not in facts.tested:
            continue
        for p in paths:
            if it != facts.best or p.suffix != ".caffemodel":
                p.unlink(missing_ok=True)


def final_prune(folder: Path, best_iteration: Optional[int], resume_iteration: Optional[int] = None) -> None:
    """A finished model keeps only its best weights, a model stopped early also the snapshot to
    finish it from, a model with no best iteration (it failed in the probe, or was never trained)
    nothing at all (idempotent: redone when a result is recovered)."""
    kept = {best_iteration, resume_iteration} - {None}
    doomed = [p for it, paths in snapshot_files(folder).items() for p in paths if it not in kept]
    doomed += [p for p in folder.glob("*.solverstate") if p not in doomed and _iter_in(p) != resume_iteration]
    for n, p in enumerate(doomed):
        p.unlink(missing_ok=True)
        if n == 0:
            faults.point("pruning")  # a kill half-way through the deletions


def _iter_in(path: Path) -> Optional[int]:
    m = _SNAP_ITER.search(path.name)
    return int(m.group(1)) if m else None


def write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename, fsync the folder: after a kill the file is either old or complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fd = os.open(str(path.parent), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _runs_of(log: Path) -> List[LogState]:
    return [parse_lines(lines) for _, lines in split_runs(log.read_text(errors="replace").splitlines())]


_LOG_NAME = re.compile(r"^(probe(\d+)|train\d+)(_retry\d+)?\.log$")


def read_runs(folder: Path, restart: Optional[int], probes_only: bool = False) -> List[LogState]:
    """Every caffe run of the model's lineage -- the probe with this restart index (all probes if
    None) and every full-training run -- parsed from the logs, oldest first by run number."""
    keyed = []
    for log in folder.glob("*.log"):
        m = _LOG_NAME.match(log.name)
        if m is None or (m.group(2) is not None and restart is not None and int(m.group(2)) != restart):
            continue
        if probes_only and m.group(2) is None:
            continue
        mtime = log.stat().st_mtime_ns
        for i, (number, lines) in enumerate(split_runs(log.read_text(errors="replace").splitlines())):
            keyed.append(((number, mtime, log.name, i), parse_lines(lines)))
    return [st for _, st in sorted(keyed, key=lambda kv: kv[0])]


class _StartAfresh(InfrastructureError):
    """The folder's history cannot be continued (its snapshots are gone): the model starts afresh."""


# result.json statuses that are results; a 'deferred' one was set aside and is trained again
_RESULT_STATUSES = (ModelStatus.DONE, ModelStatus.FAILED, ModelStatus.STOPPED, ModelStatus.OOM, ModelStatus.REJECTED)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def job_net(job: TrainJob) -> NetSpec:
    """The search net of a job, exactly as the trainer renders it into the model folder."""
    return build_net(
        job.layers,
        image_size=job.image_size,
        channels=job.channels,
        num_classes=job.num_classes,
        train_source=str(job.train_lmdb),
        test_source=str(job.val_lmdb),
        transform=job.transform,
        dropout=job.dropout,
        train_batch=job.protocol.train_batch,
        test_batch=job.protocol.test_batch,
    )


def folder_identity(job: TrainJob, net_text: str) -> Dict[str, Any]:
    """What a model folder trains: its experiment and model id, architecture, Caffe seed, net and protocol.

    Written first into a new folder; any later run adopts the folder's logs, snapshots or result
    only when it names the same identity, so a folder left by another experiment, another model
    under a reused id, or another protocol or data set is never taken for this model's history.
    Where caffe runs (GPU, timeouts, the early-stopping rule) is not part of it.
    """
    protocol = json.dumps(asdict(job.protocol), sort_keys=True, default=str)
    return {
        "experiment": job.experiment_id,
        "model": job.model_id,
        "architecture": format_architecture(job.layers),
        "caffe_seed": job.seed,
        "net_sha256": _digest(net_text),
        "protocol_sha256": _digest(protocol),
        "train_size": job.train_size,
        "val_size": job.val_size,
    }


def identity_mismatch(found: Optional[Dict[str, Any]], wanted: Dict[str, Any]) -> Optional[str]:
    """Why a folder's identity is not ``wanted`` (None when it is)."""
    if found is None:
        return "it carries no identity.json (a folder this model did not write)"
    for key, value in wanted.items():
        if found.get(key) != value:
            return f"its identity.json names {key} {found.get(key)!r}, this model's is {value!r}"
    return None


def set_aside(folder: Path) -> Path:
    """Move a folder that is not to be adopted out of the way (kept, never deleted): ``<name>.foreign-N``."""
    n = 1
    while os.path.lexists(str(folder.with_name(f"{folder.name}.foreign-{n}"))):
        n += 1
    dest = folder.with_name(f"{folder.name}.foreign-{n}")
    folder.rename(dest)
    return dest


def _state_problem(state: Any) -> Optional[str]:
    """Why a loaded state.json cannot be trusted (None when it can)."""
    if not isinstance(state, dict):
        return "it is not a JSON object"
    if state.get("phase") not in ("probe", "full"):
        return f"its phase is {state.get('phase')!r}"
    for key in ("restart", "runs"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            return f"its {key} is {state.get(key)!r}"
    if state["phase"] == "full" and not isinstance(state.get("lr"), (int, float)):
        return "it has no learning rate for the full training"
    return None


class Trainer:
    def __init__(self, job: TrainJob, progress: Optional[Callable[[str], None]] = None) -> None:
        self.job = job
        self.dir = job.model_dir.resolve()  # caffe runs with this as its working directory
        self.snap_dir = self.dir / "snapshots"
        self.progress = progress or (lambda _msg: None)
        self.ipe = job.protocol.iters_per_epoch(job.train_size)
        self.caffe_time = 0.0
        self.states: List[LogState] = []
        self.state: Dict[str, Any] = {}
        self.param_count = 0
        self.decision: Optional[StopDecision] = None  # the early-stopping rule's, once it stops the model
        self.spec = job_net(job)
        self.net_text = render_net(self.spec)
        self.identity = folder_identity(job, self.net_text)
        self.notes: List[str] = []

    # -- files ------------------------------------------------------------------------
    def _load_state(self) -> Dict[str, Any]:
        """phase (probe | full), restart index, learning rate, caffe runs so far: survives a crash.

        Checked by :meth:`claim` before anything else reads it."""
        p = self.dir / "state.json"
        return json.loads(p.read_text()) if p.exists() else {"phase": "probe", "restart": 0, "runs": 0}

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self.progress(text)

    def claim(self) -> None:
        """Make the model folder this model's: adopt it when its identity matches and its state
        can be read, else set it aside (``<folder>.foreign-N``, kept) and start afresh.

        Nothing in a folder -- result, logs, snapshots, state -- is read before this check."""
        folder = self.dir
        if folder.is_dir() and any(folder.iterdir()):
            why = identity_mismatch(read_identity(folder), self.identity)
            state = folder / "state.json"
            if why is None and state.exists():
                try:
                    problem = _state_problem(json.loads(state.read_text()))
                except (OSError, ValueError) as exc:
                    problem = f"it does not parse ({type(exc).__name__})"
                if problem is not None:
                    why = f"its {state} cannot be trusted: {problem}"
            if why is None:
                return
            dest = set_aside(folder)
            self._note(f"model folder {folder} set aside as {dest.name} because {why}; training from the start")
        elif folder.exists() and not folder.is_dir():
            raise InfrastructureError(f"model folder {folder} is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / IDENTITY, json.dumps(self.identity, indent=1, sort_keys=True))

    def _save_state(self) -> None:
        write_atomic(self.dir / "state.json", json.dumps(self.state))

    def _write_solver(self, name: str, lr: float, epochs: int) -> Path:
        proto = self.job.protocol.with_overrides(base_lr=lr, random_seed=self.job.seed)
        if self.job.gpu is not None:
            proto = proto.with_overrides(solver_mode="GPU")
        fields = solver_fields(
            proto,
            net="net.prototxt",
            train_size=self.job.train_size,
            test_size=self.job.val_size,
            whole_test_set=True,
            max_epochs=epochs,
        )
        return write_training_files(self.dir, None, fields, solver_name=name)

    def _check_data(self) -> None:
        """Before each caffe run: data deleted or truncated mid-search stops the search, not this model."""
        for p in (self.job.train_lmdb, self.job.val_lmdb):
            problem = lmdb_file_problem(p)  # reads only the LMDB's meta pages: cheap, and never maps it
            if problem is not None:
                raise DataMissingError(f"training data {p}: {problem} (run `make data` or `metaqnn prepare`)")

    # -- one caffe run ----------------------------------------------------------------
    def _history(self) -> List[LogState]:
        """The model's complete recorded history: the current probe's runs, then the full runs."""
        return read_runs(self.dir, self.state.get("restart", 0))

    def _run(self, solver: Path, snapshot: Optional[Path], label: str, keep: Sequence[int]) -> RunOutcome:
        self._check_data()
        self.state["runs"] += 1
        self._save_state()
        log = self.dir / f"{label}.log"
        prior = self._history()
        prior_epoch = next(
            (e for e in map(lambda st: measured_epoch_seconds(st, self.ipe), reversed(prior)) if e is not None), None
        )
        seen = {"tests": 0}

        def on_line(st: LogState) -> bool:
            measured = sum(ACCURACY in r for r in st.test_rows)
            if measured == seen["tests"]:
                return False
            seen["tests"] = measured
            row = st.test_rows[-1]
            acc = row.get(ACCURACY)
            if acc is not None:
                self.progress(f"epoch {int(row['NumIters']) // self.ipe} acc {acc:.4f}")
            # a test line is a safe point: the snapshot it measured is now known to be best or not
            prune_by_history(self.snap_dir, snapshot_facts([*prior, st]), keep)
            if self.state.get("phase") == "full":
                self.decision = self._early_decision([*prior, st])
            return self.decision is not None

        outcome = run_caffe(
            train_argv(self.job.caffe, solver, snapshot, self.job.gpu),
            cwd=self.dir,
            log_path=log,
            timeout=self.job.timeout,
            on_line=on_line,
            stall=self.job.stall,
            iters_per_epoch=self.ipe,
            epoch_seconds=prior_epoch,
            run_number=self.state["runs"],
            env=dict(self.job.env) or None,
        )
        self.caffe_time += outcome.wall_time
        self.states.append(outcome.state)
        write_csvs(merge_states(_runs_of(log)), log.with_suffix(""))  # each iteration once, the latest
        return outcome

    def _classify(self, o: RunOutcome) -> Optional[Verdict]:
        """How a run that did not finish normally failed (the model's failure), else None."""
        st = o.state
        if o.stopped_early:  # the rule stopped it at a test line: its snapshot is complete
            return None
        broken = infrastructure_reason(st.fatal)
        if broken is not None:  # not this net's fault: stop the search, retry the model on resume
            raise InfrastructureError(f"caffe failed on {self.dir.name} because {broken}")
        if st.out_of_memory:
            return Verdict(ModelStatus.OOM, FailureKind.OOM, "CUDA out of memory: " + (st.fatal[0] if st.fatal else ""))
        if o.timed_out:
            return Verdict.failed(FailureKind.TIMEOUT, f"stopped after the wall-clock limit of {self.job.timeout} s")
        if o.stalled:
            return Verdict.failed(
                FailureKind.STALLED, "caffe printed nothing for longer than the stall watchdog allows"
            )
        if o.stopped_for_nan:
            return None  # handled by the protocol (divergence)
        self._check_data()
        lmdb_fatal = next((f for f in st.fatal if "db_lmdb" in f or "mdb_" in f.lower() or "MDB_" in f), None)
        if lmdb_fatal is not None:  # every model would fail the same way: stop the search instead
            raise DataMissingError(f"caffe cannot read the training data: {lmdb_fatal[:200]}")
        if st.fatal:
            return Verdict.failed(FailureKind.REJECTED, "caffe refused the net: " + st.fatal[0][:300])
        if o.returncode != 0:
            sig = o.signal
            if sig is not None:  # not shown to be the net's doing: retried, then set aside (no reward)
                return Verdict(ModelStatus.DEFERRED, FailureKind.CRASHED, f"caffe was killed by signal {sig}")
            return Verdict.failed(FailureKind.CRASHED, f"caffe crashed (exit status {o.returncode})")
        return None

    def _run_with_retry(
        self, solver: Path, snapshot: Optional[Path], label: str, keep: Sequence[int]
    ) -> Tuple[RunOutcome, Optional[Verdict]]:
        attempt = 0
        while True:
            o = self._run(solver, snapshot, f"{label}" if attempt == 0 else f"{label}_retry{attempt}", keep)
            verdict = self._classify(o)
            if verdict is None or not verdict.transient(o):
                return o, verdict
            allowed = self.job.crash_retries if verdict.signal_death(o) else self.job.retries
            if attempt >= allowed:
                if verdict.signal_death(o):
                    verdict = verdict._replace(
                        message=f"{verdict.message} in all {attempt + 1} attempts: set aside without a reward, "
                        "trained again when the search is next run"
                    )
                return o, verdict
            attempt += 1
            self.progress(f"transient failure ({verdict.message}), retrying")
            if snapshot is not None:  # continue from the newest snapshot since the one this run started from
                snapshot = self._latest_solverstate(min_iter=self._iter_of(snapshot)) or snapshot

    @staticmethod
    def _iter_of(path: Path) -> int:
        m = _SNAP_ITER.search(path.name)
        return int(m.group(1)) if m else 0

    def _latest_solverstate(self, min_iter: int = 0) -> Optional[Path]:
        """The solver state to continue from: newest complete pair per the files and the history."""
        it = resume_point(self.snap_dir, snapshot_facts(self._history()), min_iter)
        if it is None:
            return None
        return next(p for p in snapshot_files(self.snap_dir)[it] if p.suffix == ".solverstate").relative_to(self.dir)

    # -- the protocol --------------------------------------------------------------------
    def recover(self) -> Optional[TrainResult]:
        """The result of a training that finished before a crash (its result.json), or None.

        The final pruning is redone: a kill may have come between result.json and the pruning."""
        path = self.dir / "result.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("architecture") != format_architecture(self.job.layers) or data.get("identity") != self.identity:
            return None  # not this model's result (a copy from another folder, or from another run of it)
        if data.get("status") not in [s.value for s in _RESULT_STATUSES]:
            return None  # set aside (deferred), or not a result at all: train again
        known = set(TrainResult.__dataclass_fields__)
        result = TrainResult(**{k: v for k, v in data.items() if k in known})
        result.curve = [(int(it), float(acc)) for it, acc in result.curve]
        final_prune(self.snap_dir, result.best_iteration, result.resume_iteration)
        return result

    def train(self) -> TrainResult:
        self.claim()
        recovered = self.recover()
        if recovered is not None:
            self.progress("recovered the finished result from result.json")
            recovered.notes = self.notes + recovered.notes
            return recovered
        t0 = time.monotonic()
        job = self.job
        faults.inject("trainer")
        self.snap_dir.mkdir(exist_ok=True)
        (self.dir / "net.prototxt").write_text(self.net_text)
        self.param_count = self.spec.param_count
        latency = self._latency() if job.latency is not None else None
        try:
            if latency is not None and "forward_ms" not in latency:  # caffe time refused the net
                result = Verdict.failed(FailureKind.REJECTED, f"caffe time: {latency['error']}").result()
            elif latency is not None and self._over_latency(latency):
                result = self._rejected(latency)
            else:
                result = self._protocol()
        except _StartAfresh as why:
            dest = set_aside(self.dir)
            self._note(f"model folder {self.dir} set aside as {dest.name} because {why}; training from the start")
            self.claim()
            self.snap_dir.mkdir(exist_ok=True)
            (self.dir / "net.prototxt").write_text(self.net_text)
            self.states = []
            result = self._protocol()  # a second loss in a fresh folder is not caught: it stops the search
        result.notes = self.notes + result.notes
        result.latency = latency if latency is None or "forward_ms" in latency else None
        result.param_count = self.spec.param_count
        result.iters_per_epoch = self.ipe
        result.caffe_seed = job.seed
        result.worker = f"{socket.gethostname()}:{os.getpid()}"
        result.wall_time = time.monotonic() - t0
        result.caffe_time = self.caffe_time
        if not result.curve and self.states:
            result.curve = _accuracy_curve(self.states)
        faults.point("trained")
        self._commit(result)
        return result

    def _latency(self) -> Dict[str, Any]:
        """The model's forward latency (metaqnn.latency), measured once: a rerun reads latency.json.

        A net ``caffe time`` refuses is ``{"error": reason}`` (cached too): caffe train would refuse it as well.
        """
        from metaqnn.latency import LatencyError, measure_latency

        plan = self.job.latency
        assert plan is not None
        cache = self.dir / "latency.json"
        try:
            found = json.loads(cache.read_text())
            if isinstance(found, dict) and found.get("settings") == plan.settings():
                return dict(found["latency"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        try:
            measured: Dict[str, Any] = measure_latency(
                self.job.caffe,
                self.spec,
                channels=self.job.channels,
                image_size=self.job.image_size,
                folder=self.dir / "latency",
                batch=plan.batch,
                iterations=plan.iterations,
                warmup=plan.warmup,
                gpu=self.job.gpu if plan.on_gpu else None,
                timeout=self.job.timeout or 600.0,
            ).to_dict()
        except LatencyError as exc:
            measured = {"error": str(exc)}
        write_atomic(cache, json.dumps({"settings": plan.settings(), "latency": measured}, indent=1))
        faults.point("latency-measured")
        return measured

    def _over_latency(self, latency: Optional[Dict[str, Any]]) -> bool:
        plan = self.job.latency
        return (
            latency is not None and plan is not None and plan.max_ms is not None and latency["forward_ms"] > plan.max_ms
        )

    def _rejected(self, latency: Dict[str, Any]) -> TrainResult:
        plan = self.job.latency
        assert plan is not None
        return TrainResult(
            ModelStatus.REJECTED,
            failure=FailureKind.OVER_LATENCY,
            message=f"latency {latency['forward_ms']:.3f} ms > constraints.max_latency_ms {plan.max_ms:g} "
            f"({latency.get('device', '?')}): never trained",
        )

    def _commit(self, result: TrainResult) -> None:
        """Make the result durable before deleting anything it was computed from, then prune."""
        write_csvs(merge_states(self._history()), self.dir / "history")  # every epoch of the lineage, once
        for path in [*self.dir.glob("*.log"), *self.dir.glob("*.train"), *self.dir.glob("*.test")]:
            fsync_file(path)
        record = {"architecture": format_architecture(self.job.layers), "identity": self.identity, **result.metrics()}
        write_atomic(self.dir / "result.json", json.dumps(record, indent=1))
        faults.point("result-written")
        if result.status in _RESULT_STATUSES:  # a deferred model is trained again from its snapshots
            final_prune(self.snap_dir, result.best_iteration, result.resume_iteration)
        faults.point("pruned")

    def _protocol(self) -> TrainResult:
        """Probe (with restarts), then full training from the probe's epoch-1 snapshot."""
        self.state = self._load_state()
        if self.state["phase"] == "probe":
            failed = self._probe()
            if failed is not None:
                return failed
        return self._train_full()

    def _probe(self) -> Optional[TrainResult]:
        """One epoch at base_lr x lr_factor^k until it beats the threshold; a failure after the last try."""
        job, proto, state = self.job, self.job.protocol, self.state
        restarts = proto.restarts
        threshold = restarts.threshold(job.num_classes)
        while True:
            k = state["restart"]
            lr = proto.base_lr * restarts.lr_factor**k
            self.progress(f"probe {k}: lr {lr:g}")
            solver = self._write_solver(f"solver_probe{k}.prototxt", lr, 1)
            finished = self._finished_probe(k)
            if finished is not None:  # it ended before a kill that came before state.json said so
                o, verdict = RunOutcome(0, finished, 0.0), None
                self.progress(f"probe {k} had finished: not trained again")
            else:
                prune_snapshots(self.snap_dir, [])
                o, verdict = self._run_with_retry(solver, None, f"probe{k}", [])
                faults.point("probe-finished")  # caffe is done with the probe, state.json does not say so yet
            if verdict is not None:
                return verdict.result(restarts=k, learning_rate=lr)
            best = o.state.best_test(ACCURACY)
            acc = best[1] if best else None
            if acc is not None and acc > threshold and not o.stopped_for_nan:
                state.update(phase="full", lr=lr)
                self._save_state()
                return None
            if k >= restarts.max_restarts:
                return TrainResult(
                    ModelStatus.FAILED,
                    failure=FailureKind.DIVERGED if o.stopped_for_nan else FailureKind.NO_LEARNING,
                    restarts=k,
                    learning_rate=lr,
                    best_accuracy=acc,
                    last_accuracy=acc,
                    message=f"never beat the random-predictor threshold {threshold:g} "
                    f"in {k + 1} tries (last accuracy {acc})",
                )
            state["restart"] = k + 1
            self._save_state()

    def _finished_probe(self, k: int) -> Optional[LogState]:
        """Probe ``k``'s newest run, if it reached 'Optimization Done' at epoch 1 and left its
        epoch-1 snapshot completely written; else None (the probe is run)."""
        runs = read_runs(self.dir, k, probes_only=True)
        last = runs[-1] if runs else None
        if last is None or not last.done or last.last_iteration < self.ipe:
            return None
        if resume_point(self.snap_dir, snapshot_facts(runs), self.ipe, self.ipe) != self.ipe:
            return None
        return last

    def _train_full(self) -> TrainResult:
        """Continue to the protocol's epochs; the reward is the best accuracy over the whole history."""
        proto, state = self.job.protocol, self.state
        lr = state["lr"]
        solver = self._write_solver("solver.prototxt", lr, proto.epochs)
        finished = self._finished_run(proto.epochs * self.ipe)
        resume = self._latest_solverstate(min_iter=self.ipe)
        if resume is None and finished is None:  # lost files are no verdict on the net: start it afresh
            raise _StartAfresh(f"{self.snap_dir} holds no complete snapshot to continue the full training from")
        if finished is not None:  # caffe finished before a crash: nothing to train again
            o, verdict = RunOutcome(0, finished, 0.0), None
        else:
            # the rule at the checkpoints the history already passed: the probe's epoch, or where a
            # killed training had got to (a pure function of the curve: the same decision again)
            self.decision = self._early_decision(self._history())
            if self.decision is not None:
                return self._stopped_result(self.decision, lr)
            assert resume is not None
            o, verdict = self._run_from_snapshot(solver, resume)
            if o.stopped_early and self.decision is not None:
                return self._stopped_result(self.decision, lr)
        if verdict is not None and verdict.failure not in (FailureKind.TIMEOUT, FailureKind.STALLED):
            return verdict.result(restarts=state["restart"], learning_rate=lr)
        return self._full_result(o, verdict, lr)

    def _run_from_snapshot(self, solver: Path, resume: Path) -> Tuple[RunOutcome, Optional[Verdict]]:
        """The full run from ``resume``; a snapshot caffe cannot read (truncated, overwritten) is no
        verdict on the net: it is deleted and the run starts from the next older one, or afresh."""
        while True:
            self.progress(f"training to {self.job.protocol.epochs} epochs from {resume.name}")
            o, verdict = self._run_with_retry(solver, resume, f"train{self.state['runs']}", [])
            damaged = self._unreadable_snapshot(o, verdict, resume)
            if damaged is None:
                return o, verdict
            for path in snapshot_files(self.snap_dir).get(damaged, []):
                path.unlink(missing_ok=True)
            self._note(
                f"caffe could not read the snapshot of iteration {damaged} ({verdict.message if verdict else ''}"
                "); it is deleted and the training continues from an older one"
            )
            older = self._latest_solverstate(min_iter=self.ipe)
            if older is None:
                raise _StartAfresh(f"its only snapshot to continue from ({resume}) is unreadable")
            resume = older

    def _unreadable_snapshot(self, o: RunOutcome, verdict: Optional[Verdict], resume: Path) -> Optional[int]:
        """The iteration of ``resume`` if caffe's fatal error names its files (it could not read them)."""
        if verdict is None or verdict.failure != FailureKind.REJECTED:
            return None
        it = self._iter_of(resume)
        needle = f"_iter_{it}."
        return it if any(needle in line for line in o.state.fatal) else None

    # -- early stopping ------------------------------------------------------------------
    def _model_info(self) -> ModelInfo:
        return model_info(self.job.layers, self.param_count, self.state.get("lr", 0.0), self.state.get("restart", 0))

    def _early_decision(self, states: Sequence[LogState]) -> Optional[StopDecision]:
        """The job's rule on the curve of ``states`` (the model's history so far), or None."""
        rule = self.job.early_stop
        if rule is None:
            return None
        return rule.decide(epoch_curve(_accuracy_curve(states), self.ipe), self._model_info())

    def _stopped_result(self, decision: StopDecision, lr: float) -> TrainResult:
        """A model the rule stopped: what it reached, the prediction that is its reward, the snapshot
        to finish it from (`metaqnn finish`)."""
        history = self._history()
        cut = decision.epoch * self.ipe
        whole = _accuracy_curve(history)
        curve = [p for p in whole if p[0] <= cut]  # what caffe ran past the checkpoint is not the result
        best = best_of(curve)
        facts = snapshot_facts(history)
        resume = resume_point(self.snap_dir, facts, cut, cut)
        if resume is None:
            resume = resume_point(self.snap_dir, facts, self.ipe, cut) or resume_point(self.snap_dir, facts, self.ipe)
        if len(whole) > len(curve):
            self._note(
                f"caffe ran {len(whole) - len(curve)} tests past the epoch-{decision.epoch} checkpoint before it "
                "stopped; they are left out of the result, so that it does not depend on timing"
            )
        self.progress(describe(decision))
        return TrainResult(
            ModelStatus.STOPPED,
            best_accuracy=best[1] if best else None,
            best_iteration=best[0] if best else None,
            last_accuracy=curve[-1][1] if curve else None,
            learning_rate=lr,
            restarts=self.state["restart"],
            message=describe(decision),
            curve=curve,
            predicted_accuracy=max(decision.predicted, best[1]) if best else decision.predicted,
            stopped_epoch=decision.epoch,
            stop_probability=decision.probability,
            stop_target=decision.target,
            stop_rule=decision.rule,
            resume_iteration=resume,
        )

    def finish(self) -> TrainResult:
        """Train a model that was stopped early on to the protocol's end, from its kept snapshot.

        Its stopped result is kept as ``result-stopped.json``; the new ``result.json`` is measured.
        A kill in between is resumed like any training (the renamed file says it was stopped)."""
        path, kept = self.dir / "result.json", self.dir / "result-stopped.json"
        self.claim()  # a folder that is not this model's is set aside, and then holds no stopped result
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                raise StoreError(f"{path} is not readable (truncated?): the stopped model cannot be finished") from None
            if data.get("status") != ModelStatus.STOPPED.value:
                return self.train()  # already finished: recovered from its result
            path.replace(kept)
        elif not kept.exists():
            raise StoreError(f"{self.dir} holds no result of a model stopped early")
        return self.train()

    def _full_result(self, o: RunOutcome, verdict: Optional[Verdict], lr: float) -> TrainResult:
        """The finished (or cut short) full training as a result: curve, best, speed, and how it ended."""
        proto = self.job.protocol
        threshold = proto.restarts.threshold(self.job.num_classes)
        curve = _accuracy_curve(self._history())
        best = best_of(curve)
        result = TrainResult(ModelStatus.DONE, restarts=self.state["restart"], learning_rate=lr, curve=curve)
        if best is not None:
            result.best_iteration, result.best_accuracy = best
            result.last_accuracy = curve[-1][1]
        rows = o.state.train_rows
        span = [r for r in rows if r.get("Seconds") is not None]
        if len(span) >= 2 and span[-1]["Seconds"] > span[0]["Seconds"]:
            result.images_per_sec = (
                (span[-1]["NumIters"] - span[0]["NumIters"])
                * proto.train_batch
                / (span[-1]["Seconds"] - span[0]["Seconds"])
            )
        if o.stopped_for_nan:
            result.failure = FailureKind.DIVERGED
            result.message = "diverged (NaN/inf loss) during training; reward = best accuracy before divergence"
            if result.best_accuracy is None or result.best_accuracy <= threshold:
                result.status = ModelStatus.FAILED
        elif verdict is not None:
            result.status, result.failure, result.message = ModelStatus.FAILED, verdict.failure, verdict.message
        elif not o.state.done:
            result.status, result.failure = ModelStatus.FAILED, FailureKind.CRASHED
            result.message = "caffe stopped before 'Optimization Done'"
        return result

    def _finished_run(self, max_iter: int) -> Optional[LogState]:
        """The newest full-training run if it reached 'Optimization Done' at the last iteration."""
        runs = read_runs(self.dir, self.state.get("restart", 0))
        last = runs[-1] if runs else None
        if last is not None and last.done and last.last_iteration >= max_iter:
            return last
        return None
