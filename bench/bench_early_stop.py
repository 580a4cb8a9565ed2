"""Early stopping by performance prediction (issue 17): prediction quality on real learning curves,
and paper-scale searches replayed in simulation from those curves.

``quality``: out-of-sample predictions of the final accuracy from the first tau epochs, per
regressor and tau, on the fully trained models of real searches (never on curves used to fit).
Two splits: 5-fold over the pooled models of all stores, grouped by architecture (the same
architecture trained by two searches never sits on both sides), and cross-store (fit on one
search's models, test on every other search's).  Per split: R^2, Kendall tau, the calibration of
the Gaussian uncertainty (held-out truths inside mean +- 2 sigma, where sigma is the predictor's
own cross-validated residual spread on its training set) and, as a floor, the same figures for
"the final accuracy is the best accuracy seen so far".  Also: the fit time of one nu_svr
predictor (the default checkpoints, 5 folds) on ~100 and ~2,000 examples.

``simulate``: 2,700-model searches with the paper's Table 2 schedule (or the digits preset's
134) whose models are drawn from the recorded real models (failed ones included: they cost
their probe epochs), bootstrapped with noise (:func:`jitter`: each copy is the same curve
measured on another validation set of the same size); the drift toward better models as
epsilon falls is modelled (:func:`draw_search`, ``--drift top``) or taken from the real
searches' own epsilon phases (``--drift phase``).  The rule is applied online exactly as a
sequential search applies it (:func:`replay`).  Per rule, delta, warm-up, checkpoints and seed:
epochs with and without stopping (probes included) and their ratio, the ceiling of that ratio
(every model that learns stopped at the first checkpoint), whether the true best and how many of
the true top 5 were trained fully, and the true accuracy of the best and top 5 found.
``--target``/``--spread`` replay the same searches with the paper's predictor (final accuracy
as the target, one sigma per checkpoint) for comparison.

    .venv/bin/python bench/bench_early_stop.py quality --stores /work/runs/base-s{1,2,3}/store.sqlite \\
        --out /work/runs/bench-early-stop
    .venv/bin/python bench/bench_early_stop.py simulate --stores /work/runs/base-s{1,2,3}/store.sqlite \\
        --out /work/runs/bench-early-stop --seeds 0 1 2 --warmups 25 50 100 200
"""

import argparse
import json
import math
import sqlite3
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaqnn.config import build_config  # the digits preset's 134-model schedule
from metaqnn.early_stop.curves import Example, epochs_trained, example_from_metrics
from metaqnn.early_stop.predictor import REGRESSORS, SPREADS, TARGETS, fit_predictor
from metaqnn.early_stop.rules import EarlyStopConfig, PredictorCache, build_rule
from qagent.schedule import PAPER_SCHEDULE  # Table 2: 2,700 models

EPOCHS = 20  # the search protocol's training epochs
TAUS = (1, 2, 5, 10)  # the probe epoch, then 10%, 25%, 50% of 20 epochs


# ---------------------------------------------------------------- the recorded models


@dataclass(frozen=True)
class Recorded:
    """A model of a real search, as the simulation and the quality benchmark use it."""

    store: str
    model_id: int
    arch: str
    epsilon: float
    reward: float
    restarts: int
    cost: float  # epochs it cost, probes included (epochs_trained)
    example: Optional[Example]  # None: failed (or not trained for all epochs)


