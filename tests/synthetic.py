"""A search with a synthetic deterministic reward instead of Caffe (agent + store + loop only).

Run as a script by the kill-and-resume tests: ``python tests/synthetic.py STORE [SLEEP [WORKERS]]``.
"""

import hashlib
import sys
import time
from pathlib import Path

from metaqnn.config import Config, build_config
from metaqnn.executors import InlineExecutor, LocalExecutor
from metaqnn.search import Progress, search_loop
from metaqnn.trainer import TrainResult
from qagent.agent import Agent, Proposal
from qagent.store import ExperimentStore

SCHEDULE = "schedule.steps=[[1.0, 40], [0.5, 20], [0.1, 20]]"


def synthetic_reward(arch: str) -> float:
    """A fixed pseudo-random accuracy in [0.1, 0.95] per architecture."""
    h = int(hashlib.sha256(arch.encode()).hexdigest()[:8], 16)
    return 0.1 + 0.85 * h / 0xFFFFFFFF


def synthetic_result(arch: str) -> TrainResult:
    r = synthetic_reward(arch)
    if r < 0.15:
        return TrainResult("failed", failure="no_learning", message="synthetic failure")
    return TrainResult("done", best_accuracy=r)


def config() -> Config:
    return build_config("svhn", [SCHEDULE])


def run(store_path: Path, sleep: float = 0.0, workers: int = 1) -> None:
    cfg = config()
    with ExperimentStore.open(store_path, cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        store.load_agent(agent)

        def train(p: Proposal) -> TrainResult:
            if sleep:
                time.sleep(sleep)
            return synthetic_result(p.arch)

        executor = InlineExecutor(train) if workers == 1 else LocalExecutor(train, workers)
        try:
            search_loop(agent, store, executor, lambda p, _id: p, Progress(agent, store, lambda _m: None))
        finally:
            executor.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    run(Path(args[0]), float(args[1]) if len(args) > 1 else 0.0, int(args[2]) if len(args) > 2 else 1)
