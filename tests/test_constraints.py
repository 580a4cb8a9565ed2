"""Issue 22 with the real Caffe: a search under a budget.

* bad [constraints] values are one line, before anything exists;
* under max_params no trained model is over the budget; a net timed over max_latency_ms is
  rejected before training, rewarded with the failure reward and not counted as trained;
* the mnas reward shapes what the agent learns while the store keeps the accuracy beside it;
* a search killed -9 right after timing a model resumes without timing it again, and ends with
  the models and rewards of an uninterrupted run of the same seed.
"""

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from commandline import ROOT, cli, one_line_error
from test_export_recovery import short

from metaqnn.constraints import ConstraintsConfig, mnas_reward
from metaqnn.netspec import build_net
from qagent.arch import parse_architecture
from qagent.errors import ConfigError


def test_mnas_reward_arithmetic():
    """MnasNet's ACC x (cost/T)^w: soft alpha = beta = -0.07, hard alpha = 0, beta = -1."""
    assert mnas_reward(0.9, 100.0, 100.0, -0.07, -0.07) == pytest.approx(0.9)
    assert mnas_reward(0.9, 200.0, 100.0, -0.07, -0.07) == pytest.approx(0.9 * 2**-0.07)
    assert mnas_reward(0.9, 50.0, 100.0, -0.07, -0.07) == pytest.approx(0.9 * 0.5**-0.07)  # > 0.9: cheaper pays
    assert mnas_reward(0.9, 50.0, 100.0, 0.0, -1.0) == pytest.approx(0.9)  # hard: no bonus under the target
    assert mnas_reward(0.9, 300.0, 100.0, 0.0, -1.0) == pytest.approx(0.3)  # ... and 1/3 at three times it
    shaped = ConstraintsConfig(reward="mnas", cost="macs", target=1000.0, alpha=0.0, beta=-1.0)
    assert shaped.shaped(0.8, 2000.0) == pytest.approx(0.4) and ConstraintsConfig().shaped(0.8, 2000.0) == 0.8


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"max_params": -5}, "constraints.max_params must be a positive number"),
        ({"cost": "flops"}, "constraints.cost must be one of params, macs, latency"),
        ({"reward": "mnas"}, "needs constraints.target"),
        ({"reward": "pareto"}, "constraints.reward must be one of"),
        ({"latency_device": "tpu"}, "constraints.latency_device must be one of cpu, gpu"),
        ({"latency_iterations": 0}, "latency_iterations must be >= 1"),
    ],
)
def test_bad_constraints_are_refused_when_built(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ConstraintsConfig(**values)


def test_a_budget_nothing_fits_or_a_latency_nobody_can_measure_is_refused_before_anything_exists(tmp_path, caffe):
    exp = tmp_path / "exp"
    env = {"METAQNN_HOME": str(tmp_path / "home"), "CAFFE_BIN": str(caffe.binary)}
    r = cli("search", "--exp", str(exp), "--set", "constraints.max_params=100", env=env)
    one_line_error(r, "no architecture of the digits space fits the budget (constraints.max_params 100")
    assert "the smallest has 130 parameters" in r.stderr
    r = cli("search", "--exp", str(exp), "--set", "constraints.max_latency_ms=1.0",
            "--set", 'constraints.latency_device="gpu"', env=env)  # fmt: skip
    one_line_error(r, 'latency_device = "gpu" needs a search that trains on GPUs')
    r = cli("search", "--exp", str(exp), "--set", "constraints.max_params=0", env=env)
    one_line_error(r, "constraints.max_params = 0 is ambiguous")
    assert not exp.exists() and not (tmp_path / "home").exists()


def search_args(data: Path, root: Path, exp: Path, *extra: str):
    search = short("search_digits", root, epochs=3, step_epochs=1)
    return ["search", "--exp", str(exp), "--data-dir", str(data), "--seed", "5",
            "--set", "schedule.steps=[[1.0, 8], [0.3, 6]]", "--set", "space.max_depth=3",
            "--set", f"protocol.search='{search}'", *extra]  # fmt: skip


def models(exp: Path):
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM models ORDER BY id")]


def test_no_trained_model_is_over_budget_and_slow_nets_are_rejected_untrained(digits_data, tmp_path):
    data, _ = digits_data
    exp = tmp_path / "exp"
    budget = 3000
    r = cli(*search_args(data, tmp_path, exp, "--set", f"constraints.max_params={budget}",
                         "--set", "constraints.max_latency_ms=0.02", "--set", "constraints.latency_iterations=5",
                         "--set", "constraints.latency_warmup=1"))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = models(exp)
    done = [m for m in rows if m["status"] in ("done", "failed")]
    rejected = [m for m in rows if m["status"] == "rejected"]
    assert len(done) == 14  # the schedule counts trained models only
    for m in rows:
        metrics = json.loads(m["metrics"])
        layers = parse_architecture(m["arch"])
        params = build_net(
            layers, image_size=8, channels=1, num_classes=10, train_source="a", test_source="b"
        ).param_count
        assert params <= budget and metrics["params"] == params, m["arch"]
        latency = metrics["latency"]["forward_ms"]
        assert (latency > 0.02) == (m["status"] == "rejected"), (m["arch"], latency)
    assert rejected, "no net was timed over 0.02 ms: the budget did not bite"
    for m in rejected:
        assert m["reward"] == pytest.approx(0.1) and "never trained" in m["message"]
        folder = exp / "models" / f"{m['id']:05d}"
        assert not list(folder.glob("*.log")) and (folder / "latency.json").is_file()  # timed, never trained
    assert "REJECTED" in r.stdout
    status = cli("status", "--exp", str(exp))
    assert status.returncode == 0 and " params, " in status.stdout and " ms on cpu: " in status.stdout


def test_the_mnas_reward_is_learnt_and_the_accuracy_kept(digits_data, tmp_path):
    data, _ = digits_data
    exp = tmp_path / "exp"
    r = cli(*search_args(data, tmp_path, exp, "--set", 'constraints.reward="mnas"', "--set", 'constraints.cost="params"',
                         "--set", "constraints.target=2000.0", "--set", "constraints.alpha=0.0",
                         "--set", "constraints.beta=-1.0"))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        samples = dict(conn.execute("SELECT arch, reward FROM samples WHERE reward IS NOT NULL").fetchall())
    for m in models(exp):
        if m["status"] != "done":
            continue
        metrics = json.loads(m["metrics"])
        expected = metrics["accuracy"] * min(1.0, 2000.0 / metrics["params"])
        assert m["reward"] == pytest.approx(expected) and samples[m["arch"]] == m["reward"]
    export = cli("export", "--exp", str(exp), "--top", "3")
    assert export.returncode == 0, export.stderr
    ranked = [json.loads(p.read_text()) for p in sorted((exp / "export").glob("*/metadata.json"))]
    accs = [meta["validation_accuracy"] for meta in ranked]
    assert accs == sorted(accs, reverse=True) and all("reward" in meta for meta in ranked)
    by_reward = cli("export", "--exp", str(exp), "--top", "3", "--rank-by", "reward", "--out", str(tmp_path / "r"))
    assert by_reward.returncode == 0, by_reward.stderr
    rewards = [json.loads(p.read_text())["reward"] for p in sorted((tmp_path / "r").glob("*/metadata.json"))]
    assert rewards == sorted(rewards, reverse=True)
    pareto = cli("export", "--exp", str(exp), "--pareto", "params")
    assert pareto.returncode == 0, pareto.stderr
    front = [json.loads(p.read_text()) for p in sorted((exp / "export-pareto-params").glob("*/metadata.json"))]
    assert front and [m["param_count"] for m in front] == sorted(m["param_count"] for m in front)


def test_a_search_killed_after_timing_a_model_resumes_without_timing_it_again(digits_data, tmp_path):
    data, _ = digits_data
    extra = ("--set", 'constraints.reward="mnas"', "--set", 'constraints.cost="params"',
             "--set", "constraints.target=2000.0", "--set", "constraints.measure_latency=true",
             "--set", "constraints.latency_iterations=3", "--set", "constraints.latency_warmup=1")  # fmt: skip
    reference = tmp_path / "reference"
    r = cli(*search_args(data, tmp_path, reference, *extra))
    assert r.returncode == 0, r.stdout + r.stderr
    exp = tmp_path / "exp"
    argv = [sys.executable, "-m", "metaqnn", *search_args(data, tmp_path, exp, *extra)]
    killed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "METAQNN_KILL_AT": "latency-measured:4"})  # fmt: skip
    assert killed.returncode == -9, killed.stdout + killed.stderr
    timed = {p: p.stat().st_mtime_ns for p in exp.glob("models/*/latency.json")}
    assert len(timed) == 4
    resumed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {p: p.stat().st_mtime_ns for p in timed} == timed  # nothing timed before the kill was timed again
    ours = [(m["arch"], m["status"], m["reward"]) for m in models(exp)]
    theirs = [(m["arch"], m["status"], m["reward"]) for m in models(reference)]
    assert ours == theirs and all(r is None or math.isfinite(r) for _, _, r in ours)


