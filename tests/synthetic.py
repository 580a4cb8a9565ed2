"""A search with a synthetic deterministic reward instead of Caffe (agent + store + loop only).

Run as a script by the kill-and-resume tests: ``python tests/synthetic.py STORE [SLEEP]``.
"""

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Dict

from metaqnn.config import agent_config_of, build_config, schedule_of, space_of
from metaqnn.search import Progress, search_loop
from metaqnn.trainer import TrainResult
from qagent.agent import Agent, Proposal
from qagent.store import ExperimentStore

SCHEDULE = "schedule.steps=[[1.0, 40], [0.5, 20], [0.1, 20]]"


def synthetic_reward(arch: str) -> float:
    """A fixed pseudo-random accuracy in [0.1, 0.95] per architecture."""
    h = int(hashlib.sha256(arch.encode()).hexdigest()[:8], 16)
    return 0.1 + 0.85 * h / 0xFFFFFFFF


def config() -> Dict[str, Any]:
    return build_config("svhn", [SCHEDULE])


def run(store_path: Path, sleep: float = 0.0) -> None:
    cfg = config()
    with ExperimentStore.open(store_path, cfg) as store:
        agent = Agent(space_of(cfg), schedule_of(cfg), agent_config_of(cfg))
        store.load_agent(agent)

        def train(p: Proposal, model_id: int) -> TrainResult:
            if sleep:
                time.sleep(sleep)
            r = synthetic_reward(p.arch)
            if r < 0.15:
                return TrainResult("failed", failure="no_learning", message="synthetic failure")
            return TrainResult("done", best_accuracy=r)

        search_loop(agent, store, train, Progress(agent, store, lambda _m: None))


if __name__ == "__main__":
    run(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
