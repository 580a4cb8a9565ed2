"""Issue 24, with the real caffe: what a search or a trainer picks up again from disk must be what
it claims to be.  A folder that is not this model's is set aside, never adopted; a torn state.json
restarts the model instead of wedging it; a caffe killed by a signal is no reward; a probe that
finished before a kill is not trained again; a stopped model's result does not depend on how far
caffe ran past its checkpoint; a snapshot no log line confirms is never the one kept."""

import json
import os
import pickle
import shutil
import stat
import time
from dataclasses import replace
from pathlib import Path

from commandline import cli
from test_crash import KILL_AT_SNAPSHOT_LINE, RUN_TRAINER, python
from test_trainer import make_job

from metaqnn.caffe.logparse import LogState
from metaqnn.early_stop.rules import MedianRule
from metaqnn.preflight import WORK_PREFIX, remove_stale_work_dirs
from metaqnn.trainer import SnapshotFacts, Trainer, prune_by_history, resume_point
from qagent.status import ModelStatus
from qagent.store import ExperimentStore

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "schedule.steps=[[1.0, 3]]", "--set", "space.max_depth=3"]


def models_of(exp: Path):
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        return {m.id: m for m in store.models()}


def killed_training(digits_data, tmp_path, script, *args, env=None):
    """A training (make_job's) run in a child that is kill -9ed where ``script`` says, and the same
    training uninterrupted, in a folder of its own, as the reference."""
    job = make_job(digits_data, tmp_path)
    reference = Trainer(replace(job, model_dir=tmp_path / "reference")).train()
    path = tmp_path / "job.pkl"
    path.write_bytes(pickle.dumps(job))
    killed = python(script, str(path), *args, extra_env=env)
    assert killed.returncode == -9, killed.stderr
    if script == KILL_AT_SNAPSHOT_LINE:
        as_if_killed_at_the_line(job.model_dir, int(args[0]))
    return job, reference


def as_if_killed_at_the_line(folder: Path, iteration: int) -> None:
    """The folder as a kill at caffe's solver-state line of ``iteration`` leaves it.

    The trainer dies when its log reader parses that line, and caffe with it; but a loaded machine
    lets caffe run ahead of the reader (a digits epoch takes milliseconds), even to its end.  What
    caffe wrote after the line, and the snapshots after it, are cut, so every run tests the kill
    the test names."""
    marker = f"_iter_{iteration}.solverstate"
    for log in folder.glob("*.log"):
        lines = log.read_text().splitlines(keepends=True)
        at = next((i for i, ln in enumerate(lines) if "Snapshotting solver state" in ln and marker in ln), None)
        if at is not None:
            log.write_text("".join(lines[: at + 1]))
    for snap in (folder / "snapshots").glob("*_iter_*"):
        if int(snap.name.rsplit("_iter_", 1)[1].split(".")[0]) > iteration:
            snap.unlink()


