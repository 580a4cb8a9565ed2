"""Watching a search in TensorBoard: event files under ``<experiment>/tensorboard/``, written live.

Runs (README "Watching a search"):

* ``search`` -- step = iteration (every sample the agent drew, duplicates included): the sampled
  model's accuracy as Figure 3 plots it and its rolling mean, epsilon, the best *measured*
  accuracy so far, the unique models trained per epsilon, and the failures by kind; plus the
  HParams experiment record (the columns of the HParams view).
* ``models/<id>`` -- step = Caffe iteration: the validation accuracy and training loss, the same
  points as the model's ``history.test`` / ``history.train`` CSVs (while it trains, read from its
  caffe logs as they grow); once it has a result, its HParams session: hyperparameters (the
  architecture, depth, layers of each type, parameters, epsilon, learning rate after restarts,
  restarts, status), the best measured accuracy and, for a model stopped early, the predicted one
  apart, as final scalars, and how it ended (success, failure, or unknown = stopped, predicted).

Only the process that owns the experiment writes them: the search's head (a thread of its own,
:class:`Monitor`), or ``metaqnn tensorboard`` for an experiment made before (or without)
tensorboardX, never both (a lock).  Each writer appends to files of its own, and only the points
and records a run does not hold yet: :func:`search_points` and :func:`model_points` say what the
events should contain (pure functions of the store and the model folders), :class:`EventSync`
reads what the runs hold (:func:`metaqnn.monitor_events.read_run`, which tolerates the torn last
record a kill -9 leaves) and writes the difference.  So a resumed search continues the same runs
without a duplicate point, and ``metaqnn tensorboard`` is the same code and idempotent.

Models on Ray workers write their folders where the head reads them (the experiment folder on a
shared file system, docs/scale-out.md); a model whose folder the head cannot see gets its curve
from its stored result.
"""

import contextlib
import csv
import fcntl
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, TextIO, Tuple

from metaqnn.caffe.logparse import LogParser, LogState, is_run_header, merge_states, run_number
from metaqnn.figure3 import figure3_window, rolling_mean  # the report's own line
from metaqnn.monitor_events import (
    EXPERIMENT_TAG,
    SESSION_END_TAG,
    SESSION_START_TAG,
    HParamSpec,
    HParamValue,
    MetricSpec,
    RunIndex,
    RunWriter,
    Scalar,
    Session,
    event_files,
    experiment_event,
    read_run,
    scalar_events,
    session_end_event,
    session_start_event,
    tensorboardx,
)
from qagent.errors import MetaQNNError
from qagent.status import TRAINED, ModelStatus

TB_DIR = "tensorboard"
SEARCH_RUN = "search"
LOCK_NAME = ".writer.lock"
DONE_MARK = ".metaqnn-complete"  # in a model's run folder, once its session end is on disk: its status
ACCURACY = "Accuracy1"  # the test net's accuracy output (metaqnn.trainer.ACCURACY)
FINAL = (ModelStatus.DONE, ModelStatus.STOPPED, ModelStatus.FAILED, ModelStatus.OOM, ModelStatus.REJECTED)
FAILURES = (ModelStatus.FAILED, ModelStatus.OOM, ModelStatus.REJECTED)
SESSION_STATUS = {
    ModelStatus.DONE: "STATUS_SUCCESS",
    ModelStatus.STOPPED: "STATUS_UNKNOWN",  # predicted, not measured: neither a success nor a failure
    ModelStatus.FAILED: "STATUS_FAILURE",
    ModelStatus.OOM: "STATUS_FAILURE",
    ModelStatus.REJECTED: "STATUS_FAILURE",
}

# tags and what TensorBoard shows for them (the information icon of each chart)
TAG_ACCURACY = "search/accuracy"
TAG_ROLLING = "search/rolling_mean_accuracy"
TAG_EPSILON = "search/epsilon"
TAG_BEST = "search/best_measured_accuracy"
TAG_VAL = "val/accuracy"
TAG_LOSS = "train/loss"
TAG_BEST_METRIC = "hparams/best_accuracy"
TAG_PREDICTED = "hparams/predicted_accuracy"
DESCRIPTIONS = {
    TAG_ACCURACY: "the sampled model's accuracy as the agent saw it (Figure 3's points): measured, predicted for "
    "a model stopped early, the failure reward for a failure",
    TAG_EPSILON: "epsilon of the sample",
    TAG_BEST: "the best measured validation accuracy so far (predictions left out)",
    TAG_VAL: "validation accuracy (history.test)",
    TAG_LOSS: "training loss (history.train)",
    TAG_BEST_METRIC: "best measured validation accuracy of the model",
    TAG_PREDICTED: "the final accuracy early stopping PREDICTED for a model it stopped (not measured)",
}


