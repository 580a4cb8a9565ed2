"""Finish models that an early-stopping rule stopped: train them to the protocol's end.

A stopped model kept the snapshot it was stopped at (weights and solver state), so finishing
continues from there with the same solver; its reward was a prediction, its finished result is
a measurement and replaces the prediction in the store (the prediction stays in the model's
metrics under ``stopped_early``).  The search must not be running (the store's writer lock).
"""

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from data_prep.prepare import read_manifest
from data_prep.sources import DataError
from metaqnn.caffe.locate import find_caffe
from metaqnn.caffe.runner import Stall
from metaqnn.config import upgrade_record
from metaqnn.constraints import Scorer
from metaqnn.experiment import STORE_NAME, experiment_config, experiment_data_dir, experiment_id, model_dir
from metaqnn.search import JobPlaces, build_job
from metaqnn.snapshot_policy import why_dropped
from metaqnn.trainer import Trainer, snapshot_files
from qagent.arch import parse_architecture
from qagent.errors import ConfigError, MetaQNNError
from qagent.status import ModelStatus
from qagent.store import ExperimentStore, ModelRow

# what a finished model keeps of the prediction it was stopped with
STOP_FIELDS = ("predicted_accuracy", "stopped_epoch", "stop_probability", "stop_target", "stop_rule", "best_accuracy")


def stopped_prediction(m: ModelRow) -> Optional[float]:
    """The prediction a model was stopped with: still stopped, or finished since (kept beside the measurement)."""
    if m.status == ModelStatus.STOPPED:
        return m.accuracy  # the prediction itself, not the reward [constraints] shaped from it
    kept = m.metrics.get("stopped_early")
    if m.status == ModelStatus.DONE and isinstance(kept, dict) and kept.get("predicted_accuracy") is not None:
        return float(kept["predicted_accuracy"])
    return None


def choose(models: Sequence[ModelRow], top: Optional[int], ids: Sequence[int]) -> List[ModelRow]:
    """The models to finish: these ids, else the ``top`` highest predictions (all: None).

    Ranked over every model that was ever stopped, finished ones included (a prediction never
    changes once stored), so ``--top K`` names the same K models however often it is run or
    killed: a rerun completes the selection instead of reaching for the next stopped ones.
    """
    ever = [m for m in models if stopped_prediction(m) is not None]
    if ids:
        by_id = {m.id: m for m in ever}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ConfigError(f"model #{missing[0]} is not a model stopped early in this experiment")
        return [by_id[i] for i in ids]
    ranked = sorted(ever, key=lambda m: (-(stopped_prediction(m) or 0.0), m.id))
    return ranked if top is None else ranked[:top]


class FinishError(MetaQNNError):
    pass


def _kept_snapshot_problem(folder: Path) -> Optional[str]:
    """Why a stopped model cannot be finished from its folder (None when it can).

    Only a folder whose ``result.json`` is still the stopped one is checked: a finish killed
    midway (``result-stopped.json`` beside a newer result, or none yet) is resumed by the trainer
    from wherever that run got to."""
    try:
        data = json.loads((folder / "result.json").read_text())
    except FileNotFoundError:
        if (folder / "result-stopped.json").exists():
            return None  # a finish in progress: continued from its newest snapshot
        return f"{folder} holds no result of a model stopped early"
    except (OSError, ValueError) as exc:
        return f"{folder / 'result.json'} is unreadable ({type(exc).__name__})"
    if not isinstance(data, dict) or data.get("status") != ModelStatus.STOPPED.value:
        return None  # finished before a kill: recovered, not trained again
    it = data.get("resume_iteration")
    if it is None:
        return f"{folder / 'result.json'} names no snapshot to finish it from"
    present = {p.suffix: p for p in snapshot_files(folder / "snapshots").get(int(it), [])}
    for suffix in (".caffemodel", ".solverstate"):
        if suffix not in present:
            why = why_dropped(folder, f"snapshots/*_iter_{int(it)}{suffix}")
            if why is not None:
                return (
                    f"its kept snapshot {folder / 'snapshots'}/*_iter_{int(it)}{suffix} was deleted by the snapshot "
                    f"policy ({why}); `metaqnn train --exp <E> --model <N>` trains it again from the start"
                )
            return f"its kept snapshot {folder / 'snapshots'}/*_iter_{int(it)}{suffix} is missing"
    return None


