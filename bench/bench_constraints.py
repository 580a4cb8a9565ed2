"""Searching under a budget on the digits demo (issue 22's acceptance), from three real searches.

    .venv/bin/python bench/bench_constraints.py --out build/bench-constraints [--seed 0]

1. ``base``: the unconstrained search, every model timed (``constraints.measure_latency``);
2. ``params``: the same seed with ``max_params`` at the 25th percentile of base's trained models;
3. ``mnas``: the same seed with ``reward = "mnas"`` on latency (CPU), target the median latency of
   base's trained models, MnasNet's soft alpha = beta = -0.07.
Each search is resumed, not redone, when its folder exists.  Printed: models trained under the
budget and the best accuracy among them, per run; the median latency of the models at epsilon
0.1 and the best accuracy within 2x the fastest model's latency, base against mnas.
"""

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

ROOT = Path(__file__).resolve().parent.parent


def search(exp: Path, seed: int, sets: Sequence[str]) -> None:
    argv = [sys.executable, "-m", "metaqnn", "search", "--dataset", "digits", "--exp", str(exp), "--seed", str(seed)]
    for s in sets:
        argv += ["--set", s]
    print("$", " ".join(argv[1:]), flush=True)
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def trained(exp: Path) -> List[Dict[str, Any]]:
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM models WHERE status IN ('done', 'failed') ORDER BY id").fetchall()
    out = []
    for r in rows:
        m = json.loads(r["metrics"])
        accuracy = m.get("accuracy", r["reward"]) if r["status"] == "done" else None
        latency = (m.get("latency") or {}).get("forward_ms")
        out.append({"id": r["id"], "eps": r["epsilon"], "acc": accuracy, "params": m["params"], "lat": latency})
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def best(models: Sequence[Dict[str, Any]]) -> Any:
    accs = [m["acc"] for m in models if m["acc"] is not None]
    return max(accs) if accs else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-constraints")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base, params, mnas = (args.out / n for n in ("base", "params", "mnas"))
    search(base, args.seed, ["constraints.measure_latency=true"])
    b = trained(base)
    budget = int(percentile([m["params"] for m in b], 0.25))
    search(params, args.seed, [f"constraints.max_params={budget}", "constraints.measure_latency=true"])
    target = statistics.median(m["lat"] for m in b if m["lat"] is not None)
    search(mnas, args.seed, ["constraints.reward=mnas", "constraints.cost=latency", f"constraints.target={target!r}"])
    p, n = trained(params), trained(mnas)
    under_b = [m for m in b if m["params"] <= budget]
    print(f"\nmax_params = {budget:,} (25th percentile of {len(b)} trained models of the unconstrained run)")
    print(
        f"  unconstrained: {len(under_b)} of {len(b)} trained models under the budget, best accuracy under it {best(under_b)}"
    )
    print(
        f"  constrained:   {len(p)} trained models, largest {max(m['params'] for m in p):,} params, best accuracy {best(p)}"
    )
    print(f"\nmnas on CPU latency, target {target:.4f} ms (median of the unconstrained run), alpha = beta = -0.07")
    for name, run in (("unconstrained", b), ("mnas", n)):
        last = [m["lat"] for m in run if m["eps"] == 0.1 and m["lat"] is not None]
        fastest = min(m["lat"] for m in run if m["lat"] is not None)
        within = [m for m in run if m["lat"] is not None and m["lat"] <= 2 * fastest]
        print(
            f"  {name:13s} median latency at epsilon 0.1 {statistics.median(last):.4f} ms ({len(last)} models); "
            f"fastest {fastest:.4f} ms; best accuracy within 2x of it {best(within)} ({len(within)} models)"
        )


if __name__ == "__main__":
    main()
