"""Check Caffe before a search trusts it with days of work.

A search turns each failed training into a reward.  If the Caffe binary is not
Caffe, crashes on everything, or cannot read the data, every model would fail
the same way and the agent would learn from infrastructure noise.  So before
the experiment is created (or resumed) the binary must answer ``--version`` as
Caffe, and one iteration of a one-layer net on the real LMDBs (TRAIN and TEST)
must finish.  Failures are :class:`InfrastructureError`: one line naming the
binary, exit status 2, nothing created.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

from metaqnn.caffe.runner import run_caffe, train_argv
from metaqnn.failures import InfrastructureError
from metaqnn.netspec import Transform, build_net
from metaqnn.render import write_training_files
from qagent.arch import Softmax

PREFLIGHT_TIMEOUT = 300.0
WORK_PREFIX = "metaqnn-preflight-"  # + the pid of the process that made it


def remove_stale_work_dirs(tmp: Optional[Path] = None) -> List[Path]:
    """Remove the preflight folders of processes that are gone (a kill -9 skips the cleanup).

    A folder is removed only when its name carries a pid with no live process: a preflight
    running now, in another search, is left alone."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        pid = folder.name[len(WORK_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists() or not folder.is_dir() or folder.is_symlink():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def check_caffe_runs(binary: Path) -> str:
    """``caffe --version`` must succeed and say it is Caffe; returns the version line."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, errors="replace", timeout=60, check=False
        )
    except OSError as exc:
        raise InfrastructureError(f"caffe binary {binary} cannot be run: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"caffe binary {binary} did not answer --version within 60 s") from None
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    version = next((ln.strip() for ln in lines if "caffe version" in ln.lower()), None)
    if proc.returncode != 0 or version is None:
        said = lines[-1].strip()[:120] if lines else "nothing"
        raise InfrastructureError(
            f"{binary} is not a working Caffe: `--version` exited with status {proc.returncode} and printed {said!r}"
        )
    return version


def check_caffe_trains(
    binary: Path,
    *,
    train_lmdb: Path,
    val_lmdb: Path,
    image_size: int,
    channels: int,
    num_classes: int,
    transform: Transform,
    gpu: Optional[int] = None,
    timeout: float = PREFLIGHT_TIMEOUT,
) -> None:
    """One training iteration and one test batch of ``[SM(n)]`` on the real data must finish."""
    spec = build_net(
        (Softmax(num_classes),),
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        train_source=str(train_lmdb.resolve()),
        test_source=str(val_lmdb.resolve()),
        transform=transform,
        dropout="none",
        train_batch=1,
        test_batch=1,
    )
    remove_stale_work_dirs()
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
    try:
        solver = [
            ("net", "net.prototxt"),
            ("test_iter", 1),
            ("test_interval", 1),
            ("base_lr", 0.0001),
            ("max_iter", 1),
            ("lr_policy", "fixed"),
            ("display", 1),
            ("snapshot_after_train", False),
            ("solver_mode", "CPU" if gpu is None else "GPU"),
        ]
        write_training_files(work, spec, solver)
        outcome = run_caffe(
            train_argv(binary, Path("solver.prototxt"), None, gpu),
            cwd=work,
            log_path=work / "preflight.log",
            timeout=timeout,
            stop_on_nan=False,
        )
        if outcome.timed_out:
            raise InfrastructureError(
                f"caffe {binary} did not finish one iteration on {train_lmdb.parent} in {timeout:g} s"
            )
        if outcome.returncode != 0 or not outcome.state.done:
            st = outcome.state
            why = st.fatal[0][:200] if st.fatal else _last_line(work / "preflight.log")
            raise InfrastructureError(
                f"caffe {binary} cannot train one iteration on {train_lmdb.parent} "
                f"(exit status {outcome.returncode}): {why}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError:
        return "no output"
    return lines[-1][:200] if lines else "no output"
