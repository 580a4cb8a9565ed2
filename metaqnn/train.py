"""``metaqnn train``: one architecture, one prepared dataset, one protocol, tested on its test set.

The building block of Table 5 (``metaqnn transfer``) and of "train this architecture, or this
published prototxt, on my data with the paper's protocol".  Everything a run depends on is
decided and checked first (:func:`plan_training`) -- the architecture against the target's
image size, the weights against the architecture, the protocol -- so a bad request is one line
and creates nothing.  Then (:func:`run_training`):

* ``--init scratch``: ``caffe train`` on the rendered net (Xavier fillers), nothing else.
* ``--init finetune``: first a ``caffe train`` of zero iterations with ``--weights SOURCE``
  writes ``init.caffemodel``: the source's blobs in every copied layer, the fillers' in the
  renamed (re-initialised) ones.  It is checked blob for blob against the source before the
  training starts from it (``--weights init.caffemodel``), so a finetune provably starts from
  the source's weights.
* Resumable like every long command: ``metadata.json`` names the plan; a rerun of the same plan
  continues from the newest snapshot the log confirms (a finished one is never trained again),
  and a folder holding another plan is refused, never mixed.
* The result is the test accuracy after the last iteration (as ``finetune``); the final weights
  are written as ``weights.caffemodel`` and ``weights.h5`` under the architecture's own layer
  names, so a trained folder can be a source in turn.
"""

import contextlib
import fcntl
import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from metaqnn.caffe.logparse import LogState, merge_states, parse_lines, split_runs, write_csvs
from metaqnn.caffe.runner import Stall, run_caffe, train_argv
from metaqnn.config import Config
from metaqnn.netspec import NetSpec, build_net
from metaqnn.render import render_net, render_solver
from metaqnn.solverspec import Protocol, load_protocol, solver_fields
from metaqnn.trainer import caffe_seed, resume_point, snapshot_facts, write_atomic
from metaqnn.transfer_source import SourceModel, TransferError, sha256_of
from metaqnn.weight_plan import (
    InputShape,
    WeightPlan,
    WeightsMismatchError,
    caffemodel_shapes,
    fit_source,
    plan_weights,
    renamed_spec,
    write_canonical_names,
)
from qagent.arch import Layer, Softmax, format_architecture
from qagent.outdir import first_missing, make_output_dir
from qagent.space import size_problem

INITS = ("scratch", "finetune")
FROM_WEIGHTS = "_from_weights"  # --init finetune's default protocol: <target's finetune protocol>_from_weights
SNAPSHOTS = "snapshots"
ACCURACY = "Accuracy1"
DEFAULT_STALL = Stall()  # the search's watchdog defaults
_WEIGHT_KEYS = ("weights_from", "weights_missing")  # what a scratch run's metadata leaves out of its source


@dataclass(frozen=True)
class TrainPlan:
    """Everything one training is, decided before it runs; ``metadata`` is what metadata.json records."""

    source: SourceModel
    config: Config
    data_dir: Path
    init: str
    protocol: Protocol
    layers: Tuple[Layer, ...]
    spec: NetSpec
    solver: Tuple[Tuple[str, Any], ...]  # device-independent fields (solver_mode is set when run)
    weights: Optional[WeightPlan]
    metadata: Dict[str, Any]

    @property
    def max_iter(self) -> int:
        return int(dict(self.solver)["max_iter"])

    @property
    def iters_per_epoch(self) -> int:
        return int(dict(self.solver)["test_interval"])


def default_protocol(config: Config, init: str) -> str:
    """The target's finetune protocol; from weights, its ``_from_weights`` variant (solvers/)."""
    base = config.protocol.finetune
    return base if init == "scratch" else base + FROM_WEIGHTS


def target_layers(layers: Sequence[Layer], num_classes: int) -> Tuple[Layer, ...]:
    """The architecture with the target's classifier: SM(n) -> SM(target classes)."""
    return (*layers[:-1], Softmax(num_classes))


def whole_set_batch(count: int, batch: int) -> int:
    """The largest TEST batch <= ``batch`` that divides ``count``: the test pass is then every image
    exactly once (Caffe's data layer wraps around, so a batch that does not divide the set would
    count some images twice, or, rounded down as the published solvers do, leave some out)."""
    return next(b for b in range(min(batch, count), 0, -1) if count % b == 0)


def _with(fields: Sequence[Tuple[str, Any]], **values: Any) -> Tuple[Tuple[str, Any], ...]:
    """Solver fields with some replaced in place (or appended), the order kept."""
    out = [(k, values.pop(k) if k in values else v) for k, v in fields]
    return tuple(out + list(values.items()))


