"""Issue 5: the exploration protocol with the real CPU caffe on the digits LMDBs."""

import subprocess
from dataclasses import replace

import pytest

from metaqnn.caffe.locate import find_caffe
from metaqnn.netspec import Transform
from metaqnn.solverspec import Restarts, load_protocol
from metaqnn.trainer import Trainer, TrainJob
from qagent.arch import Pool, Softmax, parse_architecture

SMALL = "[C(16,3,1), P(2,2), FC(32), SM(10)]"


def make_job(digits_data, tmp_path, arch=SMALL, **protocol):
    data, manifest = digits_data
    proto = load_protocol("search_digits").with_overrides(**{"epochs": 4, "step_epochs": 2, **protocol})
    layers = parse_architecture(arch) if isinstance(arch, str) else arch
    return TrainJob(
        layers=layers,
        model_dir=tmp_path / "model",
        caffe=find_caffe().binary,
        train_lmdb=data / "train.lmdb",
        val_lmdb=data / "val.lmdb",
        train_size=manifest["sets"]["train"]["count"],
        val_size=manifest["sets"]["val"]["count"],
        image_size=8,
        channels=1,
        num_classes=10,
        protocol=proto,
        transform=Transform(scale=1 / 256),
        timeout=120,
        seed=3,  # Caffe's random_seed: CPU training is then repeatable, and so is this test
    )


def test_normal_run_reward_is_the_best_parsed_accuracy(digits_data, tmp_path):
    result = Trainer(replace(make_job(digits_data, tmp_path), seed=1)).train()  # seeded: not flaky
    assert result.status == "done" and result.restarts == 0 and result.learning_rate == 0.001
    assert [it for it, _ in result.curve] == [37, 74, 111, 148]  # epoch 1 (probe) + epochs 2-4 (continued)
    assert result.best_accuracy == max(acc for _, acc in result.curve) > 0.8
    assert result.last_accuracy == result.curve[-1][1] and result.images_per_sec > 0
    model = tmp_path / "model"
    assert (model / "probe0.log").exists() and (model / "probe0.test").exists()
    left = sorted(p.name for p in (model / "snapshots").iterdir())
    assert left == [f"model_iter_{result.best_iteration}.caffemodel"]  # pruned to the best weights


def test_forced_restart_lowers_the_rate_by_the_factor(digits_data, tmp_path):
    job = make_job(digits_data, tmp_path, base_lr=5.0, restarts=Restarts(max_restarts=5, lr_factor=0.1))
    result = Trainer(job).train()
    assert result.status == "done" and result.restarts >= 1
    assert result.learning_rate == pytest.approx(5.0 * 0.1**result.restarts)
    logs = sorted(p.name for p in (tmp_path / "model").glob("probe*.log"))
    assert logs == [f"probe{k}.log" for k in range(result.restarts + 1)]


def test_never_learning_is_a_failure_after_the_last_restart(digits_data, tmp_path):
    job = make_job(digits_data, tmp_path, base_lr=50.0, restarts=Restarts(max_restarts=1, lr_factor=0.9))
    result = Trainer(job).train()
    assert result.status == "failed" and result.failure in ("no_learning", "diverged") and result.restarts == 1


def test_a_probe_failure_leaves_no_snapshot_behind(digits_data, tmp_path):
    """Issue 25: a model that fails in the probe has no best iteration; it keeps no weights either."""
    job = make_job(digits_data, tmp_path, restarts=Restarts(max_restarts=1, pass_threshold=0.999))
    result = Trainer(job).train()
    model = tmp_path / "model"
    assert result.status == "failed" and result.failure == "no_learning" and result.best_iteration is None
    assert (
        "Snapshotting solver state to binary proto file snapshots/model_iter_37" in (model / "probe1.log").read_text()
    )
    assert list((model / "snapshots").iterdir()) == [] and not list(model.rglob("*.solverstate"))
    (model / "snapshots" / "model_iter_37.caffemodel").write_bytes(b"left by a kill before the pruning")
    assert Trainer(job).train().status == "failed"  # recovered from result.json, and pruned again
    assert list((model / "snapshots").iterdir()) == []


