"""Finetuning of an experiment's top models and their ensemble (§5, Tables 3-4).

finetune: each exported top model is trained from scratch with the preset's finetuning protocol
          on the full training set, tested on the test set (``finetune_net.prototxt`` +
          ``solver_finetune.prototxt`` of ``metaqnn export``); the result is the test accuracy
          after the last iteration (and the best one, for information).
ensemble: the softmax outputs of the top finetuned models on the test set are averaged.  Route:
          a copy of each finetune net with a Softmax ``prob`` layer is run by Caffe's own
          ``extract_features`` tool (TEST phase, the test LMDB in order), which writes one Datum of
          class probabilities per image; we average them and score against the test labels.

Both export the store's current top k first and work on exactly those rank folders, chosen by
model id (``metaqnn.export.export_models``), never by sorting folder names: an export folder
may hold what an older ranking left (issue 24).  A finetune result is reused only for the same
model id and the same exported solver and net.
"""

import csv
import hashlib
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from google.protobuf import text_format

from data_prep.lmdb_writer import iter_lmdb, quick_check_lmdb
from data_prep.prepare import read_manifest
from metaqnn.caffe.gpu import ensure_gpu_ready
from metaqnn.caffe.locate import find_caffe
from metaqnn.caffe.runner import run_caffe, train_argv
from metaqnn.caffe.schema import load_schema
from metaqnn.experiment import STORE_NAME, experiment_data_dir, model_dir
from metaqnn.export import export_models, kept_weights, result_json_check
from metaqnn.lrschedule import RateSchedule, finetune_problems
from qagent.errors import MetaQNNError
from qagent.store import ExperimentStore

# A finetuned model that tests more than this below its search validation accuracy is flagged.
# "A couple of points": on the digits demo's 300 test images one image is 0.33 points, and the
# validation accuracy is the best epoch of a search that picked the top models out of many, so
# it is optimistic by a point or so; 2 points (6 of 300 images) is beyond that noise.
DROP_FLAG = 0.02
FLAG_TEXT = "DROP"


class FinetuneError(MetaQNNError):
    pass


def _exported(
    exp_dir: Path, top: int, include_predicted: bool = False, log: Any = print, rank_by: str = "accuracy"
) -> List[Path]:
    """The rank folders of the store's current top ``top`` models, exported now, in rank order.

    Chosen by the model id the store ranks, never by the folder names: what ``<exp>/export``
    held before (an older ranking, a ``--include-predicted`` export) is no part of it.  A folder
    whose metadata.json disagrees with the ranking is refused rather than trained or averaged.
    """
    exported = export_models(exp_dir, top, exp_dir / "export", include_predicted=include_predicted, rank_by=rank_by)
    for line in exported.lines:
        if line.startswith("warning: "):
            log(line)
    for model, folder in zip(exported.models, exported.folders):
        meta = _metadata(folder)
        if meta.get("model_id") != model.id:
            raise FinetuneError(f"{folder} does not hold model {model.id} of the current ranking")
        if meta.get("reward_kind") == "predicted" and not include_predicted:
            raise FinetuneError(f"{folder} holds a model stopped early: it is ranked only with --include-predicted")
    return exported.folders


def _solver_message(path: Path) -> Any:
    solver = load_schema().SolverParameter()
    text_format.Parse(path.read_text(), solver)
    return solver


def _solver_for(folder: Path, gpu: Optional[int]) -> Path:
    """The exported finetune solver as run here: this device, and the model's Caffe seed (repeatable on the CPU)."""
    pb = load_schema()
    solver = _solver_message(folder / "solver_finetune.prototxt")
    solver.solver_mode = pb.SolverParameter.GPU if gpu is not None else pb.SolverParameter.CPU
    seed = _metadata(folder).get("caffe_seed")
    if seed is not None and not solver.HasField("random_seed"):
        solver.random_seed = int(seed)
    path = folder / "solver_finetune_run.prototxt"
    path.write_text(text_format.MessageToString(solver))
    return path


def _metadata(folder: Path) -> Dict[str, Any]:
    path = folder / "metadata.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def solver_schedule(path: Path) -> RateSchedule:
    """The rate schedule of a solver prototxt."""
    msg = _solver_message(path)
    return RateSchedule.from_fields(
        [(f.name, v) for f, v in msg.ListFields() if f.name != "stepvalue"] + [("stepvalue", v) for v in msg.stepvalue]
    )