def _load_protocol(name: str, overrides: Dict[str, Any]) -> Protocol:
    proto = load_protocol(name)
    return proto.with_overrides(**overrides) if overrides else proto


def check_request(
    source: SourceModel,
    config: Config,
    init: str,
    protocol: Optional[str] = None,
    protocol_overrides: Optional[Dict[str, Any]] = None,
) -> None:
    """What can be refused before the target's data is even prepared: the init, the protocol,
    the architecture on the target's images, and the weights against the architecture."""
    plan_training(source, config, Path("/nonexistent"), _release_manifest(config), init, protocol, protocol_overrides)


def _release_manifest(config: Config) -> Dict[str, Any]:
    """Set sizes as a manifest would give them, from the preset's release sizes (a check needs no data)."""
    rel = config.dataset.release_sizes
    train, test, extra = (rel.train, rel.test, rel.extra) if rel is not None else (1 << 20, 1 << 20, 0)
    val = config.dataset.validation_size
    counts = {"train": train - val, "val": val, "train_full": train + extra, "test": test}
    return {"sets": {name: {"count": n} for name, n in counts.items()}}


def _check_blob_sizes(spec: NetSpec) -> None:
    """Caffe counts a blob's elements in an int: a larger layer is refused here, not after the data is made."""
    for name, info in spec.params.items():
        for shape in info.shapes:
            if math.prod(shape) >= 2**31:
                raise TransferError(f"layer {name} would hold {math.prod(shape):,} weights, more than a Caffe blob can")


def _weight_plan(source: SourceModel, spec: NetSpec, config: Config) -> Tuple[WeightPlan, InputShape]:
    """What the source's weights give the target net, from the data they fit (metaqnn.weight_plan)."""
    if source.weights is None:
        missing = source.origin.get("weights_missing")
        raise TransferError(
            "--init finetune needs the source's weights: "
            + (missing or "give --weights FILE, or a model folder or experiment model that has weights")
        )

    def build(shape: InputShape) -> NetSpec:
        size, channels, classes = shape
        layers = target_layers(source.layers, classes)
        return build_net(
            layers, image_size=size, channels=channels, num_classes=classes, train_source="", test_source=""
        )

    target = (config.space.image_size, config.dataset.channels, config.space.num_classes)
    prefer = [s for s in (source.input_shape, target) if s is not None]
    try:
        fitted, shape = fit_source(build, caffemodel_shapes(source.weights), prefer)
        plan = plan_weights(spec, {name: list(info.shapes) for name, info in fitted.params.items()})
    except WeightsMismatchError as exc:
        raise WeightsMismatchError(f"{source.weights} for {source.arch}: {exc}") from None
    if not plan.copied:
        raise TransferError(
            f"no layer of {source.weights} fits {config.name} (every one would be re-initialised): use --init scratch"
        )
    return plan, shape


