"""``metaqnn train`` and ``metaqnn transfer``: Table 5 (and Table 3's CIFAR-100 column).

``train`` trains one architecture on one target (:mod:`metaqnn.train`).  ``transfer`` takes the
best measured model of an experiment -- or a model folder, such as a ``train`` folder of the
Table A2 network trained on CIFAR-10 -- and trains it on each target twice, from scratch and
finetuned from its weights, then writes Table 5: one row per initialisation, one column per
target, test error, with the source's own (finetuned) test error beside it.  Every run is a
``train`` folder under ``<root>/<target>_<init>``, so a killed transfer resumes where it stopped.

Everything that can be refused is checked for every target before the first one trains.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from data_prep.lmdb_writer import quick_check_lmdb
from data_prep.prepare import prepare
from metaqnn.caffe.gpu import ensure_gpu_ready
from metaqnn.caffe.locate import find_caffe
from metaqnn.caffe.runner import Stall
from metaqnn.config import Config
from metaqnn.train import (
    DEFAULT_STALL,
    INITS,
    TrainPlan,
    check_out,
    check_request,
    describe_plan,
    plan_training,
    run_training,
    target_layers,
)
from metaqnn.transfer_source import SourceModel, TransferError
from qagent.arch import format_architecture

TABLE = "table5"
TRANSFER = "transfer"


@dataclass(frozen=True)
class Target:
    """One dataset to train on: its config (preset + overrides), its prepared data, its release files."""

    config: Config
    data_dir: Path
    source_dir: Optional[Path] = None


def prepared(target: Target, log: Callable[[str], None]) -> Dict[str, Any]:
    """The target's manifest, preparing the data when it is missing (as a search does); checked to fit.

    Every set is checked by its meta pages only: which two sets are read (walked by
    :func:`plan_for`) depends on the protocol, which is planned from this manifest.
    """
    from metaqnn.search import check_data_fits, prep_options

    manifest = prepare(
        prep_options(target.config),
        target.data_dir,
        target.source_dir,
        lambda msg: None if "already" in msg else log(msg),
        repair=False,
        deep=(),
    )
    check_data_fits(target.config, manifest, target.data_dir)
    return manifest


def plan_for(
    source: SourceModel,
    target: Target,
    init: str,
    protocol: Optional[str],
    overrides: Optional[Dict[str, Any]],
    log: Callable[[str], None],
    walked: Optional[Set[Path]] = None,
) -> TrainPlan:
    """The plan of one cell; the two sets it reads (train_full and test, by default) walked page by page.

    ``walked``: the sets already walked by this command (a transfer plans a target twice), not walked again.
    """
    manifest = prepared(target, log)
    plan = plan_training(source, target.config, target.data_dir, manifest, init, protocol, overrides)
    for name in (plan.protocol.train_set, plan.protocol.test_set):
        s = manifest["sets"][name]
        path = Path(os.path.abspath(target.data_dir / s["path"]))
        if walked is None or path not in walked:
            quick_check_lmdb(path, int(s["count"]), s["shape"], manifest.get("num_classes"))
            if walked is not None:
                walked.add(path)
    return plan


def refuse_early(
    source: SourceModel,
    target: Target,
    init: str,
    out: Path,
    protocol: Optional[str],
    overrides: Optional[Dict[str, Any]],
) -> None:
    """Everything about one cell that can be refused before its data is prepared (nothing is created)."""
    check_request(source, target.config, init, protocol, overrides)
    arch = format_architecture(target_layers(source.layers, target.config.space.num_classes))
    check_out(out, arch, target.config.name, init)


def _caffe(gpu: Optional[int]) -> Any:
    caffe = find_caffe(gpu=gpu is not None)
    if gpu is not None:
        ensure_gpu_ready(caffe)
    return caffe


def train_one(
    source: SourceModel,
    target: Target,
    init: str,
    out: Path,
    protocol: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    gpu: Optional[int] = None,
    timeout: Optional[float] = None,
    stall: Optional[Stall] = DEFAULT_STALL,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """``metaqnn train``: check everything, prepare the target's data, train, test."""
    refuse_early(source, target, init, out, protocol, overrides)
    caffe = _caffe(gpu)
    plan = plan_for(source, target, init, protocol, overrides, log)
    for line in describe_plan(plan):
        log(line)
    return run_training(plan, out, caffe, gpu, timeout, stall, log)


