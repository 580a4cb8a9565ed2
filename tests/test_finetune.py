"""Issue 15: finetune schedules that train to the end, the validation/test comparison, the progress line."""

import json
import re
from pathlib import Path

import pytest
import synthetic
from digits import digits_net

from metaqnn.caffe.runner import run_caffe, train_argv
from metaqnn.config import build_config, preset_names
from metaqnn.executors import InlineExecutor
from metaqnn.export import dataset_sizes
from metaqnn.finetune import DROP_FLAG, flagged, format_results
from metaqnn.lrschedule import FINAL_FLOOR, MEANINGFUL, RateSchedule, finetune_problems
from metaqnn.render import write_training_files
from metaqnn.report import finetune_section
from metaqnn.search import Progress, search_loop
from metaqnn.solverspec import Protocol, solver_fields
from qagent.agent import Agent
from qagent.store import ExperimentStore


def schedules(preset, finetune_overrides=None):
    """(search, finetune) schedules of a preset at its release sizes, as rendered into the solvers."""
    cfg = build_config(preset)
    sizes = dataset_sizes(cfg, Path("/nonexistent"))  # the release sizes, whatever is prepared here
    out = []
    for role in ("search", "finetune"):
        proto = cfg.protocol.load(role)
        if role == "finetune" and finetune_overrides:
            proto = proto.with_overrides(**finetune_overrides)
        fields = solver_fields(
            proto, net="n", train_size=sizes[proto.train_set], test_size=sizes[proto.test_set], whole_test_set=False
        )
        out.append(RateSchedule.from_fields(fields))
    return out[0], out[1]


# (preset: iterations per epoch, max_iter, step points, updates at >= 1% of base_lr) of the finetuning.
PINNED = {
    # 1,497 // 32 = 46; x0.2 every 10 epochs (460 iterations) over 30 epochs
    "digits": (46, 1380, [460, 920], 1380),
    # the digits 5..9 task (747 training images): 747 // 32 = 23; x0.2 every 10 epochs over 30
    "digits59": (23, 690, [230, 460], 690),
    # 60,000 // 128 = 468; x0.2 every 5 epochs over 40, as published
    "mnist": (468, 18720, [2340, 4680, 7020, 9360, 11700, 14040, 16380], 7020),
    # 604,388 // 128 = 4721; floor(5 * 604388 / 128) = 23608, 7 halvings at epoch 10, 3 at 40: as published
    "svhn": (4721, 236050, [23608, *range(47217, 47224), *range(188871, 188874)], 47222),
    # 50,000 // 128 = 390; floor(epoch * 50000 / 128) at 40, 80, 240: 1, 7 and 3 halvings
    "cifar10": (390, 117000, [15625, *range(31250, 31257), *range(93750, 93753)], 31255),
    # CIFAR-100: CIFAR-10's sizes and protocol
    "cifar100": (390, 117000, [15625, *range(31250, 31257), *range(93750, 93753)], 31255),
}


