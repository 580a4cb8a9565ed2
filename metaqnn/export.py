"""The Caffe files of a model the way the authors published theirs, and export of an experiment's top models.

For each model: ``net.prototxt`` (search net: exploration train set / validation
set), ``finetune_net.prototxt`` (full training set / test set),
``solver_search.prototxt`` (Section 5 protocol, at the learning rate that
passed the restarts), ``solver_finetune.prototxt`` (the preset's finetuning
protocol), ``arch.txt``, ``metadata.json`` and the best weights; plus
``summary.md`` / ``summary.csv`` over the exported models.

An export folder always holds the store's ranking at the time of the last export, never an
older one's: ``finetune`` and ``ensemble`` train and average what it holds, so a stale rank
folder would be a model trained or averaged under a rank it no longer has (issue 24).
"""

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from data_prep.prepare import read_manifest
from metaqnn.config import Config
from metaqnn.experiment import (
    IDENTITY,
    STORE_NAME,
    default_data_dir,
    experiment_config,
    experiment_data_dir,
    model_dir,
    read_identity,
)
from metaqnn.netspec import build_net
from metaqnn.render import render_net, render_solver
from metaqnn.snapshot_policy import why_dropped
from metaqnn.solverspec import Protocol, solver_fields
from metaqnn.weights import WeightsError, caffemodel_to_hdf5
from qagent.arch import Layer, format_architecture, parse_architecture
from qagent.errors import ConfigError
from qagent.outdir import OutputError, writing_into
from qagent.space import trajectory_of
from qagent.status import ModelStatus
from qagent.store import ExperimentStore, ModelRow


def dataset_sizes(config: Config, data_dir: Optional[Path] = None) -> Dict[str, int]:
    """Set sizes from the prepared manifest, else from the preset's release sizes (paper numbers)."""
    manifest = read_manifest(data_dir or default_data_dir(config))
    if manifest is not None:
        return {name: int(s["count"]) for name, s in manifest["sets"].items()}
    rel = config.dataset.release_sizes
    if rel is None:
        raise ConfigError(f"no prepared data for {config.name} and no release_sizes in the preset")
    val = config.dataset.validation_size
    return {"train": rel.train - val, "val": val, "train_full": rel.train + rel.extra, "test": rel.test}


def _paths(config: Config, finetune: bool, data_dir: Optional[Path]) -> Dict[str, str]:
    d = data_dir or default_data_dir(config)
    train, test = ("train_full", "test") if finetune else ("train", "val")
    return {"train": str(d / f"{train}.lmdb"), "test": str(d / f"{test}.lmdb")}


def net_spec(config: Config, layers: Sequence[Layer], finetune: bool, data_dir: Optional[Path] = None) -> Any:
    paths = _paths(config, finetune, data_dir)
    return build_net(
        layers,
        image_size=config.space.image_size,
        channels=config.dataset.channels,
        num_classes=config.space.num_classes,
        train_source=paths["train"],
        test_source=paths["test"],
        transform=config.render.transform(),
        dropout=config.render.dropout,
    )


def net_text(config: Config, layers: Sequence[Layer], finetune: bool, data_dir: Optional[Path] = None) -> str:
    return render_net(net_spec(config, layers, finetune, data_dir))


def _overridden(config: Config, role: str, overrides: Optional[Dict[str, Any]]) -> Protocol:
    proto: Protocol = config.protocol.load(role)
    return proto.with_overrides(**overrides) if overrides else proto


def _solver_text(
    config: Config, role: str, net: str, overrides: Optional[Dict[str, Any]], data_dir: Optional[Path]
) -> str:
    """The preset's ``role`` protocol (search | finetune) for this dataset's sizes.

    The search protocol tests the whole validation set; finetuning rounds test_iter down, as published.
    """
    proto = _overridden(config, role, overrides)
    sizes = dataset_sizes(config, data_dir)
    fields = solver_fields(
        proto,
        net=net,
        train_size=sizes[proto.train_set],
        test_size=sizes[proto.test_set],
        whole_test_set=role == "search",
    )
    return render_solver(fields)


def finetune_solver_text(
    config: Config,
    net: str = "finetune_net.prototxt",
    protocol_overrides: Optional[Dict[str, Any]] = None,
    data_dir: Optional[Path] = None,
) -> str:
    return _solver_text(config, "finetune", net, protocol_overrides, data_dir)