def search(exp: Path, data: Path, *extra: str, env=None):
    result = cli("search", "--exp", str(exp), "--data-dir", str(data), *TINY, *extra, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# --- 1. a model folder is adopted only when it is this model's ---------------------------------


def test_folders_of_another_experiment_are_set_aside_not_adopted(digits_data, tmp_path):
    """Model folders copied in from another experiment (another seed, other architectures under
    the same ids) are never read as this model's history: the search trains each model itself and
    gets exactly the rewards of a clean run."""
    data, _ = digits_data
    other, exp, clean = tmp_path / "other", tmp_path / "exp", tmp_path / "clean"
    search(other, data, "--seed", "5")
    search(clean, data, "--seed", "7")
    search(exp, data, "--seed", "7", "--max-models", "1")
    for mid in ("00002", "00003"):  # stale folders where this experiment's next models will go
        shutil.copytree(other / "models" / mid, exp / "models" / mid)
    out = search(exp, data, "--seed", "7")
    assert "set aside" in out.stdout and "identity.json" in out.stdout
    got, want = models_of(exp), models_of(clean)
    assert {m.arch: (m.status, m.reward) for m in got.values()} == {m.arch: (m.status, m.reward) for m in want.values()}
    for mid in ("00002", "00003"):
        assert (exp / "models" / f"{mid}.foreign-1" / "result.json").exists()  # kept, not deleted
        assert json.loads((exp / "models" / mid / "identity.json").read_text())["model"] == int(mid)


def test_a_torn_state_json_restarts_the_model_instead_of_wedging_it(digits_data, tmp_path):
    """kill -9 after the probe, then state.json cut to 40 bytes: the folder is set aside with the
    file named, and the model trains to the same result as an uninterrupted training."""
    job, reference = killed_training(digits_data, tmp_path, RUN_TRAINER, env={"METAQNN_KILL_AT": "trained"})
    state = job.model_dir / "state.json"
    state.write_text(state.read_text()[:40])
    result = Trainer(job).train()
    assert any("state.json" in n and "set aside" in n for n in result.notes), result.notes
    assert result.status == reference.status and result.curve == reference.curve
    assert (job.model_dir.parent / "model.foreign-1" / "state.json").exists()


def test_lost_snapshots_of_a_training_in_flight_restart_it_instead_of_failing_it(digits_data, tmp_path):
    """kill -9 mid-training, then the snapshots are deleted: no "crashed" reward; the model is
    trained from the start in a fresh folder and reaches the uninterrupted result."""
    job, reference = killed_training(digits_data, tmp_path, KILL_AT_SNAPSHOT_LINE, "111")
    assert json.loads((job.model_dir / "state.json").read_text())["phase"] == "full"
    shutil.rmtree(job.model_dir / "snapshots")
    result = Trainer(job).train()
    assert result.status == reference.status and result.curve == reference.curve
    assert any("holds no complete snapshot" in n for n in result.notes), result.notes


def test_a_truncated_snapshot_is_no_verdict_on_the_net(digits_data, tmp_path):
    """kill -9 mid-training, then the snapshot to continue from is cut short: caffe refuses to read
    it, which is no failure of the net (never a "rejected" reward); the snapshot is dropped and
    the training continues from the one before."""
    job, reference = killed_training(digits_data, tmp_path, KILL_AT_SNAPSHOT_LINE, "111")
    for snap in (job.model_dir / "snapshots").glob("*.caffemodel"):
        if int(snap.stem.rsplit("_", 1)[1]) >= 74:
            snap.write_bytes(snap.read_bytes()[:50])
    result = Trainer(job).train()
    assert result.status == ModelStatus.DONE and result.failure is None, result.message
    assert any("could not read the snapshot of iteration 74" in n for n in result.notes), result.notes
    assert [it for it, _ in result.curve] == [it for it, _ in reference.curve]


# --- 2. a caffe killed by a signal is not the net's failure --------------------------------------


def _segfaulting_caffe(tmp_path: Path, caffe: Path, model: str) -> Path:
    """A wrapper prefix whose caffe kills itself with SIGSEGV when training in model folder
    ``model``; its schema comes from the real prefix (root/ is the real one's)."""
    prefix = tmp_path / "wrapped"
    (prefix / "bin").mkdir(parents=True)
    os.symlink(caffe.parent.parent / "root", prefix / "root")
    wrapper = prefix / "bin" / "caffe"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = train ] && [ "$(basename "$PWD")" = {model} ]; then kill -SEGV $$; fi\n'
        f'exec {caffe} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def test_a_caffe_killed_by_a_signal_is_set_aside_and_trained_again_by_a_healthy_run(digits_data, tmp_path, caffe):
    data, _ = digits_data
    exp = tmp_path / "exp"
    wrapper = _segfaulting_caffe(tmp_path, caffe.binary, "00002")
    out = search(exp, data, "--seed", "7", env={"CAFFE_BIN": str(wrapper)})
    assert "SET ASIDE" in out.stdout and "signal 11 in all 3 attempts" in out.stdout
    models = models_of(exp)
    assert models[2].status == ModelStatus.DEFERRED and models[2].reward is None and models[2].attempts == 1
    assert len([p for p in (exp / "models" / "00002").glob("probe0*.log")]) == 3  # the run and 2 retries
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        assert models[2].arch not in {s["arch"] for s in store.samples()}
        assert sum(store.trained_per_epsilon().values()) == 3  # a fourth model filled its place
    status = cli("status", "--exp", str(exp))
    assert "set aside" in status.stdout, status.stdout
    again = search(exp, data, "--seed", "7")  # the healthy caffe: #2 is trained first, and counts
    assert "#2 training again" in again.stdout
    healed = models_of(exp)[2]
    assert healed.status in (ModelStatus.DONE, ModelStatus.FAILED) and healed.reward is not None
    assert healed.metrics["caffe_time"] > 0  # trained by the healthy caffe, not recovered
    assert healed.attempts == 2  # issue 25: the run that trained it again counts


