"""Issue 12: bad input is refused at once, and broken infrastructure never becomes a reward.

Every refusal is checked the way a user meets it: the real command line, exit status 2,
one ``error:`` line on stderr, no traceback, and nothing created.
"""

import os
import stat
from pathlib import Path

import pytest
import synthetic
from commandline import cli, one_line_error

from metaqnn.config import build_config, config_from_dict, stored_config
from metaqnn.executors import InlineExecutor, LocalExecutor
from metaqnn.failures import CircuitBreaker, InfrastructureError, infrastructure_reason, signature
from metaqnn.search import Progress, search_loop
from metaqnn.trainer import TrainResult
from qagent.agent import Agent
from qagent.errors import ConfigError, quote
from qagent.store import ExperimentStore

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "schedule.steps=[[1.0, 3]]", "--set", "space.max_depth=3"]


def fake_caffe(folder: Path, body: str) -> Path:
    """A script in a prefix laid out like the real one, so that the real Caffe schema is found beside it."""
    from metaqnn.caffe.locate import find_caffe

    (folder / "bin").mkdir()
    (folder / "root").symlink_to(find_caffe().binary.parent.parent / "root")
    path = folder / "bin" / "caffe"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --- configuration: one typed, strict object ----------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.stepz=[[1.0, 3]]", "unknown key schedule.stepz"),
        ("dataset.validaton_size=10", "unknown key dataset.validaton_size"),
        ("render.mirorr=true", "unknown key render.mirorr"),
        ("protocol.serach='search'", "unknown key protocol.serach"),
        ("space.conv_filters=64", "space.conv_filters must be a list of integers, got 64"),
        ("schedule.steps=3", "schedule.steps must be a list of"),
        ("dataset.validation_size=abc", "dataset.validation_size must be an integer, got 'abc'"),
        ("render.mirror=no", "render.mirror must be true or false, got 'no'"),
        ("render.mirror=1", "render.mirror must be true or false, got 1"),
        ("space.allow_gap='yes'", "space.allow_gap must be true or false"),
        ("space.max_consecutive_fc=0", "write 'unlimited' for no limit"),
        ("render.dropout='papr'", "render.dropout must be one of"),
        ("protocol.search='no_such_protocol'", "unknown protocol 'no_such_protocol'"),
        ("dataset.validation_size=1600", "leaves no training images"),
        ("agent.failure_reward=2", "agent.failure_reward must be in [0, 1]"),
        ("agent.q_init=inf", "agent.q_init must be a finite number, got inf"),
        ("render.scale=nan", "render.scale must be a finite number, got nan"),
        ("schedule.steps=[[1.0]]", "schedule.steps[0] must be"),
        ("space.pool_pairs=[[2]]", "space.pool_pairs[0] must be"),
        ("space.image_size=3.5", "space.image_size must be an integer, got 3.5"),
        ("early_stop.rule='svm'", "early_stop.rule must be one of off, svr, median, got 'svm'"),
        ("early_stop.rule=svr", None),  # a bare word is a string: accepted
        ("early_stop.delta=0", "early_stop.delta must be in (0, 1], got 0.0"),
        ("early_stop.delta=1.5", "early_stop.delta must be in (0, 1]"),
        ("early_stop.checkpoints=[5, 2]", "early_stop.checkpoints must be increasing epochs >= 1"),
        ("early_stop.checkpoints=2", "early_stop.checkpoints must be a list of integers, got 2"),
        ("early_stop.warmup=3", "early_stop.warmup must be >= max(3, early_stop.cv_folds = 5), got 3"),
        ("early_stop.regressor='gp'", "early_stop.regressor must be one of"),
        ("early_stop.kth_best=0", "early_stop.kth_best must be >= 1"),
        ("early_stop.dleta=0.9", "unknown key early_stop.dleta"),
        ("agent.seed=-1", "agent.seed must be an integer >= 0, got -1"),  # as --seed -1 is refused
        ("dataset.seed=-7", "dataset.seed must be an integer >= 0, got -7"),
    ],
)
def test_a_bad_override_is_refused_with_its_key_named(override, message):
    if message is None:
        assert build_config("digits", [override]).early_stop.rule == "svr"
        return
    with pytest.raises(ConfigError, match=None) as err:
        build_config("digits", [override])
    assert message in str(err.value)