def search_solver_text(
    config: Config,
    net: str = "net.prototxt",
    lr: Optional[float] = None,
    data_dir: Optional[Path] = None,
    seed: Optional[int] = None,
) -> str:
    """The search protocol at the rate that passed the restarts (and the model's Caffe seed, if known)."""
    overrides = {k: v for k, v in (("base_lr", lr), ("random_seed", seed)) if v is not None}
    return _solver_text(config, "search", net, overrides, data_dir)


def render_model(
    config: Config,
    arch: str,
    out: Path,
    manifest_dir: Optional[Path] = None,
    lr: Optional[float] = None,
    metadata: Optional[Dict[str, Any]] = None,
    off_space: bool = False,
) -> List[Path]:
    """Write a model's files; an architecture outside the preset's space is refused unless ``off_space``."""
    layers = parse_architecture(arch)
    if not off_space:
        try:
            trajectory_of(config.space, layers)
        except ConfigError:
            raise
        except ValueError as exc:  # InvalidArchitectureError: the agent's own reason
            raise type(exc)(f"{exc} in the {config.name} space (render it anyway with --off-space)") from None
    spec = net_spec(config, layers, False, manifest_dir)
    files = {
        "net.prototxt": render_net(spec),
        "finetune_net.prototxt": net_text(config, layers, True, manifest_dir),
        "solver_search.prototxt": search_solver_text(
            config, "net.prototxt", lr, manifest_dir, (metadata or {}).get("caffe_seed")
        ),
        "solver_finetune.prototxt": finetune_solver_text(config, "finetune_net.prototxt", None, manifest_dir),
        "arch.txt": arch + "\n",
        "metadata.json": json.dumps(
            {"arch": arch, "param_count": spec.param_count, **(metadata or {})}, indent=1, sort_keys=True
        )
        + "\n",
    }
    written = []
    with writing_into(out, "output folder"):
        for name, text in files.items():
            (out / name).write_text(text)
            written.append(out / name)
    return written


@dataclass(frozen=True)
class Weights:
    """What export_weights wrote: ``path`` (weights.caffemodel), or None and the reason in ``missing``."""

    path: Optional[Path]
    missing: Optional[str] = None


# Whether a model folder holds the model's own files: None when it does, else the reason it does not.
FolderCheck = Callable[[Path], Optional[str]]

ANOTHER_MODEL = "the model folder holds another model's files"


def _canonical(arch: Any) -> Any:
    try:
        return format_architecture(parse_architecture(str(arch)))
    except ValueError:
        return arch


def result_json_check(arch: str, model_id: Optional[int] = None, experiment_id: Optional[str] = None) -> FolderCheck:
    """The folder is this model's: its ``identity.json`` (written by the trainer before anything
    else) names this architecture, model id and experiment id, and its ``result.json`` (written
    by the trainer's commit) names ``arch``.  A folder without identity.json is from before model
    folders carried one: its result.json alone decides.

    A folder reused by another model (an experiment rebuilt over an old one, a store restored
    from a backup) must not lend that model's weights to this one under its name.
    """

    wanted = {"architecture": _canonical(arch), "model": model_id, "experiment": experiment_id}

    def differs(identity: Any, where: Path) -> Optional[str]:
        if not isinstance(identity, dict):
            return f"{where} holds no readable identity"
        for key, value in wanted.items():
            if value is not None and identity.get(key) != value:
                return f"{ANOTHER_MODEL} ({where} names {key} {identity.get(key)!r})"
        return None

    def check(folder: Path) -> Optional[str]:
        path = folder / "result.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return f"no result.json in {folder} (the model was trained elsewhere, or its folder was removed)"
        except (OSError, ValueError) as exc:
            return f"{path} is unreadable ({exc})"
        if not isinstance(record, dict):
            return f"{path} is not a result"
        if os.path.lexists(str(folder / IDENTITY)) or "identity" in record:  # written since folders carry one
            if not os.path.lexists(str(folder / IDENTITY)):
                return f"{folder / IDENTITY} is missing (its result.json says the folder had one)"
            problem = differs(read_identity(folder), folder / IDENTITY) or differs(record.get("identity"), path)
            if problem is not None:
                return problem
            if record.get("identity") != read_identity(folder):
                return f"{ANOTHER_MODEL} ({path} and {folder / IDENTITY} disagree)"
        recorded = record.get("architecture")
        if _canonical(recorded) != _canonical(arch):
            return f"{ANOTHER_MODEL} ({path} names {recorded})"
        return None

    return check