def transfer(
    source: SourceModel,
    targets: Sequence[Target],
    root: Path,
    inits: Sequence[str] = INITS,
    overrides: Optional[Dict[str, Any]] = None,
    gpu: Optional[int] = None,
    timeout: Optional[float] = None,
    stall: Optional[Stall] = DEFAULT_STALL,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train the source on every target with every init; write and return Table 5."""
    bad = [i for i in inits if i not in INITS]
    if bad or not inits:
        raise TransferError(f"--init takes {' and/or '.join(INITS)}, got {','.join(inits) or 'nothing'}")
    names = [t.config.name for t in targets]
    if len(set(names)) != len(names):
        raise TransferError(f"--to names a dataset twice: {','.join(names)}")
    root = Path(os.path.abspath(root))
    cells = [(target, init, root / f"{target.config.name}_{init}") for target in targets for init in inits]
    for target, init, out in cells:  # refuse before anything trains: first what needs no data,
        refuse_early(source, target, init, out, None, overrides)
    caffe = _caffe(gpu)
    walked: Set[Path] = set()  # then data, each set walked once
    plans = [(out, plan_for(source, target, init, None, overrides, log, walked)) for target, init, out in cells]
    results: Dict[str, Dict[str, Any]] = {}
    for out, plan in plans:
        for line in describe_plan(plan):
            log(line)
        cell = {"folder": out.name, **run_training(plan, out, caffe, gpu, timeout, stall, log)}
        results.setdefault(plan.init, {})[plan.config.name] = cell
    table = merged_table(root, source, names, results)
    write_table(root, table)
    for line in table_lines(table):
        log(line)
    return table


def _source_key(source: SourceModel) -> Dict[str, Any]:
    """What makes two transfers' cells one table: the same architecture from the same weights."""
    from metaqnn.transfer_source import sha256_of

    return {"arch": source.arch, "weights_sha256": None if source.weights is None else sha256_of(source.weights)}


def merged_table(
    root: Path, source: SourceModel, names: List[str], results: Dict[str, Dict[str, Any]]
) -> Dict[str, Any]:
    """This run's cells on top of those an earlier ``transfer`` of the same source wrote into ``root``
    (another target or init), so running the targets one at a time still builds the whole table;
    a table of another source is replaced."""
    key = _source_key(source)
    targets, rows = list(names), {init: dict(cells) for init, cells in results.items()}
    try:
        old = json.loads((root / f"{TABLE}.json").read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("key") == key:
        targets = [t for t in old.get("targets", []) if t not in targets] + targets
        for init, cells in (old.get("rows") or {}).items():
            for name, cell in cells.items():
                rows.setdefault(init, {}).setdefault(name, cell)
    order = [i for i in INITS if i in rows]
    return {
        "key": key,
        "source": {"arch": source.arch, **{k: v for k, v in source.origin.items() if k != "weights_missing"}},
        "source_test_error": None if source.test_accuracy is None else 1.0 - source.test_accuracy,
        "targets": targets,
        "rows": {init: rows[init] for init in order},
    }


def write_table(root: Path, table: Dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{TABLE}.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    (root / f"{TABLE}.md").write_text("\n".join(table_lines(table)) + "\n")


def _pct(error: Optional[float]) -> str:
    return "-" if error is None else f"{100 * error:.2f}"


def table_lines(table: Dict[str, Any]) -> List[str]:
    """Table 5's layout: a row per initialisation, a column per target, test error (%)."""
    src = table["source"]
    dataset = src.get("dataset") or "source"
    head = f"| init | {dataset} (source) | " + " | ".join(table["targets"]) + " |"
    lines = [
        f"Table 5: test error (%) of `{src['arch']}` trained on each target from random initialisation "
        f"and finetuned from its {dataset} weights ({src.get('weights_from', 'given weights')}).",
        "",
        head,
        "|---|---:|" + "---:|" * len(table["targets"]),
    ]
    labels = {"scratch": "from scratch", "finetune": "finetuned"}
    for init, row in table["rows"].items():
        cells = [_pct(row[t]["test_error"]) if t in row else "-" for t in table["targets"]]
        own = _pct(table["source_test_error"]) if init == "finetune" else "-"
        lines.append(f"| {labels.get(init, init)} | {own} | " + " | ".join(cells) + " |")
    if table["source_test_error"] is None:
        lines += ["", "The source's own test error is unknown: it was not finetuned (`metaqnn finetune`)."]
    return lines


def transfer_section(exp_dir: Path) -> List[str]:
    """The experiment's Table 5, for its report, when ``transfer`` wrote one."""
    path = Path(exp_dir) / TRANSFER / f"{TABLE}.md"
    if not path.is_file():
        return []
    return ["", "## Transfer (Table 5)", "", *path.read_text().splitlines()]