def test_early_stopping_checkpoints_must_leave_epochs_to_save():
    """A checkpoint at or past the protocol's last epoch saves nothing: refused when the rule is on."""
    with pytest.raises(ConfigError, match=r"below the protocol's 20 epochs, got \[2, 20\]"):
        build_config("digits", ["early_stop.rule='svr'", "early_stop.checkpoints=[2, 20]"])
    assert build_config("digits", ["early_stop.checkpoints=[2, 20]"]).early_stop.rule == "off"


def test_failure_reward_is_a_documented_override_and_zero_stays_zero():
    assert build_config("digits", ["agent.failure_reward=0"]).agent.failure_reward == 0.0
    assert build_config("digits", ["agent.failure_reward=0.05"]).agent.failure_reward == 0.05
    assert build_config("digits", ["agent.failure_reward='chance'"]).agent.failure_reward is None
    assert build_config("digits").agent.failure_reward is None  # the default: 1/num_classes


def test_unlimited_is_spelt_out_and_survives_the_round_trip():
    mnist = build_config("mnist")
    assert mnist.space.max_consecutive_fc is None and mnist.space.fc_max_rsize is None
    record = mnist.to_dict()
    assert record["space"]["max_consecutive_fc"] == "unlimited"
    assert config_from_dict(record) == mnist


def test_a_record_from_an_earlier_version_reads_as_the_same_config():
    old = build_config("mnist").to_dict()
    old["space"]["max_consecutive_fc"] = 0  # how 0.x recorded "no limit"
    old["space"]["fc_max_rsize"] = 0
    del old["agent"]["failure_reward"]  # and a key it did not write
    assert stored_config(old) == build_config("mnist")


def test_a_typo_in_a_preset_file_is_refused_naming_the_file(tmp_path):
    preset = tmp_path / "mine.toml"
    text = (ROOT / "presets" / "digits.toml").read_text().replace("mirror = false", "mirorr = true")
    preset.write_text(text)
    with pytest.raises(ConfigError) as err:
        build_config(str(preset))
    assert str(preset) in str(err.value) and "unknown key render.mirorr" in str(err.value)


def test_a_misspelt_restart_threshold_is_refused_before_any_training(tmp_path):
    solver = tmp_path / "mysearch.toml"
    text = (ROOT / "solvers" / "search_digits.toml").read_text()
    solver.write_text(text.replace("pass_threshold = 0.15", 'pass_threshold = "chanse"'))
    with pytest.raises(ConfigError, match='pass_threshold must be "chance" or a number'):
        build_config("digits", [f"protocol.search='{solver}'"])
    solver.write_text(text.replace("max_restarts = 5", "max_restart = 5"))
    with pytest.raises(ConfigError, match=r"unknown key protocol\.restarts\.max_restart"):
        build_config("digits", [f"protocol.search='{solver}'"])


def test_the_validated_object_is_what_modules_receive():
    """No module looks a value up with a default of its own: every section is a frozen dataclass."""
    cfg = build_config("svhn", ["render.dropout='none'", "dataset.validation_size=4000"])
    assert cfg.render.dropout == "none" and cfg.dataset.validation_size == 4000 and cfg.dataset.channels == 3
    with pytest.raises(Exception):  # noqa: B017 - frozen
        cfg.render.dropout = "paper"  # type: ignore[misc]


