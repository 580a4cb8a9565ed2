"""Run one ``caffe`` command: argument list, own process group, log on disk first, then parsed.

glog goes to stderr (GLOG_logtostderr=1, so no stray /tmp/caffe.* files).  Caffe's stdout and
stderr *are* the log file (opened O_APPEND, no Python buffer in between), and the Python side
tails that file: a line is on disk before anything acts on it, so a kill -9 of the search loses
no line caffe printed.  The run is stopped -- whole process group -- on a wall-clock limit, on a
stall (no new line for a multiple of the model's own epoch time), on a NaN loss (Caffe keeps
going after divergence), or when the caller is interrupted (Ctrl-C).  The child also asks the
kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so no caffe outlives a kill -9.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Dict, List, Optional, Sequence, Set

from metaqnn.caffe.logparse import LogParser, LogState
from metaqnn.failures import InfrastructureError

# Every caffe this process has running, so that a search stopping for a broken set-up can stop
# the trainings still in flight (in other threads) instead of waiting hours for them.
_ACTIVE: "Set[subprocess.Popen[bytes]]" = set()
_ACTIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


class CaffeStopped(RuntimeError):
    """Raised in a training thread whose caffe was stopped by :func:`stop_all`."""


def stop_all() -> None:
    """Stop every caffe of this process and refuse new ones until :func:`allow_runs`."""
    _STOPPING.set()
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE)
    for proc in procs:
        _terminate(proc, grace=2.0)


def allow_runs() -> None:
    _STOPPING.clear()


RUN_HEADER = "# run "  # first line of each caffe run in a log: "# run <n>: <argv>"
_POLL = 0.05  # seconds between looks at the log file while caffe is quiet
_PR_SET_PDEATHSIG = 1


def _load_libc() -> Optional[ctypes.CDLL]:
    """libc for prctl, loaded before any fork (a dlopen in the forked child is not safe)."""
    if not sys.platform.startswith("linux"):
        return None
    try:  # the interpreter's own symbols include libc (find_library would spawn ldconfig)
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: the kernel SIGKILLs the child when the parent goes (Linux); a no-op elsewhere."""

    def setup() -> None:
        if _LIBC is None:
            return
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(137)

    return setup


@dataclass(frozen=True)
class Stall:
    """Stall watchdog: kill caffe when no log line came for ``max(floor, factor x epoch time)``.

    The epoch time is the model's own (measured from its iteration timestamps, or given by an
    earlier run of the same model); before it is known the limit is ``unmeasured``.  Caffe
    prints at least the test lines every epoch, so a longer silence is a hung or stopped caffe.
    """

    floor: float = 120.0
    factor: float = 4.0
    unmeasured: float = 1800.0

    def limit(self, epoch_seconds: Optional[float]) -> float:
        if epoch_seconds is None:
            return max(self.floor, self.unmeasured)
        return max(self.floor, self.factor * epoch_seconds)


def measured_epoch_seconds(state: LogState, iters_per_epoch: int) -> Optional[float]:
    """Seconds per epoch from the timestamps of the training/test rows of one run, if two exist."""
    rows = sorted(
        (r for r in state.train_rows + state.test_rows if r.get("Seconds") is not None),
        key=lambda r: r["NumIters"],
    )
    if len(rows) < 2 or rows[-1]["NumIters"] <= rows[0]["NumIters"]:
        return None
    per_iter = (rows[-1]["Seconds"] - rows[0]["Seconds"]) / (rows[-1]["NumIters"] - rows[0]["NumIters"])
    return max(0.0, per_iter) * iters_per_epoch


@dataclass
class RunOutcome:
    returncode: Optional[int]
    state: LogState
    wall_time: float
    timed_out: bool = False
    stopped_for_nan: bool = False
    log_path: Optional[Path] = None
    stalled: bool = False
    stopped_early: bool = False  # on_line asked for the stop (an early-stopping rule)

    @property
    def signal(self) -> Optional[int]:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None