def kept_weights(model_dir: Path, best_iteration: Optional[int], check: Optional[FolderCheck] = None) -> Weights:
    """The snapshot a search kept for a model (its best validation epoch), or why there is none."""
    if best_iteration is None:
        return Weights(None, "no best iteration recorded (a failed model keeps no weights)")
    reason = check(model_dir) if check is not None else None
    if reason is not None:
        return Weights(None, reason)
    pattern = f"*_iter_{int(best_iteration)}.caffemodel"
    found = sorted((model_dir / "snapshots").glob(pattern))
    if not found:
        why = why_dropped(model_dir, "snapshots/" + pattern)
        if why is not None:
            return Weights(None, f"its best weights were deleted by the snapshot policy ({why})")
        return Weights(None, f"snapshot file missing: {model_dir / 'snapshots'}/{pattern}")
    return Weights(found[0])


def export_weights(
    model_dir: Path, best_iteration: Optional[int], out: Path, check: Optional[FolderCheck] = None
) -> Weights:
    """Copy the model's best weights as ``weights.caffemodel`` and write them as ``weights.h5``.

    Weights are copied only from a folder ``check`` accepts.  When there are none to copy, the
    reason is returned and no weights file is left in ``out`` (not even an older export's), so
    a folder never holds weights that are not this model's current ones.
    """
    targets = (out / "weights.caffemodel", out / "weights.h5")
    for stale in targets:
        stale.unlink(missing_ok=True)
    source = kept_weights(model_dir, best_iteration, check)
    if source.path is None:
        return source
    shutil.copyfile(source.path, targets[0])
    try:
        caffemodel_to_hdf5(targets[0], targets[1])
    except WeightsError as exc:  # a truncated or foreign snapshot: said, not exported
        for stale in targets:
            stale.unlink(missing_ok=True)
        return Weights(None, f"unusable snapshot: {exc}")
    return Weights(targets[0])


def reward_kind(m: ModelRow) -> str:
    """``measured`` (a validation accuracy Caffe reported) or ``predicted`` (a model stopped early)."""
    return "predicted" if m.status == ModelStatus.STOPPED else "measured"


def reward_fields(m: ModelRow) -> Dict[str, Any]:
    """The model's score for metadata.json, never a prediction under a measurement's name."""
    shaped = {"reward": m.reward} if "accuracy" in m.metrics else {}  # [constraints] shaped the agent's reward
    if m.status == ModelStatus.STOPPED:
        return {
            **shaped,
            "validation_accuracy": None,
            "predicted_accuracy": m.accuracy,
            "reward_kind": "predicted",
            "stopped_epoch": m.metrics.get("stopped_epoch"),
            "accuracy_when_stopped": m.metrics.get("best_accuracy"),
        }
    out: Dict[str, Any] = {**shaped, "validation_accuracy": m.accuracy, "reward_kind": "measured"}
    if m.metrics.get("stopped_early"):  # stopped, then finished: the prediction it was stopped with
        out["stopped_early"] = m.metrics["stopped_early"]
    return out


@dataclass(frozen=True)
class Export:
    """One export: the rank folders of the current top models (in rank order) and what to print."""

    models: List[ModelRow]
    folders: List[Path]
    lines: List[str]


RANK_FOLDER = re.compile(r"^(\d{2,})_model(\d{5,})$")
PARKED = "unranked"  # <out>/unranked/model<id>: folders of models that left the ranking, kept for reuse
PARKED_FOLDER = re.compile(r"^model(\d{5,})$")


def rank_folder_name(rank: int, model_id: int) -> str:
    return f"{rank:02d}_model{model_id:05d}"


def export_top(
    exp_dir: Path, top: int, out: Path, include_predicted: bool = False, rank_by: str = "accuracy"
) -> List[str]:
    """The top models by measured validation accuracy (and by predicted accuracy too, when asked)."""
    return export_models(exp_dir, top, out, include_predicted, rank_by).lines


def pareto_models(exp_dir: Path, cost: str, include_predicted: bool = False) -> Tuple[List[ModelRow], str]:
    """The models on the accuracy/cost front (metaqnn.pareto), cheapest first, and what was left out."""
    from metaqnn.pareto import comparable, pareto_front

    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        statuses = (ModelStatus.DONE, ModelStatus.STOPPED) if include_predicted else (ModelStatus.DONE,)
        models = {m.id: m for m in store.models() if m.status in statuses and m.accuracy is not None}
    points, note = comparable([(m.id, float(m.accuracy or 0.0), m.metrics) for m in models.values()], cost)
    if not points:
        raise ConfigError(f"experiment {exp_dir} has no trained model with a {cost} figure to put on a front")
    return [models[i] for i in pareto_front(points)], note