def load_store(path: Path) -> List[Recorded]:
    """The finished models of one store (read-only), in the order they finished."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT id, arch, status, epsilon, reward, metrics FROM models "
            "WHERE status IN ('done', 'failed') AND metrics IS NOT NULL ORDER BY finished, id"
        ).fetchall()
    finally:
        con.close()
    out = []
    label = path.parent.name or str(path)
    for model_id, arch, status, epsilon, reward, text in rows:
        metrics = json.loads(text)
        example = example_from_metrics(arch, metrics, EPOCHS) if status == "done" else None
        out.append(
            Recorded(
                label,
                int(model_id),
                arch,
                float(epsilon),
                float(reward if reward is not None else 0.0),
                int(metrics.get("restarts") or 0),
                epochs_trained(metrics),
                example,
            )
        )
    return out


def load_stores(paths: Sequence[str]) -> List[Recorded]:
    out: List[Recorded] = []
    for p in paths:
        recs = load_store(Path(p))
        done = sum(r.example is not None for r in recs)
        print(f"{p}: {len(recs)} finished models, {done} fully trained, {len(recs) - done} failed")
        out.extend(recs)
    return out


# ---------------------------------------------------------------- quality


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "   -  " if x is None or not math.isfinite(x) else f"{x:+.{digits}f}"


def scores(true: Sequence[float], pred: Sequence[float]) -> Dict[str, Optional[float]]:
    from scipy.stats import kendalltau
    from sklearn.metrics import r2_score

    t, p = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    kt = kendalltau(t, p)[0] if len(t) > 1 else float("nan")
    return {
        "r2": float(r2_score(t, p)) if len(t) > 1 else None,
        "kendall_tau": None if kt is None or not math.isfinite(kt) else float(kt),
        "rmse": float(np.sqrt(np.mean((t - p) ** 2))),
    }


def predict_held_out(
    train: Sequence[Example], test: Sequence[Example], tau: int, regressor: str, seed: int, target: str
) -> Tuple[List[float], List[float], List[float], float]:
    """For ``test``, from a predictor fitted on ``train`` only: means, local and floored sigmas; the global sigma."""
    pred = fit_predictor(train, [tau], regressor, 5, seed, target, spread="floored")
    cp = pred.models[tau]
    local = replace(cp, cv_noise=())
    means = [pred.predict(e.curve[:tau], e.info)[0] for e in test]
    return means, [local.spread(m) for m in means], [cp.spread(m) for m in means], cp.sigma


def splits(recs: Sequence[Recorded], mode: str, seed: int) -> List[Tuple[List[int], List[int]]]:
    """(train, test) index lists over ``recs``: grouped 5-fold, or one store against the others."""
    if mode == "kfold":
        from sklearn.model_selection import GroupKFold

        groups = [r.arch for r in recs]
        order = np.random.default_rng(seed).permutation(len(recs))  # GroupKFold is not seeded
        g = [groups[i] for i in order]
        return [
            (sorted(int(order[i]) for i in tr), sorted(int(order[i]) for i in te))
            for tr, te in GroupKFold(n_splits=5).split(np.zeros(len(g)), groups=g)
        ]
    stores = sorted({r.store for r in recs})
    return [
        ([i for i, r in enumerate(recs) if r.store == s], [i for i, r in enumerate(recs) if r.store != s])
        for s in stores
    ]


def cmd_quality(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    recs = [r for r in load_stores(args.stores) if r.example is not None]
    exs: List[Example] = [r.example for r in recs if r.example is not None]
    finals = np.array([e.final for e in exs])
    print(
        f"{len(exs)} fully trained models; final accuracy min {finals.min():.4f} median {np.median(finals):.4f} "
        f"max {finals.max():.4f}; {len({r.arch for r in recs})} distinct architectures"
    )
    modes = ["kfold"] + (["cross_store"] if len({r.store for r in recs}) > 1 else [])
    result: Dict[str, Any] = {
        "stores": list(args.stores),
        "models": len(exs),
        "taus": list(args.taus),
        "regressors": list(args.regressors),
        "targets": list(args.targets),
        "splits": {},
    }
    top_cut = float(np.quantile(finals, 0.75))
    plots: Dict[int, Dict[str, Tuple[List[float], List[float], List[float]]]] = {}
    for mode in modes:
        parts = splits(recs, mode, args.seed)
        rows: List[Dict[str, Any]] = []
        print(
            f"\n{mode}: {len(parts)} splits, {sum(len(te) for _, te in parts)} held-out predictions per row. "
            "R2, Kendall: of the predicted mean; 'rule': of max(mean, best seen), the reward of a stopped model; "
            "in 2s: fraction of truths inside mean +- 2 sigma (0.954 if Gaussian), local sigma without floor; "
            f"top: on the models whose final is in the top quarter (>= {top_cut:.4f}); >2.33s top: truths above "
            "mean + 2.33 sigma (1% if Gaussian); fl: the floored local sigma (the default) on the top; glob: the single "
            "(paper's) sigma and its coverage"
        )
        print(
            f"{'tau':>3} {'regressor':<14} {'target':<6} {'R2':>7} {'Kendall':>7} {'R2 rule':>8} {'K rule':>7} "
            f"{'rmse':>7} {'in 2s':>6} {'rmse top':>8} {'sigma top':>9} {'in 2s top':>9} {'>2.33s':>8} "
            f"{'fl s top':>8} {'in 2s':>6} {'>2.33s':>6} {'glob s':>6} {'in 2s':>6} {'top':>6}"
        )
        for tau in args.taus:
            seen_all = [max(e.curve[:tau]) for e in exs]
            floor = scores(finals.tolist(), seen_all)
            top_mask = finals >= top_cut
            floor_top = float(np.sqrt(np.mean((finals - np.array(seen_all))[top_mask] ** 2)))
            rows.append({"tau": tau, "regressor": "best_seen", "target": None, **floor, "rmse_top": floor_top})
            print(
                f"{tau:>3} {'best seen':<14} {'':<6} {_fmt(floor['r2']):>7} {_fmt(floor['kendall_tau']):>7} "
                f"{'':>8} {'':>7} {floor['rmse']:>7.4f} {'':>6} {'':>6} {floor_top:>8.4f}"
            )
            for target in args.targets:
                for reg in args.regressors:
                    true: List[float] = []
                    mean: List[float] = []
                    sigma: List[float] = []
                    floored: List[float] = []
                    flat: List[float] = []
                    seen: List[float] = []
                    t0 = time.perf_counter()
                    for tr, te in parts:
                        test = [exs[i] for i in te]
                        m, sg, fl, glob = predict_held_out([exs[i] for i in tr], test, tau, reg, args.seed, target)
                        true += [e.final for e in test]
                        mean += m
                        sigma += sg
                        floored += fl
                        flat += [glob] * len(test)
                        seen += [max(e.curve[:tau]) for e in test]
                    fit_s = time.perf_counter() - t0
                    t, mu, sd, sg_flat = np.array(true), np.array(mean), np.array(sigma), np.array(flat)
                    sc, sc_rule = scores(true, mean), scores(true, np.maximum(mu, seen).tolist())
                    inside = np.abs(t - mu) <= 2 * sd
                    inside_flat = np.abs(t - mu) <= 2 * sg_flat
                    sd_fl = np.array(floored)
                    inside_fl = np.abs(t - mu) <= 2 * sd_fl
                    top = t >= top_cut
                    row = {
                        "tau": tau,
                        "regressor": reg,
                        "target": target,
                        **sc,
                        "r2_rule": sc_rule["r2"],
                        "kendall_tau_rule": sc_rule["kendall_tau"],
                        "within_2_sigma": float(np.mean(inside)),
                        "mean_sigma": float(np.mean(sd)),
                        "rmse_top": float(np.sqrt(np.mean((t - mu)[top] ** 2))),
                        "within_2_sigma_top": float(np.mean(inside[top])),
                        "mean_sigma_top": float(np.mean(sd[top])),
                        # the rule at delta = 0.99 would call these unable to reach their own final
                        "above_2_33_sigma_top": float(np.mean((t - mu)[top] > 2.326 * sd[top])),
                        "floored_within_2_sigma": float(np.mean(inside_fl)),
                        "floored_within_2_sigma_top": float(np.mean(inside_fl[top])),
                        "floored_above_2_33_sigma_top": float(np.mean((t - mu)[top] > 2.326 * sd_fl[top])),
                        "floored_mean_sigma_top": float(np.mean(sd_fl[top])),
                        "global_within_2_sigma": float(np.mean(inside_flat)),
                        "global_within_2_sigma_top": float(np.mean(inside_flat[top])),
                        "global_sigma": float(np.mean(sg_flat)),
                        "predictions": len(true),
                        "seconds": fit_s,
                    }
                    rows.append(row)
                    print(
                        f"{tau:>3} {reg:<14} {target:<6} {_fmt(sc['r2']):>7} {_fmt(sc['kendall_tau']):>7} "
                        f"{_fmt(sc_rule['r2']):>8} {_fmt(sc_rule['kendall_tau']):>7} {sc['rmse']:>7.4f} "
                        f"{row['within_2_sigma']:>6.3f} {row['rmse_top']:>8.4f} {row['mean_sigma_top']:>9.4f} "
                        f"{row['within_2_sigma_top']:>9.3f} {row['above_2_33_sigma_top']:>8.3f} "
                        f"{row['floored_mean_sigma_top']:>8.4f} {row['floored_within_2_sigma_top']:>6.3f} "
                        f"{row['floored_above_2_33_sigma_top']:>6.3f} "
                        f"{row['global_sigma']:>6.4f} {row['global_within_2_sigma']:>6.3f} "
                        f"{row['global_within_2_sigma_top']:>6.3f}",
                        flush=True,
                    )
                    if mode == "kfold" and (target == "gain" or reg == "nu_svr"):
                        plots.setdefault(tau, {})[f"{reg} ({target})"] = (true, mean, sigma)
        result["splits"][mode] = rows
    if args.out:
        write_plots(Path(args.out), plots)
    result["fit_time"] = fit_times(exs, args.seed)
    result["seconds"] = time.perf_counter() - t_start
    print(f"\nquality benchmark: {result['seconds']:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'quality.json'} and {out}/quality_tau*.png")


def write_plots(out: Path, plots: Dict[int, Dict[str, Tuple[List[float], List[float], List[float]]]]) -> None:
    """Per tau: predicted (+-2 local sigma) against true, per regressor; below, the same zoomed on the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for tau, by_reg in sorted(plots.items()):
        fig, axes = plt.subplots(2, len(by_reg), figsize=(4 * len(by_reg), 8), squeeze=False)
        for col, (reg, (true, mean, sigma)) in enumerate(by_reg.items()):
            sc = scores(true, mean)
            for row, lo in enumerate((min(min(true), min(mean)) - 0.02, 0.94)):
                ax = axes[row][col]
                ax.errorbar(true, mean, yerr=2 * np.array(sigma), fmt="o", ms=3, alpha=0.5, elinewidth=0.5)
                ax.plot([lo, 1.0], [lo, 1.0], "k--", lw=0.8)
                ax.set_xlim(lo, 1.0)
                ax.set_ylim(lo, 1.01)
                ax.set_xlabel("true final accuracy")
                ax.set_ylabel("predicted, held out (+-2 sigma)")
                if row == 0:
                    ax.set_title(f"{reg}, tau={tau}\nR2 {sc['r2']:.3f}, Kendall {sc['kendall_tau']:.3f}", fontsize=9)
                else:
                    ax.set_title("zoom: the top", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"quality_tau{tau}.png", dpi=80)
        plt.close(fig)


