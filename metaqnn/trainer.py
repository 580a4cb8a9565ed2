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
from metaqnn.early_stop import ModelInfo, StopDecision, StopRule, epoch_curve, model_info
from metaqnn.early_stop.rules import describe
from metaqnn.failures import FailureKind, InfrastructureError, infrastructure_reason
from metaqnn.netspec import Transform, build_net
from metaqnn.render import write_net, write_training_files
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
    retries: int = 1  # extra attempts for transient failures (timeout, killed by a signal)
    seed: Optional[int] = None  # Caffe's random_seed (weight fillers, dropout): CPU training is then repeatable
    stall: Optional[Stall] = field(default_factory=Stall)  # watchdog for a hung or stopped caffe; None: off
    env: Tuple[Tuple[str, str], ...] = ()  # extra environment of caffe, e.g. the GPU it sees (metaqnn.packing)
    early_stop: Optional[StopRule] = None  # may stop the full training at a checkpoint epoch (metaqnn.early_stop)

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


def _snapshot_files(folder: Path) -> Dict[int, List[Path]]:
    out: Dict[int, List[Path]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SNAP_ITER.search(p.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(p)
    return out


def prune_snapshots(folder: Path, keep: Sequence[int]) -> None:
    """Delete every snapshot whose iteration is not in ``keep``."""
    for it, paths in _snapshot_files(folder).items():
        if it not in keep:
            for p in paths:
                p.unlink(missing_ok=True)


@dataclass
class SnapshotFacts:
    """What a model's history says about its snapshot files."""

    best: Optional[int]  # iteration of the best accuracy over the whole history
    tested: Set[int]  # iterations whose latest snapshot was tested afterwards
    complete: Set[int]  # iterations whose latest solverstate write is confirmed by a later log line
    mentioned: Set[int]  # iterations any run logged a snapshot for


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
        mentioned=set(last_snap),
    )


def resume_point(folder: Path, facts: SnapshotFacts, min_iter: int = 0) -> Optional[int]:
    """Newest iteration whose weights and solver state are both on disk and completely written.

    A snapshot no log mentions (a log from before logs went to disk unbuffered) is trusted as is.
    """
    files = _snapshot_files(folder)
    ok = [
        it
        for it, paths in files.items()
        if it >= min_iter
        and {p.suffix for p in paths} >= {".caffemodel", ".solverstate"}
        and (it in facts.complete or it not in facts.mentioned)
    ]
    return max(ok) if ok else None


def prune_by_history(folder: Path, facts: SnapshotFacts, keep: Iterable[int] = ()) -> None:
    """Delete only what can never matter: a snapshot whose accuracy is known and is not the best,
    unless it is the resume point.  Untested snapshots (caffe may be ahead of the log reader, or
    was killed before testing them) and the best weights over *all* runs always stay."""
    resume = resume_point(folder, facts)
    for it, paths in _snapshot_files(folder).items():
        if it == resume or it in keep or it not in facts.tested:
            continue
        for p in paths:
            if it != facts.best or p.suffix != ".caffemodel":
                p.unlink(missing_ok=True)


def final_prune(folder: Path, best_iteration: int, resume_iteration: Optional[int] = None) -> None:
    """A finished model keeps only its best weights, a model stopped early also the snapshot to
    finish it from (idempotent: redone when a result is recovered)."""
    kept = {best_iteration, resume_iteration}
    doomed = [p for it, paths in _snapshot_files(folder).items() for p in paths if it not in kept]
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


def read_runs(folder: Path, restart: Optional[int]) -> List[LogState]:
    """Every caffe run of the model's lineage -- the probe with this restart index (all probes if
    None) and every full-training run -- parsed from the logs, oldest first by run number."""
    keyed = []
    for log in folder.glob("*.log"):
        m = _LOG_NAME.match(log.name)
        if m is None or (m.group(2) is not None and restart is not None and int(m.group(2)) != restart):
            continue
        mtime = log.stat().st_mtime_ns
        for i, (number, lines) in enumerate(split_runs(log.read_text(errors="replace").splitlines())):
            keyed.append(((number, mtime, log.name, i), parse_lines(lines)))
    return [st for _, st in sorted(keyed, key=lambda kv: kv[0])]


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

    # -- files ------------------------------------------------------------------------
    def _load_state(self) -> Dict[str, Any]:
        """phase (probe | full), restart index, learning rate, caffe runs so far: survives a crash."""
        p = self.dir / "state.json"
        return json.loads(p.read_text()) if p.exists() else {"phase": "probe", "restart": 0, "runs": 0}

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
            what = f"killed by signal {sig}" if sig else f"exit status {o.returncode}"
            return Verdict.failed(FailureKind.CRASHED, f"caffe crashed ({what})")
        return None

    def _run_with_retry(
        self, solver: Path, snapshot: Optional[Path], label: str, keep: Sequence[int]
    ) -> Tuple[RunOutcome, Optional[Verdict]]:
        for attempt in range(self.job.retries + 1):
            o = self._run(solver, snapshot, f"{label}" if attempt == 0 else f"{label}_retry{attempt}", keep)
            verdict = self._classify(o)
            if verdict is None or not verdict.transient(o):
                return o, verdict
            self.progress(f"transient failure ({verdict.message}), retrying")
            if snapshot is not None:  # continue from the newest snapshot since the one this run started from
                snapshot = self._latest_solverstate(min_iter=self._iter_of(snapshot)) or snapshot
        return o, verdict

    @staticmethod
    def _iter_of(path: Path) -> int:
        m = _SNAP_ITER.search(path.name)
        return int(m.group(1)) if m else 0

    def _latest_solverstate(self, min_iter: int = 0) -> Optional[Path]:
        """The solver state to continue from: newest complete pair per the files and the history."""
        it = resume_point(self.snap_dir, snapshot_facts(self._history()), min_iter)
        if it is None:
            return None
        return next(p for p in _snapshot_files(self.snap_dir)[it] if p.suffix == ".solverstate").relative_to(self.dir)

    # -- the protocol --------------------------------------------------------------------
    def recover(self) -> Optional[TrainResult]:
        """The result of a training that finished before a crash (its result.json), or None.

        The final pruning is redone: a kill may have come between result.json and the pruning."""
        path = self.dir / "result.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("architecture") != format_architecture(self.job.layers):
            return None
        known = set(TrainResult.__dataclass_fields__)
        result = TrainResult(**{k: v for k, v in data.items() if k in known})
        result.curve = [(int(it), float(acc)) for it, acc in result.curve]
        if result.best_iteration is not None:
            final_prune(self.snap_dir, result.best_iteration, result.resume_iteration)
        return result

    def train(self) -> TrainResult:
        recovered = self.recover()
        if recovered is not None:
            self.progress("recovered the finished result from result.json")
            return recovered
        t0 = time.monotonic()
        job = self.job
        faults.inject("trainer")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.snap_dir.mkdir(exist_ok=True)
        spec = build_net(
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
        write_net(self.dir / "net.prototxt", spec)
        self.param_count = spec.param_count
        result = self._protocol()
        result.param_count = spec.param_count
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

    def _commit(self, result: TrainResult) -> None:
        """Make the result durable before deleting anything it was computed from, then prune."""
        write_csvs(merge_states(self._history()), self.dir / "history")  # every epoch of the lineage, once
        for path in [*self.dir.glob("*.log"), *self.dir.glob("*.train"), *self.dir.glob("*.test")]:
            fsync_file(path)
        record = {"architecture": format_architecture(self.job.layers), **result.metrics()}
        write_atomic(self.dir / "result.json", json.dumps(record, indent=1))
        faults.point("result-written")
        if result.best_iteration is not None:  # a finished model keeps only its best weights
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
            prune_snapshots(self.snap_dir, [])
            o, verdict = self._run_with_retry(solver, None, f"probe{k}", [])
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

    def _train_full(self) -> TrainResult:
        """Continue to the protocol's epochs; the reward is the best accuracy over the whole history."""
        proto, state = self.job.protocol, self.state
        lr = state["lr"]
        solver = self._write_solver("solver.prototxt", lr, proto.epochs)
        finished = self._finished_run(proto.epochs * self.ipe)
        resume = self._latest_solverstate(min_iter=self.ipe)
        if resume is None and finished is None:
            return Verdict.failed(FailureKind.CRASHED, "the epoch-1 snapshot is missing; cannot continue").result(
                restarts=state["restart"], learning_rate=lr
            )
        if finished is not None:  # caffe finished before a crash: nothing to train again
            o, verdict = RunOutcome(0, finished, 0.0), None
        else:
            # the rule at the checkpoints the history already passed: the probe's epoch, or where a
            # killed training had got to (a pure function of the curve: the same decision again)
            self.decision = self._early_decision(self._history())
            if self.decision is not None:
                return self._stopped_result(self.decision, lr)
            assert resume is not None
            self.progress(f"training to {proto.epochs} epochs from {resume.name}")
            o, verdict = self._run_with_retry(solver, resume, f"train{state['runs']}", [])
            if o.stopped_early and self.decision is not None:
                return self._stopped_result(self.decision, lr)
        if verdict is not None and verdict.failure not in (FailureKind.TIMEOUT, FailureKind.STALLED):
            return verdict.result(restarts=state["restart"], learning_rate=lr)
        return self._full_result(o, verdict, lr)

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
        curve = _accuracy_curve(history)
        best = best_of(curve)
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
            predicted_accuracy=decision.predicted,
            stopped_epoch=decision.epoch,
            stop_probability=decision.probability,
            stop_target=decision.target,
            stop_rule=decision.rule,
            resume_iteration=resume_point(self.snap_dir, snapshot_facts(history), self.ipe),
        )

    def finish(self) -> TrainResult:
        """Train a model that was stopped early on to the protocol's end, from its kept snapshot.

        Its stopped result is kept as ``result-stopped.json``; the new ``result.json`` is measured.
        A kill in between is resumed like any training (the renamed file says it was stopped)."""
        path, kept = self.dir / "result.json", self.dir / "result-stopped.json"
        if path.exists():
            data = json.loads(path.read_text())
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
