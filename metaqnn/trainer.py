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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from metaqnn.caffe.logparse import LogState, parse_lines, write_csvs
from metaqnn.caffe.runner import RunOutcome, run_caffe, train_argv
from metaqnn.netspec import Transform, build_net
from metaqnn.render import render_net, render_solver
from metaqnn.solverspec import Protocol, solver_fields
from qagent.arch import Layer
from qagent.errors import MetaQNNError

ACCURACY = "Accuracy1"
_SNAP_ITER = re.compile(r"_iter_(\d+)\.(caffemodel|solverstate)$")


def caffe_seed(seed: int, arch: str) -> int:
    """Caffe's random_seed for one model: a pure function of the experiment seed and the architecture."""
    digest = hashlib.sha256(f"{seed}|{arch}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


class DataMissingError(MetaQNNError):
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
    env: Tuple[Tuple[str, str], ...] = ()  # extra environment of caffe, e.g. the GPU it sees (metaqnn.packing)


@dataclass
class TrainResult:
    status: str  # done | failed | oom
    best_accuracy: Optional[float] = None
    last_accuracy: Optional[float] = None
    best_iteration: Optional[int] = None
    learning_rate: Optional[float] = None
    restarts: int = 0
    failure: Optional[str] = None  # no_learning | diverged | rejected | crashed | timeout
    message: str = ""
    curve: List[Tuple[int, float]] = field(default_factory=list)
    wall_time: float = 0.0
    caffe_time: float = 0.0
    images_per_sec: Optional[float] = None
    param_count: int = 0
    worker: str = ""  # host:pid (and Ray node) that trained it
    caffe_seed: Optional[int] = None

    def metrics(self) -> Dict[str, Any]:
        return asdict(self)


def _accuracy_curve(states: Sequence[LogState]) -> List[Tuple[int, float]]:
    by_iter: Dict[int, float] = {}
    for st in states:
        for row in st.test_rows:
            v = row.get(ACCURACY)
            if v is not None and math.isfinite(v) and not row.get("_nan_before"):
                by_iter[int(row["NumIters"])] = v
    return sorted(by_iter.items())


def _snapshot_files(folder: Path) -> Dict[int, List[Path]]:
    out: Dict[int, List[Path]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SNAP_ITER.search(p.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(p)
    return out


def prune_snapshots(folder: Path, keep: Sequence[int]) -> None:
    """Delete every snapshot whose iteration is not in ``keep`` (resume point, best, probe)."""
    for it, paths in _snapshot_files(folder).items():
        if it not in keep:
            for p in paths:
                p.unlink(missing_ok=True)


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

    # -- files ------------------------------------------------------------------------
    def _load_state(self) -> Dict[str, Any]:
        """phase (probe | full), restart index, learning rate, caffe runs so far: survives a crash."""
        p = self.dir / "state.json"
        return json.loads(p.read_text()) if p.exists() else {"phase": "probe", "restart": 0, "runs": 0}

    def _save_state(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.dir / "state.json")

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
        path = self.dir / name
        path.write_text(render_solver(fields))
        return path

    def _check_data(self) -> None:
        for p in (self.job.train_lmdb, self.job.val_lmdb):
            if not (p / "data.mdb").exists():
                raise DataMissingError(f"training data missing: {p} (run `make data` or `metaqnn prepare`)")

    # -- one caffe run ----------------------------------------------------------------
    def _run(self, solver: Path, snapshot: Optional[Path], label: str, keep: Sequence[int]) -> RunOutcome:
        self._check_data()
        self.state["runs"] += 1
        self._save_state()
        log = self.dir / f"{label}.log"
        best_iter: List[int] = []
        seen = {"tests": 0, "snapshots": 0}

        def on_line(st: LogState) -> None:
            if len(st.test_rows) != seen["tests"]:
                seen["tests"] = len(st.test_rows)
                row = st.test_rows[-1]
                acc = row.get(ACCURACY)
                if acc is not None:
                    self.progress(f"epoch {int(row['NumIters']) // self.ipe} acc {acc:.4f}")
            # a snapshot is two lines (weights, then solver state): prune once the pair is written
            if len(st.snapshots) != seen["snapshots"] and len(st.snapshots) % 2 == 0:
                seen["snapshots"] = len(st.snapshots)
                best = st.best_test(ACCURACY)
                if best is not None:
                    best_iter[:] = [best[0]]
                latest = _SNAP_ITER.search(st.snapshots[-1])
                if latest:
                    prune_snapshots(self.snap_dir, [int(latest.group(1)), *best_iter, *keep])

        outcome = run_caffe(
            train_argv(self.job.caffe, solver, snapshot, self.job.gpu),
            cwd=self.dir,
            log_path=log,
            timeout=self.job.timeout,
            on_line=on_line,
            env=dict(self.job.env) or None,
        )
        self.caffe_time += outcome.wall_time
        self.states.append(outcome.state)
        write_csvs(parse_lines(log.read_text().splitlines()), log.with_suffix(""))
        return outcome

    def _classify(self, o: RunOutcome) -> Optional[Tuple[str, str, str]]:
        """(status, failure, message) for a run that did not finish normally, else None."""
        st = o.state
        if st.out_of_memory:
            return "oom", "oom", "CUDA out of memory: " + (st.fatal[0] if st.fatal else "")
        if o.timed_out:
            return "failed", "timeout", f"stopped after the wall-clock limit of {self.job.timeout} s"
        if o.stopped_for_nan:
            return None  # handled by the protocol (divergence)
        self._check_data()
        lmdb_fatal = next((f for f in st.fatal if "db_lmdb" in f or "mdb_" in f.lower() or "MDB_" in f), None)
        if lmdb_fatal is not None:  # every model would fail the same way: stop the search instead
            raise DataMissingError(f"caffe cannot read the training data: {lmdb_fatal[:200]}")
        if st.fatal:
            return "failed", "rejected", "caffe refused the net: " + st.fatal[0][:300]
        if o.returncode != 0:
            sig = o.signal
            what = f"killed by signal {sig}" if sig else f"exit status {o.returncode}"
            return "failed", "crashed", f"caffe crashed ({what})"
        return None

    def _run_with_retry(
        self, solver: Path, snapshot: Optional[Path], label: str, keep: Sequence[int]
    ) -> Tuple[RunOutcome, Optional[Tuple[str, str, str]]]:
        for attempt in range(self.job.retries + 1):
            o = self._run(solver, snapshot, f"{label}" if attempt == 0 else f"{label}_retry{attempt}", keep)
            verdict = self._classify(o)
            transient = (
                verdict is not None
                and verdict[1] in ("timeout", "crashed")
                and (verdict[1] == "timeout" or o.signal is not None)
            )
            if verdict is None or not transient:
                return o, verdict
            self.progress(f"transient failure ({verdict[2]}), retrying")
            if snapshot is not None:  # continue from the newest snapshot since the one this run started from
                snapshot = self._latest_solverstate(min_iter=self._iter_of(snapshot)) or snapshot
        return o, verdict

    @staticmethod
    def _iter_of(path: Path) -> int:
        m = _SNAP_ITER.search(path.name)
        return int(m.group(1)) if m else 0

    def _latest_solverstate(self, min_iter: int = 0) -> Optional[Path]:
        files = _snapshot_files(self.snap_dir)
        its = sorted(i for i, ps in files.items() if i >= min_iter and any(p.suffix == ".solverstate" for p in ps))
        if not its:
            return None
        return next(p for p in files[its[-1]] if p.suffix == ".solverstate").relative_to(self.dir)

    # -- the protocol --------------------------------------------------------------------
    def train(self) -> TrainResult:
        t0 = time.monotonic()
        job = self.job
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
        (self.dir / "net.prototxt").write_text(render_net(spec))
        result = self._protocol()
        result.param_count = spec.param_count
        result.caffe_seed = job.seed
        result.worker = f"{socket.gethostname()}:{os.getpid()}"
        result.wall_time = time.monotonic() - t0
        result.caffe_time = self.caffe_time
        if not result.curve and self.states:
            result.curve = _accuracy_curve(self.states)
        (self.dir / "result.json").write_text(json.dumps(result.metrics(), indent=1))
        return result

    def _protocol(self) -> TrainResult:
        job, proto = self.job, self.job.protocol
        restarts = proto.restarts
        threshold = restarts.threshold(job.num_classes)
        state = self.state = self._load_state()
        if state["phase"] == "probe":
            while True:
                k = state["restart"]
                lr = proto.base_lr * restarts.lr_factor**k
                self.progress(f"probe {k}: lr {lr:g}")
                solver = self._write_solver(f"solver_probe{k}.prototxt", lr, 1)
                prune_snapshots(self.snap_dir, [])
                o, verdict = self._run_with_retry(solver, None, f"probe{k}", [])
                if verdict is not None:
                    return TrainResult(verdict[0], failure=verdict[1], message=verdict[2], restarts=k, learning_rate=lr)
                best = o.state.best_test(ACCURACY)
                acc = best[1] if best else None
                passed = acc is not None and acc > threshold and not o.stopped_for_nan
                if passed:
                    state.update(phase="full", lr=lr)
                    self._save_state()
                    break
                if k >= restarts.max_restarts:
                    why = "diverged" if o.stopped_for_nan else "no_learning"
                    return TrainResult(
                        "failed",
                        failure=why,
                        restarts=k,
                        learning_rate=lr,
                        best_accuracy=acc,
                        last_accuracy=acc,
                        message=f"never beat the random-predictor threshold {threshold:g} "
                        f"in {k + 1} tries (last accuracy {acc})",
                    )
                state["restart"] = k + 1
                self._save_state()
        lr = state["lr"]
        solver = self._write_solver("solver.prototxt", lr, proto.epochs)
        resume = self._latest_solverstate(min_iter=self.ipe)
        if resume is None:
            return TrainResult(
                "failed",
                failure="crashed",
                message="the epoch-1 snapshot is missing; cannot continue",
                restarts=state["restart"],
                learning_rate=lr,
            )
        self.progress(f"training to {proto.epochs} epochs from {resume.name}")
        o, verdict = self._run_with_retry(solver, resume, f"train{state['runs']}", [self.ipe])
        if verdict is not None and not (verdict[0] == "failed" and verdict[1] == "timeout"):
            return TrainResult(
                verdict[0], failure=verdict[1], message=verdict[2], restarts=state["restart"], learning_rate=lr
            )
        curve = _accuracy_curve(self._lineage_states(state["restart"]))
        best = max(curve, key=lambda p: (p[1], -p[0])) if curve else None
        result = TrainResult("done", restarts=state["restart"], learning_rate=lr, curve=curve)
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
            result.failure = "diverged"
            result.message = "diverged (NaN/inf loss) during training; reward = best accuracy before divergence"
            if result.best_accuracy is None or result.best_accuracy <= threshold:
                result.status = "failed"
        elif verdict is not None:
            result.status, result.failure, result.message = "failed", verdict[1], verdict[2]
        elif not o.state.done:
            result.status, result.failure, result.message = (
                "failed",
                "crashed",
                "caffe stopped before 'Optimization Done'",
            )
        if result.best_iteration is not None:  # a finished model keeps only its best weights
            prune_snapshots(self.snap_dir, [result.best_iteration])
            for p in self.snap_dir.glob("*.solverstate"):
                p.unlink()
        return result

    def _lineage_states(self, restart: int) -> List[LogState]:
        """The passing probe's log and every full-training log, oldest first (survives a search crash)."""
        logs = sorted(self.dir.glob(f"probe{restart}*.log"), key=lambda p: p.stat().st_mtime)
        logs += sorted(self.dir.glob("train*.log"), key=lambda p: p.stat().st_mtime)
        return [parse_lines(log.read_text().splitlines()) for log in logs]