@pytest.mark.slow  # runs the command line in subprocesses
def test_a_long_argument_is_quoted_short():
    assert len(quote("x" * 1_000_000)) < 200
    huge = "x" * 120_000  # near the kernel's limit for one argument
    result = cli("render", "--arch", huge, "--out", "/tmp/never")
    line = one_line_error(result, "architecture must be a bracketed list")
    assert len(line) < 400


# --- the command line: nothing created until everything is checked ----------------------------


@pytest.mark.slow  # runs the command line in subprocesses
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["search", "--max-models", "-1"], "--max-models: a positive integer expected, got '-1'"),
        (["search", "--workers", "0"], "--workers: a positive integer expected, got '0'"),
        (["search", "--workers", "-3"], "--workers: a positive integer expected"),
        (["search", "--timeout", "-5"], "--timeout: a positive number of seconds expected"),
        (["search", "--timeout", "nan"], "--timeout: a positive number of seconds expected"),
        (["search", "--gpus", "0,-1"], "--gpus must list distinct GPU ids >= 0"),
        (["search", "--set", "dataset.validation_size=1600"], "leaves no training images"),
        (["search", "--set", "render.mirror=no"], "render.mirror must be true or false"),
        (["export", "--top", "-1"], "--top: a positive integer expected"),
        (["finetune", "--top", "0"], "--top: a positive integer expected"),
        (["search", "--bogus"], "unrecognized arguments: --bogus"),
        (["search", "--gpus", ""], "--gpus is empty"),  # not a silent CPU run
        (["search", "--gpus", " "], "--gpus is empty"),
        (["search", "--gpus", "0,,1"], "(an empty id)"),
        (["search", "--ray", ""], "--ray is empty"),
        (["search", "--seed", "-1"], "--seed: an integer >= 0 expected"),
        (["search", "--set", "agent.seed=-1"], "agent.seed must be an integer >= 0"),
    ],
)
def test_bad_command_line_values_create_nothing(tmp_path, args, fragment):
    exp = tmp_path / "exp"
    one_line_error(cli(*args, "--exp", str(exp)), fragment)
    assert not exp.exists()


def test_a_corrected_command_is_not_refused_as_a_different_config(tmp_path, digits_data):
    data, _ = digits_data
    exp = tmp_path / "exp"
    base = ["search", "--exp", str(exp), "--data-dir", str(data), "--max-models", "1", *TINY]
    one_line_error(cli(*base, "--set", "dataset.validation_size=1600"), "leaves no training images")
    assert not exp.exists()
    ok = cli(*base)
    assert ok.returncode == 0, ok.stdout + ok.stderr


# --- caffe is checked before the experiment exists ------------------------------------------


def test_a_caffe_that_always_fails_is_refused_at_start(tmp_path, digits_data):
    data, _ = digits_data
    exp = tmp_path / "exp"
    broken = fake_caffe(tmp_path, "exit 1")
    line = one_line_error(
        cli("search", "--exp", str(exp), "--data-dir", str(data), *TINY, env={"CAFFE_BIN": str(broken)}),
        str(broken),
    )
    assert "not a working Caffe" in line and "Datum" not in line
    assert not exp.exists()
    line = one_line_error(
        cli("search", "--exp", str(exp), "--data-dir", str(data), *TINY, env={"CAFFE_BIN": "/bin/false"}),
        "/bin/false is not a working Caffe",
    )
    assert not exp.exists()


def test_a_caffe_that_says_its_version_but_cannot_train_is_refused_at_start(tmp_path, digits_data):
    data, _ = digits_data
    exp = tmp_path / "exp"
    liar = fake_caffe(
        tmp_path, 'if [ "$1" = "--version" ]; then echo "caffe version 1.0.0"; exit 0; fi; echo boom >&2; exit 1'
    )
    line = one_line_error(
        cli("search", "--exp", str(exp), "--data-dir", str(data), *TINY, env={"CAFFE_BIN": str(liar)}),
        f"caffe {liar} cannot train one iteration",
    )
    assert "boom" in line
    assert not exp.exists()


