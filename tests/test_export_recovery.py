"""Issue 24 (points 3 and 9): export, finetune and ensemble follow the store's ranking at the time
they run, whatever earlier exports left in the folder, and export says which weights it could not
write and why.  One tiny real digits search (4 models, 3 epochs) is built per module; each test
copies it and rewrites rewards and statuses in the store to change the ranking."""

import csv
import json
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Dict, Iterable

import pytest
from commandline import cli, one_line_error
from test_crash import store_models

from metaqnn.export import export_weights

ROOT = Path(__file__).resolve().parent.parent
RANKED = re.compile(r"^\d\d_model\d{5}$")
TRAINED = r"^finetune: (\S+) \(\["  # the line finetune prints when it trains a model: `finetune: 01_model00003 ([C(...`


def short(protocol: str, out: Path, **fields: int) -> Path:
    """A copy of a digits protocol with fewer epochs: the search and the finetune take seconds."""
    text = (ROOT / "solvers" / f"{protocol}.toml").read_text()
    for key, value in fields.items():
        text, n = re.subn(rf"^{key} = \d+", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    path = out / f"{protocol}_short.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, digits_data):
    data, _ = digits_data
    root = tmp_path_factory.mktemp("recovery")
    search = short("search_digits", root, epochs=3, step_epochs=1)
    tune = short("finetune_digits", root, epochs=2, step_epochs=1)
    exp = root / "exp"
    run = cli(
        "search", "--exp", str(exp), "--data-dir", str(data), "--seed", "3",
        "--set", "schedule.steps=[[1.0, 4]]", "--set", "space.max_depth=3",
        "--set", f"protocol.search='{search}'", "--set", f"protocol.finetune='{tune}'",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    models = store_models(exp)
    assert sorted(models) == [1, 2, 3, 4] and all(m.status == "done" for m in models.values())
    return exp


@pytest.fixture
def exp(built, tmp_path):
    copy = tmp_path / "exp"
    shutil.copytree(built, copy)
    return copy


def rank(exp: Path, rewards: Dict[int, float], stopped: Iterable[int] = ()) -> None:
    """Set rewards (and which models were stopped early) in the store: the ranking changes."""
    stopped = set(stopped)
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        for model_id, reward in rewards.items():
            status = "stopped" if model_id in stopped else "done"
            conn.execute("UPDATE models SET reward = ?, status = ? WHERE id = ?", (reward, status, model_id))
            # the samples hold the reward the agent was given: the same, or the store is damaged
            conn.execute(
                "UPDATE samples SET reward = ? WHERE arch = (SELECT arch FROM models WHERE id = ?)", (reward, model_id)
            )


def ranked(out: Path) -> Dict[str, int]:
    """Rank folder name -> the model id its metadata.json names."""
    return {
        p.name: json.loads((p / "metadata.json").read_text())["model_id"]
        for p in sorted(out.iterdir())
        if RANKED.match(p.name)
    }


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def summary_folders(out: Path):
    with open(out / "summary.csv", newline="") as fh:
        return [row["folder"] for row in csv.DictReader(fh)]


def test_export_after_the_ranking_changed_holds_exactly_the_current_top_k(exp):
    out = exp / "export"
    rank(exp, {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.99}, stopped=[4])
    ok(cli("export", "--exp", str(exp), "--top", "3", "--include-predicted"))
    assert ranked(out) == {"01_model00004": 4, "02_model00001": 1, "03_model00002": 2}
    # what export did not write is never touched: a note, and a model folder of another experiment
    (out / "notes.txt").write_text("mine\n")
    foreign = out / "05_model00003"
    foreign.mkdir()
    (foreign / "metadata.json").write_text(json.dumps({"model_id": 3, "arch": "[C(8,1,1), SM(10)]"}))

    ok(cli("export", "--exp", str(exp), "--top", "3"))  # measured only: the stopped model is gone
    assert ranked(out) == {"01_model00001": 1, "02_model00002": 2, "03_model00003": 3, "05_model00003": 3}
    for name in ("01_model00001", "02_model00002", "03_model00003"):
        meta = json.loads((out / name / "metadata.json").read_text())
        assert meta["rank"] == int(name[:2]) and meta["reward_kind"] == "measured"
    assert summary_folders(out) == ["01_model00001", "02_model00002", "03_model00003"]
    assert len([ln for ln in (out / "summary.md").read_text().splitlines() if ln.startswith("| ") and "`" in ln]) == 3

    rank(exp, {3: 0.95, 1: 0.9, 2: 0.5})
    ok(cli("export", "--exp", str(exp), "--top", "2"))
    assert ranked(out) == {"01_model00003": 3, "02_model00001": 1, "05_model00003": 3}
    assert summary_folders(out) == ["01_model00003", "02_model00001"]
    assert (out / "notes.txt").read_text() == "mine\n" and sorted(p.name for p in foreign.iterdir()) == [
        "metadata.json"
    ]

    # a folder of another experiment where this export has to write is refused, not overwritten
    (out / "05_model00003").rename(out / "01_model00003x")
    shutil.rmtree(out / "01_model00003")
    (out / "01_model00003x").rename(out / "01_model00003")
    one_line_error(cli("export", "--exp", str(exp), "--top", "2"), "01_model00003")
    assert json.loads((out / "01_model00003" / "metadata.json").read_text())["arch"] == "[C(8,1,1), SM(10)]"


def test_finetune_after_the_ranking_changed_reuses_each_models_result_under_its_new_rank(exp):
    out = exp / "export"
    rank(exp, {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6})
    first = ok(cli("finetune", "--exp", str(exp), "--top", "2"))
    assert len(re.findall(TRAINED, first.stdout, re.M)) == 2, first.stdout
    before = {ranked(out)[n]: json.loads((out / n / "finetune.json").read_text()) for n in ranked(out)}
    logs = {ranked(out)[n]: (out / n / "finetune.log").read_text() for n in ranked(out)}
    assert all(0.1 < r["search_weights_test_accuracy"] <= 1 for r in before.values())  # the search's own weights

    rank(exp, {2: 0.95})  # model 2 is now first, model 1 second
    again = ok(cli("finetune", "--exp", str(exp), "--top", "2"))
    assert not re.findall(TRAINED, again.stdout, re.M), again.stdout  # nothing trained again
    assert ranked(out) == {"01_model00002": 2, "02_model00001": 1}
    for name, model_id in ranked(out).items():
        result = json.loads((out / name / "finetune.json").read_text())
        assert result["model"] == name and result["model_id"] == model_id
        assert result["test_accuracy"] == before[model_id]["test_accuracy"]
        assert (out / name / "finetune.log").read_text() == logs[model_id]
        assert f"| {name} |" in again.stdout

    # a result is the model's own: one naming another model id (same inputs) is not reused
    done = out / "01_model00002" / "finetune.json"
    done.write_text(json.dumps({**json.loads(done.read_text()), "model_id": 1}))
    third = ok(cli("finetune", "--exp", str(exp), "--top", "2"))
    assert re.findall(TRAINED, third.stdout, re.M) == ["01_model00002"], third.stdout


def test_ensemble_averages_exactly_the_current_top_k_and_never_a_stopped_model_unasked(exp):
    out = exp / "export"
    rank(exp, {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6})
    ok(cli("finetune", "--exp", str(exp), "--top", "3"))
    one_line_error(cli("ensemble", "--exp", str(exp), "--top", "4"), "04_model00004")  # not finetuned: said so

    rank(exp, {4: 0.99}, stopped=[4])  # model 4 was stopped early with a high prediction
    ok(cli("finetune", "--exp", str(exp), "--top", "1", "--include-predicted"))
    ok(cli("ensemble", "--exp", str(exp), "--top", "3"))  # measured only: models 1, 2, 3
    members = [m["model"] for m in json.loads((out / "ensemble.json").read_text())["models"]]
    assert members == ["01_model00001", "02_model00002", "03_model00003"]

    ok(cli("ensemble", "--exp", str(exp), "--top", "2", "--include-predicted"))  # model 4's result was kept aside
    summary = json.loads((out / "ensemble.json").read_text())
    assert [(m["model"], m["model_id"]) for m in summary["models"]] == [("01_model00004", 4), ("02_model00001", 1)]

    # the ranking moved on: an ensemble of folders that are no longer the top k is not left behind
    ok(cli("export", "--exp", str(exp), "--top", "2"))
    assert not (out / "ensemble.json").exists()


def test_export_names_every_model_whose_weights_it_could_not_write(exp):
    out = exp / "export"
    rank(exp, {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6})
    ok(cli("export", "--exp", str(exp), "--top", "4"))
    for name in ranked(out):
        assert (out / name / "weights.caffemodel").stat().st_size > 0 and (out / name / "weights.h5").exists()
        assert json.loads((out / name / "metadata.json").read_text())["weights"] == "weights.caffemodel"

    models = exp / "models"
    snapshot = next((models / "00001" / "snapshots").glob("*.caffemodel"))
    snapshot.unlink()  # model 1: its kept snapshot is gone
    record = json.loads((models / "00002" / "result.json").read_text())  # model 2: another model's files
    (models / "00002" / "result.json").write_text(json.dumps({**record, "architecture": "[C(8,1,1), SM(10)]"}))
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:  # model 3: no best iteration recorded
        metrics = json.loads(conn.execute("SELECT metrics FROM models WHERE id = 3").fetchone()[0])
        del metrics["best_iteration"]
        conn.execute("UPDATE models SET metrics = ? WHERE id = 3", (json.dumps(metrics),))

    run = ok(cli("export", "--exp", str(exp), "--top", "4"))  # the prototxt export itself succeeded
    assert run.stderr == ""
    warnings = [ln for ln in run.stdout.splitlines() if ln.startswith("warning: ")]
    reasons = {
        "01_model00001": f"snapshot file missing: {snapshot.parent}/",
        "02_model00002": "the model folder holds another model's files",
        "03_model00003": "no best iteration recorded",
    }
    assert len(warnings) == 3, run.stdout
    for (name, reason), line in zip(reasons.items(), warnings):
        assert line.startswith(f"warning: {name}: no weights exported: {reason}"), line
        meta = json.loads((out / name / "metadata.json").read_text())
        assert meta["weights"] is None and meta["weights_missing"].startswith(reason)
        assert not (out / name / "weights.caffemodel").exists() and not (out / name / "weights.h5").exists()
    assert json.loads((out / "04_model00004" / "metadata.json").read_text())["weights"] == "weights.caffemodel"
    assert (out / "04_model00004" / "weights.h5").exists()
    with open(out / "summary.csv", newline="") as fh:
        assert [row["weights"] for row in csv.DictReader(fh)] == ["missing", "missing", "missing", "weights.caffemodel"]

    # finetune says the same, and never tests another model's files as this model's search weights
    tuned = ok(cli("finetune", "--exp", str(exp), "--top", "2"))
    assert [ln for ln in tuned.stdout.splitlines() if "no weights exported" in ln] == warnings[:2]
    assert json.loads((out / "02_model00002" / "finetune.json").read_text())["search_weights_test_accuracy"] is None


def test_export_weights_copies_only_from_a_folder_the_check_accepts(built, tmp_path):
    """The check callable is where the model-folder identity is decided (result.json today)."""
    models = store_models(built)
    folder = built / "models" / "00001"
    it = models[1].metrics["best_iteration"]
    refused = export_weights(folder, it, tmp_path, check=lambda _d: "the model folder holds another model's files")
    assert refused.path is None and refused.missing == "the model folder holds another model's files"
    assert list(tmp_path.iterdir()) == []
    copied = export_weights(folder, it, tmp_path, check=lambda _d: None)
    assert copied.missing is None and copied.path == tmp_path / "weights.caffemodel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.caffemodel", "weights.h5"]


def test_finetune_walks_the_sets_it_reads_before_caffe_does(exp, tmp_path):
    """A search start walks only train and val (issue 25); a damaged page of train_full is then a
    one-line error of `finetune`, naming the file, not an assertion inside caffe."""
    from test_startup_checks import _garbage_leaf, mdb

    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        (data,) = conn.execute("SELECT value FROM meta WHERE key = 'data_dir'").fetchone()
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'data_dir'", (str(copy),))
    _garbage_leaf(mdb(copy, "train_full"))
    line = one_line_error(cli("finetune", "--exp", str(exp), "--top", "1"), "train_full.lmdb: corrupt LMDB")
    assert str(copy) in line
    assert not list((exp / "export").glob("*/finetune.log"))  # caffe never started
