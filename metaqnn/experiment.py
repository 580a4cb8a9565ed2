"""An experiment's places and names: its folder, its store, its model folders, its data.

Every command that reads or writes an experiment (search, status, export, finetune, ensemble,
report) finds these here, so none of them imports the search loop just to learn a path.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

from metaqnn.config import PROJECT_ROOT, Config, stored_config
from qagent.errors import StoreError
from qagent.store import ExperimentStore

STORE_NAME = "store.sqlite"
MODELS = "models"
IDENTITY = "identity.json"  # in each model folder: what it trains (metaqnn.trainer.folder_identity)


def default_exp_dir(name: str) -> Path:
    return PROJECT_ROOT / "experiments" / name


def store_path(exp_dir: Path) -> Path:
    return Path(exp_dir) / STORE_NAME


def model_dir(exp_dir: Path, model_id: int) -> Path:
    """A model's folder: its prototxt, caffe logs, CSV curves, result.json and best weights."""
    return Path(exp_dir) / MODELS / f"{int(model_id):05d}"


def read_identity(folder: Path) -> Optional[Dict[str, Any]]:
    """A model folder's identity.json, or None when it has none or it does not parse."""
    try:
        data = json.loads((Path(folder) / IDENTITY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def experiment_id(store: ExperimentStore, exp_dir: Path) -> str:
    """The experiment id every model folder of a writing command must carry.

    A store from before model folders carried one gets its id now; a store without an id whose
    model folders name one lost it (damage: the folders could never be adopted again)."""
    found = store.experiment_id()
    if found:
        return found
    named = next(iter(sorted((Path(exp_dir) / MODELS).glob(f"*/{IDENTITY}"))), None)
    if named is not None:
        raise StoreError(
            f"experiment store {store.path} is damaged: it has no experiment id, but {named} names one "
            "(a damaged store is never repaired by guessing: restore it from a copy, or start a new experiment)"
        )
    return store.assign_experiment_id()


def default_data_dir(config: Config) -> Path:
    return PROJECT_ROOT / "data" / config.name


def default_source_dir(config: Config) -> Path:
    """Where `metaqnn download` puts a dataset's release files."""
    return default_data_dir(config) / "source"


def source_or_default(config: Config) -> Optional[Path]:
    d = default_source_dir(config)
    return d if d.is_dir() else None


def experiment_config(store: ExperimentStore) -> Config:
    """The typed config an experiment was created with."""
    return stored_config(store.config())


def experiment_data_dir(store: ExperimentStore) -> Path:
    """The data folder the experiment was searched with (export, finetune and ensemble use it too)."""
    recorded = store.meta().get("data_dir")
    return Path(recorded) if recorded else default_data_dir(experiment_config(store))