class MonitorError(MetaQNNError):
    pass


def run_name(model_id: int) -> str:
    return f"models/{int(model_id):05d}"


# --- what the events should contain: pure functions of the store and the model folders ----------


@dataclass(frozen=True)
class Sample:
    iteration: int
    arch: str
    epsilon: float
    reward: Optional[float]
    duplicate: bool
    time: float = 0.0


def samples_of(rows: Iterable[Any]) -> List[Sample]:
    return [
        Sample(int(r["iteration"]), r["arch"], float(r["epsilon"]), r["reward"], bool(r["duplicate"]), float(r["time"]))
        for r in rows
    ]


def search_points(samples: Sequence[Sample], models: Sequence[Any], window: int) -> List[Scalar]:
    """The search run's scalars, step = iteration; ``models`` are the store's rows (ModelRow)."""

    by_arch = {m.arch: m for m in models}
    rewarded = [s for s in samples if s.reward is not None]
    rolling = dict(
        zip((s.iteration for s in rewarded), rolling_mean([float(s.reward or 0.0) for s in rewarded], window))
    )
    out: List[Scalar] = []
    best: Optional[float] = None
    unique: Dict[float, int] = {}
    failures: Dict[str, int] = {}
    for s in samples:
        t, it = s.time, s.iteration
        out.append(Scalar(TAG_EPSILON, it, s.epsilon, t))
        if s.reward is not None:
            out.append(Scalar(TAG_ACCURACY, it, float(s.reward), t))
            out.append(Scalar(TAG_ROLLING, it, rolling[it], t))
        m = by_arch.get(s.arch)
        if m is not None and m.status == ModelStatus.DONE and m.accuracy is not None:
            best = float(m.accuracy) if best is None else max(best, float(m.accuracy))
        if best is not None:
            out.append(Scalar(TAG_BEST, it, best, t))
        if s.duplicate or m is None:
            continue
        if m.status in TRAINED and s.reward is not None:
            unique[s.epsilon] = unique.get(s.epsilon, 0) + 1
            out.append(Scalar(f"unique_models/epsilon_{s.epsilon:g}", it, float(unique[s.epsilon]), t))
        if m.status in FAILURES:
            kind = str(m.metrics.get("failure") or m.status.value)
            failures[kind] = failures.get(kind, 0) + 1
            out.append(Scalar(f"failures/{kind}", it, float(failures[kind]), t))
    return out


@dataclass
class Curves:
    """A model's validation accuracy and training loss, (iteration, value) in iteration order."""

    val: List[Tuple[int, float]] = field(default_factory=list)
    loss: List[Tuple[int, float]] = field(default_factory=list)


def _loss_column(names: Iterable[str]) -> Optional[str]:
    return next((n for n in names if "loss" in n.lower()), None)


def _column(rows: Sequence[Dict[str, Any]], name: Optional[str]) -> List[Tuple[int, float]]:
    out = []
    for r in rows:
        v = r.get(name) if name is not None else None
        if v is None or v == "":
            continue
        out.append((int(float(r["NumIters"])), float(v)))
    return out


def curves_of_csv(folder: Path) -> Optional[Curves]:
    """The curves of a finished model: its ``history.test`` and ``history.train`` (None without them)."""
    test, train = folder / "history.test", folder / "history.train"
    if not test.is_file():
        return None
    with open(test, newline="") as fh:
        test_rows = list(csv.DictReader(fh))
    train_rows: List[Dict[str, Any]] = []
    loss = None
    if train.is_file():
        with open(train, newline="") as fh:
            reader = csv.DictReader(fh)
            train_rows = list(reader)
            loss = _loss_column(reader.fieldnames or [])
    return Curves(_column(test_rows, ACCURACY), _column(train_rows, loss))