def fit_times(exs: Sequence[Example], seed: int) -> Dict[str, float]:
    """Seconds to fit one nu_svr predictor (default checkpoints, 5 folds) on ~100 and ~2,000 examples."""
    rng = np.random.default_rng(seed)
    out = {}
    cps = EarlyStopConfig().checkpoints
    for n in (100, 2000):
        sample = [jitter(exs[int(i)], rng, 300) for i in rng.integers(0, len(exs), n)]
        t0 = time.perf_counter()
        fit_predictor(sample, cps, "nu_svr", 5, seed)
        out[f"nu_svr_{n}"] = time.perf_counter() - t0
        print(
            f"fit of one nu_svr predictor, checkpoints {list(cps)}, 5-fold sigma, {n} examples: {out[f'nu_svr_{n}']:.2f} s"
        )
    return out


# ---------------------------------------------------------------- simulate


def jitter(ex: Example, rng: np.random.Generator, val_size: int, scale: float = 1.0) -> Example:
    """A bootstrapped copy of a real curve: the same model measured on another validation set.

    In logit space each epoch's accuracy p moves by (z + e_t / 2) / sqrt(n p (1 - p)), n the
    validation set's size: z ~ N(0, 1) is shared by the whole curve (the shape is kept, the curve
    rises or falls by about one binomial standard deviation sqrt(p (1 - p) / n)), e_t ~ N(0, 1)
    is the epoch's own jitter, half as large.  Logits keep the accuracies inside (0, 1) without
    ties at 1.  The final accuracy stays the best of the curve.
    """
    lo = 0.5 / val_size
    p = np.clip(np.asarray(ex.curve, dtype=float), lo, 1.0 - lo)
    z = rng.standard_normal() + 0.5 * rng.standard_normal(len(p))
    logit = np.log(p / (1.0 - p)) + scale * z / np.sqrt(val_size * p * (1.0 - p))
    curve = tuple(float(v) for v in 1.0 / (1.0 + np.exp(-logit)))
    return Example(curve, ex.info, max(curve))