def schedule_warnings(folder: Path) -> List[str]:
    """What is wrong with the finetune schedule of an exported model, against its search schedule."""
    return finetune_problems(
        solver_schedule(folder / "solver_finetune.prototxt"), solver_schedule(folder / "solver_search.prototxt")
    )


def _inputs_digest(folder: Path) -> str:
    """What a finetune result depends on: the exported solver and net."""
    h = hashlib.sha256()
    for name in ("solver_finetune.prototxt", "finetune_net.prototxt"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def _own_result(folder: Path, result: Dict[str, Any]) -> bool:
    """A finetune result is this folder's model's: the same model id (older results: the same architecture)."""
    meta = _metadata(folder)
    if "model_id" in result:
        return bool(result["model_id"] == meta.get("model_id"))
    return bool(result.get("arch") == meta.get("arch"))


def _finetuned(folder: Path) -> bool:
    """Finetuned with the current inputs, and for the model the folder holds."""
    done = folder / "finetune.json"
    if not done.exists():
        return False
    result = json.loads(done.read_text())
    return result.get("inputs_sha256") == _inputs_digest(folder) and _own_result(folder, result)


def search_weights_test_accuracy(
    folder: Path, search_dir: Path, caffe: Any, gpu: Optional[int] = None
) -> Optional[float]:
    """Test accuracy of the weights the search kept for this model (its best validation epoch), if they exist.

    Beside the search's validation accuracy this separates what finetuning does from how much
    harder the test set is than the validation set for the same weights.
    """
    meta = _metadata(folder)
    model_id = meta.get("model_id") if isinstance(meta.get("model_id"), int) else None
    kept = kept_weights(search_dir, meta.get("best_iteration"), result_json_check(str(meta.get("arch")), model_id))
    if kept.path is None:  # none kept, or the folder is not this model's: nothing to test
        return None
    weights = kept.path.resolve()
    batches = _solver_message(folder / "solver_finetune.prototxt").test_iter[0]
    argv = [str(caffe.binary), "test", "-model", "finetune_net.prototxt", "-weights", str(weights)]
    argv += ["-iterations", str(batches)] + ([f"-gpu={gpu}"] if gpu is not None else [])
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=3600)
    found = re.findall(r"\] Accuracy1 = ([0-9.eE+-]+)\s*$", proc.stderr, re.M)
    return float(found[-1]) if proc.returncode == 0 and found else None


def finetune_model(
    folder: Path,
    caffe: Any,
    gpu: Optional[int] = None,
    timeout: Optional[float] = None,
    log: Any = print,
    search_dir: Optional[Path] = None,
) -> Dict[str, Any]:
    """Train one exported model folder with its ``solver_finetune.prototxt``; resumable.

    ``search_dir``: the model's folder in the experiment, whose kept weights are tested too.
    """
    done = folder / "finetune.json"
    digest = _inputs_digest(folder)
    if done.exists():  # the same model finished with this solver and net is not trained again
        previous: Dict[str, Any] = json.loads(done.read_text())
        if not _own_result(folder, previous):
            log(f"finetune: {folder.name} holds another model's finetune result: training it again")
        elif previous.get("inputs_sha256") != digest:
            log(f"finetune: {folder.name} was finetuned with another solver or net: training it again")
        else:
            if previous.get("model") != folder.name:  # the model moved to another rank since
                previous["model"] = folder.name
                done.write_text(json.dumps(previous, indent=1))
            return previous
        done.unlink()
    for stale in folder.glob("test_prob.lmdb"):  # the ensemble's probabilities of older weights
        shutil.rmtree(stale)
    (folder.parent / "ensemble.json").unlink(missing_ok=True)  # and its result
    for problem in schedule_warnings(folder):
        log(f"warning: {folder.name}: {problem}")
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
        "model_id": _metadata(folder).get("model_id"),
        "arch": (folder / "arch.txt").read_text().strip(),
        "validation_accuracy": _metadata(folder).get("validation_accuracy"),
        "search_weights_test_accuracy": None
        if search_dir is None
        else search_weights_test_accuracy(folder, search_dir, caffe, gpu),
        "test_accuracy": accs[-1],
        "best_test_accuracy": max(accs),
        "weights": f"modelsave_iter_{last_iter}.caffemodel",
        "wall_time": o.wall_time,
        "inputs_sha256": digest,
    }
    done.write_text(json.dumps(result, indent=1))
    log(f"  {format_pair(result)}")
    return result