def curves_of_states(states: Sequence[LogState]) -> Curves:
    """The curves of caffe runs given oldest first, each iteration once (the latest): as history.*."""
    merged = merge_states(states)
    names: List[str] = []
    for r in merged.train_rows:
        names += [k for k in r if k not in names]
    return Curves(_column(merged.test_rows, ACCURACY), _column(merged.train_rows, _loss_column(names)))


def curve_points(curves: Curves, wall_time: float) -> List[Scalar]:
    return [Scalar(TAG_VAL, it, v, wall_time) for it, v in curves.val] + [
        Scalar(TAG_LOSS, it, v, wall_time) for it, v in curves.loss
    ]


def hparam_specs(epsilons: Sequence[float]) -> List[HParamSpec]:
    return [
        HParamSpec("architecture", "string", "the architecture string"),
        HParamSpec(
            "status",
            "string",
            "done, stopped (predicted), failed, oom or rejected",
            ("done", "stopped", "failed", "oom", "rejected"),
        ),
        HParamSpec("epsilon", "number", "epsilon when the model was first sampled", tuple(sorted(epsilons))),
        HParamSpec("depth", "number", "layers, the termination included"),
        HParamSpec("conv", "number", "convolution layers"),
        HParamSpec("pool", "number", "pooling layers"),
        HParamSpec("fc", "number", "fully connected layers"),
        HParamSpec("gap", "number", "1 for a global average pooling termination"),
        HParamSpec("params", "number", "learnable parameters"),
        HParamSpec("learning_rate", "number", "the learning rate after the probe's restarts"),
        HParamSpec("restarts", "number", "probe restarts (Section 5)"),
        HParamSpec("failure", "string", "why it failed (none when it did not)"),
    ]


METRICS = [
    MetricSpec(TAG_BEST_METRIC, DESCRIPTIONS[TAG_BEST_METRIC]),
    MetricSpec(TAG_PREDICTED, DESCRIPTIONS[TAG_PREDICTED]),
]


def model_session(m: Any) -> Session:
    """A finished model (a store ModelRow) as an HParams session."""
    from metaqnn.early_stop.curves import model_info
    from qagent.arch import parse_architecture

    metrics = m.metrics
    info = model_info(
        parse_architecture(m.arch),
        int(metrics.get("param_count") or 0),
        float(metrics.get("learning_rate") or 0.0),
        int(metrics.get("restarts") or 0),
    )
    hparams: Dict[str, HParamValue] = {
        "architecture": m.arch,
        "status": m.status.value,
        "epsilon": float(m.epsilon),
        "depth": float(info.depth),
        "conv": float(info.convs),
        "pool": float(info.pools),
        "fc": float(info.fcs),
        "gap": float(info.gaps),
        "restarts": float(info.restarts),
        "failure": str(metrics.get("failure") or "none"),
    }
    if metrics.get("param_count"):
        hparams["params"] = float(metrics["param_count"])
    if metrics.get("learning_rate") is not None:
        hparams["learning_rate"] = float(metrics["learning_rate"])
    return Session(hparams, SESSION_STATUS[m.status], float(m.started or m.finished or 0.0), float(m.finished or 0.0))


def model_points(m: Any, curves: Curves) -> List[Scalar]:
    """A finished model's scalars: its curves, then the HParams metrics as final scalars (at the
    curve's last iteration, so that they are the last value HParams shows)."""
    wall = float(m.finished or time.time())
    out = curve_points(curves, wall)
    last = max([it for it, _ in curves.val] + [it for it, _ in curves.loss] + [0])
    best = m.metrics.get("best_accuracy")
    if best is not None and math.isfinite(float(best)):
        out.append(Scalar(TAG_BEST_METRIC, last, float(best), wall))
    predicted = m.metrics.get("predicted_accuracy") if m.status == ModelStatus.STOPPED else None
    if predicted is None and isinstance(m.metrics.get("stopped_early"), dict):  # stopped, then finished
        predicted = m.metrics["stopped_early"].get("predicted_accuracy")
    if predicted is not None:
        out.append(Scalar(TAG_PREDICTED, last, float(predicted), wall))
    return out