@dataclass(frozen=True)
class SimModel:
    base: int  # index of the recorded model it was drawn from
    epsilon: float
    restarts: int
    cost: float  # epochs if trained fully (or failed at the probe)
    example: Optional[Example]  # None: failed at the probe


def draw_search(
    population: Sequence[Recorded],
    schedule: Sequence[Tuple[float, int]],
    seed: int,
    top: float,
    val_size: int,
    drift: str = "top",
) -> List[SimModel]:
    """The models of one simulated search, in the order it trains them.

    Drift toward better models as epsilon falls, two models of it:
    ``top``: with probability epsilon a uniform draw from every recorded model (failed ones
    included), else (the agent exploiting) a uniform draw from the ``top`` fraction of the fully
    trained models by final accuracy;
    ``phase``: a uniform draw from the models the real searches trained at that epsilon (the
    nearest recorded epsilon), i.e. the real searches' own drift, failures included.
    """
    rng = np.random.default_rng(seed)
    trained = [i for i, r in enumerate(population) if r.example is not None]
    trained.sort(key=lambda i: -population[i].reward)
    better = trained[: max(1, round(top * len(trained)))]
    phases: Dict[float, List[int]] = {}
    for i, r in enumerate(population):
        phases.setdefault(r.epsilon, []).append(i)
    out = []
    for eps, count in schedule:
        nearest = min(phases, key=lambda e: (abs(e - eps), -e))
        for _ in range(count):
            if drift == "phase":
                i = phases[nearest][int(rng.integers(0, len(phases[nearest])))]
            elif rng.random() < eps:
                i = int(rng.integers(0, len(population)))
            else:
                i = better[int(rng.integers(0, len(better)))]
            r = population[i]
            ex = jitter(r.example, rng, val_size) if r.example is not None else None
            out.append(SimModel(i, eps, r.restarts, r.cost, ex))
    return out


