"""Finetune protocol candidates measured on an experiment's top models (issue 15).

Each candidate is the preset's finetune protocol with some fields overridden; every top model is
exported into ``--out/<candidate>``, finetuned with that solver (the model's Caffe seed, so a CPU
run repeats) and the top models are ensembled.  Per candidate: the schedule's arithmetic, each
model's search validation accuracy beside its finetuned test accuracy, the ensemble.

    .venv/bin/python bench/bench_finetune_protocols.py --exp /tmp/d15/digits --top 5 \\
        --candidate preset --candidate b32:train_batch=32,epochs=40,step_epochs=10
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaqnn.caffe.locate import find_caffe
from metaqnn.config import parse_override
from metaqnn.experiment import STORE_NAME, experiment_data_dir
from metaqnn.export import export_top, finetune_solver_text
from metaqnn.finetune import (
    drop_of,
    ensemble_of,
    finetune_model,
    format_results,
    schedule_warnings,
    solver_schedule,
    test_labels,
)
from qagent.store import ExperimentStore


def candidate(text: str) -> Tuple[str, Dict[str, Any]]:
    """``name`` or ``name:key=value,key=value`` (TOML values) -> (name, protocol overrides)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        _, key, value = parse_override(f"protocol.{item}")
        overrides[key] = value
    return name, overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", required=True)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: <exp>/protocol_bench")
    ap.add_argument("--candidate", action="append", default=[], help="name[:key=value,...]")
    args = ap.parse_args()
    exp = Path(args.exp).resolve()
    out = Path(args.out) if args.out else exp / "protocol_bench"
    with ExperimentStore.open_readonly(exp / STORE_NAME) as store:
        config = store.config()
        data_dir = experiment_data_dir(store)
    caffe, labels = find_caffe(), test_labels(exp)
    summary: List[Dict[str, Any]] = []
    for name, overrides in map(candidate, args.candidate or ["preset"]):
        where = out / name
        export_top(exp, args.top, where)
        folders = sorted(p for p in where.iterdir() if p.is_dir())[: args.top]
        for folder in folders:
            text = finetune_solver_text(config, "finetune_net.prototxt", overrides or None, data_dir)
            (folder / "solver_finetune.prototxt").write_text(text)
        schedule = solver_schedule(folders[0] / "solver_finetune.prototxt")
        print(f"== {name} {overrides}: {schedule.describe()}", flush=True)
        for problem in schedule_warnings(folders[0]):
            print(f"   schedule problem: {problem}", flush=True)
        results = [
            finetune_model(f, caffe, log=lambda _m: None, search_dir=exp / "models" / f.name.split("model")[-1])
            for f in folders
        ]
        ens = ensemble_of(folders, labels, log=lambda _m: None)
        print("\n".join(format_results(results)))
        within = sum((drop_of(r) or 0.0) <= 0.01 + 1e-9 for r in results)
        print(
            f"   {within}/{len(results)} within 1 point of their validation accuracy; mean test "
            f"{100 * sum(r['test_accuracy'] for r in results) / len(results):.2f}; ensemble "
            f"{100 * ens['ensemble_accuracy']:.2f} (best member {100 * ens['best_single_accuracy']:.2f})",
            flush=True,
        )
        summary.append(
            {
                "candidate": name,
                "overrides": overrides,
                "schedule": schedule.describe(),
                "models": [
                    {k: r[k] for k in ("model", "validation_accuracy", "test_accuracy", "best_test_accuracy")}
                    for r in results
                ],
                "within_1_point": within,
                "ensemble": ens["ensemble_accuracy"],
                "best_member": ens["best_single_accuracy"],
            }
        )
        (out / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
