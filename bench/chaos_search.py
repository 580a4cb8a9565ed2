"""Chaos check (issue 11): kill a digits search with SIGKILL at random moments, resume it to the
end, and compare with an uninterrupted search of the same seed.

Kills: the search process at a random time (anywhere: training, live pruning, commit), at the
named kill points of :mod:`metaqnn.faults` (``trained``, ``result-written``, ``pruning``, ``pruned``,
``commit``: the commit window and the final pruning), and the caffe child itself.  After every
kill of the search, no caffe of the experiment may be alive 0.2 s later.

Checked at the end, for the interrupted experiment:
  * the same number of unique models as the uninterrupted run, nothing left running;
  * every finished model trained to completion once (one full run reaching 'Optimization Done');
  * every finished model has its best weights (and only them) and a complete per-epoch curve
    (``history.test``: every epoch exactly once);
  * each reward equals the maximum of the model's recorded validation accuracies (its logs);
  * the Q-table equals a replay of the stored sample/reward history with a fresh agent.
Rewards that differ from the uninterrupted run are counted, with how many of those models were
interrupted mid-training (Caffe restarts its data cursor on resume: docs/deviations.md).

    .venv/bin/python bench/chaos_search.py --kills 24 --out /tmp/chaos     (make chaos)
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaqnn.caffe.logparse import split_runs  # noqa: E402
from metaqnn.config import stored_config  # noqa: E402
from metaqnn.trainer import _accuracy_curve, read_runs  # noqa: E402
from qagent.agent import Agent  # noqa: E402
from qagent.store import ExperimentStore  # noqa: E402

# 48 unique models of up to 3 layers: minutes on 2 cores, and enough work that the search is still
# running at the 24th kill (resumes redo less work since issue 24: 16 or 24 models ended after 13)
STEPS = [[1.0, 24], [0.5, 12], [0.1, 12]]
SETTINGS = ["--set", f"schedule.steps={json.dumps(STEPS)}", "--set", "space.max_depth=3"]
TOTAL = sum(n for _, n in STEPS)
POINTS = ["trained", "result-written", "pruning", "pruned", "commit"]


def search_argv(exp: Path, data: Path, seed: int) -> List[str]:
    base = [sys.executable, "-m", "metaqnn", "search", "--exp", str(exp), "--data-dir", str(data)]
    return [*base, "--seed", str(seed), *SETTINGS]


def env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def caffes_of(exp: Path) -> List[int]:
    """Pids of caffe processes working in this experiment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        # the caffe binary itself (argv[0]), not the search (python -m metaqnn) nor a folder named
        # metaqnn-...: /tmp/metaqnn-chaos, the default --out, is in every caffe's command line
        program = os.path.basename(cmd.split(b"\0", 1)[0])
        if program.startswith(b"caffe") and str(exp).encode() in cmd and ") Z" not in stat:
            found.append(int(proc.name))
    return found


def finished(exp: Path) -> bool:
    store = exp / "store.sqlite"
    if not store.exists():
        return False
    with ExperimentStore.open_readonly(store) as s:
        done = sum(1 for m in s.models() if m.status in ("done", "failed"))
        return done >= TOTAL and not s.running()