def check_finetune_data(exp_dir: Path) -> None:
    """Walk the two sets a finetune reads (train_full, test) before caffe does: a damaged page is a
    one-line error naming the file, not an assertion inside caffe (a search start checks only
    the sets the search reads)."""
    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        data_dir = experiment_data_dir(store)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise FinetuneError(f"{data_dir} holds no prepared data (manifest.json): run `metaqnn prepare` first")
    for name in ("train_full", "test"):
        s = manifest["sets"][name]
        quick_check_lmdb(data_dir / s["path"], int(s["count"]), s["shape"], manifest.get("num_classes"))


def finetune(
    exp_dir: Path,
    top: int,
    gpu: Optional[int] = None,
    timeout: Optional[float] = None,
    log: Any = print,
    include_predicted: bool = False,
    rank_by: str = "accuracy",
) -> List[Dict[str, Any]]:
    caffe = find_caffe(gpu=gpu is not None)
    if gpu is not None:
        ensure_gpu_ready(caffe)
    check_finetune_data(exp_dir)
    return [
        finetune_model(folder, caffe, gpu, timeout, log, model_dir(exp_dir, _metadata(folder)["model_id"]))
        for folder in _exported(exp_dir, top, include_predicted, log, rank_by)
    ]


def _ranked_folders(export: Path) -> List[Path]:
    """The rank folders of the last export (summary.csv), else every folder (an export before summary.csv)."""
    summary = export / "summary.csv"
    if summary.exists():
        with open(summary, newline="") as fh:
            return [export / row["folder"] for row in csv.DictReader(fh) if row.get("folder")]
    return sorted(p for p in export.iterdir() if p.is_dir()) if export.is_dir() else []


def finetuned_results(exp_dir: Path) -> List[Dict[str, Any]]:
    """The finetune results of the last export's ranking, by rank (older results get their validation accuracy here)."""
    out = []
    for done in (folder / "finetune.json" for folder in _ranked_folders(exp_dir / "export")):
        if not done.exists():
            continue
        result = dict(json.loads(done.read_text()))
        if result.get("validation_accuracy") is None:
            result["validation_accuracy"] = _metadata(done.parent).get("validation_accuracy")
        out.append(result)
    return out


def drop_of(result: Dict[str, Any]) -> Optional[float]:
    """Search validation accuracy minus finetuned test accuracy (None when the first is unknown)."""
    val = result.get("validation_accuracy")
    return None if val is None else float(val) - float(result["test_accuracy"])


def flagged(result: Dict[str, Any]) -> bool:
    drop = drop_of(result)
    return drop is not None and drop > DROP_FLAG + 1e-9


def format_pair(result: Dict[str, Any]) -> str:
    val = result.get("validation_accuracy")
    text = (
        f"search val. acc. {'?' if val is None else f'{val:.4f}'} -> finetuned test acc. {result['test_accuracy']:.4f}"
    )
    return text + (f"  << {FLAG_TEXT}" if flagged(result) else "")