def export_models(
    exp_dir: Path,
    top: int,
    out: Path,
    include_predicted: bool = False,
    rank_by: str = "accuracy",
    chosen: Optional[List[ModelRow]] = None,
) -> Export:
    """Export the store's current top ``top`` models into ``out``, and only them (``chosen``: these
    models, in this order, instead -- the Pareto front).

    Rank folders an earlier export wrote for this experiment are renamed to their model's new
    rank (keeping a finetune result), or moved to ``unranked/`` when the model left the ranking;
    nothing export did not write is touched.  ``rank_by`` "reward" ranks by the agent's reward
    (shaped under [constraints]); the default is the accuracy.
    """
    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        config = experiment_config(store)
        models = chosen if chosen is not None else store.top_models(top, include_predicted, rank_by)
        data_dir = experiment_data_dir(store)
        archs = {m.id: m.arch for m in store.models()}
        key = store.meta().get("created")
        experiment_id = store.experiment_id() or None
    if not models:
        raise ConfigError(
            f"experiment {exp_dir} has no trained model to export yet"
            + ("" if include_predicted else " (models stopped early count with --include-predicted)")
        )
    with writing_into(out, "export folder"):
        folders = _arrange(out, models, archs, key)
        lines = _export(config, models, out, folders, data_dir, exp_dir, key, experiment_id)
        _drop_stale_ensemble(out, folders)
    return Export(models, folders, lines)


def _owner(folder: Path, archs: Dict[int, str], key: Optional[str], pattern: "re.Pattern[str]") -> Optional[int]:
    """The model id a folder was exported for, if an export of this experiment wrote it (else None).

    Its metadata.json must name a model of this store with that model's architecture, and this
    experiment's creation time (exports before that field existed carry none); the folder's name
    must carry the same id.  A link is never ours: what it points to was not written here.
    """
    m = pattern.match(folder.name)
    if m is None or folder.is_symlink() or not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    model_id = meta.get("model_id")
    if not isinstance(model_id, int) or model_id != int(m.groups()[-1]) or archs.get(model_id) != meta.get("arch"):
        return None
    return model_id if meta.get("experiment_created", key) == key else None