def stopped_cost(restarts: int, epoch: int) -> float:
    """epochs_trained of a model stopped after ``epoch`` epochs (same formula as the store's)."""
    return epochs_trained({"restarts": restarts, "curve": [[k, 0.5] for k in range(1, epoch + 1)]})


def replay(models: Sequence[SimModel], config: EarlyStopConfig, seed: int) -> Dict[str, Any]:
    """One sequential search: before each model the rule is built from the models fully trained
    so far (finish order; target the best measured), then ``decide`` sees the model's whole
    per-epoch curve (it looks only at the checkpoints, in order).  A stopped model costs its
    probes and epochs up to the checkpoint, never enters the predictor's training set or the
    measured rewards; its reward (the prediction) is kept for the ranking figures."""
    t0 = time.perf_counter()
    cache = PredictorCache()
    examples: List[Tuple[int, Example]] = []
    measured: List[float] = []
    kept = [True] * len(models)
    stop_epoch: Dict[int, int] = {}
    full = spent = 0.0
    rule = None
    built_for = (-1, -1)
    for i, m in enumerate(models):
        full += m.cost
        if m.example is None:  # failed at the probe: the rule is never asked
            spent += m.cost
            measured.append(0.1)
            continue
        if (len(examples), len(measured)) != built_for:
            rule = build_rule(config, examples, measured, seed, cache)
            built_for = (len(examples), len(measured))
        decision = rule.decide(m.example.curve, m.example.info) if rule is not None else None
        if decision is not None:
            kept[i] = False
            stop_epoch[decision.epoch] = stop_epoch.get(decision.epoch, 0) + 1
            spent += stopped_cost(m.restarts, decision.epoch)
        else:
            spent += m.cost
            examples.append((i, m.example))
            measured.append(m.example.final)
    floor = sum(m.cost if m.example is None else stopped_cost(m.restarts, config.checkpoints[0]) for m in models)
    finals = {i: m.example.final for i, m in enumerate(models) if m.example is not None}
    ranked = sorted(finals, key=lambda i: -finals[i])
    top5 = ranked[:5]
    found = sorted((i for i in finals if kept[i]), key=lambda i: -finals[i])[:5]
    return {
        "epochs_full": full,
        "epochs_spent": spent,
        "ratio": full / spent,
        "ratio_ceiling": full / floor,  # every model that learns stopped at the first checkpoint
        "best_kept": kept[ranked[0]],
        "top5_kept": sum(kept[i] for i in top5),
        "true_best": finals[ranked[0]],
        "true_top5_mean": float(np.mean([finals[i] for i in top5])),
        "found_best": finals[found[0]],
        "found_top5_mean": float(np.mean([finals[i] for i in found])),
        "stopped": sum(not k for k in kept),
        "stopped_at": {str(k): v for k, v in sorted(stop_epoch.items())},
        "trained_fully": len(examples),
        "seconds": time.perf_counter() - t0,
    }


