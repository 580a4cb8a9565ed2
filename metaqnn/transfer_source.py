"""Where a ``metaqnn train`` architecture (and, for ``--init finetune``, its weights) comes from.

One of: an architecture string; a net prototxt in the authors' style (the architecture is
recovered, :func:`metaqnn.compare.architecture_from_net`); a model folder that ``export`` or
``train`` wrote; or ``--exp E --model N``.  Weights come with a folder or a store's model, or
from ``--weights FILE``.  A model's weights are its *finished* ones: the finetuned weights of an
export folder when it was finetuned (the paper transfers the final CIFAR-10 model), else the
search's best-epoch weights; a ``train`` folder's final weights.  A model stopped early by the
search has only a prediction: it is a source only with ``--include-predicted``.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, cast

from qagent.arch import Layer, format_architecture, parse_architecture
from qagent.errors import MetaQNNError
from qagent.status import ModelStatus


class TransferError(MetaQNNError):
    pass


@dataclass(frozen=True)
class SourceModel:
    """An architecture to train, with the weights a finetune starts from (None: none known)."""

    layers: Tuple[Layer, ...]
    weights: Optional[Path] = None
    # What the source is, for metadata.json and Table 5: kind, path or experiment and model,
    # dataset, which weights, and the source's own test accuracy when it has one.
    origin: Dict[str, Any] = field(default_factory=dict)
    # (image size, channels, classes) of the data the weights were trained on, when it is known:
    # tried first when the weights are matched to the architecture (metaqnn.weight_plan.fit_source).
    input_shape: Optional[Tuple[int, int, int]] = None

    @property
    def arch(self) -> str:
        return format_architecture(self.layers)

    @property
    def test_accuracy(self) -> Optional[float]:
        value = self.origin.get("test_accuracy")  # checked when read (_accuracy)
        return None if value is None else float(value)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TransferError(f"{path} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise TransferError(f"{path} is not a JSON object")
    return data


def _accuracy(value: Any, where: Path) -> Optional[float]:
    """A recorded test accuracy: None, or a number in [0, 1]; anything else is a damaged file."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise TransferError(f"{where} records a test accuracy that is not a number in [0, 1]: {value!r}")
    return float(value)


def _preset_shape(dataset: Any) -> Optional[Tuple[int, int, int]]:
    """The input shape of a dataset's preset, when the name is one (an export folder records only the name)."""
    from metaqnn.config import build_config, preset_names

    if not isinstance(dataset, str) or dataset not in preset_names():
        return None
    cfg = build_config(dataset)
    return (cfg.space.image_size, cfg.dataset.channels, cfg.space.num_classes)


def _predicted_refused(what: str) -> TransferError:
    return TransferError(
        f"{what} was stopped early by the search: its accuracy is only predicted "
        "(train it to the end with `metaqnn finish`, or pass --include-predicted)"
    )


def from_folder(folder: Path, include_predicted: bool = False) -> SourceModel:
    """A model folder written by ``export`` (rank folder) or by ``train``."""
    meta = _json(folder / "metadata.json")
    arch_file = folder / "arch.txt"
    if not arch_file.is_file():
        raise TransferError(f"{folder} is not a model folder of `metaqnn export` or `metaqnn train` (no arch.txt)")
    if not meta:
        raise TransferError(f"{folder} is not a model folder of `metaqnn export` or `metaqnn train` (no metadata.json)")
    layers = parse_architecture(arch_file.read_text().strip())
    origin: Dict[str, Any] = {"kind": "folder", "path": str(folder), "dataset": meta.get("dataset")}
    if meta.get("kind") == "train":  # a metaqnn train folder: its final weights and test accuracy
        result = _json(folder / "result.json")
        if not result:
            raise TransferError(f"{folder} is a `metaqnn train` folder whose training has not finished")
        weights = folder / "weights.caffemodel"
        target: Dict[str, Any] = meta["target"] if isinstance(meta.get("target"), dict) else {}
        origin.update(
            dataset=target.get("dataset"),
            test_accuracy=_accuracy(result.get("test_accuracy"), folder / "result.json"),
            weights_from="the training's final weights",
        )
        dims = [target.get(k) for k in ("image_size", "channels", "classes")]
        known = cast(Tuple[int, int, int], tuple(dims)) if all(isinstance(v, int) for v in dims) else None
        return SourceModel(layers, weights if weights.is_file() else None, origin, known)
    if meta.get("reward_kind") == "predicted" and not include_predicted:
        raise _predicted_refused(f"the model in {folder}")
    origin.update(experiment=meta.get("experiment_created"), model=meta.get("model_id"))
    preset = _preset_shape(meta.get("dataset"))
    done = _json(folder / "finetune.json")
    if done and done.get("model_id", meta.get("model_id")) == meta.get("model_id") and done.get("weights"):
        weights = folder / str(done["weights"])
        if weights.is_file():
            accuracy = _accuracy(done.get("test_accuracy"), folder / "finetune.json")
            origin.update(test_accuracy=accuracy, weights_from="its finetuned weights")
            return SourceModel(layers, weights, origin, preset)
    weights = folder / "weights.caffemodel"
    origin.update(weights_from="the search's best-epoch weights (not finetuned)")
    return SourceModel(layers, weights if weights.is_file() else None, origin, preset)


