import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synthetic

from qagent.agent import Agent
from qagent.errors import StoreError, StoreLockedError
from qagent.store import ExperimentStore

HERE = Path(__file__).resolve().parent


def _snapshot(path):
    with ExperimentStore.open_readonly(path) as store:
        q = [(r["state"], bytes(r["q"])) for r in store.q_rows()]
        samples = [(r["arch"], r["epsilon"], r["reward"], r["duplicate"]) for r in store.samples()]
        models = [(m.arch, m.status, m.reward, m.epsilon) for m in store.models()]
    return sorted(q), samples, sorted(models)


def _wait_for_a_commit(store: Path, proc: subprocess.Popen, limit: float = 60.0) -> None:
    """Until the store has changed since the process started (or it exited)."""

    def stamp():
        return [(p.stat().st_mtime_ns, p.stat().st_size) for p in store.parent.glob("store.sqlite*") if p.exists()]

    before, deadline = stamp(), time.monotonic() + limit
    while proc.poll() is None and stamp() == before and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "ref" / "store.sqlite"
    synthetic.run(reference)
    killed = tmp_path / "killed" / "store.sqlite"
    rng = random.Random(11)
    kills = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    for _ in range(40):
        proc = subprocess.Popen([sys.executable, str(HERE / "synthetic.py"), str(killed), "0.03"], env=env)
        _wait_for_a_commit(killed, proc)  # a loaded machine may take seconds just to start Python
        time.sleep(rng.uniform(0.0, 0.9))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0
            break
    else:
        pytest.fail("the synthetic search never finished")
    synthetic.run(killed)  # idempotent once complete
    assert kills >= 2
    ref_q, ref_samples, ref_models = _snapshot(reference)
    got_q, got_samples, got_models = _snapshot(killed)
    assert got_models == ref_models  # nothing lost, nothing trained twice
    assert got_samples == ref_samples
    assert got_q == ref_q  # the final Q-table is bit-identical


def test_second_writer_gets_a_clear_error(tmp_path):
    path = tmp_path / "store.sqlite"
    with ExperimentStore.open(path, synthetic.config().to_dict()):
        with pytest.raises(StoreLockedError, match="already open for writing by pid"):
            ExperimentStore.open(path, synthetic.config().to_dict())
        with ExperimentStore.open_readonly(path) as reader:  # readers need no lock
            assert reader.config() == synthetic.config().to_dict()
    ExperimentStore.open(path, synthetic.config().to_dict()).close()  # released on close


def test_changed_config_is_refused_on_resume(tmp_path):
    path = tmp_path / "store.sqlite"
    ExperimentStore.open(path, synthetic.config().to_dict()).close()
    cfg = synthetic.config().to_dict()
    cfg["agent"]["seed"] = 99
    with pytest.raises(StoreError, match=r"agent.seed: stored 0, given 99"):
        ExperimentStore.open(path, cfg)


def test_in_flight_model_is_not_sampled_again_and_failures_are_recorded(tmp_path):
    cfg = synthetic.config()
    path = tmp_path / "store.sqlite"
    with ExperimentStore.open(path, cfg.to_dict()) as store:  # the search dies with a model in flight
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        p = agent.propose()
        model_id = store.begin_model(agent, p)
        rng_after_sampling = agent.rng.getstate()
    with ExperimentStore.open(path, cfg.to_dict()) as store:  # resume
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        store.load_agent(agent)
        # the in-flight model is resumed under its own id, and the RNG continues *after* its sample,
        # so it is not drawn (nor trained) a second time
        assert [(m.id, m.arch) for m in store.running()] == [(model_id, p.arch)]
        assert agent.rng.getstate() == rng_after_sampling
        agent.observe(p.arch, agent.encode(p.arch), agent.failure_reward, p.epsilon)  # as the search resumes it
        store.record_result(agent, p, "failed", agent.failure_reward, {"failure": "diverged"}, "diverged")
        q = agent.propose()
        assert q.arch != p.arch or q.known_reward is not None
        agent.skip(q.arch)
        store.record_result(agent, q, "oom", None, {}, "out of memory")
    with ExperimentStore.open(path, cfg.to_dict()) as store:
        fresh = Agent(cfg.space, cfg.schedule, cfg.agent)
        store.load_agent(fresh)
        assert store.running() == []
        assert fresh.rewards == {p.arch: 0.1} and fresh.skipped == {q.arch}
        assert store.model(p.arch).message == "diverged" and store.model(q.arch).reward is None
        assert fresh.rng.getstate() == agent.rng.getstate()