def stored_curves(m: Any) -> Curves:
    """The validation curve of a stored result, for a model whose folder the head cannot read."""
    return Curves(val=[(int(it), float(v)) for it, v in m.metrics.get("curve") or []])


def missing(points: Sequence[Scalar], index: RunIndex) -> List[Scalar]:
    """The points a run does not hold yet: past the last step it holds of their tag."""
    return [p for p in points if p.step > index.last_step.get(p.tag, -1)]


# --- the live curves of a model in flight --------------------------------------------------------


class _LogFile:
    """One caffe log read as it grows: complete lines only, one parser per caffe run in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inode = -1
        self.offset = 0
        self.runs: List[Tuple[int, LogParser]] = []

    def update(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            return
        if st.st_ino != self.inode or st.st_size < self.offset:  # a new file of that name: start again
            self.inode, self.offset, self.runs = st.st_ino, 0, []
        if st.st_size == self.offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in chunk[:end].decode("utf-8", errors="replace").split("\n"):
            if is_run_header(line) or not self.runs:
                self.runs.append((run_number(line) if is_run_header(line) else -1, LogParser()))
            self.runs[-1][1].feed(line)


class LiveCurves:
    """The curves of a model in flight, from its caffe logs, once its probe has passed.

    The lineage is the trainer's (metaqnn.trainer.read_runs): the probe of the current restart
    and every full-training run; before the probe passes there is nothing to show that a restart
    could not take back."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: Dict[str, _LogFile] = {}

    def read(self) -> Optional[Curves]:
        from metaqnn.trainer import _LOG_NAME  # the trainer's own log names

        try:
            state = json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("phase") != "full":
            return None
        restart = state.get("restart")
        keyed: List[Tuple[Tuple[int, str, int], LogState]] = []
        for log in sorted(self.folder.glob("*.log")):
            m = _LOG_NAME.match(log.name)
            if m is None or (m.group(2) is not None and int(m.group(2)) != restart):
                continue
            f = self.files.setdefault(log.name, _LogFile(log))
            f.update()
            keyed += [((number, log.name, i), parser.state) for i, (number, parser) in enumerate(f.runs)]
        return curves_of_states([st for _, st in sorted(keyed, key=lambda kv: kv[0])])


# --- writing what is missing ---------------------------------------------------------------------


def _run_bytes(folder: Path) -> int:
    """The size of a run's event files: what its completion mark records, to notice a file cut short."""
    return sum(p.stat().st_size for p in event_files(folder))


