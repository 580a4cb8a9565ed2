"""Issue 11: a search loses nothing -- results, best weights and learning curves survive kill -9
and a lagging log reader.  Each test injects its fault at a named point (a monkeypatched hook in
a child process that kill -9s itself, or a parser that waits for caffe), never by timing luck."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_trainer import make_job

from metaqnn.caffe import runner
from metaqnn.caffe.logparse import LogParser, parse_lines
from metaqnn.trainer import Trainer
from qagent.store import ExperimentStore

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "schedule.steps=[[1.0, 2]]", "--set", "space.max_depth=3"]

# A search whose first commit is a kill -9: the model is trained, its result not yet in the store.
KILL_AT_FIRST_COMMIT = """
import os, signal, sys
from qagent.store import ExperimentStore
def record_result(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
ExperimentStore.record_result = record_result
from metaqnn.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A trainer that is kill -9ed right after its log reader parsed caffe's "Snapshotting solver state
# ... iter_<N>" line (the pickled job is argv[1], N is argv[2]).
KILL_AT_SNAPSHOT_LINE = """
import os, pickle, signal, sys
from metaqnn.caffe import runner
class Killer(runner.LogParser):
    def feed(self, line):
        super().feed(line)
        if "Snapshotting solver state" in line and "_iter_%s." % sys.argv[2] in line:
            os.kill(os.getpid(), signal.SIGKILL)
runner.LogParser = Killer
from metaqnn.trainer import Trainer
with open(sys.argv[1], "rb") as fh:
    Trainer(pickle.load(fh)).train()
"""


# A trainer run to its end (the pickled job is argv[1]); METAQNN_KILL_AT picks where it dies.
RUN_TRAINER = """
import pickle, sys
from metaqnn.trainer import Trainer
with open(sys.argv[1], "rb") as fh:
    Trainer(pickle.load(fh)).train()
"""


def python(code_or_args, *args, cwd=ROOT, timeout=600, extra_env=None):
    argv = [sys.executable, "-c", textwrap.dedent(code_or_args), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def metaqnn(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "metaqnn", *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def store_models(exp):
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        return {m.id: m for m in store.models()}


def caffe_alive(folder):
    out = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    return out.stdout.split()


def test_1_kill_between_result_and_commit_recovers_the_model(tmp_path, digits_data):
    """Killed after the trainer finished, before the store commit: the rerun commits the trained
    result from the model folder (not a 'crashed' failure, not trained again)."""
    data, _ = digits_data
    exp = tmp_path / "exp"
    args = ["search", "--exp", str(exp), "--data-dir", str(data), "--seed", "3", "--max-models", "1", *TINY]
    killed = python(KILL_AT_FIRST_COMMIT, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert store_models(exp)[1].status == "running"
    model = exp / "models" / "00001"
    logs = {p.name: p.read_text() for p in model.glob("*.log")}
    rerun = metaqnn(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    m = store_models(exp)[1]
    assert m.status == "done", m.message
    curve = m.metrics["curve"]
    assert m.reward == max(acc for _, acc in curve) > 0.5 and len(curve) == 20
    assert {p.name: p.read_text() for p in model.glob("*.log")} == logs  # caffe did not run again
    best = m.metrics["best_iteration"]
    assert sorted(p.name for p in (model / "snapshots").iterdir()) == [f"model_iter_{best}.caffemodel"]


class LaggingParser(LogParser):
    """A log reader on a loaded CPU: at the full run's second test it waits until caffe has
    written its last snapshot, so everything after that line is already on disk when read."""

    last_snapshot: Path = Path("/nonexistent")

    def feed(self, line):
        if "Test net output #0" in line and self.state.last_iteration == 74:
            deadline = time.monotonic() + 60
            while not self.last_snapshot.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.5)  # caffe's last test and exit
        super().feed(line)


def test_2_a_lagging_log_reader_never_deletes_the_best_weights(digits_data, tmp_path, monkeypatch):
    job = replace(make_job(digits_data, tmp_path, epochs=6), seed=7)
    monkeypatch.setattr(LaggingParser, "last_snapshot", job.model_dir / "snapshots" / "model_iter_222.caffemodel")
    monkeypatch.setattr(runner, "LogParser", LaggingParser)
    result = Trainer(job).train()
    assert result.status == "done" and [it for it, _ in result.curve] == [37, 74, 111, 148, 185, 222]
    assert result.best_iteration >= 111  # the weights the reader had not reached yet (seed 7)
    left = sorted(p.name for p in (job.model_dir / "snapshots").iterdir())
    assert left == [f"model_iter_{result.best_iteration}.caffemodel"]


def test_3_kill_9_loses_no_log_line_and_leaves_no_caffe(digits_data, tmp_path):
    """Killed right after the reader saw the epoch-3 snapshot line: every earlier line (the epoch-2
    test) is on disk, caffe dies with the search, and the resumed model's curve has every epoch once."""
    job = replace(make_job(digits_data, tmp_path, epochs=6), seed=7)
    pickled = tmp_path / "job.pickle"
    pickled.write_bytes(pickle.dumps(job))
    killed = python(KILL_AT_SNAPSHOT_LINE, str(pickled), "111")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    time.sleep(0.2)
    assert caffe_alive(job.model_dir) == []  # PR_SET_PDEATHSIG: caffe went with its parent
    (log,) = job.model_dir.glob("train*.log")
    before = parse_lines(log.read_text().splitlines())
    assert [int(r["NumIters"]) for r in before.test_rows][:2] == [37, 74]  # caffe may have got further
    result = Trainer(job).train()
    assert result.status == "done" and [it for it, _ in result.curve] == [37, 74, 111, 148, 185, 222]
    assert result.best_accuracy == max(acc for _, acc in result.curve)
    history = (job.model_dir / "history.test").read_text().splitlines()
    assert [int(float(line.split(",")[0])) for line in history[1:]] == [37, 74, 111, 148, 185, 222]


def test_a_kill_after_caffe_finished_but_before_result_json_trains_nothing_again(digits_data, tmp_path):
    job = replace(make_job(digits_data, tmp_path), seed=3)
    pickled = tmp_path / "job.pickle"
    pickled.write_bytes(pickle.dumps(job))
    killed = python(RUN_TRAINER, str(pickled), extra_env={"METAQNN_KILL_AT": "trained"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (job.model_dir / "result.json").exists()
    logs = {p.name: p.read_text() for p in job.model_dir.glob("*.log")}
    result = Trainer(job).train()
    assert result.status == "done" and [it for it, _ in result.curve] == [37, 74, 111, 148]
    assert {p.name: p.read_text() for p in job.model_dir.glob("*.log")} == logs  # caffe did not run again
    left = sorted(p.name for p in (job.model_dir / "snapshots").iterdir())
    assert left == [f"model_iter_{result.best_iteration}.caffemodel"]


def test_4_a_relative_data_dir_trains(tmp_path, digits_data):
    data, _ = digits_data
    work = tmp_path / "work"
    work.mkdir()
    rel = os.path.relpath(data, work)
    out = metaqnn("search", "--exp", "./exp", "--data-dir", rel, "--seed", "4", "--max-models", "1", *TINY, cwd=work)
    assert out.returncode == 0, out.stdout + out.stderr
    m = store_models(work / "exp")[1]
    assert m.status == "done" and m.reward > 0.5, m.message
    with ExperimentStore.open_readonly(work / "exp" / "store.sqlite") as store:
        assert store.meta()["data_dir"] == str(data.resolve())


def test_a_stopped_caffe_is_killed_by_the_watchdog_and_retried(digits_data, tmp_path):
    """A caffe that stops itself (SIGSTOP) before printing anything, once: the watchdog kills it
    after its limit, the retry trains the model, and the log says why the first run ended."""
    from metaqnn.caffe.runner import Stall

    job = make_job(digits_data, tmp_path)
    stopping = tmp_path / "stopping-caffe.sh"
    stopping.write_text(
        f"#!/bin/sh\nif [ ! -e {tmp_path}/stopped ]; then touch {tmp_path}/stopped; kill -STOP $$; fi\n"
        f'exec {job.caffe} "$@"\n'
    )
    stopping.chmod(0o755)
    job = replace(job, caffe=stopping, stall=Stall(floor=2.0, factor=5.0, unmeasured=5.0), timeout=None)
    started = time.monotonic()
    result = Trainer(job).train()
    assert result.status == "done" and time.monotonic() - started < 120
    assert "# stopped: stalled" in (job.model_dir / "probe0.log").read_text()
    assert (job.model_dir / "probe0_retry1.log").exists()


def test_stale_temporary_lmdbs_of_killed_runs_are_removed(tmp_path, digits_data):
    from data_prep.prepare import PrepOptions, prepare

    data, _ = digits_data
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text((data / "manifest.json").read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".train.lmdb.tmp-{dead.pid}"
    live = out / f".val.lmdb.tmp-{os.getppid()}"  # another prepare still writing: not ours to delete
    for folder in (stale, live):
        folder.mkdir()
        (folder / "data.mdb").write_bytes(b"x")
    prepare(PrepOptions("digits", validation_size=300), out, log=lambda _m: None)
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("best_run", [0, 1])
def test_pruning_keeps_the_best_of_every_run(tmp_path, best_run):
    """The best weights measured before a kill survive the resumed run's pruning (and vice versa)."""
    from metaqnn.trainer import prune_by_history, snapshot_facts

    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    for it in (37, 74, 111, 148):
        for ext in ("caffemodel", "solverstate"):
            (snaps / f"model_iter_{it}.{ext}").write_bytes(b"x")

    def run(tests, snapshots):
        lines = []
        for it, acc in tests:
            lines += [
                f"I1128 03:00:00.000000  1 solver.cpp:454] Snapshotting to binary proto file snapshots/model_iter_{it}.caffemodel",
                f"I1128 03:00:00.000000  1 sgd_solver.cpp:273] Snapshotting solver state to binary proto file snapshots/model_iter_{it}.solverstate",
                f"I1128 03:00:00.000000  1 solver.cpp:347] Iteration {it}, Testing net (#0)",
                f"I1128 03:00:00.000000  1 solver.cpp:414]     Test net output #0: Accuracy1 = {acc}",
            ]
        return parse_lines(lines)

    accs = [(0.9, 0.5), (0.5, 0.8)][best_run]
    first = run([(37, 0.3), (74, accs[0])], None)
    second = run([(111, accs[1]), (148, 0.4)], None)
    prune_by_history(snaps, snapshot_facts([first, second]))
    best = 74 if best_run == 0 else 111
    assert sorted(p.name for p in snaps.iterdir()) == sorted(
        [f"model_iter_{best}.caffemodel", "model_iter_148.caffemodel", "model_iter_148.solverstate"]
    )
