"""Issue 25: what a search keeps of its models' weights ([snapshots]), and what status says it costs.

The decision is pure (plan_drops); the search applies it after every commit and at every start,
so a policy changed on resume takes effect at once; a deleted file is recorded, and finish and
export say why it is missing."""

import json
import math

import pytest
from commandline import cli, one_line_error
from test_crash import store_models
from test_early_stop import search_args, short_protocol

from metaqnn.config import build_config
from metaqnn.snapshot_policy import (
    DROPPED,
    GB,
    POLICY_FILE,
    ModelSnapshots,
    SnapFile,
    SnapshotPolicy,
    UnreadablePolicy,
    dropped_record,
    kth_best,
    plan_drops,
    read_policy,
    role_of,
    why_dropped,
    write_policy,
)
from qagent.errors import ConfigError
from qagent.status import ModelStatus

W = 1000  # bytes of one model's weights; a solver state holds two copies (Adam)


def done(model_id: int, acc: float, it: int = 10) -> ModelSnapshots:
    return ModelSnapshots(model_id, ModelStatus.DONE, acc, (SnapFile(f"snapshots/m_iter_{it}.caffemodel", W, "best"),))


def stopped(model_id: int, predicted: float, best: int = 10, resume: int = 20) -> ModelSnapshots:
    files = [SnapFile(f"snapshots/m_iter_{best}.caffemodel", W, "best")]
    if resume != best:
        files.append(SnapFile(f"snapshots/m_iter_{resume}.caffemodel", W, "finish"))
    files.append(SnapFile(f"snapshots/m_iter_{resume}.solverstate", 2 * W, "finish"))
    return ModelSnapshots(model_id, ModelStatus.STOPPED, predicted, tuple(files))


MODELS = [done(1, 0.90), done(2, 0.80), stopped(3, 0.85), stopped(4, 0.70), stopped(5, 0.60, resume=10)]


def dropped(drops):
    return sorted((d.model_id, d.name) for d in drops)


def test_the_default_policy_keeps_everything():
    assert plan_drops(MODELS, SnapshotPolicy()) == []
    assert not SnapshotPolicy().deletes_anything


def test_keep_stopped_none_drops_every_finish_snapshot_but_never_best_weights():
    drops = plan_drops(MODELS, SnapshotPolicy(keep_stopped="none"))
    assert dropped(drops) == [
        (3, "snapshots/m_iter_20.caffemodel"),
        (3, "snapshots/m_iter_20.solverstate"),
        (4, "snapshots/m_iter_20.caffemodel"),
        (4, "snapshots/m_iter_20.solverstate"),
        (5, "snapshots/m_iter_10.solverstate"),  # its resume point is its best: the weights stay
    ]


def test_within_reach_keeps_only_predictions_that_could_reach_the_kth_best():
    assert kth_best(MODELS, 2) == 0.85  # 0.90, 0.85 (predicted), 0.80, ...
    drops = plan_drops(MODELS, SnapshotPolicy(keep_stopped="within_reach", top_k=2, reach=0.02))
    assert {d.model_id for d in drops} == {4, 5}  # 0.70 and 0.60 + 0.02 < 0.85; 0.85 stays
    assert all("< the top-2 accuracy 0.8500" in d.reason for d in drops)
    wide = plan_drops(MODELS, SnapshotPolicy(keep_stopped="within_reach", top_k=2, reach=0.2))
    assert {d.model_id for d in wide} == {5}
    few = plan_drops([*MODELS[:2], stopped(3, 0.1)], SnapshotPolicy(keep_stopped="within_reach", top_k=5))
    assert few == [] and kth_best(MODELS[:2], 5) == -math.inf  # fewer than k: everything within reach


def test_without_solver_states_a_stopped_model_keeps_its_weights():
    drops = plan_drops(MODELS, SnapshotPolicy(keep_solverstate=False))
    assert dropped(drops) == [(m, f"snapshots/m_iter_{it}.solverstate") for m, it in ((3, 20), (4, 20), (5, 10))]


def test_a_budget_drops_finish_snapshots_lowest_prediction_first_then_weights_outside_the_top_k():
    total = sum(m.size for m in MODELS)  # 2 done x W + 3 stopped (4W, 4W, 3W) = 13W
    assert total == 13 * W
    budget = SnapshotPolicy(budget_gb=10 * W / GB, top_k=2)
    drops = plan_drops(MODELS, budget)
    order = [(d.model_id, d.name) for d in drops]
    assert order == [(5, "snapshots/m_iter_10.solverstate"), (4, "snapshots/m_iter_20.solverstate")]
    assert total - sum(d.size for d in drops) <= 10 * W  # the solver state of the lowest first
    tight = plan_drops(MODELS, SnapshotPolicy(budget_gb=2 * W / GB, top_k=2))
    left = {(m.model_id, f.name) for m in MODELS for f in m.files} - {(d.model_id, d.name) for d in tight}
    assert left == {(1, "snapshots/m_iter_10.caffemodel"), (3, "snapshots/m_iter_10.caffemodel")}  # the top 2
    impossible = plan_drops(MODELS, SnapshotPolicy(budget_gb=1 / GB, top_k=2))
    assert dropped(impossible) == dropped(tight)  # the top k's weights are never deleted
    assert plan_drops(MODELS, SnapshotPolicy(budget_gb=13 * W / GB)) == []


