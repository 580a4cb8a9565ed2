"""Finish models that an early-stopping rule stopped: train them to the protocol's end.

A stopped model kept the snapshot it was stopped at (weights and solver state), so finishing
continues from there with the same solver; its reward was a prediction, its finished result is
a measurement and replaces the prediction in the store (the prediction stays in the model's
metrics under ``stopped_early``).  The search must not be running (the store's writer lock).
"""

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from data_prep.prepare import read_manifest
from data_prep.sources import DataError
from metaqnn.caffe.locate import find_caffe
from metaqnn.caffe.runner import Stall
from metaqnn.config import upgrade_record
from metaqnn.experiment import STORE_NAME, experiment_config, experiment_data_dir
from metaqnn.search import JobPlaces, build_job
from metaqnn.trainer import Trainer
from qagent.arch import parse_architecture
from qagent.errors import ConfigError
from qagent.status import ModelStatus
from qagent.store import ExperimentStore, ModelRow

# what a finished model keeps of the prediction it was stopped with
STOP_FIELDS = ("predicted_accuracy", "stopped_epoch", "stop_probability", "stop_target", "stop_rule", "best_accuracy")


def choose(stopped: Sequence[ModelRow], top: Optional[int], ids: Sequence[int]) -> List[ModelRow]:
    """The stopped models to finish: these ids, else the ``top`` highest predictions (all: None)."""
    if ids:
        by_id = {m.id: m for m in stopped}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ConfigError(f"model #{missing[0]} is not a model stopped early in this experiment")
        return [by_id[i] for i in ids]
    ranked = sorted(stopped, key=lambda m: (-(m.reward or 0.0), m.id))
    return ranked if top is None else ranked[:top]


def finish_stopped(
    exp_dir: Path,
    top: Optional[int] = None,
    ids: Sequence[int] = (),
    gpu: Optional[int] = None,
    timeout: Optional[float] = None,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Finish the chosen stopped models, one at a time; each result is committed as it arrives."""
    path = Path(exp_dir) / STORE_NAME
    with ExperimentStore.open_readonly(path) as ro:
        config = experiment_config(ro)
        data_dir = experiment_data_dir(ro)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise DataError(f"the experiment's data {data_dir} is gone (run `metaqnn prepare`)")
    caffe = find_caffe(gpu=gpu is not None)
    protocol = config.protocol.load("search")
    places = JobPlaces(caffe.binary, data_dir, manifest["sets"], Path(exp_dir).resolve())
    out: List[Dict[str, Any]] = []
    with ExperimentStore.open(path, config.to_dict(), normalize=upgrade_record) as store:
        chosen = choose(store.models(ModelStatus.STOPPED), top, ids)
        if not chosen:
            log(f"experiment {exp_dir} has no model stopped early to finish")
        for n, m in enumerate(chosen, 1):
            job = build_job(
                config, protocol, places, m.id, parse_architecture(m.arch), m.arch, timeout, Stall(), gpu, None
            )
            log(f"[{n}/{len(chosen)}] #{m.id} predicted {m.reward:.4f}: training to {protocol.epochs} epochs")
            result = Trainer(job).finish()
            line = {"model": m.id, "arch": m.arch, "predicted": m.reward, "status": str(result.status)}
            if result.status == ModelStatus.DONE and result.best_accuracy is not None:
                metrics = result.metrics()
                metrics["stopped_early"] = {k: m.metrics.get(k) for k in STOP_FIELDS}
                store.record_finished(m.arch, result.best_accuracy, metrics)
                line["measured"] = result.best_accuracy
                log(f"#{m.id} measured {result.best_accuracy:.4f} (predicted {m.reward:.4f})")
            else:
                log(f"#{m.id} could not be finished: {result.failure} {result.message}; it stays stopped")
            out.append(line)
    return out
