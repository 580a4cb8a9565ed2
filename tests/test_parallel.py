"""Issue 8: several models in flight -- a local pool, and a real two-node Ray cluster."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import synthetic

from metaqnn.executors import LocalExecutor
from metaqnn.search import Progress, search_loop
from qagent.agent import Agent
from qagent.store import ExperimentStore

HERE = Path(__file__).resolve().parent


def test_local_pool_keeps_n_in_flight_and_trains_each_model_once(tmp_path):
    cfg = synthetic.config()
    lock = threading.Lock()
    running, calls = Counter(), Counter()
    peak = [0]

    def train(p):
        with lock:
            running[p.arch] += 1
            calls[p.arch] += 1
            assert running[p.arch] == 1, "the same architecture is training twice at once"
            peak[0] = max(peak[0], sum(running.values()))
        time.sleep(random.uniform(0.001, 0.01))  # results arrive out of order
        with lock:
            running[p.arch] -= 1
        return synthetic.synthetic_result(p.arch)

    with ExperimentStore.open(tmp_path / "store.sqlite", cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        executor = LocalExecutor(train, 4)
        try:
            search_loop(agent, store, executor, lambda p, _id: p, Progress(agent, store, lambda _m: None))
        finally:
            executor.close()
        assert peak[0] == 4
        assert set(calls.values()) == {1}  # every architecture trained exactly once
        models = store.models()
        assert len(models) == len(calls) and all(m.status in ("done", "failed") for m in models)
        # in-flight models hold their place in the schedule: each epsilon gets exactly its quota
        assert store.trained_per_epsilon() == {e: n for e, n in cfg.schedule.steps}
        samples = list(store.samples())
        assert [s["iteration"] for s in samples] == list(range(1, len(samples) + 1))


@pytest.mark.slow
def test_parallel_search_killed_and_resumed_loses_nothing(tmp_path):
    path = tmp_path / "store.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    kills = 0
    for _ in range(30):
        proc = subprocess.Popen([sys.executable, str(HERE / "synthetic.py"), str(path), "0.15", "4"], env=env)
        time.sleep(random.Random(kills).uniform(0.6, 1.2))
        if proc.poll() is not None:
            assert proc.returncode == 0
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    synthetic.run(path, 0.0, 4)
    assert kills >= 2
    cfg = synthetic.config()
    with ExperimentStore.open_readonly(path) as store:
        models = store.models()
        assert all(m.status in ("done", "failed") for m in models)  # nothing left running
        assert all(m.reward == synthetic.synthetic_result(m.arch).best_accuracy or m.status == "failed" for m in models)
        assert store.trained_per_epsilon() == {e: n for e, n in cfg.schedule.steps}


def _netns_run(mode, exp, data):
    """Run tests/ray_cluster.py in a fresh network namespace with only loopback (Ray traffic stays local)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("the Ray tests need root and iproute2 (`ip netns`) to isolate the cluster on loopback")
    ns = f"metaqnn-ray-{os.getpid()}-{mode}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(HERE / "ray_cluster.py"), mode, str(exp), str(data)],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_complete(result):
    assert result["returncode"] == 0, result["output"]
    models = result["models"]
    assert len(models) == 8 and all(m["status"] in ("done", "failed", "stopped") for m in models), models
    assert len({m["arch"] for m in models}) == 8  # one row per architecture: nothing trained twice
    fresh = [a for _, a, dup in result["samples"] if not dup]
    assert sorted(fresh) == sorted(m["arch"] for m in models)  # each result applied exactly once


def test_search_on_a_two_node_ray_cluster(tmp_path, digits_data):
    data, _ = digits_data
    result = _netns_run("search", tmp_path / "exp", data)
    _check_complete(result)
    nodes = {m["worker"].split("ray-node ")[-1] for m in result["models"] if "ray-node" in m["worker"]}
    assert len(nodes) == 2, result["models"]  # both nodes trained models
    stopped = [m for m in result["models"] if m["status"] == "stopped"]  # the rule shipped to the workers
    assert stopped and all(m["stop_rule"] == "svr" and "ray-node" in m["worker"] for m in stopped), result["models"]


def test_a_killed_ray_worker_has_its_model_completed_exactly_once(tmp_path, digits_data):
    data, _ = digits_data
    exp = tmp_path / "exp"
    result = _netns_run("kill", exp, data)
    assert result["killed"] is not None, result["output"]
    _check_complete(result)
    folder = exp / "models" / result["killed"]["model"]
    model = next(m for m in result["models"] if m["id"] == int(folder.name))
    assert model["status"] in ("done", "failed")
    state = json.loads((folder / "state.json").read_text())
    assert state["runs"] >= 3  # the probe, the killed run, and the run Ray retried
    retried = max(folder.glob("train*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "Resuming from" in retried and "Optimization Done" in retried  # continued from a snapshot


def test_an_exception_in_a_ray_training_stops_the_search_and_records_nothing(tmp_path, digits_data):
    """The same semantics as the sequential search and the local pool (tests/test_bad_input.py)."""
    data, _ = digits_data
    result = _netns_run("fault", tmp_path / "exp", data)
    assert result["returncode"] == 2, result["output"]
    assert "InjectedFault" in result["output"] and "Traceback" not in result["output"]
    assert result["models"] and all(m["status"] == "running" for m in result["models"]), result["models"]
    assert not result["samples"]  # no reward was learned from the broken set-up


# --- an unreachable Ray cluster: one line, soon, and nothing created (issue 24) --------------


@pytest.mark.slow  # runs the command line in a subprocess
def test_an_unreachable_ray_cluster_is_one_line_soon_and_creates_nothing(tmp_path):
    from commandline import cli, one_line_error

    exp = tmp_path / "r"
    start = time.monotonic()
    result = cli(
        "search", "--dataset", "digits", "--exp", str(exp), "--ray", "127.0.0.1:1", "--max-models", "1", timeout=60
    )
    line = one_line_error(result, "cannot connect to the Ray cluster at 127.0.0.1:1")
    assert time.monotonic() - start < 30 and "connection refused" in line
    assert not exp.exists()
    one_line_error(cli("search", "--exp", str(exp), "--ray", "head-host"), "--ray takes the address")
    assert not exp.exists()


@pytest.mark.slow  # imports ray and waits for the bound
def test_a_cluster_address_that_never_answers_is_bounded(tmp_path):
    """A port that accepts connections but never speaks Ray's protocol: ray.init alone would wait for minutes."""
    import socket

    code = (
        "import sys\n"
        "from metaqnn.executors import ExecutorError, connect_ray\n"
        "try:\n"
        "    connect_ray(sys.argv[1], timeout=4)\n"
        "except ExecutorError as exc:\n"
        "    print('error:', exc, file=sys.stderr)\n"
        "    raise SystemExit(2)\n"
    )
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", code, address],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        took = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no answer within 4 s" in lines[0], out.stderr  # Ray's own warnings held back
    assert took < 60, took
