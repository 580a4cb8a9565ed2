"""The paper's figures for one experiment, read from its store (works while the search runs).

fig3_rolling_accuracy.png   Figure 3: rolling mean accuracy over iterations, bars = mean per epsilon
fig3_rolling_accuracy.csv   its values: iteration, epsilon, accuracy, rolling mean (the TensorBoard curve's)
figA2_accuracy_by_eps.png   Figure A2: accuracy distribution per epsilon, first vs last epsilon
figA3_q_by_layer_type.png   Figure A3: average Q-value per layer type against layer depth
figA4_q_by_receptive.png    Figure A4: average Q-value per conv receptive field against depth
figES_predicted_vs_measured.png  early stopping: predicted against measured accuracy of the models
                            stopped early and then finished (`metaqnn finish`), when there are any
report.md                   the figures, the per-epsilon table and the top models (and Table 5, when
                            `metaqnn transfer` wrote one under <exp>/transfer)
"""

import csv
import json
from array import array
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from metaqnn.experiment import STORE_NAME, experiment_config
from metaqnn.figure3 import figure3_curve, figure3_window
from metaqnn.finetune import finetuned_results, format_results
from metaqnn.pareto import COSTS, LABELS, comparable, cost_of, pareto_front
from metaqnn.search import format_summary, summary
from metaqnn.transfer import transfer_section
from qagent.arch import parse_architecture
from qagent.errors import StoreError
from qagent.outdir import writing_into
from qagent.space import State
from qagent.status import ModelStatus
from qagent.store import ExperimentStore

TYPE_OF = {"C": "convolution", "P": "pooling", "FC": "fully connected", "SM": "termination", "GAP": "termination"}


def _samples(store: ExperimentStore) -> List[Tuple[int, float, float]]:
    return [(r["iteration"], r["epsilon"], r["reward"]) for r in store.samples() if r["reward"] is not None]


def write_figure3_values(samples: List[Tuple[int, float, float]], window: int, out: Path) -> None:
    """The figure's numbers beside it, for a reader (or a test) that wants values, not pixels."""
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["iteration", "epsilon", "accuracy", f"rolling_mean_{window}"])
        for (it, eps, r), (_it, mean) in zip(samples, figure3_curve(samples, window)):
            w.writerow([it, eps, repr(float(r)), repr(float(mean))])