def plan_training(
    source: SourceModel,
    config: Config,
    data_dir: Path,
    manifest: Dict[str, Any],
    init: str,
    protocol: Optional[str] = None,
    protocol_overrides: Optional[Dict[str, Any]] = None,
) -> TrainPlan:
    """Check and decide everything; raises a one-line error for anything that cannot run."""
    if init not in INITS:
        raise TransferError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    layers = target_layers(source.layers, config.space.num_classes)
    problem = size_problem(config.space, layers)
    if problem is not None:
        raise TransferError(f"{format_architecture(source.layers)} cannot run on {config.name}: {problem}")
    name = protocol or default_protocol(config, init)
    proto = _load_protocol(name, dict(protocol_overrides or {}))
    sizes = {set_name: int(s["count"]) for set_name, s in manifest["sets"].items()}
    for role, set_name in (("train_set", proto.train_set), ("test_set", proto.test_set)):
        if set_name not in sizes:
            raise TransferError(
                f"protocol {proto.name}: {role} {set_name!r} is not a set `prepare` writes ({', '.join(sizes)})"
            )
    proto = replace(proto, test_batch=whole_set_batch(sizes[proto.test_set], proto.test_batch))
    spec = build_net(
        layers,
        image_size=config.space.image_size,
        channels=config.dataset.channels,
        num_classes=config.space.num_classes,
        train_source=str(data_dir / f"{proto.train_set}.lmdb"),
        test_source=str(data_dir / f"{proto.test_set}.lmdb"),
        transform=config.render.transform(),
        dropout=config.render.dropout,
        train_batch=proto.train_batch,
        test_batch=proto.test_batch,
    )
    _check_blob_sizes(spec)
    weights: Optional[WeightPlan] = None
    source_shape: Optional[InputShape] = None
    if init == "scratch" and source.origin.get("weights_from") == "--weights":
        raise TransferError("--weights is read only by --init finetune (--init scratch starts from Xavier fillers)")
    if init == "finetune":
        weights, source_shape = _weight_plan(source, spec, config)
        spec = renamed_spec(spec, weights, proto.reinit_lr_mult)
    arch = format_architecture(layers)
    fields = solver_fields(
        proto,
        net="net.prototxt",
        train_size=sizes[proto.train_set],
        test_size=sizes[proto.test_set],
        whole_test_set=False,
    )
    seed = proto.random_seed if proto.random_seed is not None else caffe_seed(config.agent.seed, arch)
    fields_t = _with(fields, snapshot_prefix=f"{SNAPSHOTS}/modelsave", random_seed=int(seed))
    fields_t = tuple((k, v) for k, v in fields_t if k != "solver_mode")
    test_images = int(dict(fields_t)["test_iter"]) * proto.test_batch
    metadata: Dict[str, Any] = {
        "kind": "train",
        "arch": arch,
        "source_arch": source.arch,
        "source": {
            **{k: v for k, v in source.origin.items() if init == "finetune" or k not in _WEIGHT_KEYS},
            "input_shape": None if source_shape is None else list(source_shape),
            "weights": None if source.weights is None or init == "scratch" else str(source.weights),
            "weights_sha256": None if source.weights is None or init == "scratch" else sha256_of(source.weights),
        },
        "target": {
            "dataset": config.name,
            "data_dir": str(data_dir),
            "image_size": config.space.image_size,
            "channels": config.dataset.channels,
            "classes": config.space.num_classes,
            "test_images": test_images,
            "test_set_size": sizes[proto.test_set],
        },
        "init": init,
        "protocol": {"name": proto.name, "overrides": dict(protocol_overrides or {})},
        "reinitialised": []
        if weights is None
        else [
            {"layer": r.layer, "renamed": r.renamed, "reason": r.reason, "lr_mult": proto.reinit_lr_mult}
            for r in weights.reinitialised
        ],
        "copied": [] if weights is None else list(weights.copied),
        "caffe_seed": int(seed),
        "param_count": spec.param_count,
    }
    metadata["plan_sha256"] = _plan_digest(render_net(spec), render_solver(fields_t), metadata)
    return TrainPlan(source, config, data_dir, init, proto, layers, spec, fields_t, weights, metadata)