class EventSync:
    """Brings an experiment's event files up to what its store and model folders hold.

    Holds what it has read of each run (read once, then kept up to date as it writes) and one
    writer per run it writes to; :meth:`sync` is one pass, :meth:`flush` makes the pass's records
    reach the files."""

    def __init__(self, exp_dir: Path, schedule_total: int, epsilons: Sequence[float], name: str = "") -> None:
        self.exp_dir = Path(exp_dir)
        self.root = self.exp_dir / TB_DIR
        self.window = figure3_window(schedule_total)
        self.epsilons = list(epsilons)
        self.name = name or self.exp_dir.name
        self.index: Dict[str, RunIndex] = {}
        self.writers: Dict[str, RunWriter] = {}
        self.live: Dict[int, LiveCurves] = {}
        self.complete: Set[int] = set()
        self.written = 0  # scalar points written

    def _index(self, run: str) -> RunIndex:
        if run not in self.index:
            self.index[run] = read_run(self.root / run)
        return self.index[run]

    def _write(self, run: str, points: Sequence[Scalar], records: Sequence[Any] = ()) -> None:
        index = self._index(run)
        events = list(records) + scalar_events(points, DESCRIPTIONS)
        if not events:
            return
        self.writers.setdefault(run, RunWriter(self.root / run)).write(events)
        for p in points:
            index.last_step[p.tag] = max(p.step, index.last_step.get(p.tag, -1))
            index.tags.add(p.tag)
        self.written += len(points)

    def sync(self, samples: Sequence[Sample], models: Sequence[Any]) -> None:
        index = self._index(SEARCH_RUN)
        records = []
        if not index.has(EXPERIMENT_TAG):
            records.append(
                experiment_event(
                    f"MetaQNN {self.name}",
                    "one session per model: its hyperparameters, best measured accuracy and, for a model "
                    "stopped early, the predicted one",
                    hparam_specs(self.epsilons),
                    METRICS,
                )
            )
            index.tags.add(EXPERIMENT_TAG)
        self._write(SEARCH_RUN, missing(search_points(samples, models, self.window), index), records)
        for m in models:
            if m.id in self.complete:
                continue
            if m.status in FINAL:
                self._finish(m)
            elif m.status == ModelStatus.RUNNING:
                self._follow(m)

    def _follow(self, m: Any) -> None:
        """A model in flight: the points its logs hold beyond those written."""
        from metaqnn.experiment import model_dir

        live = self.live.setdefault(m.id, LiveCurves(model_dir(self.exp_dir, m.id)))
        curves = live.read()
        if curves is not None:
            run = run_name(m.id)
            self._write(run, missing(curve_points(curves, time.time()), self._index(run)))

    def _finish(self, m: Any) -> None:
        """A model with a result: its final points, then its session (once), then the mark."""
        from metaqnn.experiment import model_dir

        run = run_name(m.id)
        folder = self.root / run
        mark = folder / DONE_MARK
        with contextlib.suppress(OSError):
            # written completely before, with this status, and its files are the size they were
            # then (a file cut short since is read and completed again): nothing to read
            if run not in self.index and mark.read_text().split() == [m.status.value, str(_run_bytes(folder))]:
                self.complete.add(m.id)
                return
        index = self._index(run)
        curves = curves_of_csv(model_dir(self.exp_dir, m.id)) or stored_curves(m)
        records = []
        session = model_session(m)
        if not index.has(SESSION_START_TAG):
            records.append(session_start_event(run, session))
            index.tags.add(SESSION_START_TAG)
        points = missing(model_points(m, curves), index)
        end = [] if index.has(SESSION_END_TAG) else [session_end_event(session)]
        self._write(run, points, records)
        if end:
            self.writers.setdefault(run, RunWriter(folder)).write(end)
            index.tags.add(SESSION_END_TAG)
        writer = self.writers.pop(run, None)
        if writer is not None:
            writer.close()  # the model's end: its records are on disk (fsync) before the mark says so
        self.live.pop(m.id, None)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (DONE_MARK + ".tmp")
        tmp.write_text(f"{m.status.value}\n{_run_bytes(folder)}\n")
        tmp.replace(mark)
        self.complete.add(m.id)
        self.index.pop(run, None)  # a complete run is not read again: its mark says so

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def read_store(store: Any) -> Tuple[List[Sample], List[Any]]:
    return samples_of(store.samples()), store.models()


# --- one writer at a time -------------------------------------------------------------------------