def chaos(exp: Path, data: Path, seed: int, kills: int, caffe_kills: int, rng: random.Random) -> Dict[str, Any]:
    """Kill the search ``kills`` times (and caffe ``caffe_kills`` times), then let it finish."""
    plan = ["time"] * kills
    points = [POINTS[n % len(POINTS)] for n in range(min(kills, 2 * len(POINTS)))]  # each point twice
    for i, point in zip(rng.sample(range(kills), k=len(points)), points):
        plan[i] = point
    times = [i for i, k in enumerate(plan) if k == "time"]
    for i in rng.sample(times, k=min(caffe_kills, len(times))):
        plan[i] = "caffe"
    figures: Dict[str, Any] = {"search_kills": 0, "point_kills": {}, "caffe_kills": 0, "caffe_survivors": 0}
    for kind in plan:
        if finished(exp):
            break
        extra = {}
        if kind in POINTS:
            point = kind
            extra["METAQNN_KILL_AT"] = point
        proc = subprocess.Popen(
            search_argv(exp, data, seed), cwd=ROOT, env=env(extra), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            if kind in POINTS:  # a point not reached in time (a failed model is not pruned): killed anyway
                rc = proc.wait(timeout=rng.uniform(15.0, 40.0))
                if rc == -signal.SIGKILL:
                    figures["point_kills"][point] = figures["point_kills"].get(point, 0) + 1
                    figures["search_kills"] += 1
                    figures["caffe_survivors"] += _survivors(exp)
                continue
            if kind == "caffe":
                deadline = time.monotonic() + rng.uniform(4.0, 10.0)
                while time.monotonic() < deadline and proc.poll() is None and not caffes_of(exp):
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.5))
                for pid in caffes_of(exp):
                    os.kill(pid, signal.SIGKILL)
                    figures["caffe_kills"] += 1
            proc.wait(timeout=rng.uniform(1.0, 6.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            figures["search_kills"] += 1
            figures["caffe_survivors"] += _survivors(exp)
    final = subprocess.run(search_argv(exp, data, seed), cwd=ROOT, env=env(), capture_output=True, text=True)
    if final.returncode != 0:
        raise SystemExit(f"the resumed search failed:\n{final.stdout}\n{final.stderr}")
    return figures


def _survivors(exp: Path) -> int:
    time.sleep(0.2)
    left = caffes_of(exp)
    for pid in left:  # do not let one survivor spoil the next run
        os.kill(pid, signal.SIGKILL)
    return len(left)


def full_runs_done(folder: Path) -> int:
    """Caffe runs of the full training that reached 'Optimization Done'."""
    n = 0
    for log in folder.glob("train*.log"):
        for _, lines in split_runs(log.read_text(errors="replace").splitlines()):
            n += any("Optimization Done" in line for line in lines)
    return n


def interrupted(folder: Path) -> bool:
    """Was the full training of this model split over more than one caffe run?"""
    runs = sum(len(split_runs(p.read_text(errors="replace").splitlines())) for p in folder.glob("train*.log"))
    return runs > 1


def replayed_q_matches(store: ExperimentStore) -> Tuple[bool, int]:
    """Replay the stored samples with a fresh agent (same seed): the same proposals, the stored
    rewards; the Q-table must come out equal to the stored one.  Returns (equal, samples)."""
    config = stored_config(store.config())
    agent = Agent(config.space, config.schedule, config.agent)
    n = 0
    for s in store.samples():
        p = agent.propose()
        if p.arch != s["arch"]:
            return False, n
        if s["reward"] is None:
            agent.skip(p.arch)
        else:
            agent.observe(p.arch, p.encoded, s["reward"], p.epsilon)
        n += 1
    stored = Agent(config.space, config.schedule, config.agent)
    store.load_agent(stored)
    mine = {agent.q.states[i].key(): list(agent.q.values[i]) for i in range(len(agent.q))}
    theirs = {stored.q.states[i].key(): list(stored.q.values[i]) for i in range(len(stored.q))}
    return mine == theirs, n


def check(exp: Path, ipe: int, epochs: int) -> Dict[str, Any]:
    problems: List[str] = []
    with ExperimentStore.open_readonly(exp / "store.sqlite") as store:
        models = store.models()
        q_ok, samples = replayed_q_matches(store)
    if not q_ok:
        problems.append("the Q-table differs from a replay of the stored rewards")
    expected = [ipe * (k + 1) for k in range(epochs)]
    for m in models:
        folder = exp / "models" / f"{m.id:05d}"
        if m.status == "running":
            problems.append(f"#{m.id} still running")
        if m.status != "done":
            continue
        if full_runs_done(folder) != 1:
            problems.append(f"#{m.id} trained to completion {full_runs_done(folder)} times")
        best = m.metrics.get("best_iteration")
        left = sorted(p.name for p in (folder / "snapshots").iterdir())
        if left != [f"model_iter_{best}.caffemodel"]:
            problems.append(f"#{m.id} snapshots {left}, best iteration {best}")
        rows = (folder / "history.test").read_text().splitlines()[1:]
        if [int(float(r.split(",")[0])) for r in rows] != expected:
            problems.append(f"#{m.id} history.test iterations {[r.split(',')[0] for r in rows]}")
        curve = _accuracy_curve(read_runs(folder, m.metrics.get("restarts", 0)))
        if [it for it, _ in curve] != expected or m.reward != max(acc for _, acc in curve):
            problems.append(f"#{m.id} reward {m.reward} vs logs {curve}")
    return {
        "models": len(models),
        "by_status": {s: sum(1 for m in models if m.status == s) for s in {m.status for m in models}},
        "samples": samples,
        "q_table_replays": q_ok,
        "problems": problems,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/metaqnn-chaos"))
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--kills", type=int, default=24, help="kills of the search process (>= 20)")
    ap.add_argument("--caffe-kills", type=int, default=3, help="of which first kill the caffe child")
    ap.add_argument("--rng", type=int, default=1, help="seed of the kill moments")
    args = ap.parse_args()
    out = args.out.resolve()
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    data = out / "data"
    from data_prep.prepare import PrepOptions, prepare

    manifest = prepare(PrepOptions("digits", validation_size=300), data, log=lambda _m: None)
    ipe = int(manifest["sets"]["train"]["count"]) // 32
    t0 = time.monotonic()
    ref = subprocess.run(search_argv(out / "ref", data, args.seed), cwd=ROOT, env=env(), capture_output=True, text=True)
    if ref.returncode != 0:
        raise SystemExit(f"the uninterrupted search failed:\n{ref.stdout}\n{ref.stderr}")
    t_ref = time.monotonic() - t0
    t1 = time.monotonic()
    figures = chaos(out / "chaos", data, args.seed, args.kills, args.caffe_kills, random.Random(args.rng))
    t_chaos = time.monotonic() - t1
    result = {"seed": args.seed, "uninterrupted_s": round(t_ref, 1), "chaos_s": round(t_chaos, 1), **figures}
    result["chaos"] = check(out / "chaos", ipe, 20)
    result["reference"] = check(out / "ref", ipe, 20)
    with ExperimentStore.open_readonly(out / "ref" / "store.sqlite") as a, ExperimentStore.open_readonly(
        out / "chaos" / "store.sqlite"
    ) as b:
        ref_models = {m.arch: m for m in a.models()}
        chaos_models = {m.arch: m for m in b.models()}
        same_samples = [s["arch"] for s in a.samples()] == [s["arch"] for s in b.samples()]
    differ = [arch for arch, m in chaos_models.items() if arch in ref_models and ref_models[arch].reward != m.reward]
    result["same_unique_models"] = len(ref_models) == len(chaos_models)
    result["same_architectures_sampled"] = same_samples
    result["rewards_differ"] = len(differ)
    result["rewards_differ_interrupted"] = sum(
        1 for arch in differ if interrupted(out / "chaos" / "models" / f"{chaos_models[arch].id:05d}")
    )
    result["interrupted_models"] = sum(
        1 for m in chaos_models.values() if interrupted(out / "chaos" / "models" / f"{m.id:05d}")
    )
    print(json.dumps(result, indent=1))
    (out / "chaos.json").write_text(json.dumps(result, indent=1))
    ok = (
        not result["chaos"]["problems"]
        and not result["reference"]["problems"]
        and result["chaos"]["q_table_replays"]
        and result["same_unique_models"]
        and result["caffe_survivors"] == 0
        and result["search_kills"] >= min(20, args.kills)
        and result["rewards_differ"] == result["rewards_differ_interrupted"]
    )
    print("chaos check:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