def from_experiment(
    exp_dir: Path, model_id: Optional[int], include_predicted: bool = False, rank_by: str = "accuracy"
) -> SourceModel:
    """Model ``model_id`` of an experiment (None: its best measured model), with its finished weights.

    The export rank folder of that model is used when ``export``/``finetune`` wrote one (its
    finetuned weights); else the weights the search kept.
    """
    from metaqnn.experiment import STORE_NAME, experiment_config, model_dir
    from metaqnn.export import RANK_FOLDER, kept_weights, result_json_check
    from qagent.store import ExperimentStore

    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        cfg = experiment_config(store)
        dataset, shape = cfg.name, (cfg.space.image_size, cfg.dataset.channels, cfg.space.num_classes)
        if model_id is None:
            top = store.top_models(1, include_predicted=include_predicted, by=rank_by)
            if not top:
                raise TransferError(
                    f"experiment {exp_dir} has no trained model yet"
                    + ("" if include_predicted else " (models stopped early count with --include-predicted)")
                )
            row = top[0]
        else:
            found = [m for m in store.models() if m.id == model_id]
            if not found:
                raise TransferError(f"experiment {exp_dir} has no model {model_id}")
            row = found[0]
        experiment = store.experiment_id() or None
    if row.status == ModelStatus.STOPPED and not include_predicted:
        raise _predicted_refused(f"model {row.id} of {exp_dir}")
    if row.status not in (ModelStatus.DONE, ModelStatus.STOPPED):  # its architecture still trains from scratch
        origin = {"kind": "experiment", "path": str(exp_dir), "model": row.id, "dataset": dataset}
        origin["weights_missing"] = f"model {row.id} of {exp_dir} has no trained weights (status {row.status.value})"
        return SourceModel(parse_architecture(row.arch), None, origin, shape)
    export = exp_dir / "export"
    for folder in sorted(export.iterdir()) if export.is_dir() else []:
        m = RANK_FOLDER.match(folder.name)
        if m and int(m.group(2)) == row.id and _json(folder / "metadata.json").get("arch") == row.arch:
            source = from_folder(folder, include_predicted)
            if source.test_accuracy is not None:  # finetuned: the final model
                return SourceModel(source.layers, source.weights, {**source.origin, "dataset": dataset}, shape)
    kept = kept_weights(
        model_dir(exp_dir, row.id), row.metrics.get("best_iteration"), result_json_check(row.arch, row.id, experiment)
    )
    origin = {
        "kind": "experiment",
        "path": str(exp_dir),
        "experiment": experiment,
        "model": row.id,
        "dataset": dataset,
        "validation_accuracy": row.accuracy if row.status == ModelStatus.DONE else None,
        "weights_from": "the search's best-epoch weights (not finetuned)",
    }
    if kept.path is None:
        origin["weights_missing"] = kept.missing
    return SourceModel(parse_architecture(row.arch), kept.path, origin, shape)


def from_net(path: Path) -> SourceModel:
    """The architecture of a MetaQNN-style net prototxt (the authors' published files)."""
    from metaqnn.compare import architecture_of_net

    return SourceModel(parse_architecture(architecture_of_net(path)), None, {"kind": "prototxt", "path": str(path)})


def resolve_source(
    arch: Optional[str] = None,
    folder: Optional[Path] = None,
    exp_dir: Optional[Path] = None,
    model_id: Optional[int] = None,
    net: Optional[Path] = None,
    weights: Optional[Path] = None,
    include_predicted: bool = False,
    every_way: bool = True,
    rank_by: str = "accuracy",
) -> SourceModel:
    """Exactly one of ``arch``, ``folder``, ``exp_dir`` (+ ``model_id``) or ``net``; ``weights`` replaces any weights.

    ``every_way``: all four are offered (``train``); else only a folder or an experiment (``transfer``).
    """
    given: List[str] = [n for n, v in (("--arch", arch), ("--from", folder), ("--exp", exp_dir), ("--net", net)) if v]
    if len(given) != 1:
        ways = (
            "--arch STRING, --from MODEL_FOLDER, --exp E [--model N] or --net FILE"
            if every_way
            else "--from MODEL_FOLDER or --exp E [--model N]"
        )
        raise TransferError(
            f"give the architecture exactly one way: {ways}" + (f" (got {', '.join(given)})" if given else "")
        )
    if model_id is not None and exp_dir is None:
        raise TransferError("--model N names a model of an experiment: give --exp E too")
    if arch is not None:
        source = SourceModel(parse_architecture(arch), None, {"kind": "architecture"})
    elif folder is not None:
        if not folder.is_dir():
            raise TransferError(f"--from {folder}: no such folder")
        source = from_folder(folder, include_predicted)
    elif exp_dir is not None:
        from metaqnn.experiment import STORE_NAME

        if not (exp_dir / STORE_NAME).is_file():
            raise TransferError(f"--exp {exp_dir}: no experiment there (no {STORE_NAME})")
        source = from_experiment(exp_dir, model_id, include_predicted, rank_by)
    else:
        assert net is not None
        source = from_net(net)
    if weights is not None:
        if not weights.is_file():
            raise TransferError(f"--weights {weights}: no such file")
        origin = {**source.origin, "weights_from": "--weights"}
        origin.pop("test_accuracy", None)
        source = SourceModel(source.layers, weights, origin, source.input_shape)
    return source
