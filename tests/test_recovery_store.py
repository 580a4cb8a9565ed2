"""Issue 24 (no caffe): a store that is damaged is refused, never recreated; failures the circuit
breaker blames on the set-up are taken back exactly; read-only opens leave nothing behind."""

import json
import sqlite3

import pytest
import synthetic

from metaqnn.executors import InlineExecutor
from metaqnn.failures import CircuitBreaker, InfrastructureError
from metaqnn.search import Progress, search_loop
from metaqnn.trainer import TrainResult
from qagent.agent import Agent
from qagent.errors import StoreError
from qagent.store import ExperimentStore


def _search(path, train, max_models=None, breaker=None):
    cfg = synthetic.config()
    with ExperimentStore.open(path, cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        store.load_agent(agent)
        executor = InlineExecutor(train)
        try:
            search_loop(
                agent, store, executor, lambda p, _id: p, Progress(agent, store, lambda _m: None), max_models, breaker
            )
        finally:
            executor.close()


def _q_table(path):
    with ExperimentStore.open_readonly(path) as store:
        return {r["state"]: bytes(r["q"]) for r in store.q_rows()}


def _samples(path):
    with ExperimentStore.open_readonly(path) as store:
        return [(s["iteration"], s["arch"], s["reward"]) for s in store.samples()]


@pytest.fixture()
def small_store(tmp_path):
    path = tmp_path / "store.sqlite"
    _search(path, lambda p: synthetic.synthetic_result(p.arch), max_models=6)
    return path


@pytest.mark.parametrize("table", ["models", "samples", "qstates", "qvalues", "agent"])
def test_a_store_missing_a_table_is_damaged_not_new(small_store, table):
    with sqlite3.connect(small_store) as conn:
        conn.execute(f"DROP TABLE {table}")
    cfg = synthetic.config()
    with pytest.raises(StoreError, match=f"damaged.*{table}"):
        ExperimentStore.open(small_store, cfg.to_dict())
    with pytest.raises(StoreError, match="damaged"):
        ExperimentStore.open_readonly(small_store)
    with sqlite3.connect(small_store) as conn:  # and nothing was recreated
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert table not in tables


@pytest.mark.parametrize(
    "damage",
    [
        "DELETE FROM agent",
        "DELETE FROM qvalues",
        "DELETE FROM models WHERE id = 2",
        "DELETE FROM samples",
        "UPDATE models SET reward = NULL WHERE id = 1",
        # values that are not what they claim
        "UPDATE models SET reward = 'abc' WHERE id = 2",
        "UPDATE models SET reward = 5.0 WHERE id = 1",
        "UPDATE samples SET reward = 0.99 WHERE iteration = 1",
        "UPDATE models SET epsilon = 'x' WHERE id = 3",
        "DELETE FROM meta WHERE key = 'config'",
    ],
)
def test_a_store_whose_parts_disagree_is_damaged(small_store, damage):
    with sqlite3.connect(small_store) as conn:
        conn.execute(damage)
    for opened in (
        lambda: ExperimentStore.open(small_store, synthetic.config().to_dict()),
        lambda: ExperimentStore.open_readonly(small_store),
    ):
        with pytest.raises(StoreError, match=r"damaged|not an experiment store|not a readable experiment store"):
            opened()


def test_a_read_only_open_leaves_no_wal_or_shm(small_store):
    folder = small_store.parent
    before = sorted(p.name for p in folder.iterdir())
    for _ in range(2):
        with ExperimentStore.open_readonly(small_store) as store:
            assert store.models()
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (folder / "store.sqlite-wal").exists() and not (folder / "store.sqlite-shm").exists()


def test_failures_blamed_on_the_set_up_are_taken_back_exactly(tmp_path):
    """Six good models, then a caffe that fails every net the same way: after the breaker trips,
    the Q-table and the samples are those of the six good models alone, and the blamed models are
    deferred, with no reward, and trained first when the search is run again."""
    calls = {"n": 0}

    def then_broken(p):
        calls["n"] += 1
        if calls["n"] <= 6:
            return synthetic.synthetic_result(p.arch)
        return TrainResult("failed", failure="rejected", message="caffe refused the net: Check failed: 7 vs 3")

    broken = tmp_path / "broken.sqlite"
    with pytest.raises(InfrastructureError, match="not kept as rewards"):
        _search(broken, then_broken, breaker=CircuitBreaker(4))
    reference = tmp_path / "reference.sqlite"
    _search(reference, lambda p: synthetic.synthetic_result(p.arch), max_models=6)
    assert _q_table(broken) == _q_table(reference)
    assert _samples(broken) == _samples(reference)
    with ExperimentStore.open_readonly(broken) as store:
        deferred = store.models("deferred")
        assert len(deferred) == 4 and all(m.reward is None for m in deferred)
        assert not [m for m in store.models() if m.metrics.get("failure") == "rejected" and m.reward is not None]
        assert store.trained_per_epsilon() == {1.0: 6}
    # the next run, with a working set-up, trains the four first and counts them
    seen = []

    def healthy(p):
        seen.append(p.arch)
        return synthetic.synthetic_result(p.arch)

    _search(broken, healthy, max_models=4)
    assert seen == [m.arch for m in deferred]
    with ExperimentStore.open_readonly(broken) as store:
        assert not store.models("deferred") and store.trained_per_epsilon() == {1.0: 10}


def test_a_model_set_aside_is_not_rewarded_and_not_sampled_as_trained(tmp_path):
    """A caffe killed by a signal in every attempt: no reward, no sample, no schedule step."""
    path = tmp_path / "store.sqlite"
    sigsegv = TrainResult("deferred", failure="crashed", message="caffe was killed by signal 11 in all 3 attempts")
    calls = {"n": 0}

    def every_third(p):
        calls["n"] += 1
        return sigsegv if calls["n"] % 3 == 0 else synthetic.synthetic_result(p.arch)

    _search(path, every_third, max_models=9)  # --max-models counts trained models: 9 trained, 4 set aside
    with ExperimentStore.open_readonly(path) as store:
        deferred = store.models("deferred")
        assert len(deferred) == 4 and all(m.reward is None for m in deferred)
        sampled = {s["arch"] for s in store.samples() if s["reward"] is not None}
        assert not sampled & {m.arch for m in deferred}
        assert sum(store.trained_per_epsilon().values()) == 9


def test_export_takes_weights_only_from_a_folder_whose_identity_is_the_models(tmp_path):
    from metaqnn.export import ANOTHER_MODEL, result_json_check

    arch = "[C(8,3,1), SM(10)]"
    folder = tmp_path / "00005"
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({"architecture": arch}))
    legacy = result_json_check(arch, 5, "exp-a")(folder)
    assert legacy is None  # a folder from before identity.json: its result.json decides
    identity = {"architecture": arch, "model": 5, "experiment": "exp-b"}
    (folder / "identity.json").write_text(json.dumps(identity))
    (folder / "result.json").write_text(json.dumps({"architecture": arch, "identity": identity}))
    assert ANOTHER_MODEL in (result_json_check(arch, 5, "exp-a")(folder) or "")
    assert ANOTHER_MODEL in (result_json_check(arch, 6, "exp-b")(folder) or "")
    assert result_json_check(arch, 5, "exp-b")(folder) is None
    (folder / "identity.json").unlink()  # the result says the folder had one: deleted is not legacy
    assert "identity.json is missing" in (result_json_check(arch, 5, "exp-b")(folder) or "")
    other = dict(identity, model=4)  # a result copied in from another model's folder
    (folder / "identity.json").write_text(json.dumps(identity))
    (folder / "result.json").write_text(json.dumps({"architecture": arch, "identity": other}))
    assert ANOTHER_MODEL in (result_json_check(arch, 5, "exp-b")(folder) or "")


