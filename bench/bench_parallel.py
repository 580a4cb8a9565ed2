"""Concurrency of the search loop (issue 8): a trainer that only sleeps, no caffe.

For 2, 4 and 8 slots and 200 unique models, reports how busy the slots were (time spent training
/ (slots x wall time)) and the per-result overhead on the head (time the loop spends outside
waiting for results: sampling, 100 replays, the store transaction), against targets of >= 90%
and < 50 ms.

    .venv/bin/python bench/bench_parallel.py [--sleep 0.2]
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaqnn.config import build_config
from metaqnn.executors import LocalExecutor
from metaqnn.search import Progress, search_loop
from metaqnn.trainer import TrainResult
from qagent.agent import Agent
from qagent.store import ExperimentStore

SCHEDULE = "schedule.steps=[[1.0, 120], [0.5, 40], [0.1, 40]]"


class TimedExecutor(LocalExecutor):
    """Counts the time the head spends blocked in wait_any, and the results it receives."""

    waited = 0.0
    results = 0

    def wait_any(self):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = super().wait_any()
        self.waited += time.perf_counter() - t
        self.results += len(out)
        return out


def run(slots: int, sleep: float) -> None:
    cfg = build_config("svhn", [SCHEDULE])
    busy = [0.0]
    lock = threading.Lock()

    def train(p):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        time.sleep(sleep)
        with lock:
            busy[0] += time.perf_counter() - t
        return TrainResult("done", best_accuracy=0.1 + (hash(p.arch) % 850) / 1000)

    with tempfile.TemporaryDirectory() as tmp, ExperimentStore.open(Path(tmp) / "s.sqlite", cfg.to_dict()) as store:
        agent = Agent(cfg.space, cfg.schedule, cfg.agent)
        ex = TimedExecutor(train, slots)
        t0 = time.perf_counter()
        search_loop(agent, store, ex, lambda p, _id: p, Progress(agent, store, lambda _m: None))
        wall = time.perf_counter() - t0
        ex.close()
        models = len(store.models())
    head = wall - ex.waited
    print(
        f"slots {slots}: {models} models in {wall:.1f} s; slots busy {100 * busy[0] / (slots * wall):.1f} %; "
        f"head overhead {1000 * head / ex.results:.2f} ms per result ({agent.iteration} samples)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sleep", type=float, default=0.2)
    args = ap.parse_args()
    for slots in (2, 4, 8):
        run(slots, args.sleep)


if __name__ == "__main__":
    main()
