"""``python -m metaqnn <command>`` -- the one entry point the Makefile targets wrap.

Every user error is a :class:`~qagent.errors.MetaQNNError`: one line on stderr,
exit status 2.  Ctrl-C stops Caffe, leaves the store consistent and exits 130.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional

from qagent.errors import MetaQNNError, quote

if TYPE_CHECKING:
    from metaqnn.config import Config

if TYPE_CHECKING:
    from metaqnn.caffe.runner import Stall


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="digits",
        help="preset name (digits, digits59, mnist, svhn, cifar10, cifar100) or a .toml file",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a preset value (TOML syntax), e.g. --set space.max_depth=8",
    )
    p.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=None, help="the one seed of the agent (default: the preset's)"
    )


def _build_config(args: argparse.Namespace) -> "Config":
    from metaqnn.config import build_config

    return build_config(args.dataset, args.overrides, args.seed)


def _bounded(kind: Callable[[str], Any], low: float, what: str) -> Callable[[str], Any]:
    """An argparse type: ``kind`` parsed and at least ``low``, else a one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} expected, got {quote(text)}") from None
        if value != value or value < low:  # NaN, or below the bound
            raise argparse.ArgumentTypeError(f"{what} expected, got {quote(text)}")
        return value

    return parse


POSITIVE_INT = _bounded(int, 1, "a positive integer")
NON_NEGATIVE_INT = _bounded(int, 0, "an integer >= 0")
POSITIVE_SECONDS = _bounded(float, 1e-3, "a positive number of seconds")
POSITIVE_NUMBER = _bounded(float, 1e-6, "a positive number")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (exit status 2)."""

    def error(self, message: str) -> "NoReturn":
        print(f"error: {self.prog}: {message[:300]} (see --help)", file=sys.stderr)
        sys.exit(2)


def _exp_dir(args: argparse.Namespace, default: str) -> Path:
    """--exp as a folder: a path (holds a '/' or starts with '.') or a name under experiments/.

    A symlink loop or an over-long name is one line (:func:`metaqnn.exp_path.resolved_path`).
    """
    from metaqnn.exp_path import resolved_path
    from metaqnn.experiment import default_exp_dir

    if args.exp is not None and not args.exp.strip():
        from qagent.errors import ConfigError

        raise ConfigError("--exp is empty: give an experiment name or a path")
    if args.exp and ("/" in args.exp or args.exp.startswith(".")):
        return resolved_path(args.exp, "--exp")
    return resolved_path(default_exp_dir(args.exp or default), "--exp")


def _path_arg(value: Optional[str], what: str) -> Optional[Path]:
    """A path option made absolute (links resolved), or None when not given; bad paths are one line."""
    from metaqnn.exp_path import resolved_path

    return None if value is None else resolved_path(value, what)


def _out_arg(value: str, what: str) -> Path:
    """A path option kept as given (relative stays relative), after the loop and length checks."""
    from metaqnn.exp_path import checked_path

    return checked_path(value, what)


def _gpus(args: argparse.Namespace) -> List[int]:
    from qagent.errors import ConfigError

    text = args.gpus if args.gpus is not None else ("" if args.gpu is None else str(args.gpu))
    if args.gpus is not None and not args.gpus.strip():
        raise ConfigError("--gpus is empty: list GPU ids (e.g. --gpus 0,1), or leave --gpus out to train on the CPU")
    if text.strip() == "all":
        if not args.ray and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(
                "--gpus all needs a Ray cluster (--ray); on one machine list the GPU ids, e.g. --gpus 0,1"
            )
        return []
    if args.gpus is not None and any(not g.strip() for g in text.split(",")):
        raise ConfigError(f"--gpus must be a comma-separated list of GPU ids, got {quote(text)} (an empty id)")
    try:
        ids = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus must be a comma-separated list of GPU ids, got {quote(text)}") from None
    if any(g < 0 for g in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus must list distinct GPU ids >= 0, got {quote(text)}")
    return ids


def _stall(args: argparse.Namespace) -> "Optional[Stall]":
    """--stall FLOOR[,FACTOR]: kill a caffe silent for max(FLOOR, FACTOR x its epoch time); 0 turns it off."""
    from metaqnn.caffe.runner import Stall
    from qagent.errors import ConfigError

    if args.stall is None:
        return Stall()
    try:
        parts = [float(x) for x in args.stall.split(",")]
    except ValueError:
        raise ConfigError(f"--stall takes FLOOR[,FACTOR] in seconds, got {quote(args.stall)}") from None
    if not 1 <= len(parts) <= 2 or min(parts) < 0 or not all(math.isfinite(x) for x in parts):
        raise ConfigError(f"--stall takes FLOOR[,FACTOR] (non-negative numbers), got {quote(args.stall)}")
    if parts[0] == 0:
        return None
    return Stall(floor=parts[0], factor=parts[1] if len(parts) > 1 else Stall().factor)


def cmd_search(args: argparse.Namespace) -> int:
    from metaqnn.experiment import default_data_dir
    from metaqnn.search import SearchOptions, format_summary, run_search
    from qagent.errors import ConfigError

    if args.ray is not None and not args.ray.strip():
        raise ConfigError("--ray is empty: give the address of a running Ray cluster (HOST:PORT), or leave --ray out")
    if args.trainings_per_gpu > 1 and args.gpu is None and args.gpus is None:
        raise ConfigError("--trainings-per-gpu packs trainings onto GPUs: give --gpu N or --gpus (CPU: --workers)")
    config = _build_config(args)
    opts = SearchOptions(
        exp_dir=_exp_dir(args, config.name),
        data_dir=_path_arg(args.data_dir, "--data-dir") or default_data_dir(config),
        source=_path_arg(args.source, "--source"),
        gpus=_gpus(args),
        workers=args.workers,
        ray=args.ray or os.environ.get("RAY_ADDRESS") or None,
        ray_gpus=(args.gpus or "").strip() == "all" or bool(_gpus(args)),
        cpus_per_trial=args.cpus_per_trial,
        trainings_per_gpu=args.trainings_per_gpu,
        timeout=args.timeout,
        max_models=args.max_models,
        max_same_failures=args.max_same_failures,
        stall=_stall(args),
    )
    result = run_search(config, opts)
    print(format_summary(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from metaqnn.experiment import STORE_NAME, experiment_config
    from metaqnn.search import format_summary, summary
    from metaqnn.snapshot_policy import UnreadablePolicy, disk_usage, read_policy
    from qagent.status import ModelStatus
    from qagent.store import ExperimentStore

    exp = _exp_dir(args, "digits")
    with ExperimentStore.open_readonly(exp / STORE_NAME) as store:
        cfg = experiment_config(store)
        schedule = cfg.schedule
        counts = store.trained_per_epsilon()
        eps = schedule.current(counts)
        done = sum(min(counts.get(e, 0), n) for e, n in schedule.steps)
        print(
            f"experiment {exp} ({cfg.name}): {done}/{schedule.total} unique models trained, "
            f"epsilon {'complete' if eps is None else eps}"
        )
        for m in store.running():
            print(f"in flight: #{m.id} {m.arch} (attempt {m.attempts})")
        for m in store.models(ModelStatus.DEFERRED):
            print(f"set aside, no reward (trained again on the next run): #{m.id} {m.arch}: {m.message}")
        rejected = store.models(ModelStatus.REJECTED)
        if rejected:
            print(f"rejected over constraints.max_latency_ms, never trained (not counted above): {len(rejected)}")
        print(format_summary(summary(store)))
        models = store.models()
    try:
        policy, note = read_policy(exp), ""
        if policy is None:  # no search of this version ran on it: the config's (default) policy
            policy = cfg.snapshots
    except UnreadablePolicy as exc:
        policy, note = None, f"the policy the last search applied is unknown: {exc}"
    for line in disk_usage(exp, models).lines(schedule.total - done, policy, note):
        print(line)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_prep.prepare import prepare
    from metaqnn.experiment import default_data_dir, source_or_default
    from metaqnn.search import prep_options

    config = _build_config(args)
    out = _path_arg(args.data_dir, "--data-dir") or default_data_dir(config)
    source = _path_arg(args.source, "--source") or source_or_default(config)
    manifest = prepare(prep_options(config), out, source)
    for name, s in manifest["sets"].items():
        print(f"{name:10s} {s['count']:7d} images {s['shape']} {s['dtype']}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from data_prep.download import download
    from metaqnn.experiment import default_source_dir

    dest = _out_arg(args.dest, "--dest") if args.dest is not None else default_source_dir(_build_config(args))
    print(f"downloaded to {download(args.dataset, dest)}")
    return 0


def cmd_caffe_info(args: argparse.Namespace) -> int:
    from metaqnn.caffe.gpu import describe
    from metaqnn.caffe.locate import find_caffe, find_gpu_build
    from metaqnn.caffe.schema import load_schema

    c = find_caffe(gpu=args.gpu)
    pb = load_schema()
    print(f"caffe: {c.binary} ({c.origin}), {c.version()}")
    for line in describe(c):
        print(line)
    gpu_build = find_gpu_build()
    if gpu_build is not None and gpu_build.binary != c.binary:
        print(f"GPU build: {gpu_build.binary} (used with GPU=/GPUS=; `caffe-info --gpu` describes it)")
    elif gpu_build is None and c.is_cpu_prefix:
        print("GPU build: none (`make caffe-gpu` builds one for NVIDIA GPUs)")
    print(f"schema: {getattr(pb, '__file__', None) or 'descriptor from ' + str(getattr(pb, 'source', '?'))}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from metaqnn.export import render_model

    config = _build_config(args)
    out = _out_arg(args.out, "--out")
    if args.data_dir is not None:  # sizes and shapes from prepared data: it must be there, and fit the config
        _path_arg(args.data_dir, "--data-dir")
        from data_prep.prepare import read_manifest
        from metaqnn.search import check_data_fits
        from qagent.errors import ConfigError

        manifest = read_manifest(Path(args.data_dir))
        if manifest is None:
            raise ConfigError(
                f"--data-dir {args.data_dir} holds no prepared data (no manifest.json): "
                "prepare it, or leave --data-dir out to use the release sizes"
            )
        check_data_fits(config, manifest, Path(args.data_dir))
    files = render_model(
        config,
        args.arch,
        out,
        manifest_dir=Path(args.data_dir).resolve() if args.data_dir else None,
        off_space=args.off_space,
    )
    for f in files:
        print(f)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from metaqnn.export import export_models, export_top, pareto_models

    exp = _exp_dir(args, "digits")
    if args.pareto is not None:  # the accuracy/cost front, in a folder of its own (finetune reads export/)
        out = _out_arg(args.out, "--out") if args.out is not None else exp / f"export-pareto-{args.pareto}"
        models, note = pareto_models(exp, args.pareto, args.include_predicted)
        exported = export_models(exp, len(models), out, args.include_predicted, chosen=models)
        for line in exported.lines + ([note] if note else []):
            print(line)
        return 0
    out = _out_arg(args.out, "--out") if args.out is not None else exp / "export"
    for line in export_top(exp, args.top, out, include_predicted=args.include_predicted, rank_by=args.rank_by):
        print(line)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from metaqnn.compare import compare_files

    equal, report = compare_files(
        _out_arg(args.a, "compare"), _out_arg(args.b, "compare"), ignore_paths=args.ignore_paths
    )
    print(report)
    return 0 if equal else 1


def cmd_regenerate_check(args: argparse.Namespace) -> int:
    from metaqnn.compare import regenerate_check

    file = _out_arg(args.file, "regenerate-check")
    equal, report = regenerate_check(file, _build_config(args), overrides=args.protocol_set)
    print(report)
    return 0 if equal else 1


def cmd_arch(args: argparse.Namespace) -> int:
    from metaqnn.compare import architecture_of_net

    print(architecture_of_net(_out_arg(args.file, "arch")))
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    """Write what an experiment's TensorBoard event files lack (idempotent); with --serve, then start the viewer."""
    from metaqnn.monitor import MonitorError, viewer_argv, write_events

    exp = _exp_dir(args, "digits")
    try:
        done = write_events(exp)
        print(f"tensorboard: {exp / 'tensorboard'}: {done['points']} new points, {done['models']} models complete")
    except MonitorError as exc:
        if not args.serve:
            raise
        print(f"tensorboard: {exc}; serving what is there")
    if args.serve:
        argv = viewer_argv(exp, args.viewer, args.host, args.port)
        print("tensorboard: " + " ".join(argv), flush=True)
        os.execv(argv[0], argv)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metaqnn.report import write_report

    exp = _exp_dir(args, "digits")
    page = write_report(exp, _out_arg(args.out, "--out") if args.out is not None else exp / "report", args.rank_by)
    print(page)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from metaqnn.finetune import finetune, format_results

    results = finetune(
        _exp_dir(args, "digits"),
        args.top,
        gpu=args.gpu,
        timeout=args.timeout,
        include_predicted=args.include_predicted,
        rank_by=args.rank_by,
    )
    print("\n".join(format_results(results)))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from metaqnn.finetune import ensemble

    ensemble(
        _exp_dir(args, "digits"), args.top, gpu=args.gpu, include_predicted=args.include_predicted, rank_by=args.rank_by
    )
    return 0


