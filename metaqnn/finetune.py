"""Finetuning of an experiment's top models and their ensemble (§5, Tables 3-4).

finetune: each exported top model is trained from scratch with the preset's finetuning protocol
          on the full training set, tested on the test set (``finetune_net.prototxt`` +
          ``solver_finetune.prototxt`` of ``metaqnn export``); the result is the test accuracy
          after the last iteration (and the best one, for information).
ensemble: the softmax outputs of the top finetuned models on the test set are averaged.  Route:
          a copy of each finetune net with a Softmax ``prob`` layer is run by Caffe's own
          ``extract_features`` tool (TEST phase, the test LMDB in order), which writes one Datum of
          class probabilities per image; we average them and score against the test labels.
"""

import json
import math
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from google.protobuf import text_format

from data_prep.lmdb_writer import iter_lmdb
from metaqnn.caffe.gpu import ensure_gpu_ready
from metaqnn.caffe.locate import find_caffe
from metaqnn.caffe.runner import run_caffe, train_argv
from metaqnn.caffe.schema import load_schema
from metaqnn.export import export_top
from metaqnn.search import STORE_NAME, experiment_data_dir
from qagent.errors import MetaQNNError
from qagent.store import ExperimentStore


class FinetuneError(MetaQNNError):
    pass


def _exported(exp_dir: Path, top: int) -> List[Path]:
    out = exp_dir / "export"
    export_top(exp_dir, top, out)
    return sorted(p for p in out.iterdir() if p.is_dir())[:top]


def _solver_for(folder: Path, gpu: Optional[int]) -> Path:
    pb = load_schema()
    solver = pb.SolverParameter()
    text_format.Parse((folder / "solver_finetune.prototxt").read_text(), solver)
    solver.solver_mode = pb.SolverParameter.GPU if gpu is not None else pb.SolverParameter.CPU
    path = folder / "solver_finetune_run.prototxt"
    path.write_text(text_format.MessageToString(solver))
    return path


def finetune(
    exp_dir: Path, top: int, gpu: Optional[int] = None, timeout: Optional[float] = None, log: Any = print
) -> List[Dict[str, Any]]:
    caffe = find_caffe(gpu=gpu is not None)
    if gpu is not None:
        ensure_gpu_ready(caffe)
    results = []
    for folder in _exported(exp_dir, top):
        done = folder / "finetune.json"
        if done.exists():  # resumable: a finished model is not trained again
            results.append(json.loads(done.read_text()))
            continue
        solver = _solver_for(folder, gpu)
        log(f"finetune: {folder.name} ({(folder / 'arch.txt').read_text().strip()})")
        o = run_caffe(
            train_argv(caffe.binary, solver, None, gpu), cwd=folder, log_path=folder / "finetune.log", timeout=timeout
        )
        if o.returncode != 0 or not o.state.done or not o.state.test_rows:
            raise FinetuneError(f"finetuning {folder.name} failed: see {folder / 'finetune.log'}")
        accs = [r["Accuracy1"] for r in o.state.test_rows if math.isfinite(r.get("Accuracy1", math.nan))]
        last_iter = int(o.state.test_rows[-1]["NumIters"])
        result: Dict[str, Any] = {
            "model": folder.name,
            "arch": (folder / "arch.txt").read_text().strip(),
            "test_accuracy": accs[-1],
            "best_test_accuracy": max(accs),
            "weights": f"modelsave_iter_{last_iter}.caffemodel",
            "wall_time": o.wall_time,
        }
        done.write_text(json.dumps(result, indent=1))
        log(f"  test accuracy {result['test_accuracy']:.4f} (error {100 * (1 - result['test_accuracy']):.2f}%)")
        results.append(result)
    return results


def _prob_net(folder: Path) -> Path:
    """The finetune net with a Softmax on the classifier, as extract_features' network."""
    pb = load_schema()
    net = pb.NetParameter()
    text_format.Parse((folder / "finetune_net.prototxt").read_text(), net)
    classifier = [layer for layer in net.layer if layer.type == "InnerProduct"][-1]
    prob = net.layer.add()
    prob.name, prob.type = "prob", "Softmax"
    prob.bottom.append(classifier.top[0])
    prob.top.append("prob")
    path = folder / "prob_net.prototxt"
    path.write_text(text_format.MessageToString(net))
    return path


def ensemble(exp_dir: Path, top: int, gpu: Optional[int] = None, log: Any = print) -> Dict[str, Any]:
    caffe = find_caffe(gpu=gpu is not None)
    if gpu is not None:
        ensure_gpu_ready(caffe)
    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        data_dir = experiment_data_dir(store)
    labels = np.array([load_schema().Datum.FromString(v).label for _, v in iter_lmdb(data_dir / "test.lmdb")])
    n = len(labels)
    folders = [f for f in _exported(exp_dir, top) if (f / "finetune.json").exists()]
    if len(folders) < top:
        raise FinetuneError(f"only {len(folders)} of the top {top} models are finetuned: run `make finetune` first")
    probs, singles = [], []
    for folder in folders:
        result = json.loads((folder / "finetune.json").read_text())
        out = folder / "test_prob.lmdb"
        if not out.exists():
            batches = -(-n // 100)
            argv = [
                str(caffe.tool("extract_features")),
                result["weights"],
                str(_prob_net(folder)),
                "prob",
                str(out.name),
                str(batches),
                "lmdb",
            ] + (["GPU", str(gpu)] if gpu is not None else [])
            proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise FinetuneError(f"extract_features failed for {folder.name}: {proc.stderr.strip()[-300:]}")
        datum = load_schema().Datum
        p = np.array([list(datum.FromString(v).float_data) for _, v in iter_lmdb(out)])[:n]
        probs.append(p)
        acc = float(np.mean(p.argmax(1) == labels))
        singles.append({"model": folder.name, "test_accuracy": acc})
        log(f"{folder.name}: test error {100 * (1 - acc):.2f}%")
    mean = np.mean(probs, axis=0)
    ens = float(np.mean(mean.argmax(1) == labels))
    log(f"ensemble of {len(folders)}: test error {100 * (1 - ens):.2f}%")
    summary = {"models": singles, "ensemble_accuracy": ens, "test_images": n}
    (exp_dir / "export" / "ensemble.json").write_text(json.dumps(summary, indent=1))
    return summary
