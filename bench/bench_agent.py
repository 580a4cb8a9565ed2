"""Agent-side cost of the paper's full schedule (issue 3): 2,700 unique models, 100 replays each,
a synthetic deterministic reward and no training, the SQLite experiment store included.

Target (2-core machine): under 10 s in total, with a per-model cost that does not grow with the
replay memory (first vs last 10% of the unique models reported separately).

    .venv/bin/python bench/bench_agent.py [--preset svhn] [--max-params N] [--max-macs N]

With a budget (issue 22) the agent's walk is barred (qagent.costs.Barrier): the barrier's exact
cheapest-completion table is built first (reported apart), then every step asks it.
"""

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaqnn.config import build_config
from qagent.agent import Agent
from qagent.store import ExperimentStore


def reward(arch: str) -> float:
    return 0.1 + 0.85 * int(hashlib.sha256(arch.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="svhn")
    ap.add_argument("--max-params", type=int, default=None)
    ap.add_argument("--max-macs", type=int, default=None)
    args = ap.parse_args()
    cfg = build_config(args.preset)
    barrier = None
    if args.max_params or args.max_macs:
        from qagent.costs import Barrier, Budget

        barrier = Barrier(cfg.space, cfg.dataset.channels, Budget(args.max_params, args.max_macs))
        t = time.perf_counter()
        front = barrier.cheapest()
        print(
            f"barrier ({args.max_params} params, {args.max_macs} MACs): {len(barrier._fronts)} positions, "
            f"cheapest {front[:1]}, built in {time.perf_counter() - t:.2f} s"
        )
    agent = Agent(cfg.space, cfg.schedule, cfg.agent, barrier)
    total_models = agent.schedule.total
    marks = []  # time at each new unique model
    iter_marks = []  # (time, transitions replayed so far) at each iteration
    tmp = tempfile.mkdtemp(prefix="bench-agent-")
    with ExperimentStore.open(Path(tmp) / "store.sqlite", cfg.to_dict()) as store:
        t0 = time.perf_counter()
        iterations = 0
        while not agent.done:
            p = agent.propose()
            if p.known_reward is not None:
                agent.observe(p.arch, p.encoded, p.known_reward, p.epsilon)
                store.record_result(agent, p, "duplicate", p.known_reward)
            else:
                store.begin_model(agent, p)
                r = reward(p.arch)
                agent.observe(p.arch, p.encoded, r, p.epsilon)
                store.record_result(agent, p, "done", r, {"best_accuracy": r})
                marks.append(time.perf_counter())
            iterations += 1
            iter_marks.append(time.perf_counter())
        total = time.perf_counter() - t0
    tenth = total_models // 10
    first = marks[tenth - 1] - t0
    last = marks[-1] - marks[-tenth - 1]
    print(
        f"preset {args.preset}: {total_models} unique models, {iterations} iterations (duplicates included), "
        f"{len(agent.replay)} replay entries, {len(agent.q)} Q-states"
    )
    print(f"first 10% of models: {first:.2f} s ({1000 * first / tenth:.2f} ms/model)")
    print(f"last 10% of models:  {last:.2f} s ({1000 * last / tenth:.2f} ms/model)")
    n = len(iter_marks) // 10
    a = iter_marks[n - 1] - t0
    b = iter_marks[-1] - iter_marks[-n - 1]
    lengths = [len(enc) for enc, _ in agent.replay]
    early = sum(lengths[:n]) / n  # sampled trajectory lengths in that tenth
    late = sum(lengths[-n:]) / n
    print(f"first 10% of iterations: {1000 * a / n:.3f} ms/iteration, trajectories of {early:.1f} layers on average")
    print(f"last 10% of iterations:  {1000 * b / n:.3f} ms/iteration, trajectories of {late:.1f} layers on average")
    print(f"total: {total:.2f} s")
    # Opening the paper-scale store: the integrity checks (issue 24) run at every open; target < 0.5 s each.
    path = Path(tmp) / "store.sqlite"
    t = time.perf_counter()
    with ExperimentStore.open_readonly(path) as ro:
        ro.models()
    t_ro = time.perf_counter() - t
    t = time.perf_counter()
    with ExperimentStore.open(path, cfg.to_dict()):
        pass
    t_rw = time.perf_counter() - t
    print(f"open with integrity checks: read-only {1000 * t_ro:.0f} ms, writer {1000 * t_rw:.0f} ms")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