def use_variant(target: str, spread: str) -> None:
    """Make build_rule fit predictors with another target or sigma (a benchmark of the core's choices)."""
    import functools

    from metaqnn.early_stop import rules

    rules.fit_predictor = functools.partial(fit_predictor, target=target, spread=spread)


def simulate_one(task: Tuple[Any, ...]) -> Dict[str, Any]:
    """One (seed, setting) replay; the search is drawn again from its seed (cheap), so it can run anywhere."""
    population, schedule, seed, top, val_size, drift, label, config, target, spread = task
    use_variant(target, spread)
    models = draw_search(population, schedule, seed, top, val_size, drift)
    r = replay(models, config, seed)
    return {
        "seed": seed,
        "label": label,
        "rule": config.rule,
        "delta": config.delta if config.rule == "svr" else None,
        "regressor": config.regressor if config.rule == "svr" else None,
        "target": target if config.rule == "svr" else None,
        "spread": spread if config.rule == "svr" else None,
        "checkpoints": list(config.checkpoints),
        "warmup": config.warmup,
        "refit_growth": config.refit_growth,
        **r,
    }


def parse_checkpoints(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def scaled_schedule(scale: float, name: str = "paper") -> List[Tuple[float, int]]:
    return [
        (eps, max(1, round(n * scale)))
        for eps, n in (PAPER_SCHEDULE if name == "paper" else build_config("digits").schedule.steps)
    ]


def real_drift(recs: Sequence[Recorded]) -> Dict[str, Any]:
    """The real searches' mean reward and failure rate per epsilon (the drift the model imitates)."""
    out: Dict[str, Any] = {}
    for eps in sorted({r.epsilon for r in recs}, reverse=True):
        rs = [r for r in recs if r.epsilon == eps]
        out[f"{eps:g}"] = {
            "models": len(rs),
            "mean_reward": float(np.mean([r.reward for r in rs])),
            "failed": float(np.mean([r.example is None for r in rs])),
        }
    return out


def sim_drift(models: Sequence[SimModel]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for eps in sorted({m.epsilon for m in models}, reverse=True):
        ms = [m for m in models if m.epsilon == eps]
        out[f"{eps:g}"] = {
            "models": len(ms),
            "mean_reward": float(np.mean([m.example.final if m.example else 0.1 for m in ms])),
            "failed": float(np.mean([m.example is None for m in ms])),
        }
    return out


def cmd_simulate(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    population = load_stores(args.stores)
    schedule = scaled_schedule(args.scale, args.schedule)
    n_models = sum(n for _, n in schedule)
    print(
        f"population: {len(population)} recorded models ({sum(r.example is not None for r in population)} fully "
        f"trained); schedule {schedule} ({n_models} models); drift "
        + (
            f"top: exploit draws from the top {args.top:.0%}"
            if args.drift == "top"
            else "phase: the real searches' own"
        )
    )
    drift = real_drift(population)
    print(
        "real searches, per epsilon: "
        + ", ".join(f"{k}: {v['mean_reward']:.3f} ({v['models']})" for k, v in drift.items())
    )
    base = EarlyStopConfig(rule="svr", regressor=args.regressor, refit_growth=args.refit_growth, kth_best=1)
    configs: List[Tuple[str, EarlyStopConfig]] = []
    for cps in args.checkpoints:
        for warmup in args.warmups:
            c = replace(base, checkpoints=cps, warmup=warmup)
            if "median" in args.rules:
                configs.append(("median", replace(c, rule="median")))
            if "svr" in args.rules:
                for delta in args.deltas:
                    configs.append((f"svr d={delta:g}", replace(c, delta=delta)))
    runs: List[Dict[str, Any]] = []
    header = (
        f"{'seed':>4} {'rule':<12} {'checkpoints':<12} {'warmup':>6} {'ratio':>6} {'best':>5} {'top5':>4} "
        f"{'found best':>10} {'true best':>9} {'found top5':>10} {'true top5':>9} {'stopped':>7} {'s':>5}"
    )
    sd = sim_drift(draw_search(population, schedule, args.seeds[0], args.top, args.val_size, args.drift))
    print(
        f"simulated search (seed {args.seeds[0]}), per epsilon: "
        + ", ".join(f"{k}: {v['mean_reward']:.3f} ({v['models']})" for k, v in sd.items())
    )
    if (args.target, args.spread) != ("gain", "floored"):
        print(f"variant of the predictor: target {args.target}, sigma {args.spread}")
    print(header)
    tasks = [
        (population, schedule, seed, args.top, args.val_size, args.drift, label, config, args.target, args.spread)
        for seed in args.seeds
        for label, config in configs
    ]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(simulate_one, tasks))
    else:
        results = [simulate_one(t) for t in tasks]
    for row in results:
        runs.append(row)
        print(
            f"{row['seed']:>4} {row['label']:<12} {','.join(map(str, row['checkpoints'])):<12} {row['warmup']:>6} "
            f"{row['ratio']:>6.2f} {'yes' if row['best_kept'] else 'NO':>5} {row['top5_kept']:>4} "
            f"{row['found_best']:>10.4f} {row['true_best']:>9.4f} {row['found_top5_mean']:>10.4f} "
            f"{row['true_top5_mean']:>9.4f} {row['stopped']:>7} {row['seconds']:>5.0f}",
            flush=True,
        )
    summary = summarise(runs)
    print(
        "\nper setting over seeds: epochs ratio mean [min, max]; best kept; top-5 kept mean (min); worst loss of "
        "the best and of the top-5 mean (points); goal: 4x, best, >= 4 of 5"
    )
    for s in summary:
        print(
            f"  {s['setting']:<40} {s['ratio_mean']:.2f} [{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]  "
            f"best {s['best_kept']}/{s['seeds']}  top5 {s['top5_kept_mean']:.1f} (min {s['top5_kept_min']})  "
            f"loss {100 * s['best_gap_max']:.2f}/{100 * s['top5_gap_max']:.2f}  "
            f"(ceiling {s['ratio_ceiling_mean']:.2f})  {'MEETS' if s['meets_goal'] else 'misses'}"
        )
    result = {
        "stores": list(args.stores),
        "population": len(population),
        "schedule_name": args.schedule,
        "schedule": schedule,
        "models": n_models,
        "drift": args.drift,
        "target": args.target,
        "spread": args.spread,
        "top": args.top,
        "val_size": args.val_size,
        "seeds": list(args.seeds),
        "real_drift": drift,
        "runs": runs,
        "summary": summary,
        "seconds": time.perf_counter() - t_start,
    }
    print(f"\nsimulate: {result['seconds']:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"simulate{'-' + args.tag if args.tag else ''}.json"
        (out / name).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / name}")


def summarise(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        key = (
            f"{r['rule']}{'' if r['delta'] is None else ' d=' + format(r['delta'], 'g')} "
            f"cp={','.join(map(str, r['checkpoints']))} warmup={r['warmup']}"
            + (
                ""
                if r["rule"] != "svr" or (r["target"], r["spread"]) == ("gain", "floored")
                else f" {r['target']}/{r['spread']}"
            )
        )
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        ratios = [r["ratio"] for r in rs]
        out.append(
            {
                "setting": key,
                "seeds": len(rs),
                "ratio_mean": float(np.mean(ratios)),
                "ratio_min": float(min(ratios)),
                "ratio_max": float(max(ratios)),
                "ratio_ceiling_mean": float(np.mean([r["ratio_ceiling"] for r in rs])),
                "best_kept": sum(bool(r["best_kept"]) for r in rs),
                "top5_kept_mean": float(np.mean([r["top5_kept"] for r in rs])),
                "top5_kept_min": min(r["top5_kept"] for r in rs),
                "best_gap_max": float(max(r["true_best"] - r["found_best"] for r in rs)),
                "top5_gap_max": float(max(r["true_top5_mean"] - r["found_top5_mean"] for r in rs)),
                "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
                "meets_goal": all(r["ratio"] >= 4.0 and r["best_kept"] and r["top5_kept"] >= 4 for r in rs),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="prediction quality on held-out real curves")
    q.add_argument("--stores", nargs="+", required=True, help="store.sqlite of real searches (read-only)")
    q.add_argument("--out", default=None, help="folder for quality.json and the PNG scatter plots")
    q.add_argument("--taus", type=int, nargs="+", default=list(TAUS))
    q.add_argument("--regressors", nargs="+", default=list(REGRESSORS), choices=REGRESSORS)
    q.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS, help="what the regressors learn")
    q.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("simulate", help="paper-scale searches replayed from the recorded curves")
    s.add_argument("--stores", nargs="+", required=True)
    s.add_argument("--out", default=None, help="folder for simulate[-TAG].json")
    s.add_argument("--tag", default="", help="suffix of the JSON file name")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--schedule", default="paper", choices=["paper", "digits"], help="Table 2 (2,700) or digits (134)")
    s.add_argument("--scale", type=float, default=1.0, help="multiplies every schedule count")
    s.add_argument("--rules", nargs="+", default=["svr", "median"], choices=["svr", "median"])
    s.add_argument("--deltas", type=float, nargs="+", default=[0.99])
    s.add_argument("--warmups", type=int, nargs="+", default=[25])
    s.add_argument(
        "--checkpoints", type=parse_checkpoints, nargs="+", default=[EarlyStopConfig().checkpoints], help="e.g. 2,5,10"
    )
    s.add_argument("--regressor", default="nu_svr", choices=REGRESSORS)
    s.add_argument("--target", default="gain", choices=TARGETS, help="predictor variant: what it learns")
    s.add_argument("--spread", default="floored", choices=SPREADS, help="predictor variant: its sigma")
    s.add_argument("--jobs", type=int, default=1, help="replays in parallel processes")
    s.add_argument("--refit-growth", type=float, default=EarlyStopConfig().refit_growth)
    s.add_argument("--drift", default="top", choices=["top", "phase"], help="how the search drifts (draw_search)")
    s.add_argument("--top", type=float, default=0.25, help="drift top: exploit draws come from this top fraction")
    s.add_argument("--val-size", type=int, default=300, help="validation images (scale of the noise)")
    args = ap.parse_args()
    if args.command == "quality":
        cmd_quality(args)
    else:
        cmd_simulate(args)


if __name__ == "__main__":
    main()