def cmd_finish(args: argparse.Namespace) -> int:
    from metaqnn.finish import finish_stopped

    exp = _exp_dir(args, "digits")
    results = finish_stopped(exp, None if args.all else args.top, args.model, gpu=args.gpu, timeout=args.timeout)
    failed = [r for r in results if "measured" not in r]
    return 1 if failed else 0


def _source_model(args: argparse.Namespace) -> Any:
    """The architecture (and weights) ``train`` and ``transfer`` start from: one of the ways to name one."""
    from metaqnn.transfer_source import resolve_source

    exp = _exp_dir(args, "") if args.exp is not None else None
    return resolve_source(
        arch=getattr(args, "arch", None),
        folder=_path_arg(args.from_folder, "--from"),
        exp_dir=exp,
        model_id=args.model,
        net=_path_arg(getattr(args, "net", None), "--net"),
        weights=_path_arg(getattr(args, "weights", None), "--weights"),
        include_predicted=args.include_predicted,
        every_way=hasattr(args, "arch"),
        rank_by=args.rank_by,
    )


def _protocol_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    from metaqnn.compare import parse_protocol_overrides

    return parse_protocol_overrides(args.protocol_set)


def _target(args: argparse.Namespace, preset: str, one: bool) -> Any:
    """A target dataset: its preset with --set, its data folder (--data-dir only for one target)."""
    from metaqnn.config import build_config
    from metaqnn.experiment import default_data_dir, source_or_default
    from metaqnn.transfer import Target

    config = build_config(preset, args.overrides, args.seed)
    data_dir = _path_arg(args.data_dir, "--data-dir") if one else None
    release = _path_arg(args.source, "--source") if one else None
    return Target(config, data_dir or default_data_dir(config), release or source_or_default(config))