def test_a_lost_experiment_id_is_damage_when_model_folders_name_one(tmp_path, small_store):
    from metaqnn.experiment import experiment_id

    with ExperimentStore.open(small_store, synthetic.config().to_dict()) as store:
        assert experiment_id(store, tmp_path) == store.experiment_id() != ""
    with sqlite3.connect(small_store) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'experiment_id'")
    (tmp_path / "models" / "00001").mkdir(parents=True)
    (tmp_path / "models" / "00001" / "identity.json").write_text("{}")
    with ExperimentStore.open(small_store, synthetic.config().to_dict()) as store, pytest.raises(
        StoreError, match="no experiment id"
    ):
        experiment_id(store, tmp_path)


def test_an_empty_store_beside_model_folders_is_not_an_experiment(tmp_path):
    from metaqnn.exp_path import PathError, check_experiment_dir

    killed = tmp_path / "killed"  # a search killed while creating its store: resumable
    killed.mkdir()
    (killed / "store.sqlite").write_bytes(b"")
    assert check_experiment_dir(killed) == killed
    emptied = tmp_path / "emptied"  # a store emptied under its model folders: never a new experiment
    (emptied / "models" / "00001").mkdir(parents=True)
    (emptied / "store.sqlite").write_bytes(b"")
    with pytest.raises(PathError, match="or an empty one"):
        check_experiment_dir(emptied)