def figure3(samples: List[Tuple[int, float, float]], out: Path, window: int) -> Dict[float, float]:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    means: Dict[float, float] = {}
    spans: Dict[float, List[int]] = defaultdict(list)
    for it, eps, _r in samples:
        spans[eps].append(it)
    for eps, its in spans.items():
        vals = [r for it, e, r in samples if e == eps]
        means[eps] = sum(vals) / len(vals)
        ax.bar(
            (min(its) + max(its)) / 2,
            means[eps],
            width=max(its) - min(its) + 1,
            color="#cfe3f5",
            edgecolor="#8fb8de",
            align="center",
        )
        ax.text(
            (min(its) + max(its)) / 2,
            means[eps] + 0.01,
            f"ε={eps:g}\n{means[eps]:.3f}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    curve = figure3_curve(samples, window)
    ax.plot(
        [c[0] for c in curve],
        [c[1] for c in curve],
        color="#1f5fa8",
        lw=1.5,
        label=f"rolling mean over {window} models",
    )
    ax.set_xlabel("iteration (models sampled, duplicates included)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Q-learning performance (paper Figure 3)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return means


def figure_a2(samples: List[Tuple[int, float, float]], out: Path) -> None:
    by_eps: Dict[float, List[float]] = defaultdict(list)
    for _, eps, r in samples:
        by_eps[eps].append(r)
    order = sorted(by_eps, reverse=True)
    bins = [i / 10 for i in range(11)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottoms = [0.0] * len(order)
    cmap = plt.get_cmap("viridis")
    for k in range(10):
        fracs = [
            sum(bins[k] <= v < bins[k + 1] or (k == 9 and v == 1.0) for v in by_eps[e]) / len(by_eps[e]) for e in order
        ]
        a.bar(range(len(order)), fracs, bottom=bottoms, color=cmap(k / 9), label=f"{bins[k]:.1f}-{bins[k + 1]:.1f}")
        bottoms = [x + y for x, y in zip(bottoms, fracs)]
    a.set_xticks(range(len(order)))
    a.set_xticklabels([f"{e:g}" for e in order])
    a.set_xlabel("ε")
    a.set_ylabel("fraction of models")
    a.set_title("accuracy distribution per ε (Figure A2a/c)")
    a.legend(title="accuracy", fontsize=6, title_fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    first, last = order[0], order[-1]
    b.hist(by_eps[first], bins=bins, alpha=0.6, density=True, label=f"ε={first:g} ({len(by_eps[first])} models)")
    b.hist(by_eps[last], bins=bins, alpha=0.6, density=True, label=f"ε={last:g} ({len(by_eps[last])} models)")
    b.set_xlabel("validation accuracy")
    b.set_ylabel("density")
    b.set_title("first vs last ε (Figure A2b/d)")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def q_averages(store: ExperimentStore) -> Tuple[Dict[str, Dict[int, float]], Dict[int, Dict[int, float]]]:
    """Average Q per (layer type, depth of the chosen layer) and per (conv receptive field, depth)."""
    by_type: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    by_field: Dict[int, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for row in store.q_rows():
        state = State.from_key(row["state"])
        values = array("d")
        values.frombytes(row["q"])
        depth = state.depth + 1
        for action, q in zip(json.loads(row["actions"]), values):
            kind = action.split("(")[0]
            by_type[TYPE_OF[kind]][depth].append(q)
            if kind == "C":
                f = int(action[2:-1].split(",")[1])
                by_field[f][depth].append(q)
    avg = lambda d: {k: {x: sum(v) / len(v) for x, v in sorted(inner.items())} for k, inner in d.items()}  # noqa: E731
    return avg(by_type), avg(by_field)


def _lines(data: Dict[Any, Dict[int, float]], out: Path, title: str, label: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted(data, key=str):
        pts = data[key]
        ax.plot(list(pts), list(pts.values()), marker="o", label=f"{label}{key}")
    ax.set_xlabel("layer depth")
    ax.set_ylabel("average Q-value")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(exp_dir: Path, out: Path, rank_by: str = "accuracy") -> Path:
    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store, writing_into(out, "report folder"):
        samples = _samples(store)
        if not samples:
            raise StoreError(f"experiment {exp_dir} has no results yet")
        cfg = experiment_config(store)
        window = figure3_window(cfg.schedule.total)
        means = figure3(samples, out / "fig3_rolling_accuracy.png", window)
        write_figure3_values(samples, window, out / "fig3_rolling_accuracy.csv")
        figure_a2(samples, out / "figA2_accuracy_by_eps.png")
        by_type, by_field = q_averages(store)
        _lines(by_type, out / "figA3_q_by_layer_type.png", "average Q-value per layer type (Figure A3)", "")
        _lines(
            by_field, out / "figA4_q_by_receptive.png", "average Q-value per conv receptive field (Figure A4)", "f = "
        )
        s = summary(store)
        top = store.top_models(10, by=rank_by)
        lines = [
            f"# MetaQNN experiment `{exp_dir.name}` ({cfg.name})",
            "",
            f"{len(samples)} sampled architectures ({len(s['top'])} shown below), "
            f"{sum(v['models'] for v in s['per_epsilon'].values())} unique models trained.",
            "",
            "## Mean accuracy of sampled models per ε (Figure 3 bars)",
            "",
            "| ε | mean accuracy (samples) |",
            "|---:|---:|",
            *[f"| {e:g} | {m:.4f} |" for e, m in sorted(means.items(), reverse=True)],
            "",
            "![Figure 3](fig3_rolling_accuracy.png)",
            "",
            "![Figure A2](figA2_accuracy_by_eps.png)",
            "",
            "![Figure A3](figA3_q_by_layer_type.png)",
            "",
            "![Figure A4](figA4_q_by_receptive.png)",
            "",
            "## Unique models per ε and top models",
            "",
            "```",
            format_summary(s),
            "```",
            "",
            f"Ranked by {'validation accuracy' if rank_by == 'accuracy' else 'the agent reward'}.",
            "",
            "| rank | model | val. acc. | reward | layers | params | MACs | latency (ms) | restarts | lr |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {i} | {m.id} | {m.accuracy or 0.0:.4f} | {m.reward:.4f} | {len(parse_architecture(m.arch)) - 1} "
                f"| {_num(cost_of(m.metrics, 'params'))} | {_num(cost_of(m.metrics, 'macs'))} "
                f"| {_num(cost_of(m.metrics, 'latency'), '.3f')} | {m.metrics.get('restarts')} "
                f"| {m.metrics.get('learning_rate')} |"
                for i, m in enumerate(top, 1)
            ],
        ]
        lines += early_stop_section(store, out)
        lines += pareto_section(store, out)
        page = out / "report.md"
        page.write_text("\n".join(lines + finetune_section(exp_dir) + transfer_section(exp_dir)) + "\n")
    return page


def _num(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def pareto_section(store: ExperimentStore, out: Path) -> List[str]:
    """Accuracy against params, MACs and latency for every trained model, the front marked (issue 22)."""
    rows = [(m.id, float(m.accuracy), m.metrics) for m in store.models(ModelStatus.DONE) if m.accuracy is not None]
    lines: List[str] = []
    for cost in COSTS:
        points, note = comparable(rows, cost)
        if not points:
            continue
        front = pareto_front(points)
        name = f"figPareto_{cost}.png"
        fig, ax = plt.subplots(figsize=(7, 4.5))
        on = set(front)
        ax.scatter([c for k, _, c in points if k not in on], [a for k, a, _ in points if k not in on],
                   s=12, color="#9ab", label="trained models")  # fmt: skip
        by_id = {k: (a, c) for k, a, c in points}
        ax.plot([by_id[k][1] for k in front], [by_id[k][0] for k in front], "o-", color="#c0392b", ms=5,
                label=f"Pareto front ({len(front)})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(LABELS[cost])
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"accuracy against {LABELS[cost]}" + (f"\n{note}" if note else ""), fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        lines += [
            "",
            f"### Accuracy against {LABELS[cost]}",
            "",
            f"![Pareto {cost}]({name})",
            "",
            f"On the front, cheapest first: {', '.join(f'#{k} ({by_id[k][0]:.4f}, {by_id[k][1]:,.6g})' for k in front)}"
            + (f". {note[0].upper() + note[1:]}." if note else "."),
        ]
    return ["", "## Accuracy against cost (Pareto front)", *lines] if lines else []


def early_stop_section(store: ExperimentStore, out: Path) -> List[str]:
    """Models stopped early, kept apart from measured ones: their predictions, what they had reached,
    and (for those finished since) the prediction beside the measurement, as a table and a plot."""
    stopped = sorted(store.models(ModelStatus.STOPPED), key=lambda m: (-(m.accuracy or 0.0), m.id))
    finished = [m for m in store.models(ModelStatus.DONE) if m.metrics.get("stopped_early")]
    if not stopped and not finished:
        return []
    lines = [
        "",
        "## Early stopping (predicted, not measured)",
        "",
        f"{len(stopped)} models were stopped early: their reward is a PREDICTED final accuracy, so they are "
        f"not in the measured rankings above (export, finetune and ensemble skip them unless given "
        f"--include-predicted). {len(finished)} were finished to full training since (`metaqnn finish`).",
        "",
        "| model | predicted | stopped at epoch | reached then | rule | architecture |",
        "|---:|---:|---:|---:|---|---|",
        *[
            f"| {m.id} | {m.accuracy or 0.0:.4f} | {m.metrics.get('stopped_epoch')} | {m.metrics.get('best_accuracy')} "
            f"| {m.metrics.get('stop_rule')} | `{m.arch}` |"
            for m in stopped[:20]
        ],
    ]
    if finished:
        pairs = [(float(m.metrics["stopped_early"]["predicted_accuracy"]), float(m.accuracy or 0.0)) for m in finished]
        fig, ax = plt.subplots(figsize=(4.8, 4.5))
        ax.scatter([p for p, _ in pairs], [t for _, t in pairs], s=14)
        lo = min(min(p, t) for p, t in pairs)
        ax.plot([lo, 1.0], [lo, 1.0], color="grey", linewidth=0.8)
        ax.set_xlabel("predicted final accuracy (when stopped)")
        ax.set_ylabel("measured final accuracy (finished)")
        ax.set_title("models stopped early, then finished")
        fig.tight_layout()
        fig.savefig(out / "figES_predicted_vs_measured.png", dpi=110)
        plt.close(fig)
        lines += [
            "",
            "| model | predicted when stopped | measured when finished | architecture |",
            "|---:|---:|---:|---|",
            *[f"| {m.id} | {p:.4f} | {t:.4f} | `{m.arch}` |" for m, (p, t) in zip(finished, pairs)],
            "",
            "![predicted vs measured](figES_predicted_vs_measured.png)",
        ]
    return lines


def finetune_section(exp_dir: Path) -> List[str]:
    """Finetuned test accuracy beside search validation accuracy (drops flagged), and the ensemble."""
    results = finetuned_results(exp_dir)
    if not results:
        return []
    lines = ["", "## Finetuned top models (test set)", "", *format_results(results)]
    ens_path = exp_dir / "export" / "ensemble.json"
    if ens_path.exists():
        ens = json.loads(ens_path.read_text())
        best = max(m["test_accuracy"] for m in ens["models"])
        lines += [
            "",
            f"Ensemble of {len(ens['models'])} ({', '.join(m['model'] for m in ens['models'])}): test accuracy "
            f"{100 * ens['ensemble_accuracy']:.2f}% (best member {100 * best:.2f}%)"
            + ("" if ens["ensemble_accuracy"] >= best else " -- below its best member"),
        ]
    return lines
