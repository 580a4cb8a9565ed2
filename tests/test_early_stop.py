"""Issue 17 with the real caffe: a rule stops a training at a checkpoint, the model keeps what it
needs to be finished later, and the distinction between predicted and measured survives the
store, status, report, export and finish.  (The rules themselves: test_early_stop_core.py.)"""

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from commandline import cli, one_line_error
from test_crash import store_models
from test_trainer import make_job

from metaqnn.early_stop import MedianRule
from metaqnn.trainer import Trainer
from qagent.status import ModelStatus

ROOT = Path(__file__).resolve().parent.parent
ARCH = "[C(16,3,1), C(16,3,1), SM(10)]"


def always_stop_at(epoch: int) -> MedianRule:
    """A rule whose answer is known: every model is below a median no accuracy reaches."""
    return MedianRule({epoch: 1.01})


def snapshots(model: Path):
    return sorted(p.name for p in (model / "snapshots").iterdir())


def test_a_model_stopped_after_the_probe_finishes_exactly_like_an_unstopped_training(digits_data, tmp_path):
    """Checkpoint 1 is the probe's epoch: no full run starts; finishing it continues from the
    same epoch-1 snapshot the protocol continues from, so the measured result is the same."""
    job = replace(make_job(digits_data, tmp_path / "stopped", ARCH), seed=4, early_stop=always_stop_at(1))
    stopped = Trainer(job).train()
    model = job.model_dir
    assert stopped.status == ModelStatus.STOPPED and stopped.stopped_epoch == 1 and stopped.stop_rule == "median"
    assert stopped.predicted_accuracy == stopped.curve[0][1] and [it for it, _ in stopped.curve] == [37]
    assert not list(model.glob("train*.log"))  # the full training never started
    assert snapshots(model) == ["model_iter_37.caffemodel", "model_iter_37.solverstate"]
    assert json.loads((model / "result.json").read_text())["status"] == "stopped"

    finished = Trainer(replace(job, early_stop=None)).finish()
    reference = Trainer(replace(job, model_dir=tmp_path / "unstopped" / "model", early_stop=None)).train()
    assert finished.status == reference.status == ModelStatus.DONE
    assert finished.curve == reference.curve and finished.best_accuracy == reference.best_accuracy
    assert json.loads((model / "result-stopped.json").read_text())["predicted_accuracy"] == stopped.predicted_accuracy
    assert snapshots(model) == [f"model_iter_{finished.best_iteration}.caffemodel"]


def test_a_rule_stops_caffe_mid_training_and_the_model_can_be_finished(digits_data, tmp_path):
    """Stopped at the test line of epoch 2 of 8: caffe is stopped (no 'Optimization Done'), the
    snapshot to continue from is kept, a rerun recovers the stopped result without training, and
    finishing trains to epoch 8."""
    job = replace(make_job(digits_data, tmp_path, ARCH, epochs=8), seed=2, early_stop=always_stop_at(2))
    stopped = Trainer(job).train()
    model = job.model_dir
    assert stopped.status == ModelStatus.STOPPED and stopped.stopped_epoch == 2, stopped.message
    assert "Optimization Done" not in (model / "train1.log").read_text()
    assert "# stopped: early-stopping rule" in (model / "train1.log").read_text()
    # caffe may run ahead of the reader, but what it measured past the checkpoint is not the result:
    # the curve, the reward and the kept snapshot are those of epoch 2, however far it ran
    assert [it for it, _ in stopped.curve] == [37, 74]
    assert stopped.resume_iteration == 74
    assert stopped.predicted_accuracy >= max(acc for _, acc in stopped.curve)
    kept = snapshots(model)
    assert f"model_iter_{stopped.resume_iteration}.solverstate" in kept
    assert f"model_iter_{stopped.best_iteration}.caffemodel" in kept

    logs = {p.name: p.read_text() for p in model.glob("*.log")}
    again = Trainer(job).train()  # a search resumed after a kill: recovered, not trained again
    assert again.status == ModelStatus.STOPPED and again.predicted_accuracy == stopped.predicted_accuracy
    assert {p.name: p.read_text() for p in model.glob("*.log")} == logs

    finished = Trainer(replace(job, early_stop=None)).finish()
    assert finished.status == ModelStatus.DONE and finished.curve[-1][0] == 8 * 37
    assert finished.best_accuracy == max(acc for _, acc in finished.curve) > 0.8


