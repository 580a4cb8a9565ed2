"""Run one ``caffe`` command: argument list, own process group, streamed + parsed log.

glog goes to stderr (GLOG_logtostderr=1, so no stray /tmp/caffe.* files); each
line is written to the log file and fed to the parser as it arrives.  The run
is stopped -- whole process group, SIGTERM then SIGKILL -- on a wall-clock
limit, on a NaN loss (Caffe keeps going after divergence), or when the caller
is interrupted (Ctrl-C), so no caffe process outlives us.
"""

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

from metaqnn.caffe.logparse import LogParser, LogState
from metaqnn.failures import InfrastructureError

# Every caffe this process has running, so that a search stopping for a broken set-up can stop
# the trainings still in flight (in other threads) instead of waiting hours for them.
_ACTIVE: "Set[subprocess.Popen[str]]" = set()
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


@dataclass
class RunOutcome:
    returncode: Optional[int]
    state: LogState
    wall_time: float
    timed_out: bool = False
    stopped_for_nan: bool = False
    log_path: Optional[Path] = None

    @property
    def signal(self) -> Optional[int]:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None


def _terminate(proc: "subprocess.Popen[str]", grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
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


def run_caffe(
    argv: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    timeout: Optional[float] = None,
    stop_on_nan: bool = True,
    on_line: Optional[Callable[[LogState], None]] = None,
    env: Optional[Dict[str, str]] = None,
) -> RunOutcome:
    full_env = dict(os.environ)
    full_env.setdefault("GLOG_logtostderr", "1")
    full_env.setdefault("GLOG_minloglevel", "0")
    if env:
        full_env.update(env)
    parser = LogParser()
    lines: queue.Queue[Optional[str]] = queue.Queue()  # novermin (local annotations are never evaluated at run time)
    t0 = time.monotonic()
    if _STOPPING.is_set():
        raise CaffeStopped("the search is stopping")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {' '.join(argv)}\n")
        log.flush()
        pidfile = Path(cwd) / "caffe.pid"
        stop_stale(pidfile)
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=str(cwd),
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
            )
        except OSError as exc:  # the binary vanished or lost its execute bit since the search started
            raise InfrastructureError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        with _ACTIVE_LOCK:
            _ACTIVE.add(proc)
        pidfile.write_text(str(proc.pid))
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = stopped = False
        try:
            while True:
                remaining = None if timeout is None else timeout - (time.monotonic() - t0)
                if remaining is not None and remaining <= 0:
                    timed_out = True
                    break
                try:
                    line = lines.get(timeout=min(1.0, remaining) if remaining is not None else 1.0)
                except queue.Empty:
                    continue
                if line is None:
                    break
                log.write(line)
                parser.feed(line)
                if on_line is not None:
                    on_line(parser.state)
                if stop_on_nan and parser.state.diverged:
                    stopped = True
                    break
        except BaseException:
            _terminate(proc)
            log.write("# interrupted: caffe stopped\n")
            raise
        finally:
            if timed_out or stopped:
                _terminate(proc)
        proc.wait()
        with _ACTIVE_LOCK:
            _ACTIVE.discard(proc)
        pidfile.unlink(missing_ok=True)
        reader.join(timeout=5)
        while True:  # drain what arrived after we stopped reading
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                break
            log.write(line)
            parser.feed(line)
        if timed_out:
            log.write(f"# stopped: wall-clock limit of {timeout} s\n")
        if stopped:
            log.write("# stopped: NaN/inf loss (divergence)\n")
    if _STOPPING.is_set():
        raise CaffeStopped("the search is stopping")
    return RunOutcome(proc.returncode, parser.state, time.monotonic() - t0, timed_out, stopped, log_path)


def train_argv(caffe: Path, solver: Path, snapshot: Optional[Path] = None, gpu: Optional[int] = None) -> List[str]:
    argv = [str(caffe), "train", f"--solver={solver}"]
    if snapshot is not None:
        argv.append(f"--snapshot={snapshot}")
    if gpu is not None:
        argv.append(f"--gpu={gpu}")
    return argv