def test_divergence_stops_caffe(digits_data, tmp_path):
    job = make_job(
        digits_data, tmp_path, type="SGD", base_lr=1000.0, momentum2=None, delta=None, restarts=Restarts(max_restarts=0)
    )
    result = Trainer(job).train()
    assert result.status == "failed" and result.failure == "diverged"
    assert "# stopped: NaN/inf loss" in (tmp_path / "model" / "probe0.log").read_text()


def test_a_net_caffe_rejects_is_a_result(digits_data, tmp_path):
    result = Trainer(make_job(digits_data, tmp_path, arch=(Pool(9, 1), Softmax(10)))).train()
    assert result.status == "failed" and result.failure == "rejected"
    assert "Check failed" in result.message


def test_timeout_is_retried_once_then_failed(digits_data, tmp_path):
    job = replace(make_job(digits_data, tmp_path, arch="[C(32,5,1), C(32,5,1), C(32,5,1), SM(10)]"), timeout=0.3)
    result = Trainer(job).train()
    assert result.status == "failed" and result.failure == "timeout"
    assert sorted(p.name for p in (tmp_path / "model").glob("probe0*.log")) == ["probe0.log", "probe0_retry1.log"]


def test_missing_data_stops_the_search(digits_data, tmp_path):
    from metaqnn.trainer import DataMissingError

    job = replace(make_job(digits_data, tmp_path), train_lmdb=tmp_path / "nowhere.lmdb")
    with pytest.raises(DataMissingError, match=r"nowhere\.lmdb: missing"):
        Trainer(job).train()
    # truncated while the search runs: found from its meta pages before caffe maps it (no SIGBUS)
    data, _ = digits_data
    cut = tmp_path / "cut.lmdb"
    cut.mkdir()
    blob = (data / "val.lmdb" / "data.mdb").read_bytes()
    (cut / "data.mdb").write_bytes(blob[: len(blob) // 2])
    job = replace(make_job(digits_data, tmp_path / "b"), val_lmdb=cut)
    with pytest.raises(DataMissingError, match=r"cut\.lmdb"):
        Trainer(job).train()


def test_ctrl_c_stops_caffe_and_a_new_trainer_resumes_from_the_snapshot(digits_data, tmp_path):
    job = make_job(digits_data, tmp_path, epochs=6, step_epochs=2)

    def interrupt(msg):
        if msg.startswith("epoch 3 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(job, progress=interrupt).train()
    model = tmp_path / "model"
    running = subprocess.run(["pgrep", "-f", str(model)], capture_output=True, text=True)
    assert running.stdout.strip() == ""  # no orphan caffe
    assert any(p.suffix == ".solverstate" for p in (model / "snapshots").iterdir())
    result = Trainer(job).train()
    assert result.status == "done"
    resumed = [p for p in model.glob("train*.log") if "Resuming from" in p.read_text()]
    assert len(resumed) == 2  # the interrupted run (from epoch 1) and the resumed one (from a later snapshot)
    second = max(resumed, key=lambda p: p.stat().st_mtime).read_text()
    assert "model_iter_37.solverstate" not in second.split("Resuming from", 1)[1].splitlines()[0]
    assert [it for it, _ in result.curve] == [37, 74, 111, 148, 185, 222]
    assert result.best_accuracy == max(a for _, a in result.curve)


def test_out_of_memory_is_the_models_failure_through_the_trainers_own_branch(digits_data, tmp_path):
    """The trainer's oom branch, end to end: a stand-in for GPU caffe that runs out of memory the way
    Caffe reports it (glog FATAL from syncedmem.cpp, then abort) -- no GPU on this machine."""
    script = tmp_path / "caffe"
    script.write_text(
        "#!/bin/sh\n"
        'echo "I1127 19:49:27.811812  8753 solver.cpp:239] Iteration 0, loss = 2.29041" >&2\n'
        'echo "F1127 19:49:27.818892  8753 syncedmem.cpp:56] Check failed: error == cudaSuccess (2 vs. 0)'
        '  out of memory" >&2\n'
        'echo "*** Check failure stack trace: ***" >&2\n'
        "kill -ABRT $$\n"
    )
    script.chmod(0o755)
    job = replace(make_job(digits_data, tmp_path), caffe=script, gpu=0)
    result = Trainer(job).train()
    assert result.status == "oom" and result.failure == "oom", result
    assert "out of memory" in result.message