def format_results(results: List[Dict[str, Any]]) -> List[str]:
    """The finetune table: each model's search validation accuracy beside its finetuned test accuracy."""
    lines = [
        "| model | search val. acc. | finetuned test acc. | change (points) | test error (%) "
        "| search weights, test acc. | architecture |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        val, drop, before = r.get("validation_accuracy"), drop_of(r), r.get("search_weights_test_accuracy")
        lines.append(
            f"| {r['model']} | {'?' if val is None else f'{100 * val:.2f}'} | {100 * r['test_accuracy']:.2f} | "
            f"{'?' if drop is None else f'{-100 * drop:+.2f}'}{' **' + FLAG_TEXT + '**' if flagged(r) else ''} | "
            f"{100 * (1 - r['test_accuracy']):.2f} | {'?' if before is None else f'{100 * before:.2f}'} | "
            f"`{r['arch']}` |"
        )
    bad = [r for r in results if flagged(r)]
    if bad:
        lines += [
            "",
            f"warning: {len(bad)} of {len(results)} models test more than {100 * DROP_FLAG:g} points below their "
            f"search validation accuracy ({', '.join(r['model'] for r in bad)}): check the finetune protocol "
            "(solvers/<finetune>.toml) and each model's finetune.log before trusting these numbers.",
        ]
        harder = [r["model"] for r in bad if _not_below_search_weights(r)]
        if harder:
            lines.append(
                f"  The search's own weights test no better than the finetuned model ({', '.join(harder)}): "
                "that gap lies between the validation and the test set, not in the finetuning."
            )
    return lines


def _not_below_search_weights(result: Dict[str, Any]) -> bool:
    before = result.get("search_weights_test_accuracy")
    return before is not None and result["test_accuracy"] >= before - 1e-9


def _test_batch(net_path: Path) -> int:
    """The TEST data layer's batch size: extract_features runs that many images per batch."""
    net = load_schema().NetParameter()
    text_format.Parse(net_path.read_text(), net)
    for layer in net.layer:
        if layer.type == "Data" and any(rule.phase == 1 for rule in layer.include):  # phase 1 = TEST
            return int(layer.data_param.batch_size)
    raise FinetuneError(f"{net_path} has no TEST data layer")


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


def _caffe_complaint(stderr: str) -> str:
    """Caffe's own reason from its stderr: the fatal line (F...), not the stack trace glog prints after it."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = next((ln for ln in lines if re.match(r"^F\d{4} ", ln)), None)
    if fatal is not None:
        return fatal.split("] ", 1)[-1][:300]
    return (lines[-1] if lines else "no output")[:300]


def ensemble_of(folders: List[Path], labels: Any, gpu: Optional[int] = None, log: Any = print) -> Dict[str, Any]:
    """Average the test-set softmax outputs of finetuned model folders; score against ``labels``."""
    caffe = find_caffe(gpu=gpu is not None)
    if gpu is not None:
        ensure_gpu_ready(caffe)
    n = len(labels)
    probs: List[Any] = []
    singles: List[Dict[str, Any]] = []
    accs: List[float] = []
    for folder in folders:
        result = json.loads((folder / "finetune.json").read_text())
        out = folder / "test_prob.lmdb"
        if not out.exists():
            net = _prob_net(folder)
            batches = -(-n // _test_batch(net))  # whole batches covering the test set; the rest is cut below
            argv = [
                str(caffe.tool("extract_features")),
                result["weights"],
                str(net),
                "prob",
                str(out.name),
                str(batches),
                "lmdb",
            ] + (["GPU", str(gpu)] if gpu is not None else [])
            proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                shutil.rmtree(out, ignore_errors=True)  # a half-written output is never read as probabilities
                raise FinetuneError(
                    f"extract_features failed for {folder.name} on its weights {folder / result['weights']}: "
                    f"{_caffe_complaint(proc.stderr)} (rerun `metaqnn finetune` if the weights are damaged)"
                )
        datum = load_schema().Datum
        p = np.array([list(datum.FromString(v).float_data) for _, v in iter_lmdb(out)])[:n]
        probs.append(p)
        acc = float(np.mean(p.argmax(1) == labels))
        singles.append({"model": folder.name, "model_id": _metadata(folder).get("model_id"), "test_accuracy": acc})
        accs.append(acc)
        log(f"{folder.name}: test error {100 * (1 - acc):.2f}%")
    mean = np.mean(probs, axis=0)
    ens = float(np.mean(mean.argmax(1) == labels))
    best = max(accs)
    log(f"ensemble of {len(folders)}: test error {100 * (1 - ens):.2f}% (best single model {100 * (1 - best):.2f}%)")
    return {"models": singles, "ensemble_accuracy": ens, "best_single_accuracy": best, "test_images": n}


def test_labels(exp_dir: Path) -> Any:
    with ExperimentStore.open_readonly(exp_dir / STORE_NAME) as store:
        data_dir = experiment_data_dir(store)
    return np.array([load_schema().Datum.FromString(v).label for _, v in iter_lmdb(data_dir / "test.lmdb")])


def ensemble(
    exp_dir: Path,
    top: int,
    gpu: Optional[int] = None,
    log: Any = print,
    include_predicted: bool = False,
    rank_by: str = "accuracy",
) -> Dict[str, Any]:
    """The ensemble of exactly the store's current top ``top`` models, each finetuned; else a refusal."""
    labels = test_labels(exp_dir)
    folders = _exported(exp_dir, top, include_predicted, log, rank_by)
    flag = " --include-predicted" if include_predicted else ""
    if len(folders) < top:
        raise FinetuneError(
            f"the experiment ranks only {len(folders)} models, fewer than --top {top}"
            + ("" if include_predicted else " (models stopped early count with --include-predicted)")
        )
    missing = [f.name for f in folders if not _finetuned(f)]
    if missing:
        raise FinetuneError(
            f"{len(missing)} of the top {top} models are not finetuned with the current protocol "
            f"({', '.join(missing)}): run `metaqnn finetune --top {top}{flag}` (make finetune) first"
        )
    summary = ensemble_of(folders, labels, gpu, log)
    (exp_dir / "export" / "ensemble.json").write_text(json.dumps(summary, indent=1))
    return summary
