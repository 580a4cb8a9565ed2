"""Issue 23: watching a search in TensorBoard.

The event files under ``<exp>/tensorboard/`` are read back with TensorBoard's own code
(scripts/tensorboard-read.py in the viewer's virtualenv, which `make tensorboard-viewer` installs on
first use): every model's curve is its CSV curve point for point, the search run's rolling mean is
the report's Figure 3, one HParams session per model with its status; a kill -9 (and a torn last
record) then a resume leaves no duplicate step; `metaqnn tensorboard` writes the same files for an
experiment made without tensorboardX, and writes nothing the second time; a Ray search's models
land in the head's folder.
"""

import csv
import json
import os
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest
from commandline import cli, one_line_error

from metaqnn import monitor
from metaqnn.config import build_config
from metaqnn.experiment import experiment_config
from metaqnn.monitor_events import RunWriter, Scalar, read_events, read_run, records, scalar_events
from metaqnn.report import _samples, figure3_window
from qagent.status import ModelStatus
from qagent.store import ExperimentStore

ROOT = Path(__file__).resolve().parent.parent
TB_PYTHON = ROOT / ".deps" / "tensorboard-venv" / "bin" / "python"
TINY = ["--set", "schedule.steps=[[1.0, 5], [0.5, 4]]", "--set", "space.max_depth=3", "--seed", "4"]
FAST = ["--set", "tensorboard.flush_seconds=1"]
# the median stopping rule from the fourth model on: some models are stopped (their reward is what they reached)
MEDIAN = [
    arg
    for kv in (
        "early_stop.rule='median'",
        "early_stop.warmup=3",
        "early_stop.cv_folds=3",
        "early_stop.checkpoints=[2, 3]",
    )
    for arg in ("--set", kv)
]
SESSION_STATUS = {"done": "STATUS_SUCCESS", "stopped": "STATUS_UNKNOWN", "failed": "STATUS_FAILURE"}


def f32(x: float):
    """What TensorBoard keeps of a value: its scalars are float32 (NaN as a word, so that it compares)."""
    v = float(struct.unpack("f", struct.pack("f", float(x)))[0])
    return "nan" if v != v else v


def points(series):
    return [[step, f32(v)] for step, v in series]