class WriterLock:
    """``tensorboard/.writer.lock``: held by the one process that writes an experiment's events."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fh: Optional[TextIO] = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 -- held until release()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _sync_args(config: Any) -> Tuple[int, List[float]]:
    return config.schedule.total, [e for e, _ in config.schedule.steps]


def write_events(exp_dir: Path) -> Dict[str, int]:
    """``metaqnn tensorboard``: write what an experiment's event files lack, from its store and folders.

    Idempotent (a second call writes nothing); refused while another process writes them."""
    from metaqnn.experiment import STORE_NAME, experiment_config
    from qagent.store import ExperimentStore

    if tensorboardx() is None:
        raise MonitorError(f"writing event files needs tensorboardX: {INSTALL_HINT}")
    from qagent.outdir import os_reason

    exp_dir = Path(exp_dir)
    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        config = experiment_config(store)
        lock = WriterLock(exp_dir / TB_DIR)
        try:
            if not lock.acquire():
                raise MonitorError(
                    f"the event files of {exp_dir} are being written by {lock.holder()} (a search running on it "
                    "writes them itself)"
                )
            sync = EventSync(exp_dir, *_sync_args(config))
            try:
                sync.sync(*read_store(store))
                sync.flush()
            finally:
                sync.close()
        except OSError as exc:
            raise MonitorError(f"cannot write the event files in {exp_dir / TB_DIR}: {os_reason(exc)}") from None
        finally:
            lock.release()
    return {"points": sync.written, "models": len(sync.complete)}


INSTALL_HINT = "pip install -e '.[tensorboard]' (or pip install 'tensorboardX>=2.6') turns them on"


# --- the search's monitor thread ------------------------------------------------------------------


class NoMonitor:
    """No event files (``tensorboard.enabled = false``, or no tensorboardX)."""

    def poke(self) -> None:
        pass

    def close(self) -> None:
        pass


class Monitor:
    """The search's writer of event files: a thread with a read-only store connection of its own.

    A pass every ``flush_seconds`` (the models in flight are read then), and one soon after each
    result the search commits; each pass ends with the records on disk.  Nothing it meets stops
    the search: an error is one line and the event files stop there."""

    MIN_GAP = 0.5  # seconds between two passes, however often the search pokes

    def __init__(self, exp_dir: Path, config: Any, log: Callable[[str], None]) -> None:
        self.exp_dir = Path(exp_dir)
        self.interval = float(config.tensorboard.flush_seconds)
        self.log = log
        self.sync = EventSync(self.exp_dir, *_sync_args(config))
        self._wake = threading.Event()
        self._stop = False
        self.passes = 0
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="tensorboard-monitor", daemon=True)

    def poke(self) -> None:
        """The search committed a result (its after_commit hook): a pass soon writes its final points."""
        self._wake.set()

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def close(self, timeout: float = 60.0) -> None:
        """One last pass (everything committed gets its final points and session), then stop."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        from metaqnn.experiment import STORE_NAME
        from qagent.store import ExperimentStore

        lock = WriterLock(self.exp_dir / TB_DIR)
        store = None
        try:
            said = False
            while not lock.acquire():
                if not said:
                    self.log(f"tensorboard: {lock.holder()} is writing the event files; waiting for it")
                    said = True
                if self._stop:
                    return
                self._wake.wait(self.interval)
                self._wake.clear()
            store = ExperimentStore.open_readonly(self.exp_dir / STORE_NAME)
            last = 0.0
            while True:
                stopping = self._stop
                gap = self.MIN_GAP - (time.monotonic() - last)
                if gap > 0 and not stopping:
                    time.sleep(gap)
                last = time.monotonic()
                self.sync.sync(*read_store(store))
                self.sync.flush()
                self.passes += 1
                if stopping:
                    break
                self._wake.wait(self.interval)
                self._wake.clear()
        except Exception as exc:  # never the search's failure: the event files stop here
            self.error = exc
            self.log(f"tensorboard: event files stopped ({type(exc).__name__}: {str(exc)[:200]}); the search goes on")
        finally:
            with contextlib.suppress(Exception):
                self.sync.close()
            if store is not None:
                store.close()
            lock.release()


def start_monitor(exp_dir: Path, config: Any, log: Callable[[str], None]) -> Any:
    """The search's monitor (started), or a :class:`NoMonitor` -- saying once how to turn it on."""
    if not config.tensorboard.enabled:
        return NoMonitor()
    if tensorboardx() is None:
        log(f"tensorboard: no event files, tensorboardX is not installed: {INSTALL_HINT}")
        return NoMonitor()
    log(f"tensorboard: event files in {Path(exp_dir) / TB_DIR} (make tensorboard-serve EXP=... shows them)")
    return Monitor(exp_dir, config, log).start()


VIEWER = Path(".deps") / "tensorboard-venv" / "bin" / "tensorboard"


def viewer_argv(exp_dir: Path, viewer: Optional[str], host: str, port: int) -> List[str]:
    """The TensorBoard viewer on an experiment's event files (installed by `make tensorboard-serve`)."""
    from metaqnn.config import PROJECT_ROOT

    program = Path(viewer) if viewer else PROJECT_ROOT / VIEWER
    if not (program.is_file() and os.access(str(program), os.X_OK)):
        raise MonitorError(f"no TensorBoard viewer at {program}: `make tensorboard-serve EXP=...` installs it there")
    root = Path(exp_dir) / TB_DIR
    if not root.is_dir():
        raise MonitorError(f"no event files at {root}")
    return [str(program), "--logdir", str(root), "--host", host, "--port", str(int(port)), "--reload_interval", "15"]