def cmd_train(args: argparse.Namespace) -> int:
    import hashlib

    from metaqnn.config import PROJECT_ROOT
    from metaqnn.transfer import train_one

    target = _target(args, args.dataset, one=True)
    source = _source_model(args)
    if args.out is not None:
        out = _out_arg(args.out, "--out")
    else:
        digest = hashlib.sha256(source.arch.encode()).hexdigest()[:8]
        out = PROJECT_ROOT / "experiments" / "train" / f"{target.config.name}_{args.init}_{digest}"
    overrides = _protocol_overrides(args)
    result = train_one(source, target, args.init, out, args.protocol, overrides, args.gpu, args.timeout, _stall(args))
    print(f"test error {100 * result['test_error']:.2f}% ({out})")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from metaqnn.transfer import TRANSFER, transfer
    from qagent.errors import ConfigError

    names = [n.strip() for n in args.to.split(",")]
    if not all(names):
        raise ConfigError(f"--to takes a comma-separated list of datasets, got {quote(args.to)}")
    if (args.data_dir or args.source) and len(names) != 1:
        raise ConfigError("--data-dir and --source name one target's data: give one dataset in --to")
    targets = [_target(args, name, one=len(names) == 1) for name in names]
    inits = [i.strip() for i in args.init.split(",")]
    source = _source_model(args)
    if args.out is not None:
        root = _out_arg(args.out, "--out")
    elif args.from_folder is not None:
        root = Path(args.from_folder) / TRANSFER
    else:
        root = _exp_dir(args, "") / TRANSFER
    transfer(source, targets, root, inits, _protocol_overrides(args), args.gpu, args.timeout, _stall(args))
    return 0