@pytest.fixture(scope="session")
def tensorboard_read():
    """Read an experiment's event files with TensorBoard itself (its viewer's virtualenv, installed on demand)."""
    if not (TB_PYTHON.parent / "tensorboard").exists() or not (TB_PYTHON.parent.parent / ".installed").exists():
        done = subprocess.run(["make", "-s", "tensorboard-viewer"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    def read(exp: Path) -> dict:
        out = subprocess.run(
            [str(TB_PYTHON), str(ROOT / "scripts" / "tensorboard-read.py"), str(exp / "tensorboard")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    return read


def search(exp: Path, data: Path, *extra: str, env=None):
    result = cli("search", "--exp", str(exp), "--data-dir", str(data), *TINY, *extra, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def csv_curve(path: Path, column_of):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        column = column_of(reader.fieldnames)
        return [[int(float(r["NumIters"])), f32(float(r[column]))] for r in reader if r.get(column) not in (None, "")]


def check_against_the_experiment(exp: Path, tb: dict) -> None:
    """Every model's curves equal its CSVs, the search run's rolling mean equals Figure 3, one session per model."""
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        models = store.models()
        samples = _samples(store)
        total = experiment_config(store).schedule.total
    scalars = tb["scalars"]
    for m in models:
        folder = exp / "models" / f"{m.id:05d}"
        run = scalars[f"models/{m.id:05d}"]
        assert points(run["val/accuracy"]) == csv_curve(folder / "history.test", lambda _names: "Accuracy1"), m.id
        loss = csv_curve(folder / "history.train", lambda names: next(n for n in names if "loss" in n.lower()))
        assert points(run["train/loss"]) == loss, m.id
    report = cli("report", "--exp", str(exp), "--out", str(exp / "report-check"))
    assert report.returncode == 0, report.stdout + report.stderr
    with open(exp / "report-check" / "fig3_rolling_accuracy.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][3] == f"rolling_mean_{figure3_window(total)}"
    figure3 = [[int(r[0]), f32(float(r[3]))] for r in rows[1:]]  # the report's own Figure 3 values
    assert scalars["search"]["search/rolling_mean_accuracy"] == figure3
    assert scalars["search"]["search/accuracy"] == [[it, f32(r)] for it, _e, r in samples]
    sessions = {s["group"]: s for s in tb["sessions"]}
    finished = [m for m in models if m.status in monitor.FINAL]
    assert sorted(sessions) == sorted(f"models/{m.id:05d}" for m in finished)  # one session per model
    for m in finished:
        s = sessions[f"models/{m.id:05d}"]
        assert s["sessions"] == [f"models/{m.id:05d}"]
        assert s["status"] == [SESSION_STATUS[m.status.value]]
        assert s["hparams"]["architecture"] == m.arch and s["hparams"]["status"] == m.status.value
        assert s["metrics"]["hparams/best_accuracy"] == f32(m.metrics["best_accuracy"])
        if m.status == ModelStatus.STOPPED:
            assert s["metrics"]["hparams/predicted_accuracy"] == f32(m.metrics["predicted_accuracy"])
        else:
            assert "hparams/predicted_accuracy" not in s["metrics"]
    assert "architecture" in tb["experiment"]["hparams"] and "learning_rate" in tb["experiment"]["hparams"]
    assert tb["experiment"]["metrics"] == ["hparams/best_accuracy", "hparams/predicted_accuracy"]
    no_duplicate_steps(tb)


def no_duplicate_steps(tb: dict) -> None:
    """Every point of every run was written once: file by file, as TensorBoard's loader reads them."""
    for run, tags in tb["raw"].items():
        for tag, points in tags.items():
            steps = [s for s, _ in points]
            assert len(steps) == len(set(steps)), (run, tag, steps)


def test_a_digits_search_is_watched_live_and_an_older_one_written_the_same(tmp_path, digits_data, tensorboard_read):
    """The same seeded search twice: with tensorboardX (live), and without it (as before this change:
    it says once how to turn it on and writes nothing); `metaqnn tensorboard` then writes the second's
    event files, which TensorBoard reads as the first's; a second call writes nothing."""
    data, _ = digits_data
    live, old = tmp_path / "live", tmp_path / "old"
    out = search(live, data, *FAST)
    assert out.stdout.count("tensorboard: event files in") == 1
    tb = tensorboard_read(live)
    check_against_the_experiment(live, tb)

    hide = tmp_path / "no-tensorboardX" / "tensorboardX"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out = search(old, data, env={"PYTHONPATH": f"{hide.parent}{os.pathsep}{ROOT}"})
    assert out.stdout.count("tensorboardX is not installed") == 1 and ".[tensorboard]" in out.stdout
    assert not (old / "tensorboard").exists()
    with sqlite3.connect(str(live / "store.sqlite")) as a, sqlite3.connect(str(old / "store.sqlite")) as b:
        q = "SELECT iteration, arch, reward FROM samples ORDER BY iteration"
        assert a.execute(q).fetchall() == b.execute(q).fetchall()  # the same search
    first = cli("tensorboard", "--exp", str(old))
    assert first.returncode == 0 and " 0 new points" not in first.stdout, first.stdout + first.stderr
    again = cli("tensorboard", "--exp", str(old))
    assert again.returncode == 0 and " 0 new points" in again.stdout, again.stdout + again.stderr
    written = tensorboard_read(old)
    check_against_the_experiment(old, written)
    assert written["scalars"] == tb["scalars"]
    assert [(s["group"], s["status"], s["hparams"], s["metrics"]) for s in written["sessions"]] == [
        (s["group"], s["status"], s["hparams"], s["metrics"]) for s in tb["sessions"]
    ]


def test_kill_9_a_torn_record_and_a_resume_leave_no_duplicate_step(tmp_path, digits_data, tensorboard_read):
    """kill -9 as the third model's caffe finishes (its live points written, its session not), the
    last record of two event files torn as a kill mid-write leaves it; the resumed search continues
    the same runs: TensorBoard reads them, no step twice, curves and sessions as for any search."""
    data, _ = digits_data
    exp = tmp_path / "exp"
    killed = cli(
        "search",
        "--exp",
        str(exp),
        "--data-dir",
        str(data),
        *TINY,
        *FAST,
        *MEDIAN,
        env={"METAQNN_KILL_AT": "trained:3"},
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    before = {p.relative_to(exp): p.stat().st_size for p in (exp / "tensorboard").rglob("events.out.tfevents.*")}
    search_file = max(p for p in before if p.parts[1] == "search")
    assert read_run(exp / search_file.parent).last_step, "the search run had points before the kill"
    live = [p for p in before if p.parts[1] == "models" and not (exp / p.parent / monitor.DONE_MARK).exists()]
    for torn in [search_file, *live[:1]]:
        path = exp / torn
        path.write_bytes(path.read_bytes()[:-7])  # the last record cut in its crc
        assert records(path)[1], path
    search(exp, data, *FAST, *MEDIAN)
    tb = tensorboard_read(exp)
    check_against_the_experiment(exp, tb)
    assert "STATUS_UNKNOWN" in {s["status"][0] for s in tb["sessions"]}  # stopped early: predicted, kept apart
    assert len(list((exp / search_file.parent).glob("events.out.tfevents.*"))) == 2  # the same run, continued


def test_a_ray_search_writes_its_models_into_the_heads_folder(tmp_path, digits_data, tensorboard_read):
    """Two Ray nodes train the models, and the Ray worker of one is killed mid-training (Ray trains
    it again from its snapshot); the head writes every model's run and session into the
    experiment's folder, the killed model's curve once."""
    from test_parallel import _netns_run

    data, _ = digits_data
    exp = tmp_path / "exp"
    result = _netns_run("kill", exp, data)
    assert result["returncode"] == 0 and result["killed"] is not None, result["output"]
    assert len({m["worker"].split("ray-node ")[-1] for m in result["models"] if "ray-node" in m["worker"]}) == 2
    check_against_the_experiment(exp, tensorboard_read(exp))


# --- without caffe ------------------------------------------------------------------------------


def test_a_torn_last_record_reads_as_the_records_before_it(tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    w = RunWriter(run)
    w.write(scalar_events([Scalar("a", s, s / 10) for s in range(5)], {}))
    w.close()
    (path,) = run.glob("events.out.tfevents.*")
    whole = path.read_bytes()
    n, torn = len(records(path)[0]), records(path)[1]
    assert n == 6 and not torn  # the file-version record and five points
    last = len(whole) - len(records(path)[0][-1]) - 16  # where the last record starts
    for cut in range(last + 1, len(whole)):
        path.write_bytes(whole[:cut])
        got, torn = records(path)
        assert len(got) == 5 and torn, cut
        assert read_run(run).last_step == {"a": 3}


def test_only_what_a_run_lacks_is_written_and_a_second_writer_is_refused(tmp_path):
    """The synthetic search's store: `metaqnn tensorboard` writes its runs; a second call writes
    nothing; a kill that cut a run's last record is made good; while a writer holds the
    experiment's event files another one is refused with one line."""
    pytest.importorskip("tensorboardX")
    import synthetic

    exp = tmp_path / "exp"
    exp.mkdir()
    synthetic.run(exp / "store.sqlite")
    done = monitor.write_events(exp)
    assert done["points"] > 0 and done["models"] == 80
    assert monitor.write_events(exp)["points"] == 0
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        samples = monitor.samples_of(store.samples())
        expected = monitor.search_points(samples, store.models(), figure3_window(80))
    (path,) = (exp / "tensorboard" / "search").glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes()[:-3])
    assert monitor.write_events(exp)["points"] > 0  # the points of the torn record, again
    got = {}
    for event in read_events(exp / "tensorboard" / "search"):
        for v in event.summary.value:
            if not v.tag.startswith("_hparams_"):
                got.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
    want = {}
    for p in expected:
        want.setdefault(p.tag, []).append((p.step, f32(p.value)))
    assert got == want  # each point once
    # a finished model's run cut short by hand after its completion mark: read and completed again
    run = exp / "tensorboard" / "models" / "00004"
    (events,) = run.glob("events.out.tfevents.*")
    tags_before = read_run(run).tags
    events.write_bytes(events.read_bytes()[:-30])
    assert read_run(run).tags != tags_before
    monitor.write_events(exp)
    assert read_run(run).tags == tags_before and monitor.write_events(exp)["points"] == 0
    lock = monitor.WriterLock(exp / "tensorboard")
    assert lock.acquire()
    try:
        line = one_line_error(cli("tensorboard", "--exp", str(exp)), "being written by pid")
        assert str(os.getpid()) in line
    finally:
        lock.release()


def test_without_tensorboardx_a_search_says_once_how_to_turn_it_on(monkeypatch):
    said = []
    monkeypatch.setattr(monitor, "tensorboardx", lambda: None)
    m = monitor.start_monitor(Path("/nonexistent"), build_config("digits"), said.append)
    assert isinstance(m, monitor.NoMonitor) and len(said) == 1 and "pip install" in said[0]
    said.clear()
    off = build_config("digits", ["tensorboard.enabled=false"])
    assert isinstance(monitor.start_monitor(Path("/nonexistent"), off, said.append), monitor.NoMonitor) and not said


def test_the_tensorboard_section_is_checked_and_is_no_part_of_the_experiment():
    from qagent.errors import ConfigError

    cfg = build_config("svhn", ["tensorboard.flush_seconds=30"])
    assert cfg.tensorboard.flush_seconds == 30.0 and "tensorboard" not in cfg.to_dict()
    for bad in ("tensorboard.flush_seconds=0", "tensorboard.flush_seconds=600", "tensorboard.enabled=yes"):
        with pytest.raises(ConfigError, match="tensorboard"):
            build_config("svhn", [bad])