@pytest.mark.parametrize("reward_rule, damaged", [("mnas", False), ("accuracy", True)])
def test_a_shaped_reward_above_one_is_no_damage_only_when_rewards_are_shaped(tmp_path, reward_rule, damaged):
    from metaqnn.config import build_config
    from qagent.agent import Agent
    from qagent.errors import StoreError
    from qagent.status import ModelStatus
    from qagent.store import ExperimentStore

    extra = [f"constraints.reward={reward_rule}"] + (["constraints.target=1000.0"] if reward_rule == "mnas" else [])
    cfg = build_config("digits", extra)
    path = tmp_path / "store.sqlite"
    with ExperimentStore.open(path, cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        p = agent.propose()
        store.begin_model(agent, p)
        agent.observe(p.arch, p.encoded, 1.07, p.epsilon)
        store.record_result(agent, p, ModelStatus.DONE, 1.07, {"accuracy": 0.99})
        q = agent.propose()  # a rejected net: a reward, a sample, no trained model
        store.begin_model(agent, q)
        agent.observe(q.arch, q.encoded, 0.1, q.epsilon, trained=False)
        store.record_result(agent, q, ModelStatus.REJECTED, 0.1, {"latency": {"forward_ms": 9.0}})
    if damaged:
        with pytest.raises(StoreError, match="reward that is not a number in"):
            ExperimentStore.open_readonly(path)
        return
    with ExperimentStore.open_readonly(path) as store:
        assert store.trained_per_epsilon() == {1.0: 1}  # the rejected net is not a trained model
        resumed = Agent(cfg.space, cfg.schedule, cfg.agent)
        store.load_agent(resumed)
        assert resumed.rewards == {p.arch: 1.07, q.arch: 0.1}  # both answer a re-sample: never timed again
        assert [m.accuracy for m in store.top_models(5)] == [0.99]
