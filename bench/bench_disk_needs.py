"""The disk a paper-scale search needs, by setting (issue 25), from the parameter counts.

The agent walks a preset's whole epsilon schedule (Table 2: 2,700 unique models for SVHN) with a
synthetic deterministic reward and no training, as bench_agent.py does; every unique
architecture's parameter count P (qagent.costs.arch_cost, the same count Caffe's blobs have)
gives its files, measured on real Caffe 1.0 snapshots of digits models:

    weights (.caffemodel)   4 P bytes + ~1 KB        solver state (.solverstate, Adam)   8 P bytes

What a committed model keeps (metaqnn.trainer.final_prune, metaqnn.snapshot_policy):

    finished                         its best weights                              W
    failed                           nothing (before issue 25: a failed probe kept W + S)
    stopped early, keep_stopped=all  best weights + the snapshot to finish from   2 W + S (at most)
    keep_solverstate = false         best weights + the finish weights            2 W
    within_reach / none              (outside reach) its best weights               W

Which models fail or are stopped cannot come from a synthetic reward, so it is drawn at the
fractions given (defaults: 402 of 2,700 failed in the issue's SVHN dry run; 75% stopped is what
the README's 3.1x fewer epochs implies with checkpoints 2, 5, 10), the same models for every
setting (seeded).  Logs and CSV curves (well under 1 MB per model) are left out; add the
trainings in flight (each up to 2 W + 2 S while it runs).

    .venv/bin/python bench/bench_disk_needs.py [--preset svhn cifar10 mnist] [--failed 0.149] [--stopped 0.75]
"""

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaqnn.config import build_config
from qagent.agent import Agent
from qagent.arch import parse_architecture
from qagent.costs import arch_cost

GB = 1e9


def reward(arch: str) -> float:
    return 0.1 + 0.85 * int(hashlib.sha256(arch.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def unique_models(preset: str) -> List[str]:
    """The architectures a whole schedule trains, in order (duplicates answered from memory)."""
    cfg = build_config(preset)
    agent = Agent(cfg.space, cfg.schedule, cfg.agent)
    seen: List[str] = []
    while not agent.done:
        p = agent.propose()
        if p.known_reward is not None:
            agent.observe(p.arch, p.encoded, p.known_reward, p.epsilon)
        else:
            agent.observe(p.arch, p.encoded, reward(p.arch), p.epsilon)
            seen.append(p.arch)
    return seen


def needs(preset: str, failed: float, stopped: float, seed: int) -> Dict[str, object]:
    cfg = build_config(preset)
    t0 = time.perf_counter()
    archs = unique_models(preset)
    params = [
        arch_cost(parse_architecture(a), cfg.space.image_size, cfg.dataset.channels, cfg.space.num_classes).params
        for a in archs
    ]
    rng = random.Random(seed)
    fate = [
        "failed" if r < failed else "stopped" if r < failed + stopped else "done" for r in (rng.random() for _ in archs)
    ]
    w = [4 * p + 1100 for p in params]
    s = [8 * p for p in params]

    def total(kept: Dict[str, str]) -> float:
        per = {
            "W": lambda i: w[i],
            "0": lambda i: 0,
            "W+S": lambda i: w[i] + s[i],
            "2W+S": lambda i: 2 * w[i] + s[i],
            "2W": lambda i: 2 * w[i],
        }
        kept = {"stopped": kept["done"], **kept}  # without early stopping, no model is stopped
        return sum(per[kept[fate[i]]](i) for i in range(len(archs))) / GB

    ordered = sorted(params)
    return {
        "preset": preset,
        "models": len(archs),
        "walk_seconds": round(time.perf_counter() - t0, 1),
        "params_median": ordered[len(ordered) // 2],
        "params_mean": round(sum(params) / len(params)),
        "params_max": ordered[-1],
        "weights_all_models_gb": round(sum(w) / GB, 1),
        "failed": fate.count("failed"),
        "stopped": fate.count("stopped"),
        "settings_gb": {
            "paper protocol, before issue 25 (failed probes kept W+S)": round(total({"done": "W", "failed": "W+S"}), 1),
            "paper protocol (no early stopping)": round(total({"done": "W", "failed": "0"}), 1),
            "early stopping, keep_stopped = all (default)": round(
                total({"done": "W", "failed": "0", "stopped": "2W+S"}), 1
            ),
            "early stopping, keep_solverstate = false": round(total({"done": "W", "failed": "0", "stopped": "2W"}), 1),
            "early stopping, keep_stopped = none (or outside reach)": round(
                total({"done": "W", "failed": "0", "stopped": "W"}), 1
            ),
        },
        "in_flight_gb_per_training_max": round(max(2 * a + 2 * b for a, b in zip(w, s)) / GB, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", default=["svhn", "cifar10", "mnist"])
    ap.add_argument("--failed", type=float, default=402 / 2700, help="fraction of models that fail")
    ap.add_argument("--stopped", type=float, default=0.75, help="fraction stopped early (with early stopping)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    rows = []
    for preset in args.preset:
        r = needs(preset, args.failed, args.stopped, args.seed)
        rows.append(r)
        print(
            f"{preset}: {r['models']} unique models (walk {r['walk_seconds']} s), params median {r['params_median']:,} "
            f"mean {r['params_mean']:,} max {r['params_max']:,}; {r['failed']} failed, {r['stopped']} stopped if early "
            f"stopping; one training in flight holds up to {r['in_flight_gb_per_training_max']} GB"
        )
        for name, gb in r["settings_gb"].items():  # type: ignore[attr-defined]
            print(f"  {gb:8.1f} GB  {name}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