def short_protocol(tmp_path: Path) -> Path:
    """The digits protocol at 6 epochs (x0.2 every 2): a search test that finishes in minutes."""
    text = (ROOT / "solvers" / "search_digits.toml").read_text()
    text = text.replace("epochs = 20", "epochs = 6").replace("step_epochs = 5", "step_epochs = 2")
    path = tmp_path / "search_short.toml"
    path.write_text(text)
    return path


def search_args(exp: Path, data: Path, protocol: Path, rule: str = "svr"):
    return [
        "search", "--exp", str(exp), "--data-dir", str(data), "--seed", "7",
        "--set", "schedule.steps=[[1.0, 14]]", "--set", "space.max_depth=4",
        "--set", f"protocol.search='{protocol}'",
        "--set", f"early_stop.rule='{rule}'", "--set", "early_stop.warmup=5",
        "--set", "early_stop.delta=0.6", "--set", "early_stop.checkpoints=[1, 2]",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_search_with_early_stopping_keeps_predictions_apart_and_survives_kill_9(digits_data, tmp_path):
    data, _ = digits_data
    protocol = short_protocol(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = cli(*search_args(whole, data, protocol))
    assert run.returncode == 0, run.stdout + run.stderr
    models = store_models(whole)
    stopped = [m for m in models.values() if m.status == "stopped"]
    measured = [m for m in models.values() if m.status == "done"]
    assert stopped and len(measured) >= 5, {m.id: m.status for m in models.values()}
    for m in stopped:  # reward = the prediction, never lower than what the model had reached
        assert m.reward == m.metrics["predicted_accuracy"] >= m.metrics["best_accuracy"]
        assert m.metrics["stop_rule"] == "svr" and m.metrics["stopped_epoch"] in (1, 2)
    assert "early stopping (svr): predictor fitted on 5 fully trained models" in run.stdout

    # kill -9 at the 9th commit (the rule active), resume: the same models, statuses and rewards
    args = search_args(killed, data, protocol)
    dead = cli(*args, env={"METAQNN_KILL_AT": "commit:9"})
    assert dead.returncode == -signal.SIGKILL, dead.stdout + dead.stderr
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    again = store_models(killed)
    assert {(m.arch, m.status, m.reward) for m in again.values()} == {
        (m.arch, m.status, m.reward) for m in models.values()
    }

    # status, report and export say "predicted", and measured rankings leave stopped models out
    status = cli("status", "--exp", str(whole))
    assert status.returncode == 0 and "PREDICTED accuracy, not measured" in status.stdout
    report = cli("report", "--exp", str(whole))
    assert report.returncode == 0, report.stderr
    assert "## Early stopping (predicted, not measured)" in (whole / "report" / "report.md").read_text()
    top = len(models)
    assert cli("export", "--exp", str(whole), "--top", str(top), "--out", str(tmp_path / "m")).returncode == 0
    exported = [json.loads(p.read_text()) for p in (tmp_path / "m").glob("*/metadata.json")]
    assert {e["model_id"] for e in exported} == {m.id for m in measured}
    assert all(e["reward_kind"] == "measured" for e in exported)
    out = tmp_path / "all"
    assert (
        cli("export", "--exp", str(whole), "--top", str(top), "--include-predicted", "--out", str(out)).returncode == 0
    )
    predicted = {
        e["model_id"]: e for e in map(lambda p: json.loads(p.read_text()), out.glob("*/metadata.json"))
        if e["reward_kind"] == "predicted"
    }  # fmt: skip
    assert set(predicted) == {m.id for m in stopped}
    assert all(e["validation_accuracy"] is None and e["predicted_accuracy"] for e in predicted.values())
    assert "| predicted |" in (out / "summary.md").read_text()

    # finish the highest prediction: now measured, the prediction kept beside it, and exported as measured
    best_guess = max(stopped, key=lambda m: (m.reward, -m.id))
    # killed -9 once after caffe finished, before the result is written: the rerun completes the same model
    killed = cli("finish", "--exp", str(whole), "--top", "1", env={"METAQNN_KILL_AT": "trained"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    fin = cli("finish", "--exp", str(whole), "--top", "1")
    assert fin.returncode == 0, fin.stdout + fin.stderr
    m = store_models(whole)[best_guess.id]
    assert m.status == "done" and m.reward == m.metrics["best_accuracy"] == max(a for _, a in m.metrics["curve"])
    assert m.metrics["stopped_early"]["predicted_accuracy"] == best_guess.reward
    assert len(m.metrics["curve"]) == 6
    assert cli("export", "--exp", str(whole), "--top", str(top), "--out", str(tmp_path / "m2")).returncode == 0
    meta = [json.loads(p.read_text()) for p in (tmp_path / "m2").glob("*/metadata.json")]
    assert [e["stopped_early"]["predicted_accuracy"] for e in meta if e["model_id"] == best_guess.id] == [
        best_guess.reward
    ]
    one_line_error(cli("finish", "--exp", str(whole), "--model", str(measured[0].id)), "is not a model stopped early")
    # the selection is the same however often it is run: --top 1 again trains nothing more,
    # --top 2 trains exactly the second-highest prediction (issue 24)
    logs = sorted(p.name for p in (whole / "models").glob("*/*.log"))
    again = cli("finish", "--exp", str(whole), "--top", "1")
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    assert sorted(p.name for p in (whole / "models").glob("*/*.log")) == logs
    if len(stopped) >= 2:
        second = sorted(stopped, key=lambda m: (-m.reward, m.id))[1]
        two = cli("finish", "--exp", str(whole), "--top", "2")
        assert two.returncode == 0, two.stdout + two.stderr
        after = store_models(whole)
        assert after[second.id].status == "done"
        assert [m.id for m in after.values() if m.metrics.get("stopped_early")] == sorted([best_guess.id, second.id])
    # a stopped model whose kept snapshot is gone: one error line naming it, exit status 2, it stays stopped
    left = [m for m in store_models(whole).values() if m.status == "stopped"]
    if left:
        for p in (whole / "models" / f"{left[0].id:05d}" / "snapshots").glob("*.solverstate"):
            p.unlink()
        line = one_line_error(cli("finish", "--exp", str(whole), "--model", str(left[0].id)), "kept snapshot")
        assert f"#{left[0].id} cannot be finished" in line and ".solverstate is missing" in line
        assert store_models(whole)[left[0].id].status == "stopped"


def test_early_stopping_in_the_local_pool(digits_data, tmp_path):
    """Two trainings at once: each job carries the rule built when it was launched."""
    data, _ = digits_data
    exp = tmp_path / "pool"
    args = search_args(exp, data, short_protocol(tmp_path), rule="median")
    args[args.index("schedule.steps=[[1.0, 14]]")] = "schedule.steps=[[1.0, 10]]"
    args[args.index("early_stop.warmup=5")] = "early_stop.warmup=3"
    args[args.index("--seed") + 1] = "5"  # a seed whose first models learn (seed 7 draws mostly GAP nets here)
    run = cli(*args, "--workers", "2", "--set", "early_stop.cv_folds=3")
    assert run.returncode == 0, run.stdout + run.stderr
    models = store_models(exp)
    assert len(models) == 10 and {m.status for m in models.values()} <= {"done", "failed", "stopped"}
    stopped = [m for m in models.values() if m.status == "stopped"]
    assert stopped and all(m.metrics["stop_rule"] == "median" for m in stopped)
    for m in stopped:  # the median rule's reward is what the model reached by the checkpoint
        curve = [acc for _, acc in m.metrics["curve"]][: m.metrics["stopped_epoch"]]
        assert m.reward == max(curve) < m.metrics["stop_target"]