def finish_stopped(
    exp_dir: Path,
    top: Optional[int] = None,
    ids: Sequence[int] = (),
    gpu: Optional[int] = None,
    timeout: Optional[float] = None,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Finish the chosen stopped models, one at a time; each result is committed as it arrives.

    A model already finished (by an earlier, perhaps killed, run of the same command) is reported,
    not trained again.  A model that cannot be finished stays stopped; the command then ends with
    one error line naming it, after committing every model that did finish."""
    path = Path(exp_dir) / STORE_NAME
    with ExperimentStore.open_readonly(path) as ro:
        config = experiment_config(ro)
        data_dir = experiment_data_dir(ro)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise DataError(f"the experiment's data {data_dir} is gone (run `metaqnn prepare`)")
    caffe = find_caffe(gpu=gpu is not None)
    protocol = config.protocol.load("search")
    out: List[Dict[str, Any]] = []
    problems: List[str] = []
    with ExperimentStore.open(path, config.to_dict(), normalize=upgrade_record) as store:
        exp_id = experiment_id(store, Path(exp_dir))
        places = JobPlaces(caffe.binary, data_dir, manifest["sets"], Path(exp_dir).resolve(), exp_id)
        chosen = choose(store.models(), top, ids)
        scorer = Scorer(config.constraints, config.space.image_size, config.dataset.channels, config.space.num_classes)
        if not chosen:
            log(f"experiment {exp_dir} has no model stopped early to finish")
        for n, m in enumerate(chosen, 1):
            predicted = stopped_prediction(m) or 0.0
            line: Dict[str, Any] = {"model": m.id, "arch": m.arch, "predicted": predicted}
            if m.status == ModelStatus.DONE:
                line.update(status=str(m.status), measured=m.accuracy)
                log(
                    f"[{n}/{len(chosen)}] #{m.id} already finished: measured {m.accuracy or 0.0:.4f} "
                    f"(predicted {predicted:.4f})"
                )
                out.append(line)
                continue
            problem = _kept_snapshot_problem(model_dir(places.exp_dir, m.id))
            if problem is not None:
                problems.append(f"#{m.id} cannot be finished: {problem}")
                line["status"] = str(m.status)
                out.append(line)
                continue
            job = build_job(
                config, protocol, places, m.id, parse_architecture(m.arch), m.arch, timeout, Stall(), gpu, None
            )
            log(f"[{n}/{len(chosen)}] #{m.id} predicted {predicted:.4f}: training to {protocol.epochs} epochs")
            result = Trainer(job).finish()
            line["status"] = str(result.status)
            if result.status == ModelStatus.DONE and result.best_accuracy is not None:
                metrics = result.metrics()
                metrics["stopped_early"] = {k: m.metrics.get(k) for k in STOP_FIELDS}
                for key in ("params", "macs", "latency"):  # the costs the search kept ([constraints])
                    if metrics.get(key) is None and m.metrics.get(key) is not None:
                        metrics[key] = m.metrics[key]
                reward = result.best_accuracy
                if scorer.shaping:  # the agent's reward is shaped as it was for every other model
                    metrics["accuracy"] = reward
                    reward = scorer.reward(reward, metrics)
                store.record_finished(m.arch, reward, metrics)
                line["measured"] = result.best_accuracy
                log(f"#{m.id} measured {result.best_accuracy:.4f} (predicted {predicted:.4f})")
            else:
                problems.append(f"#{m.id} could not be finished ({result.failure}: {result.message}); it stays stopped")
            out.append(line)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FinishError(problems[0] + more)
    return out