@pytest.mark.parametrize("preset", sorted(PINNED))
def test_every_finetune_schedule_trains_until_its_end(preset):
    assert sorted(PINNED) == preset_names()  # a new preset gets its arithmetic pinned here too
    search, tune = schedules(preset)
    ipe, max_iter, points, meaningful = PINNED[preset]
    assert (tune.iters_per_epoch, tune.max_iter, tune.step_points()) == (ipe, max_iter, points)
    assert all(0 < p < tune.max_iter for p in tune.step_points())  # every rate change happens in training
    rates = tune.epoch_rates()
    assert len(rates) == tune.epochs and rates[0] == tune.base_lr
    last_quarter = rates[3 * tune.epochs // 4 :]
    assert min(last_quarter) >= FINAL_FLOOR * tune.base_lr  # the rate has not decayed to nothing
    assert tune.meaningful_updates() == meaningful
    # finetuning trains each model at least as long as the search that chose it
    assert meaningful >= search.meaningful_updates()
    assert finetune_problems(tune, search) == []


def test_the_old_digits_protocol_is_caught():
    """MNIST's epochs on 1,497 images: 11 iterations per epoch, the rate below 1% after 165 updates."""
    search, old = schedules("digits", {"train_batch": 128, "step_epochs": 5, "epochs": 40})
    assert (old.iters_per_epoch, old.max_iter, old.stepsize) == (11, 440, 55)
    assert old.meaningful_updates() == 165 and search.meaningful_updates() == 555
    assert finetune_problems(old, search) == [
        f"finetuning gives 165 updates at >= {MEANINGFUL:g} x base_lr, fewer than the search's 555"
    ]
    # in epochs it is MNIST's published schedule, so a floor on the rate alone cannot catch it
    assert old.epoch_rates() == schedules("mnist")[1].epoch_rates()
    assert old.problems() == []
    # one more x0.2 step than MNIST's: below the floor, and where the rate got there is said
    longer = RateSchedule(0.001, "step", max_iter=45 * 11, iters_per_epoch=11, gamma=0.2, stepsize=55)
    assert longer.problems() == [
        "the rate ends at 2.56e-06 x base_lr (below 1e-05): it reaches that at iteration 440 of 495"
    ]
    late = RateSchedule(0.1, "multistep", max_iter=100, iters_per_epoch=10, gamma=0.5, stepvalues=(50, 100))
    assert late.problems() == ["stepvalue(s) [100] are not inside training (max_iter 100)"]


@pytest.mark.parametrize(
    "policy", [{"lr_policy": "step", "step_epochs": 2}, {"lr_policy": "multistep", "rates": ((2.0, 0.5), (5.0, 0.1))}]
)
def test_rate_per_iteration_is_caffes(caffe, digits_data, tmp_path, policy):
    """Caffe's own logged ``lr`` at every iteration equals RateSchedule.rate of the rendered fields."""
    data, _ = digits_data
    spec = digits_net(data, "[C(8,3,1), SM(10)]")
    proto = Protocol(
        name="t",
        type="Adam",
        base_lr=1.0,
        momentum=0.9,
        weight_decay=0.0,
        gamma=0.5,
        epochs=8,
        display=1,
        train_batch=32,
        **policy,
    )
    fields = solver_fields(proto, net="net.prototxt", train_size=96, test_size=100, whole_test_set=True)
    fields = [(k, "model" if k == "snapshot_prefix" else v) for k, v in fields]
    write_training_files(tmp_path, spec, fields)
    o = run_caffe(train_argv(caffe.binary, tmp_path / "solver.prototxt"), cwd=tmp_path, log_path=tmp_path / "log")
    assert o.returncode == 0 and o.state.done, (tmp_path / "log").read_text()[-2000:]
    logged = {int(i): float(lr) for i, lr in re.findall(r"Iteration (\d+), lr = (\S+)", (tmp_path / "log").read_text())}
    schedule = RateSchedule.from_fields(fields)
    assert sorted(logged) == list(range(schedule.max_iter)) and len(set(logged.values())) >= 3
    assert all(lr == pytest.approx(schedule.rate(i), rel=1e-6) for i, lr in logged.items())


def result(model, val, test):
    return {"model": model, "arch": "[C(8,3,1), SM(10)]", "validation_accuracy": val, "test_accuracy": test}


def test_drops_of_more_than_two_points_are_flagged():
    assert DROP_FLAG == 0.02
    ok, edge, bad, unknown = (
        {**result("01_a", 0.9933, 0.9967), "search_weights_test_accuracy": 0.99},
        result("02_b", 0.9933, 0.9733),  # exactly 2 points (6 of 300 images): not flagged
        {**result("03_c", 0.9933, 0.9267), "search_weights_test_accuracy": 0.9467},  # the 92.67
        result("04_d", None, 0.9),
    )
    assert [flagged(r) for r in (ok, edge, bad, unknown)] == [False, False, True, False]
    lines = format_results([ok, edge, bad, unknown])
    assert lines[2].startswith("| 01_a | 99.33 | 99.67 | +0.34 | 0.33 | 99.00 |")
    assert lines[3].startswith("| 02_b | 99.33 | 97.33 | -2.00 | 2.67 | ? |")
    assert lines[4].startswith("| 03_c | 99.33 | 92.67 | -6.66 **DROP** | 7.33 | 94.67 |")
    assert lines[5].startswith("| 04_d | ? | 90.00 | ? | 10.00 |")
    assert lines[-1].startswith("warning: 1 of 4 models test more than 2 points below") and "03_c" in lines[-1]
    assert not any(ln.startswith("warning") for ln in format_results([ok, edge]))
    # a drop that the search's own weights show on the test set too is told apart from the finetuning
    harder = {**result("05_e", 0.9933, 0.9633), "search_weights_test_accuracy": 0.9467}
    lines = format_results([bad, harder])
    assert lines[-2].startswith("warning: 2 of 2 models") and lines[-1].startswith(
        "  The search's own weights test no better than the finetuned model (05_e): that gap lies between"
    )


def test_report_shows_finetuned_beside_validation(tmp_path):
    exp = tmp_path / "exp"
    for rank, (val, test) in enumerate([(0.99, 0.985), (0.98, 0.95)], 1):
        folder = exp / "export" / f"0{rank}_model0000{rank}"
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text(json.dumps({"validation_accuracy": val}))
        done = result(folder.name, val, test)
        if rank == 2:  # a finetune.json written before issue 15 has no validation accuracy: metadata.json has it
            del done["validation_accuracy"]
        (folder / "finetune.json").write_text(json.dumps(done))
    ensemble = {"models": [{"model": "01", "test_accuracy": 0.985}, {"model": "02", "test_accuracy": 0.95}]}
    (exp / "export" / "ensemble.json").write_text(json.dumps({**ensemble, "ensemble_accuracy": 0.98}))
    lines = finetune_section(exp)
    assert lines[1] == "## Finetuned top models (test set)"
    assert "| 01_model00001 | 99.00 | 98.50 | -0.50 |" in "\n".join(lines)
    assert "| 02_model00002 | 98.00 | 95.00 | -3.00 **DROP** |" in "\n".join(lines)
    assert lines[-1] == "Ensemble of 2 (01, 02): test accuracy 98.00% (best member 98.50%) -- below its best member"
    assert finetune_section(tmp_path / "nothing") == []


def test_progress_lines_show_the_epsilon_of_the_model_they_report(tmp_path):
    """Not the next epsilon (`[114/134] eps 0.2 (no models yet) | ... #114 eps 0.3`), nor `eps done`."""
    cfg = build_config("svhn", ["schedule.steps=[[1.0, 6], [0.5, 3], [0.1, 3]]"])
    lines = []
    with ExperimentStore.open(tmp_path / "store.sqlite", cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        executor = InlineExecutor(lambda p: synthetic.synthetic_result(p.arch))
        search_loop(agent, store, executor, lambda p, _id: p, Progress(agent, store, lines.append))
    # "best -": no measured accuracy yet at this epsilon (a failure reward is not one)
    pattern = re.compile(r"^\[(\d+)/12\] eps (\S+) \((best (?:[\d.]+|-) mean [\d.]+)\)( \| done)? \| #\d+ eps (\S+) ")
    parsed = [pattern.match(line) for line in lines]
    assert len(lines) == 12 and all(parsed), lines
    assert all(m.group(2) == m.group(5) for m in parsed)  # the line's epsilon is the reported model's
    assert [int(m.group(1)) for m in parsed] == list(range(1, 13))
    assert parsed[-1].group(2) == "0.1" and parsed[-1].group(4) and not any(m.group(4) for m in parsed[:-1])
