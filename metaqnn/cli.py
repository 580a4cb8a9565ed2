"""``python -m metaqnn <command>`` -- the one entry point the Makefile targets wrap.

Every user error is a :class:`~qagent.errors.MetaQNNError`: one line on stderr,
exit status 2.  Ctrl-C stops Caffe, leaves the store consistent and exits 130.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from qagent.errors import MetaQNNError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="preset name (digits, mnist, svhn, cifar10) or a .toml file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a preset value (TOML syntax), e.g. --set space.max_depth=8",
    )
    p.add_argument("--seed", type=int, default=None, help="the one seed of the agent (default: the preset's)")


def _build_config(args: argparse.Namespace) -> Dict[str, object]:
    from metaqnn.config import build_config

    return build_config(args.dataset, args.overrides, args.seed)


def _exp_dir(args: argparse.Namespace, default: str) -> Path:
    from metaqnn.search import default_exp_dir

    if args.exp and ("/" in args.exp or args.exp.startswith(".")):
        return Path(args.exp).resolve()
    return default_exp_dir(args.exp or default)


def _gpus(args: argparse.Namespace) -> List[int]:
    from qagent.errors import ConfigError

    text = args.gpus if args.gpus is not None else ("" if args.gpu is None else str(args.gpu))
    if text.strip() == "all":
        if not args.ray and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(
                "--gpus all needs a Ray cluster (--ray); on one machine list the GPU ids, e.g. --gpus 0,1"
            )
        return []
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus must be a comma-separated list of GPU ids, got {text!r}") from None


def cmd_search(args: argparse.Namespace) -> int:
    from metaqnn.search import SearchOptions, default_data_dir, format_summary, run_search

    config = _build_config(args)
    name = str(config["dataset"]["name"])  # type: ignore[index]
    opts = SearchOptions(
        exp_dir=_exp_dir(args, name),
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(config),
        source=Path(args.source) if args.source else None,
        gpus=_gpus(args),
        workers=args.workers,
        ray=args.ray or os.environ.get("RAY_ADDRESS") or None,
        ray_gpus=(args.gpus or "").strip() == "all" or bool(_gpus(args)),
        cpus_per_trial=args.cpus_per_trial,
        timeout=args.timeout,
        max_models=args.max_models,
    )
    result = run_search(config, opts)
    print(format_summary(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from metaqnn.search import STORE_NAME, format_summary, summary
    from qagent.store import ExperimentStore

    exp = _exp_dir(args, "digits")
    with ExperimentStore.open_readonly(exp / STORE_NAME) as store:
        cfg = store.config()
        from metaqnn.config import schedule_of

        schedule = schedule_of(cfg)
        counts = store.trained_per_epsilon()
        eps = schedule.current(counts)
        done = sum(min(counts.get(e, 0), n) for e, n in schedule.steps)
        print(
            f"experiment {exp} ({cfg['dataset']['name']}): {done}/{schedule.total} unique models trained, "
            f"epsilon {'complete' if eps is None else eps}"
        )
        for m in store.running():
            print(f"in flight: #{m.id} {m.arch} (attempt {m.attempts})")
        print(format_summary(summary(store)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_prep.prepare import prepare
    from metaqnn.search import default_data_dir, prep_options, source_or_default

    config = _build_config(args)
    out = Path(args.data_dir) if args.data_dir else default_data_dir(config)
    manifest = prepare(prep_options(config), out, Path(args.source) if args.source else source_or_default(config))
    for name, s in manifest["sets"].items():
        print(f"{name:10s} {s['count']:7d} images {s['shape']} {s['dtype']}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from data_prep.download import download
    from metaqnn.search import default_source_dir

    dest = Path(args.dest) if args.dest else default_source_dir(_build_config(args))
    print(f"downloaded to {download(args.dataset, dest)}")
    return 0


def cmd_caffe_info(args: argparse.Namespace) -> int:
    from metaqnn.caffe.locate import find_caffe
    from metaqnn.caffe.schema import load_schema

    c = find_caffe()
    pb = load_schema()
    print(f"caffe: {c.binary} ({c.origin}), {c.version()}")
    print(f"schema: {getattr(pb, '__file__', 'descriptor from ' + ', '.join(map(str, c.schema_candidates()[:1])))}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from metaqnn.export import render_model

    config = _build_config(args)
    out = Path(args.out)
    files = render_model(config, args.arch, out, manifest_dir=Path(args.data_dir) if args.data_dir else None)
    for f in files:
        print(f)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from metaqnn.export import export_top

    exp = _exp_dir(args, "digits")
    out = Path(args.out) if args.out else exp / "export"
    for line in export_top(exp, args.top, out):
        print(line)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from metaqnn.compare import compare_files

    equal, report = compare_files(Path(args.a), Path(args.b), ignore_paths=args.ignore_paths)
    print(report)
    return 0 if equal else 1


def cmd_regenerate_check(args: argparse.Namespace) -> int:
    from metaqnn.compare import regenerate_check

    equal, report = regenerate_check(Path(args.file), _build_config(args), overrides=args.protocol_set)
    print(report)
    return 0 if equal else 1


def cmd_arch(args: argparse.Namespace) -> int:
    from metaqnn.compare import architecture_of_net

    print(architecture_of_net(Path(args.file)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metaqnn.report import write_report

    exp = _exp_dir(args, "digits")
    page = write_report(exp, Path(args.out) if args.out else exp / "report")
    print(page)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from metaqnn.finetune import finetune, format_results

    results = finetune(_exp_dir(args, "digits"), args.top, gpu=args.gpu, timeout=args.timeout)
    print("\n".join(format_results(results)))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from metaqnn.finetune import ensemble

    ensemble(_exp_dir(args, "digits"), args.top, gpu=args.gpu)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaqnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        return p

    p = add("search", cmd_search, "run or resume a search (prepares the data if missing)")
    _config_args(p)
    p.add_argument("--exp", help="experiment name (experiments/<name>) or a path; default: the dataset name")
    p.add_argument("--data-dir", help="where the LMDBs are (default data/<dataset>)")
    p.add_argument("--source", help="folder with the dataset's release files (mnist, cifar10, svhn)")
    p.add_argument("--gpu", type=int, default=None, help="train on this GPU (default: CPU)")
    p.add_argument("--gpus", default=None, help="GPU ids (0,1,...): one training per GPU at a time; 'all' on Ray")
    p.add_argument("--workers", type=int, default=1, help="trainings at once (CPU); default one per GPU")
    p.add_argument("--ray", default=None, help="address of a running Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="Ray CPUs reserved per CPU training")
    p.add_argument("--timeout", type=float, default=None, help="wall-clock limit per caffe run, seconds")
    p.add_argument("--max-models", type=int, default=None, help="stop after training this many new models")

    p = add("status", cmd_status, "progress of a running or finished search (read-only)")
    p.add_argument("--exp", help="experiment name or path")

    p = add("prepare", cmd_prepare, "write the dataset's LMDBs and manifest")
    _config_args(p)
    p.add_argument("--data-dir")
    p.add_argument("--source")

    p = add("download", cmd_download, "download a dataset's release files (checksums, resumable)")
    _config_args(p)
    p.add_argument("--dest", help="folder for the release files (default data/<dataset>/source)")

    add("caffe-info", cmd_caffe_info, "which caffe and which schema this project uses")

    p = add("render", cmd_render, "render net + solvers for one architecture")
    _config_args(p)
    p.add_argument("--arch", required=True, help="e.g. '[C(64,3,1), P(2,2), SM(10)]'")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", help="take dataset sizes from this manifest (default: the paper's sizes)")

    p = add("export", cmd_export, "write the top-K models of an experiment")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out")

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
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--gpu", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="wall-clock limit per model, seconds")

    p = add("ensemble", cmd_ensemble, "average the softmax outputs of the top-K finetuned models on test")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--gpu", type=int, default=None)

    p = add("report", cmd_report, "figures (Fig. 3, A2, A3, A4) and a markdown page for an experiment")
    p.add_argument("--exp", help="experiment name or path")
    p.add_argument("--out")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except MetaQNNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: caffe stopped; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except json.JSONDecodeError as exc:
        print(f"error: corrupt JSON: {exc}", file=sys.stderr)
        return 2