def _rank_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rank-by",
        choices=("accuracy", "reward"),
        default="accuracy",
        help="rank by validation accuracy (default) or by the agent's reward, shaped under [constraints]",
    )


def _predicted_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--include-predicted",
        action="store_true",
        help="rank models stopped early by their predicted accuracy too (default: measured accuracies only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metaqnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    p = add("search", cmd_search, "run or resume a search (prepares the data if missing)")
    _config_args(p)
    p.add_argument("--exp", help="experiment name (experiments/<name>) or a path; default: the dataset name")
    p.add_argument("--data-dir", help="where the LMDBs are (default data/<dataset>)")
    p.add_argument("--source", help="folder with the dataset's release files (mnist, cifar10, cifar100, svhn)")
    p.add_argument("--gpu", type=NON_NEGATIVE_INT, default=None, help="train on this GPU (default: CPU)")
    p.add_argument("--gpus", default=None, help="GPU ids (0,1,...): one training per GPU at a time; 'all' on Ray")
    p.add_argument("--workers", type=POSITIVE_INT, default=1, help="trainings at once (CPU); default one per GPU")
    p.add_argument(
        "--trainings-per-gpu",
        type=POSITIVE_INT,
        default=1,
        metavar="K",
        help="small nets: K trainings share each GPU (Ray: num_gpus=1/K); out of memory retries at K/2, ..., 1",
    )
    p.add_argument("--ray", default=None, help="address of a running Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--cpus-per-trial", type=POSITIVE_NUMBER, default=1.0, help="Ray CPUs reserved per CPU training")
    p.add_argument("--timeout", type=POSITIVE_SECONDS, default=None, help="wall-clock limit per caffe run, seconds")
    p.add_argument("--max-models", type=POSITIVE_INT, default=None, help="stop after training this many new models")
    p.add_argument(
        "--max-same-failures",
        type=POSITIVE_INT,
        default=8,
        help="stop the search when this many models in a row fail the same way (a broken set-up)",
    )
    p.add_argument(
        "--stall",
        default=None,
        help="watchdog FLOOR[,FACTOR]: stop (and retry once) a caffe that prints nothing for "
        "max(FLOOR s, FACTOR x its epoch time); default 120,4; 0 turns it off",
    )

    p = add("status", cmd_status, "progress of a running or finished search (read-only)")
    p.add_argument("--exp", help="experiment name or path")

    p = add("prepare", cmd_prepare, "write the dataset's LMDBs and manifest")
    _config_args(p)
    p.add_argument("--data-dir")
    p.add_argument("--source")

    p = add("download", cmd_download, "download a dataset's release files (checksums, resumable)")
    _config_args(p)
    p.add_argument("--dest", help="folder for the release files (default data/<dataset>/source)")

    p = add("caffe-info", cmd_caffe_info, "which caffe and which schema this project uses (build, CUDA, driver)")
    p.add_argument("--gpu", action="store_true", help="the Caffe that GPU=/GPUS= would use")

    p = add("render", cmd_render, "render net + solvers for one architecture")
    _config_args(p)
    p.add_argument("--arch", required=True, help="e.g. '[C(64,3,1), P(2,2), SM(10)]'")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", help="take dataset sizes from this manifest (default: the paper's sizes)")
    p.add_argument(
        "--off-space",
        action="store_true",
        help="render an architecture the preset's state space does not allow (default: refuse it)",
    )

    p = add("export", cmd_export, "write the top-K models of an experiment")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--top", type=POSITIVE_INT, default=10)
    p.add_argument("--out")
    _predicted_arg(p)
    _rank_arg(p)
    p.add_argument(
        "--pareto",
        nargs="?",
        const="params",
        choices=("params", "macs", "latency"),
        help="write the models on the accuracy/COST front instead (default cost: params), to export-pareto-COST/",
    )

    p = add("finish", cmd_finish, "train models that early stopping stopped to the end (their predictions -> measured)")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--top", type=POSITIVE_INT, default=5, help="the K highest predictions (default 5)")
    p.add_argument("--all", action="store_true", help="every model stopped early")
    p.add_argument("--model", type=POSITIVE_INT, action="append", default=[], help="this model id (repeatable)")
    p.add_argument("--gpu", type=NON_NEGATIVE_INT, default=None)
    p.add_argument("--timeout", type=POSITIVE_SECONDS, default=None, help="wall-clock limit per caffe run, seconds")

    p = add("compare", cmd_compare, "semantic diff of two nets or two solvers (exit 0 when equal)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--ignore-paths", action="store_true", help="ignore data sources and net file names")

    p = add("regenerate-check", cmd_regenerate_check, "recover, re-render and compare a published net or solver")
    _config_args(p)
    p.add_argument("file")
    p.add_argument(
        "--protocol-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="per-model finetune protocol override, e.g. base_lr=0.0125",
    )

    p = add("arch", cmd_arch, "recover the architecture string from a MetaQNN-style net prototxt")
    p.add_argument("file")

    p = add("finetune", cmd_finetune, "train the top-K models with the finetune protocol, evaluate on test")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--top", type=POSITIVE_INT, default=10)
    p.add_argument("--gpu", type=NON_NEGATIVE_INT, default=None)
    p.add_argument("--timeout", type=POSITIVE_SECONDS, default=None, help="wall-clock limit per model, seconds")
    _predicted_arg(p)
    _rank_arg(p)

    p = add("ensemble", cmd_ensemble, "average the softmax outputs of the top-K finetuned models on test")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--top", type=POSITIVE_INT, default=5)
    p.add_argument("--gpu", type=NON_NEGATIVE_INT, default=None)
    _predicted_arg(p)
    _rank_arg(p)

    def source_args(p: argparse.ArgumentParser, every_way: bool) -> None:
        if every_way:
            p.add_argument("--arch", help="an architecture string, e.g. '[C(64,3,1), P(2,2), SM(10)]'")
            p.add_argument("--net", help="a MetaQNN-style net prototxt (e.g. the authors' published files)")
            p.add_argument("--weights", help="a .caffemodel of the architecture (replaces any source's weights)")
        p.add_argument(
            "--from", dest="from_folder", help="a model folder written by `export` or `train` (its weights too)"
        )
        p.add_argument("--exp", help="an experiment (name or path): its best measured model, or --model N")
        p.add_argument("--model", type=POSITIVE_INT, default=None, help="with --exp: this model id")
        p.add_argument("--data-dir", help="the target's prepared data (default data/<dataset>)")
        p.add_argument("--source", help="the target's release files, if its data must be prepared")
        p.add_argument(
            "--protocol-set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field of the protocol, e.g. epochs=2 or base_lr=0.001",
        )
        p.add_argument("--gpu", type=NON_NEGATIVE_INT, default=None, help="train on this GPU (default: CPU)")
        p.add_argument("--timeout", type=POSITIVE_SECONDS, default=None, help="wall-clock limit per caffe run")
        p.add_argument(
            "--stall", default=None, help="watchdog FLOOR[,FACTOR] as for search (default 120,4; 0 turns it off)"
        )
        p.add_argument("--out", help="output folder")
        _predicted_arg(p)
        _rank_arg(p)

    p = add("train", cmd_train, "train one architecture on one dataset with one protocol, test it (Table 5's cells)")
    _config_args(p)
    source_args(p, every_way=True)
    p.add_argument(
        "--init",
        choices=("scratch", "finetune"),
        default="scratch",
        help="scratch: Xavier (as rendered); finetune: copy the source's weights by layer name",
    )
    p.add_argument(
        "--protocol",
        default=None,
        help="solvers/<name>.toml or a .toml file (default: the dataset's finetune protocol; "
        "with --init finetune its _from_weights variant)",
    )

    p = add("transfer", cmd_transfer, "train a model on other datasets from scratch and finetuned: Table 5")
    source_args(p, every_way=False)
    p.add_argument("--to", required=True, help="target datasets (presets), e.g. cifar100,svhn,mnist")
    p.add_argument("--init", default="scratch,finetune", help="scratch and/or finetune (default both)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a value of every target's preset",
    )
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help="the seed Caffe's seeds derive from")

    p = add("tensorboard", cmd_tensorboard, "write an experiment's TensorBoard event files from its store (idempotent)")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--serve", action="store_true", help="then start the TensorBoard viewer on them")
    p.add_argument(
        "--viewer", default=None, help="the tensorboard program (default .deps/tensorboard-venv/bin/tensorboard)"
    )
    p.add_argument("--host", default="127.0.0.1", help="the viewer's address (default 127.0.0.1: reach it over ssh -L)")
    p.add_argument("--port", type=POSITIVE_INT, default=6006, help="the viewer's port (default 6006)")

    p = add("report", cmd_report, "figures (Fig. 3, A2, A3, A4) and a markdown page for an experiment")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--out")
    _rank_arg(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except MetaQNNError as exc:
        text = " ".join(str(exc).split("\n"))  # one line, always
        print(f"error: {text if len(text) <= 1000 else text[:980] + ' ...'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: caffe stopped; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except json.JSONDecodeError as exc:
        print(f"error: corrupt JSON: {exc}", file=sys.stderr)
        return 2