def _has_result(folder: Path, model_id: int) -> bool:
    try:
        result = json.loads((folder / "finetune.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and result.get("model_id", model_id) == model_id


def _arrange(out: Path, models: List[ModelRow], archs: Dict[int, str], key: Optional[str]) -> List[Path]:
    """Make ``out``'s rank folders those of ``models``: rename, park or delete what earlier exports left.

    Per model, one folder is kept (one with a finetune result first, then the one already at
    its rank); other copies of the same model are deleted.  A folder whose model is no longer
    ranked goes to ``unranked/model<id>`` (replacing an older one there), so a later export that
    ranks it again gets its finetune result back.
    """
    parked = out / PARKED
    targets = {m.id: out / rank_folder_name(rank, m.id) for rank, m in enumerate(models, 1)}
    owned: Dict[int, List[Path]] = {}
    places = [(f, RANK_FOLDER) for f in sorted(out.iterdir())]
    if parked.is_dir() and not parked.is_symlink():
        places += [(f, PARKED_FOLDER) for f in sorted(parked.iterdir())]
    for folder, pattern in places:
        model_id = _owner(folder, archs, key, pattern)
        if model_id is not None:
            owned.setdefault(model_id, []).append(folder)
    for model_id, target in targets.items():
        if os.path.lexists(str(target)) and target not in owned.get(model_id, []):
            raise OutputError(
                f"export folder {out} holds {target.name}, which no export of this experiment wrote "
                "(another experiment's, or not a model folder): move it away, or export elsewhere with --out"
            )
    for model_id, folders in owned.items():
        ranked = targets.get(model_id)
        keep = min(folders, key=lambda f: (not _has_result(f, model_id), f != ranked, f.parent != out, f.name))
        for folder in folders:
            if folder != keep:
                shutil.rmtree(folder)
        if ranked is None:
            slot = parked / f"model{model_id:05d}"
            if keep == slot:
                continue
            if os.path.lexists(str(slot)):  # not ours (ours was just deleted): leave it, drop the stale copy
                shutil.rmtree(keep)
                continue
            parked.mkdir(exist_ok=True)
            keep.rename(slot)
        elif keep != ranked:
            keep.rename(ranked)
            _rename_result(ranked)
    if parked.is_dir() and not parked.is_symlink() and not any(parked.iterdir()):
        parked.rmdir()
    return [targets[m.id] for m in models]


def _rename_result(folder: Path) -> None:
    """A finetune result moved with its folder names the folder it is in now."""
    done = folder / "finetune.json"
    try:
        result = json.loads(done.read_text())
    except (OSError, ValueError):
        return
    if isinstance(result, dict) and result.get("model") != folder.name:
        result["model"] = folder.name
        done.write_text(json.dumps(result, indent=1))


def _drop_stale_ensemble(out: Path, folders: List[Path]) -> None:
    """An ensemble result whose members are not all current rank folders no longer describes the ranking."""
    path = out / "ensemble.json"
    if not path.exists():
        return
    current = {f.name for f in folders}
    try:
        members = [str(m["model"]) for m in json.loads(path.read_text())["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        members = []
    if not members or not set(members) <= current:
        path.unlink()


def _export(
    config: Config,
    models: List[ModelRow],
    out: Path,
    folders: List[Path],
    data_dir: Path,
    exp_dir: Path,
    key: Optional[str],
    experiment_id: Optional[str] = None,
) -> List[str]:
    rows = []
    warnings = []
    for rank, (m, folder) in enumerate(zip(models, folders), 1):
        meta = {
            "rank": rank,
            "model_id": m.id,
            **reward_fields(m),
            "epsilon": m.epsilon,
            "learning_rate": m.metrics.get("learning_rate"),
            "restarts": m.metrics.get("restarts"),
            "best_iteration": m.metrics.get("best_iteration"),
            "caffe_seed": m.metrics.get("caffe_seed"),
            "macs": m.metrics.get("macs"),
            "latency": m.metrics.get("latency"),
            "dataset": config.name,
            "experiment_created": key,
        }
        render_model(config, m.arch, folder, data_dir, lr=m.metrics.get("learning_rate"), metadata=meta, off_space=True)
        weights = export_weights(
            model_dir(exp_dir, m.id),
            m.metrics.get("best_iteration"),
            folder,
            check=result_json_check(m.arch, m.id, experiment_id),
        )
        written = json.loads((folder / "metadata.json").read_text())
        written.update(
            weights=None if weights.path is None else "weights.caffemodel",
            weights_h5=None if weights.path is None else "weights.h5",
            weights_missing=weights.missing,
        )
        (folder / "metadata.json").write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
        if weights.missing is not None:
            warnings.append(f"warning: {folder.name}: no weights exported: {weights.missing}")
        latency: Dict[str, Any] = m.metrics["latency"] if isinstance(m.metrics.get("latency"), dict) else {}
        rows.append(
            {
                "rank": rank,
                "model": m.id,
                "val_acc": m.accuracy,
                "kind": reward_kind(m),
                "params": written["param_count"],
                "macs": m.metrics.get("macs"),
                "latency_ms": latency.get("forward_ms"),
                "latency_device": latency.get("device"),
                "lr": m.metrics.get("learning_rate"),
                "weights": "missing" if weights.path is None else "weights.caffemodel",
                "folder": folder.name,
                "arch": m.arch,
            }
        )
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [
        "| rank | model | val. acc. | kind | params (10^6) | MACs (10^6) | latency (ms) | lr | weights | architecture |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    md += [
        f"| {r['rank']} | {r['model']} | {r['val_acc']:.4f} | {r['kind']} | {r['params'] / 1e6:.3f} "
        f"| {'-' if r['macs'] is None else format(r['macs'] / 1e6, '.3f')} "
        f"| {'-' if r['latency_ms'] is None else format(r['latency_ms'], '.3f')} | {r['lr']} "
        f"| {'yes' if r['weights'] != 'missing' else '**missing**'} | `{r['arch']}` |"
        for r in rows
    ]
    devices = sorted({str(r["latency_device"]) for r in rows if r["latency_device"]})
    if devices:
        md += ["", f"Latency measured with `caffe time` on: {'; '.join(devices)}."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return [f"exported {len(rows)} models to {out}", *md, *warnings]
