"""Early stopping end to end on the real digits search (issue 17): real Caffe, same seed, with and
without a stopping rule.

For each seed: the search without early stopping (the paper's protocol), then one search per rule
(``svr``: the follow-up paper's predictor; ``median``: the median stopping rule), each from
scratch in its own experiment, timed in the same run.  After a search with a rule, the models
its own ranking puts in the top 5 (predicted rewards included) that were stopped are finished to
full training (``metaqnn finish``), so that every figure below is a measured accuracy:

* caffe training epochs of the search, probes included (``epochs_trained``; finishing counted
  apart), and wall time, both as ratios baseline / with the rule;
* the best model's true accuracy (the best measured accuracy of the run after finishing, and
  the true accuracy of the run's own top-1), against the baseline's best;
* the mean true accuracy of the run's top 5, against the baseline's top-5 mean.

    .venv/bin/python bench/bench_early_stop_search.py --seeds 1 2 3 --out build/bench-early-stop
    (about 3 x (7 + 2 x 3) minutes on 2 cores; --reuse-baselines DIR takes base-s<seed> from DIR)
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaqnn.early_stop import epochs_trained  # noqa: E402
from qagent.status import ModelStatus  # noqa: E402
from qagent.store import ExperimentStore  # noqa: E402

GOAL_RATIO, GOAL_BEST, GOAL_TOP5 = 2.5, 0.005, 0.01


def run_search(exp: Path, seed: int, sets: Sequence[str], log: Path) -> None:
    """A whole digits search in a subprocess (a finished experiment is only read again)."""
    argv = [sys.executable, "-m", "metaqnn", "search", "--dataset", "digits", "--seed", str(seed), "--exp", str(exp)]
    for s in sets:
        argv += ["--set", s]
    with open(log, "w") as fh:
        subprocess.run(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)


def search_wall(exp: Path) -> float:
    """Seconds from the first model's start to the last result's commit: the search loop alone,
    measured the same way for every run (data preparation and the caffe preflight left out)."""
    ms = [m for m in models(exp) if m.started is not None and m.finished is not None]
    return max(m.finished for m in ms) - min(m.started for m in ms)


def models(exp: Path) -> List[Any]:
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        return store.models()


def search_cost(exp: Path) -> Dict[str, Any]:
    """Epochs the search trained (before any finishing) and how its models ended."""
    ms = models(exp)
    counted = [m for m in ms if m.status != ModelStatus.DUPLICATE and m.metrics]
    return {
        "epochs": sum(epochs_trained(m.metrics) for m in counted),
        "models": len(counted),
        "stopped": sum(m.status == ModelStatus.STOPPED for m in ms),
        "failed": sum(m.status == ModelStatus.FAILED for m in ms),
    }


def ranking(exp: Path, k: int) -> List[int]:
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        return [m.id for m in store.top_models(k, include_predicted=True)]


def finish(exp: Path, ids: Sequence[int], log: Path) -> float:
    if not ids:
        return 0.0
    argv = [sys.executable, "-m", "metaqnn", "finish", "--exp", str(exp)]
    for i in ids:
        argv += ["--model", str(i)]
    t0 = time.monotonic()
    with open(log, "w") as fh:
        subprocess.run(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - t0


def quality(exp: Path, top_ids: Sequence[int]) -> Dict[str, Any]:
    """Measured accuracies after finishing: the best of the run, its top 1 and its top-5 mean."""
    by_id = {m.id: m for m in models(exp)}
    measured = [m.reward for m in by_id.values() if m.status == ModelStatus.DONE and m.reward is not None]
    top = [by_id[i] for i in top_ids]
    unmeasured = [m.id for m in top if m.status != ModelStatus.DONE]
    return {
        "best": max(measured),
        "top1": top[0].reward if top and top[0].status == ModelStatus.DONE else None,
        "top5_mean": statistics.mean(m.reward for m in top if m.status == ModelStatus.DONE),
        "top5": [(m.id, m.reward, m.arch) for m in top],
        "top5_unmeasured": unmeasured,
    }


RULE_SETS = {
    "svr": ["early_stop.rule='svr'"],
    "median": ["early_stop.rule='median'"],
}


def bench_seed(seed: int, rules: Sequence[str], out: Path, extra: Sequence[str], reuse: Optional[Path]) -> Dict:
    row: Dict[str, Any] = {"seed": seed}
    base = (reuse or out) / f"base-s{seed}"
    if reuse is None:
        run_search(base, seed, [], out / f"base-s{seed}.log")
    top_base = ranking(base, 5)
    wall = search_wall(base)
    row["baseline"] = {"wall": wall, **search_cost(base), **quality(base, top_base)}
    print(f"seed {seed} baseline: {row['baseline']['epochs']:.0f} epochs, {wall:.0f} s, "
          f"best {row['baseline']['best']:.4f}, top-5 mean {row['baseline']['top5_mean']:.4f}", flush=True)  # fmt: skip
    for rule in rules:
        exp = out / f"{rule}-s{seed}"
        run_search(exp, seed, [*RULE_SETS[rule], *extra], out / f"{rule}-s{seed}.log")
        wall, cost = search_wall(exp), search_cost(exp)  # before finishing rewrites some models
        top = ranking(exp, 5)
        stopped_top = [m.id for m in models(exp) if m.id in top and m.status == ModelStatus.STOPPED]
        finish_wall = finish(exp, stopped_top, out / f"{rule}-s{seed}-finish.log")
        q = quality(exp, top)
        b = row["baseline"]
        r = {
            "wall": wall,
            **cost,
            **q,
            "finished": stopped_top,
            "finish_wall": finish_wall,
            "epoch_ratio": b["epochs"] / cost["epochs"],
            "wall_ratio": b["wall"] / wall,
            "best_drop": b["best"] - q["best"],
            "top1_drop": None if q["top1"] is None else b["best"] - q["top1"],
            "top5_drop": b["top5_mean"] - q["top5_mean"],
        }
        r["meets_goal"] = (
            r["epoch_ratio"] >= GOAL_RATIO and r["best_drop"] <= GOAL_BEST + 1e-9 and r["top5_drop"] <= GOAL_TOP5 + 1e-9
        )
        row[rule] = r
        print(
            f"seed {seed} {rule}: {cost['epochs']:.0f} epochs ({r['epoch_ratio']:.2f}x fewer), wall {wall:.0f} s "
            f"({r['wall_ratio']:.2f}x), {cost['stopped']} stopped, best {q['best']:.4f} "
            f"({-100 * r['best_drop']:+.2f} pts), top-1 {q['top1']}, top-5 mean {q['top5_mean']:.4f} "
            f"({-100 * r['top5_drop']:+.2f} pts), finished {len(stopped_top)} in {finish_wall:.0f} s",
            flush=True,
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rules", nargs="+", default=["svr", "median"], choices=sorted(RULE_SETS))
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-early-stop")
    ap.add_argument("--set", action="append", default=[], help="extra override for the runs with a rule")
    ap.add_argument("--reuse-baselines", type=Path, default=None, help="folder with base-s<seed> experiments")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(bench_seed(seed, args.rules, args.out.resolve(), args.set, args.reuse_baselines))
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\nrule    seed  epochs ratio  wall ratio  best (pts)  top-5 mean (pts)  goal")
    for row in rows:
        for rule in args.rules:
            r = row[rule]
            print(
                f"{rule:7s} {row['seed']:4d}  {r['epoch_ratio']:12.2f}  {r['wall_ratio']:10.2f}  "
                f"{-100 * r['best_drop']:+10.2f}  {-100 * r['top5_drop']:+16.2f}  {'yes' if r['meets_goal'] else 'no'}"
            )


if __name__ == "__main__":
    main()