def test_roles_follow_the_best_and_resume_iterations():
    assert role_of("model_iter_74.caffemodel", 74, 111) == "best"
    assert role_of("model_iter_111.caffemodel", 74, 111) == "finish"
    assert role_of("model_iter_74.solverstate", 74, 74) == "finish"
    assert role_of("model_iter_37.caffemodel", 74, None) == "other"


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("snapshots.keep_stopped='some'", "snapshots.keep_stopped must be one of all, within_reach, none"),
        ("snapshots.top_k=0", "snapshots.top_k must be >= 1"),
        ("snapshots.reach=-0.1", "snapshots.reach must be in [0, 1]"),
        ("snapshots.budget_gb=0", "snapshots.budget_gb = 0 is ambiguous"),
        ("snapshots.budget_gb=-3", 'snapshots.budget_gb must be a positive number or "unlimited"'),
        ("snapshots.keep_solverstate=1", "snapshots.keep_solverstate"),
    ],
)
def test_bad_policy_values_are_refused(item, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        build_config("digits", [item])


def test_the_policy_is_not_part_of_what_the_store_compares_on_resume():
    a = build_config("digits").to_dict()
    b = build_config("digits", ["snapshots.budget_gb=12.5", "snapshots.keep_stopped='none'"]).to_dict()
    assert a == b and "snapshots" not in a
    assert build_config("digits", ["snapshots.budget_gb='unlimited'"]).snapshots.budget_gb is None


def test_a_search_under_early_stopping_applies_the_policy_when_resumed_with_a_new_one(digits_data, tmp_path):
    data, _ = digits_data
    protocol = short_protocol(tmp_path)
    exp = tmp_path / "exp"
    args = search_args(exp, data, protocol)
    run = cli(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    models = store_models(exp)
    stops = [m for m in models.values() if m.status == "stopped"]
    assert stops, {m.id: m.status for m in models.values()}
    for m in stops:  # the default keeps what finish needs
        names = {p.suffix for p in (exp / "models" / f"{m.id:05d}" / "snapshots").iterdir()}
        assert names == {".caffemodel", ".solverstate"}
    status = cli("status", "--exp", str(exp))
    assert status.returncode == 0 and f"finish snapshots of {len(stops)} stopped models" in status.stdout

    # resumed (the schedule is complete) with a policy that keeps only what reaches the best
    rerun = cli(*args, "--set", "snapshots.keep_stopped='within_reach'", "--set", "snapshots.top_k=1")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    best = max(m.reward for m in models.values() if m.status in ("done", "stopped"))
    doomed = [m for m in stops if m.reward + 0.02 < best]
    kept = [m for m in stops if m not in doomed]
    assert doomed, [m.reward for m in stops]
    assert "snapshots: the policy (keep_stopped within_reach" in rerun.stdout
    for m in doomed:
        folder = exp / "models" / f"{m.id:05d}"
        left = sorted(p.name for p in (folder / "snapshots").iterdir())
        assert left == [f"model_iter_{m.metrics['best_iteration']}.caffemodel"]  # its best weights stay
        record = json.loads((folder / DROPPED).read_text())["dropped"]
        assert record and all("reach 0.02 < the top-1 accuracy" in d["reason"] for d in record)
    for m in kept:
        assert len(list((exp / "models" / f"{m.id:05d}" / "snapshots").glob("*.solverstate"))) == 1
    fin = cli("finish", "--exp", str(exp), "--model", str(doomed[0].id))
    one_line_error(fin, "was deleted by the snapshot policy")
    status = cli("status", "--exp", str(exp))
    assert "deleted by the snapshot policy" in status.stdout and "keep_stopped within_reach" in status.stdout

    # a budget no experiment fits: only the best model's weights are left
    tiny = cli(*args, "--set", "snapshots.budget_gb=1e-9", "--set", "snapshots.top_k=1")
    assert tiny.returncode == 0, tiny.stdout + tiny.stderr
    left = sorted(p.relative_to(exp).as_posix() for p in (exp / "models").glob("*/snapshots/*"))
    top = max((m for m in models.values() if m.status in ("done", "stopped")), key=lambda m: (m.reward, -m.id))
    assert left == [f"models/{top.id:05d}/snapshots/model_iter_{top.metrics['best_iteration']}.caffemodel"]
    assert "OVER the budget" in cli("status", "--exp", str(exp)).stdout
    again = store_models(exp)
    assert {(m.arch, m.status, m.reward) for m in again.values()} == {
        (m.arch, m.status, m.reward) for m in models.values()
    }  # deleting files changed no result


@pytest.mark.parametrize(
    "text",
    ['{"dropped": null}', '{"dropped": 5}', "[1, 2]", '{"dropped": [{"bytes": 1}]}', "{bad"],
)
def test_a_damaged_record_of_deletions_explains_nothing_and_breaks_nothing(tmp_path, text):
    (tmp_path / DROPPED).write_text(text)
    assert dropped_record(tmp_path) == [] and why_dropped(tmp_path, "snapshots/*") is None


def test_a_record_entry_of_the_wrong_types_is_read_safely(tmp_path):
    (tmp_path / DROPPED).write_text('{"dropped": [{"name": "snapshots/a.caffemodel", "bytes": "x"}]}')
    assert dropped_record(tmp_path) == [{"name": "snapshots/a.caffemodel", "bytes": 0, "reason": "?"}]


def test_a_damaged_policy_file_is_said_not_replaced_by_the_defaults(tmp_path):
    assert read_policy(tmp_path) is None  # never written: no search of this version ran
    write_policy(tmp_path, SnapshotPolicy(budget_gb=2.5))
    assert read_policy(tmp_path) == SnapshotPolicy(budget_gb=2.5)
    for text in ("{bad", '{"budget_gb": null}', "[]"):
        (tmp_path / POLICY_FILE).write_text(text)
        with pytest.raises(UnreadablePolicy, match=r"snapshot-policy\.json is unreadable"):
            read_policy(tmp_path)