def _terminate(proc: "subprocess.Popen[bytes]", grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_stale(pidfile: Path) -> None:
    """Kill a caffe left running by a process that died (kill -9, a lost Ray worker) for this folder."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"caffe" in cmdline and str(pidfile.parent).encode() in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for _ in range(100):  # wait until it is gone before a new caffe writes the same snapshots
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


def fsync_file(path: Path) -> None:
    """Make a file's content durable (a commit point: the result is derived from it)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Tail:
    """Complete lines appended to a file since an offset (a partial last line waits for its end)."""

    def __init__(self, fh: "IO[bytes]") -> None:
        self.fh = fh
        self.rest = b""

    def lines(self, final: bool = False) -> List[str]:
        data = self.rest + self.fh.read()
        parts = data.split(b"\n")
        self.rest = parts.pop()
        if final and self.rest:
            parts.append(self.rest)
            self.rest = b""
        return [p.decode("utf-8", "replace") + "\n" for p in parts]


def _append_note(log_path: Path, text: str) -> None:
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(text)


def run_caffe(
    argv: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    timeout: Optional[float] = None,
    stop_on_nan: bool = True,
    on_line: Optional[Callable[[LogState], Optional[bool]]] = None,
    env: Optional[Dict[str, str]] = None,
    stall: Optional[Stall] = None,
    iters_per_epoch: Optional[int] = None,
    epoch_seconds: Optional[float] = None,
    run_number: int = 0,
) -> RunOutcome:
    """Run caffe to its end (or a stop), returning the parsed log; ``on_line`` sees every line
    and stops the run by returning True (an early-stopping rule at a test line).

    ``epoch_seconds`` is the model's epoch time measured by an earlier run (for the watchdog
    before this run has measured its own).
    """
    full_env = dict(os.environ)
    full_env.setdefault("GLOG_logtostderr", "1")
    full_env.setdefault("GLOG_minloglevel", "0")
    if env:
        full_env.update(env)
    parser = LogParser()
    t0 = time.monotonic()
    if _STOPPING.is_set():
        raise CaffeStopped("the search is stopping")
    _append_note(log_path, f"{RUN_HEADER}{run_number}: {' '.join(argv)}\n")
    start = log_path.stat().st_size  # caffe's lines begin here
    pidfile = Path(cwd) / "caffe.pid"
    stop_stale(pidfile)
    out_fd = os.open(str(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=str(cwd),
            env=full_env,
            stdout=out_fd,
            stderr=out_fd,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    except OSError as exc:  # the binary vanished or lost its execute bit since the search started
        raise InfrastructureError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(out_fd)  # the child holds its own copy
    with _ACTIVE_LOCK:
        _ACTIVE.add(proc)
    pidfile.write_text(str(proc.pid))
    reader = open(log_path, "rb")  # noqa: SIM115 (closed after the last line, below)
    reader.seek(start)
    tail = _Tail(reader)
    why = ""
    try:
        why = _follow(proc, tail, parser, on_line, t0, timeout, stop_on_nan, stall, iters_per_epoch, epoch_seconds)
    except BaseException:
        _terminate(proc)
        with _ACTIVE_LOCK:
            _ACTIVE.discard(proc)
        reader.close()
        _append_note(log_path, "# interrupted: caffe stopped\n")
        raise
    if why == "stall":
        _terminate(proc, sig=signal.SIGKILL)  # a stopped (SIGSTOP) caffe never handles SIGTERM
    elif why:
        _terminate(proc)
    proc.wait()
    with _ACTIVE_LOCK:
        _ACTIVE.discard(proc)
    pidfile.unlink(missing_ok=True)
    for line in tail.lines(final=True):  # what caffe wrote after we stopped reading
        parser.feed(line)
    reader.close()
    notes = {
        "timeout": f"# stopped: wall-clock limit of {timeout} s\n",
        "nan": "# stopped: NaN/inf loss (divergence)\n",
        "stall": "# stopped: stalled (no log line within the watchdog's limit)\n",
        "early": "# stopped: early-stopping rule\n",
    }
    if why:
        _append_note(log_path, notes[why])
    if _STOPPING.is_set():
        raise CaffeStopped("the search is stopping")
    return RunOutcome(
        proc.returncode,
        parser.state,
        time.monotonic() - t0,
        timed_out=why == "timeout",
        stopped_for_nan=why == "nan",
        log_path=log_path,
        stalled=why == "stall",
        stopped_early=why == "early",
    )


def _follow(
    proc: "subprocess.Popen[bytes]",
    tail: _Tail,
    parser: LogParser,
    on_line: Optional[Callable[[LogState], Optional[bool]]],
    t0: float,
    timeout: Optional[float],
    stop_on_nan: bool,
    stall: Optional[Stall],
    iters_per_epoch: Optional[int],
    epoch_seconds: Optional[float],
) -> str:
    """Feed the log's new lines to the parser until caffe exits; return why it must be stopped ('' if not)."""
    last_line = time.monotonic()
    while True:
        exited = proc.poll() is not None
        new = tail.lines()
        for line in new:
            parser.feed(line)
            if on_line is not None and on_line(parser.state):
                return "early"
            if stop_on_nan and parser.state.diverged:
                return "nan"
        now = time.monotonic()
        if new:
            last_line = now
        if exited:
            return ""
        if timeout is not None and now - t0 >= timeout:
            return "timeout"
        if stall is not None:
            measured = measured_epoch_seconds(parser.state, iters_per_epoch) if iters_per_epoch else None
            if now - last_line > stall.limit(measured if measured is not None else epoch_seconds):
                return "stall"
        if not new:
            time.sleep(_POLL)


def train_argv(caffe: Path, solver: Path, snapshot: Optional[Path] = None, gpu: Optional[int] = None) -> List[str]:
    argv = [str(caffe), "train", f"--solver={solver}"]
    if snapshot is not None:
        argv.append(f"--snapshot={snapshot}")
    if gpu is not None:
        argv.append(f"--gpu={gpu}")
    return argv