def _plan_digest(net: str, solver: str, metadata: Dict[str, Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for part in (net, solver, metadata["init"], str(metadata["source"].get("weights_sha256"))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def describe_plan(plan: TrainPlan) -> List[str]:
    """What the run will do, for the terminal: the re-initialised layers by name."""
    m = plan.metadata
    lines = [
        f"train: {m['arch']} on {plan.config.name} ({m['target']['image_size']}x{m['target']['image_size']}x"
        f"{m['target']['channels']}, {m['target']['classes']} classes), init {plan.init}, protocol {plan.protocol.name}"
        f" ({plan.max_iter} iterations)"
    ]
    if plan.weights is not None:
        lines.append(f"  weights: {plan.source.weights} ({plan.source.origin.get('weights_from', 'given')})")
        lines += [f"  {line}" for line in plan.weights.describe()]
    return lines


# --- running ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer per training folder (the kernel drops the lock if we die)."""
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransferError(f"{folder} is being trained by another metaqnn process") from None
        yield
    finally:
        os.close(fd)


def _found_plan(out: Path) -> Optional[Dict[str, Any]]:
    """The metadata.json of a training folder; a folder holding anything else is refused."""
    meta_path = out / "metadata.json"
    if not meta_path.exists():
        if out.is_dir() and any(out.iterdir()):
            raise TransferError(f"{out} is not empty and holds no training: use another --out")
        return None
    try:
        found = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict) or found.get("kind") != "train":
        raise TransferError(f"{out} holds something that `metaqnn train` did not write: use another --out")
    return found


def _another(out: Path, found: Dict[str, Any]) -> TransferError:
    target: Dict[str, Any] = found["target"] if isinstance(found.get("target"), dict) else {}
    protocol: Dict[str, Any] = found["protocol"] if isinstance(found.get("protocol"), dict) else {}
    return TransferError(
        f"{out} holds another training ({found.get('arch')} on {target.get('dataset')}, "
        f"init {found.get('init')}, protocol {protocol.get('name')}): "
        "use another --out, or delete it to train this one there"
    )


def check_out(out: Path, arch: str, dataset: str, init: str) -> None:
    """What can be refused about ``--out`` before any data is prepared: a file, a folder that
    cannot be made, a foreign folder, or a training of another architecture, dataset or init
    (a same-named plan that differs otherwise is refused by :func:`run_training`)."""
    if out.exists() and not out.is_dir():
        raise TransferError(f"--out {out} is a file")
    missing = first_missing(out)
    parent = (missing or out).parent
    if missing is not None and not parent.is_dir():
        raise TransferError(f"--out {out} cannot be created: {parent} is not a folder")
    found = _found_plan(out) if out.is_dir() else None
    if found is not None:
        target = found["target"] if isinstance(found.get("target"), dict) else {}
        same = (found.get("arch"), target.get("dataset"), found.get("init"))
        if same != (arch, dataset, init):
            raise _another(out, found)


def _claim(out: Path, plan: TrainPlan) -> None:
    """``out`` is empty or holds this very plan (checked under the folder's lock)."""
    found = _found_plan(out)
    if found is not None and found.get("plan_sha256") != plan.metadata["plan_sha256"]:
        raise _another(out, found)


def _solver_for(plan: TrainPlan, gpu: Optional[int], **changes: Any) -> str:
    fields = _with(plan.solver, solver_mode="GPU" if gpu is not None else "CPU", **changes)
    return render_solver(fields)


def _runs(log: Path) -> List[LogState]:
    if not log.exists():
        return []
    return [parse_lines(lines) for _, lines in split_runs(log.read_text(errors="replace").splitlines())]


def _caffe_reason(state: LogState, log: Path) -> str:
    if state.fatal:
        return f"caffe: {state.fatal[0].split('] ', 1)[-1][:300]}"
    return f"see {log}"


def _make_init(plan: TrainPlan, out: Path, caffe: Any, gpu: Optional[int], log: Callable[[str], None]) -> Path:
    """``init.caffemodel``: a zero-iteration caffe run from the source weights, checked against them."""
    target = out / "init.caffemodel"
    if target.exists():
        return target
    assert plan.source.weights is not None and plan.weights is not None
    solver = out / "solver_init.prototxt"
    solver.write_text(_solver_for(plan, gpu, max_iter=0, snapshot=0, display=0, snapshot_prefix=f"{SNAPSHOTS}/init"))
    (out / SNAPSHOTS).mkdir(exist_ok=True)
    argv = [*train_argv(caffe.binary, solver, None, gpu), f"--weights={plan.source.weights.resolve()}"]
    o = run_caffe(argv, cwd=out, log_path=out / "init.log")
    written = out / SNAPSHOTS / "init_iter_0.caffemodel"
    if o.returncode != 0 or not written.exists():
        raise TransferError(f"copying the source weights failed: {_caffe_reason(o.state, out / 'init.log')}")
    _check_copied(plan, written)
    written.replace(target)
    for stale in (out / SNAPSHOTS).glob("init_iter_0.*"):
        stale.unlink()
    log(f"  init.caffemodel: {len(plan.weights.copied)} layers copied from the source, checked blob for blob")
    return target


def _check_copied(plan: TrainPlan, init: Path) -> None:
    """Every copied layer holds exactly the source's blobs; every re-initialised one does not."""
    from metaqnn.weights import read_caffemodel

    assert plan.source.weights is not None and plan.weights is not None
    source, start = read_caffemodel(plan.source.weights), read_caffemodel(init)
    for name in plan.weights.copied:
        if name not in start or any(not np.array_equal(a, b) for a, b in zip(source[name], start[name])):
            raise TransferError(f"caffe did not copy layer {name} from {plan.source.weights}")
    for r in plan.weights.reinitialised:
        if r.renamed not in start:
            raise TransferError(f"the re-initialised layer {r.renamed} is missing from {init}")


def _result_of(out: Path, plan: TrainPlan) -> Optional[Dict[str, Any]]:
    path = out / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(result, dict) and result.get("plan_sha256") == plan.metadata["plan_sha256"]
    return result if ok else None


def run_training(
    plan: TrainPlan,
    out: Path,
    caffe: Any,
    gpu: Optional[int] = None,
    timeout: Optional[float] = None,
    stall: Optional[Stall] = DEFAULT_STALL,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Train ``plan`` in ``out`` (resuming what a killed run left) and return its result.

    ``stall``: the watchdog of ``search`` (None: off), so a hung caffe does not hold a transfer forever.
    """
    out = Path(os.path.abspath(out))  # caffe runs in it: every path it is given is relative to it
    check_out(out, plan.metadata["arch"], plan.config.name, plan.init)
    make_output_dir(out, "--out folder")
    with _locked(out):
        _claim(out, plan)
        done = _result_of(out, plan)
        if done is not None:
            shutil.rmtree(out / SNAPSHOTS, ignore_errors=True)  # a kill after the result, before the pruning
            log(f"  already trained: test accuracy {done['test_accuracy']:.4f} ({out})")
            return done
        if not (out / "metadata.json").exists():
            (out / "net.prototxt").write_text(render_net(plan.spec))
            (out / "arch.txt").write_text(plan.metadata["arch"] + "\n")
            write_atomic(out / "metadata.json", json.dumps(plan.metadata, indent=1, sort_keys=True) + "\n")
        solver = Path("solver.prototxt")
        (out / solver).write_text(_solver_for(plan, gpu))
        (out / SNAPSHOTS).mkdir(exist_ok=True)
        init = _make_init(plan, out, caffe, gpu, log) if plan.init == "finetune" else None
        return _train(plan, out, caffe, solver, init, gpu, timeout, stall, log)


def _train(
    plan: TrainPlan,
    out: Path,
    caffe: Any,
    solver: Path,
    init: Optional[Path],
    gpu: Optional[int],
    timeout: Optional[float],
    stall: Optional[Stall],
    log: Callable[[str], None],
) -> Dict[str, Any]:
    train_log = out / "train.log"
    runs = _runs(train_log)
    facts = snapshot_facts(runs)
    resume = resume_point(out / SNAPSHOTS, facts, max_iter=plan.max_iter)
    if resume is not None:
        log(f"  resuming from iteration {resume} of {plan.max_iter}")
        argv = train_argv(caffe.binary, solver, Path(SNAPSHOTS) / f"modelsave_iter_{resume}.solverstate", gpu)
    else:
        argv = train_argv(caffe.binary, solver, None, gpu) + ([f"--weights={init.name}"] if init is not None else [])
    o = run_caffe(
        argv,
        cwd=out,
        log_path=train_log,
        timeout=timeout,
        stall=stall,
        iters_per_epoch=plan.iters_per_epoch,
        run_number=len(runs),
    )
    if o.stopped_for_nan:
        raise TransferError(f"training diverged (NaN loss): see {train_log}; a lower --protocol-set base_lr may help")
    if o.timed_out or o.stalled:
        why = f"the --timeout of {timeout} s" if o.timed_out else "the watchdog (no log line)"
        raise TransferError(f"training stopped by {why}: rerun the same command to resume from its last snapshot")
    if o.returncode != 0 or not o.state.done:
        raise TransferError(
            f"training failed: {_caffe_reason(o.state, train_log)} (see {train_log}; "
            "a rerun of the same command resumes from the last snapshot)"
        )
    return _finish(plan, out, _runs(train_log), o.wall_time, log)


def _finish(
    plan: TrainPlan, out: Path, runs: List[LogState], wall_time: float, log: Callable[[str], None]
) -> Dict[str, Any]:
    merged = merge_states(runs)
    final = [
        r for r in merged.test_rows if int(r["NumIters"]) == plan.max_iter and math.isfinite(r.get(ACCURACY, math.nan))
    ]
    weights = out / SNAPSHOTS / f"modelsave_iter_{plan.max_iter}.caffemodel"
    if not final or not weights.exists():
        raise TransferError(
            f"caffe finished without testing or saving iteration {plan.max_iter}: see {out / 'train.log'}"
        )
    from metaqnn.weights import caffemodel_to_hdf5

    write_canonical_names(weights, out / "weights.caffemodel")
    caffemodel_to_hdf5(out / "weights.caffemodel", out / "weights.h5")
    write_csvs(merged, out / "curves")
    accs = [r[ACCURACY] for r in merged.test_rows if math.isfinite(r.get(ACCURACY, math.nan))]
    result = {
        "arch": plan.metadata["arch"],
        "dataset": plan.config.name,
        "init": plan.init,
        "protocol": plan.protocol.name,
        "test_accuracy": float(final[-1][ACCURACY]),
        "test_error": 1.0 - float(final[-1][ACCURACY]),
        "best_test_accuracy": max(accs),
        "initial_test_accuracy": next((r[ACCURACY] for r in merged.test_rows if int(r["NumIters"]) == 0), None),
        "iterations": plan.max_iter,
        "test_images": plan.metadata["target"]["test_images"],
        "weights": "weights.caffemodel",
        "wall_time": wall_time,
        "plan_sha256": plan.metadata["plan_sha256"],
    }
    write_atomic(out / "result.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out / SNAPSHOTS, ignore_errors=True)
    log(f"  test accuracy {result['test_accuracy']:.4f} (error {100 * result['test_error']:.2f}%) -> {out}")
    return result