# --- failures: the model's become rewards, the infrastructure's stop the search --------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_exception_in_a_training_stops_the_search_in_every_executor(tmp_path, digits_data, workers):
    """Sequential and local pool alike (Ray: tests/test_parallel.py): no failure recorded, the
    models in flight stay "running", and the next run retries them."""
    data, _ = digits_data
    exp = tmp_path / "exp"
    args = ["search", "--exp", str(exp), "--data-dir", str(data), "--workers", workers, *TINY]
    result = cli(*args, env={"METAQNN_FAULT": "trainer"})
    one_line_error(result, "raised InjectedFault")
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        rows = store.models()
        assert rows and all(m.status == "running" for m in rows)
        assert not list(store.samples())
        running = {m.arch for m in rows}
    again = cli(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        after = {m.arch: m for m in store.models()}
    assert running <= set(after) and all(after[a].status in ("done", "failed") for a in running)


def _synthetic_search(tmp_path, executor, result):
    cfg = synthetic.config()
    with ExperimentStore.open(tmp_path / "store.sqlite", cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        store.load_agent(agent)
        run = executor(lambda p: result)
        try:
            search_loop(
                agent, store, run, lambda p, _id: p, Progress(agent, store, lambda _m: None), None, CircuitBreaker(4)
            )
        finally:
            run.close()


@pytest.mark.parametrize("executor", [InlineExecutor, lambda run: LocalExecutor(run, 3)], ids=["inline", "pool"])
def test_the_circuit_breaker_stops_a_run_of_identical_failures(tmp_path, executor):
    crash = TrainResult("failed", failure="crashed", message="caffe crashed (exit status 1)")
    with pytest.raises(InfrastructureError, match=r"4 models in a row .* failed the same way"):
        _synthetic_search(tmp_path, executor, crash)
    with ExperimentStore.open_readonly(tmp_path / "store.sqlite") as store:
        assert not store.models("failed")  # blamed on the set-up: no failure is kept as a reward
        assert len(store.models("deferred")) == 4  # taken back, trained again on the next run
        assert not list(store.samples())


def test_training_outcomes_do_not_trip_the_breaker():
    breaker = CircuitBreaker(2)
    for i in range(10):  # a poor region of the space: many nets never learn
        breaker.observe(i, "failed", "no_learning", f"never beat the threshold (last accuracy 0.{i})")
    breaker.observe(10, "failed", "crashed", "caffe crashed (exit status 1)")
    breaker.observe(11, "failed", "rejected", "caffe refused the net: Check failed: 3 vs 4")  # a different one
    breaker.observe(12, "done", None, "")
    breaker.observe(13, "failed", "crashed", "caffe crashed (exit status 1)")
    with pytest.raises(InfrastructureError):
        breaker.observe(14, "failed", "crashed", "caffe crashed (exit status 1)")
    assert signature("rejected", "shape 3 vs 4") == signature("rejected", "shape 7 vs 12")


def test_device_and_disk_failures_are_the_infrastructures():
    assert "disk is full" in infrastructure_reason(["Check failed: ... No space left on device"])
    assert "GPU is unusable" in infrastructure_reason(
        ["Check failed: error == cudaSuccess (100 vs. 0)  no CUDA-capable device is detected"]
    )
    assert infrastructure_reason(["Check failed: top_shape[j] == bottom[i]->shape(j)"]) is None


# --- render, arch, compare ----------------------------------------------------------------


@pytest.mark.slow  # runs the command line in subprocesses
@pytest.mark.parametrize(
    "arch, reason",
    [
        ("[C(64,7,1), SM(10)]", "not allowed"),  # a filter size the preset lacks
        ("[C(64,3,1), P(2,2), P(2,2), SM(10)]", "not allowed"),  # pool after pool
        ("[C(64,3,1), P(5,3), P(3,2), FC(128), FC(256), SM(10)]", "not allowed"),
        ("[C(64,3,1), P(5,3), P(2,2), FC(128), FC(128), FC(128), SM(10)]", "not allowed"),
        ("[" + ", ".join(["C(64,3,1)"] * 13) + ", SM(10)]", "not allowed"),  # 13 layers, max 12
    ],
)
def test_render_refuses_an_architecture_outside_the_space(tmp_path, arch, reason):
    out = tmp_path / "r"
    line = one_line_error(cli("render", "--dataset", "svhn", "--arch", arch, "--out", str(out)), reason)
    assert "--off-space" in line
    assert not out.exists()
    forced = cli("render", "--dataset", "svhn", "--arch", arch, "--out", str(out), "--off-space")
    assert forced.returncode == 0, forced.stderr
    assert (out / "net.prototxt").exists()


@pytest.mark.slow  # runs the command line in subprocesses
def test_arch_refuses_a_layer_type_it_does_not_know(tmp_path):
    net = tmp_path / "net.prototxt"
    ok = cli("render", "--dataset", "svhn", "--arch", "[C(64,3,1), SM(10)]", "--out", str(tmp_path / "r"))
    assert ok.returncode == 0, ok.stderr
    text = (tmp_path / "r" / "net.prototxt").read_text()
    text = text.replace('type: "ReLU"', 'type: "Sigmoid"', 1)
    net.write_text(text)
    one_line_error(cli("arch", str(net)), "has type 'Sigmoid', which no MetaQNN net contains")


@pytest.mark.slow  # runs the command line in subprocesses
def test_a_binary_file_is_refused_by_compare_and_arch(tmp_path):
    blob = tmp_path / "weights.caffemodel"
    blob.write_bytes(bytes(range(256)) * 40)
    one_line_error(cli("arch", str(blob)), "is not a text prototxt")
    one_line_error(cli("compare", str(blob), str(blob)), "is not a text prototxt")
    one_line_error(cli("arch", str(tmp_path)), "is a directory")


@pytest.mark.slow  # runs the command line in subprocesses
def test_compare_refuses_empty_special_and_contentless_files(tmp_path):
    """/dev/null parsed as an empty solver, and 'equal' to any other empty file: never a comparison."""
    solver = tmp_path / "solver.prototxt"
    solver.write_text('base_lr: 0.01\nnet: "net.prototxt"\n')
    empty = tmp_path / "empty.prototxt"
    empty.write_text("")
    blank = tmp_path / "blank.prototxt"
    blank.write_text("\n  \n")
    comments = tmp_path / "comments.prototxt"
    comments.write_text("# a comment only\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would wait forever
    for bad, fragment in [
        ("/dev/null", "is not a regular file"),
        (str(fifo), "is not a regular file"),
        (str(empty), "is empty"),
        (str(blank), "is empty"),
        (str(comments), "is neither a Caffe net nor a solver"),
    ]:
        one_line_error(cli("compare", bad, str(solver), timeout=120), fragment)
        one_line_error(cli("compare", str(solver), bad, timeout=120), fragment)
    one_line_error(cli("arch", "/dev/null", timeout=120), "is not a regular file")
    ok = cli("compare", str(solver), str(solver))
    assert ok.returncode == 0 and "equal: solvers" in ok.stdout, ok.stderr


@pytest.mark.slow  # runs the command line in subprocesses
def test_render_with_a_data_dir_needs_prepared_data_that_fits(tmp_path, digits_data):
    data, _ = digits_data
    arch = "[C(8,3,1), SM(10)]"
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("render", "--arch", arch, "--out", str(tmp_path / "a"), "--data-dir", str(empty)), "no manifest")
    one_line_error(
        cli("render", "--dataset", "svhn", "--arch", arch, "--out", str(tmp_path / "b"), "--data-dir", str(data)),
        "but the prepared data in",
    )
    ok = cli("render", "--arch", arch, "--out", str(tmp_path / "c"), "--data-dir", str(data))
    assert ok.returncode == 0, ok.stderr