def test_failures_the_breaker_blames_are_not_kept_and_are_trained_by_the_next_run(digits_data, tmp_path, caffe):
    """A caffe that refuses every net (past the preflight) the same way: the breaker trips, and the
    models it blames are not rewards -- the resume says none is trained and trains them."""
    data, _ = digits_data
    prefix = tmp_path / "refusing"
    (prefix / "bin").mkdir(parents=True)
    os.symlink(caffe.binary.parent.parent / "root", prefix / "root")
    wrapper = prefix / "bin" / "caffe"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$(basename "$PWD")" in metaqnn-preflight-*) ;; *) if [ "$1" = train ]; then\n'
        '  echo "F1202 10:00:00.000000  1 net.cpp:42] Check failed: the set-up is broken" >&2; exit 1; fi;; esac\n'
        f'exec {caffe.binary} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    exp = tmp_path / "exp"
    args = ["search", "--exp", str(exp), "--data-dir", str(data), *TINY, "--max-same-failures", "3"]
    broken = cli(*args, env={"CAFFE_BIN": str(wrapper)})
    assert broken.returncode == 2 and "not kept as rewards" in broken.stderr, broken.stdout + broken.stderr
    models = models_of(exp)
    assert [m.status for m in models.values()] == [ModelStatus.DEFERRED] * 3
    assert all(m.reward is None for m in models.values())
    healthy = cli(*args)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "0 models already trained" in healthy.stdout
    after = models_of(exp)
    assert set(after) == set(models) and all(m.status in ("done", "failed") for m in after.values())
    assert all(m.metrics["caffe_time"] > 0 for m in after.values())  # trained, not recovered


# --- 11. kill -9 windows of the probe, the preflight and early stopping -------------------------


def test_a_probe_that_finished_before_the_kill_is_not_trained_again(digits_data, tmp_path):
    job, reference = killed_training(digits_data, tmp_path, RUN_TRAINER, env={"METAQNN_KILL_AT": "probe-finished"})
    assert json.loads((job.model_dir / "state.json").read_text())["phase"] == "probe"
    result = Trainer(job).train()
    assert (job.model_dir / "probe0.log").read_text().count("# run ") == 1  # not run again
    assert result.curve == reference.curve and result.best_accuracy == reference.best_accuracy


def test_stale_preflight_folders_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f"{WORK_PREFIX}999999999-abc"
    alive = tmp_path / f"{WORK_PREFIX}{os.getpid()}-abc"
    foreign = tmp_path / f"{WORK_PREFIX}notapid"
    for d in (dead, alive, foreign):
        d.mkdir()
        (d / "net.prototxt").write_text("x")
    assert remove_stale_work_dirs(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and foreign.exists()


def test_a_snapshot_no_log_line_confirms_is_never_the_resume_point(tmp_path):
    """Constructed: iteration 37's pair is confirmed by the log; 74's files exist but the reader has
    not seen their lines (caffe may still be writing them).  74 is kept, 37 is the resume point."""
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    for it in (37, 74):
        for suffix in ("caffemodel", "solverstate"):
            (snaps / f"model_iter_{it}.{suffix}").write_bytes(b"w")
    state = LogState()
    state.snapshots = ["snapshots/model_iter_37.caffemodel", "snapshots/model_iter_37.solverstate"]
    state.snapshots_complete = 2
    from metaqnn.trainer import snapshot_facts

    facts = snapshot_facts([state])
    assert resume_point(snaps, facts) == 37
    prune_by_history(snaps, SnapshotFacts(best=None, tested={37}, complete={37}))
    assert sorted(p.name for p in snaps.iterdir()) == [
        "model_iter_37.caffemodel",
        "model_iter_37.solverstate",
        "model_iter_74.caffemodel",
        "model_iter_74.solverstate",
    ]


def test_a_stopped_result_ends_at_its_checkpoint_however_far_caffe_ran(digits_data, tmp_path):
    """The median rule stops at epoch 2; caffe, several epochs a second on digits, runs past it
    before it is stopped.  The curve, the reward (the best it reached: issue 24, point 4) and the
    kept snapshot are those of epoch 2, and the run past it is said so and pruned."""
    job = replace(make_job(digits_data, tmp_path, epochs=12), early_stop=MedianRule({2: 0.999}))
    start = time.monotonic()
    result = Trainer(job).train()
    assert time.monotonic() - start < 120
    assert result.status == ModelStatus.STOPPED and result.stopped_epoch == 2
    assert [it for it, _ in result.curve] == [37, 74]
    assert result.predicted_accuracy == max(acc for _, acc in result.curve) == result.best_accuracy
    assert result.resume_iteration == 74
    left = sorted(p.name for p in (job.model_dir / "snapshots").iterdir())
    assert set(left) <= {f"model_iter_{result.best_iteration}.caffemodel", "model_iter_74.caffemodel",
                         "model_iter_74.solverstate"}  # fmt: skip
    again = Trainer(job).train()  # recovered: the same result
    assert again.curve == result.curve and again.predicted_accuracy == result.predicted_accuracy
