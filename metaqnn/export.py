"""The Caffe files of a model the way the authors published theirs, and export of an experiment's top models.

For each model: ``net.prototxt`` (search net: exploration train set / validation
set), ``finetune_net.prototxt`` (full training set / test set),
``solver_search.prototxt`` (Section 5 protocol, at the learning rate that
passed the restarts), ``solver_finetune.prototxt`` (the preset's finetuning
protocol), ``arch.txt`` and ``metadata.json``; plus ``summary.md`` /
``summary.csv`` over all exported models.
"""

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from data_prep.prepare import read_manifest
from metaqnn.config import Config
from metaqnn.experiment import STORE_NAME, default_data_dir, experiment_config, experiment_data_dir, model_dir
from metaqnn.netspec import build_net
from metaqnn.render import render_net, render_solver
from metaqnn.solverspec import Protocol, solver_fields
from metaqnn.weights import caffemodel_to_hdf5
from qagent.arch import Layer, parse_architecture
from qagent.errors import ConfigError
from qagent.outdir import writing_into
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


def export_weights(model_dir: Path, best_iteration: Optional[int], out: Path) -> Optional[Path]:
    """Copy the model's best weights as ``weights.caffemodel`` and write them as ``weights.h5``.

    Nothing is written when the model kept no weights (a failed model, or one trained elsewhere).
    """
    if best_iteration is None:
        return None
    found = sorted((model_dir / "snapshots").glob(f"*_iter_{int(best_iteration)}.caffemodel"))
    if not found:
        return None
    shutil.copyfile(found[0], out / "weights.caffemodel")
    caffemodel_to_hdf5(out / "weights.caffemodel", out / "weights.h5")
    return out / "weights.h5"


def reward_kind(m: ModelRow) -> str:
    """``measured`` (a validation accuracy Caffe reported) or ``predicted`` (a model stopped early)."""
    return "predicted" if m.status == ModelStatus.STOPPED else "measured"


def reward_fields(m: ModelRow) -> Dict[str, Any]:
    """The model's score for metadata.json, never a prediction under a measurement's name."""
    if m.status == ModelStatus.STOPPED:
        return {
            "validation_accuracy": None,
            "predicted_accuracy": m.reward,
            "reward_kind": "predicted",
            "stopped_epoch": m.metrics.get("stopped_epoch"),
            "accuracy_when_stopped": m.metrics.get("best_accuracy"),
        }
    out: Dict[str, Any] = {"validation_accuracy": m.reward, "reward_kind": "measured"}
    if m.metrics.get("stopped_early"):  # stopped, then finished: the prediction it was stopped with
        out["stopped_early"] = m.metrics["stopped_early"]
    return out


def export_top(exp_dir: Path, top: int, out: Path, include_predicted: bool = False) -> List[str]:
    """The top models by measured validation accuracy (and by predicted accuracy too, when asked)."""
    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        config = experiment_config(store)
        models = store.top_models(top, include_predicted=include_predicted)
        data_dir = experiment_data_dir(store)
    if not models:
        raise ConfigError(
            f"experiment {exp_dir} has no trained model to export yet"
            + ("" if include_predicted else " (models stopped early count with --include-predicted)")
        )
    with writing_into(out, "export folder"):
        return _export(config, models, data_dir, out, exp_dir)


def _export(config: Config, models: List[ModelRow], data_dir: Path, out: Path, exp_dir: Path) -> List[str]:
    rows = []
    for rank, m in enumerate(models, 1):
        folder = out / f"{rank:02d}_model{m.id:05d}"
        meta = {
            "rank": rank,
            "model_id": m.id,
            **reward_fields(m),
            "epsilon": m.epsilon,
            "learning_rate": m.metrics.get("learning_rate"),
            "restarts": m.metrics.get("restarts"),
            "best_iteration": m.metrics.get("best_iteration"),
            "caffe_seed": m.metrics.get("caffe_seed"),
            "dataset": config.name,
        }
        render_model(config, m.arch, folder, data_dir, lr=m.metrics.get("learning_rate"), metadata=meta, off_space=True)
        export_weights(model_dir(exp_dir, m.id), m.metrics.get("best_iteration"), folder)
        params = json.loads((folder / "metadata.json").read_text())["param_count"]
        rows.append(
            {
                "rank": rank,
                "model": m.id,
                "val_acc": m.reward,
                "kind": reward_kind(m),
                "params": params,
                "lr": m.metrics.get("learning_rate"),
                "folder": folder.name,
                "arch": m.arch,
            }
        )
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [
        "| rank | model | val. acc. | kind | params (10^6) | lr | architecture |",
        "|---:|---:|---:|---|---:|---:|---|",
    ]
    md += [
        f"| {r['rank']} | {r['model']} | {r['val_acc']:.4f} | {r['kind']} | {r['params'] / 1e6:.3f} | {r['lr']} "
        f"| `{r['arch']}` |"
        for r in rows
    ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return [f"exported {len(rows)} models to {out}", *md]
