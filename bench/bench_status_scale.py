"""`metaqnn status` on a paper-scale experiment: 2,700 committed models with their folders (issue 25).

The store comes from the agent's whole SVHN schedule with a synthetic reward (bench_agent.py's),
every fourth model recorded as stopped early; each model folder gets the files a real one has
(prototxt, logs, CSV curves, result.json) and its snapshots as sparse files of their real sizes
(4 bytes per parameter, 8 for Adam's solver state), so the disk walk `status` does is the real
one without writing 130 GB.  Target: under 1 s, disk lines included.

    .venv/bin/python bench/bench_status_scale.py [--keep DIR]
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaqnn.config import build_config
from metaqnn.experiment import STORE_NAME, model_dir
from qagent.agent import Agent
from qagent.arch import parse_architecture
from qagent.costs import arch_cost
from qagent.store import ExperimentStore

ROOT = Path(__file__).resolve().parent.parent

FILES = ("net.prototxt", "solver.prototxt", "probe0.log", "probe0.train", "probe0.test", "train1.log")
FILES += ("train1.train", "train1.test", "history.train", "history.test", "state.json", "identity.json")


def reward(arch: str) -> float:
    return 0.1 + 0.85 * int(hashlib.sha256(arch.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


def build(exp: Path) -> int:
    cfg = build_config("svhn")
    agent = Agent(cfg.space, cfg.schedule, cfg.agent)
    exp.mkdir(parents=True)
    n = 0
    with ExperimentStore.open(exp / STORE_NAME, cfg.to_dict()) as store:
        while not agent.done:
            p = agent.propose()
            if p.known_reward is not None:
                agent.observe(p.arch, p.encoded, p.known_reward, p.epsilon)
                store.record_result(agent, p, "duplicate", p.known_reward)
                continue
            model_id = store.begin_model(agent, p)
            r = reward(p.arch)
            params = arch_cost(parse_architecture(p.arch), 32, 3, 10).params
            stopped = model_id % 4 == 0
            metrics = {"best_accuracy": r, "best_iteration": 2 * 529, "resume_iteration": 2 * 529 if stopped else None}
            folder = model_dir(exp, model_id)
            (folder / "snapshots").mkdir(parents=True)
            for name in FILES:
                (folder / name).write_text("x" * 2000)
            (folder / "result.json").write_text(json.dumps(metrics))
            sparse(folder / "snapshots" / "model_iter_1058.caffemodel", 4 * params + 1100)
            if stopped:
                sparse(folder / "snapshots" / "model_iter_1058.solverstate", 8 * params)
            agent.observe(p.arch, p.encoded, r, p.epsilon)
            store.record_result(agent, p, "stopped" if stopped else "done", r, metrics)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=Path, default=None, help="build the experiment here and keep it")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-status-"))
    exp = base / "exp"
    try:
        t = time.perf_counter()
        n = build(exp)
        print(f"built {n} model folders in {time.perf_counter() - t:.1f} s")
        times = []
        for _ in range(3):
            t = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "metaqnn", "status", "--exp", str(exp)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            times.append(time.perf_counter() - t)
        print("\n".join(line for line in out.stdout.splitlines() if "disk" in line or "GB" in line))
        print(
            f"status: {min(times):.2f} s best of 3 ({', '.join(f'{x:.2f}' for x in times)}), python start-up included"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
