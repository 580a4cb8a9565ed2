"""The Python side of scripts/device-check.sh (issue 14): GPU Caffe checked on a real GPU.

Runs with the GPU machine's own Python (3.10 to 3.13; there 3.12 with torch cu130, numpy, h5py)
plus the packages of the bundle (``make device-bundle``): no network, no project venv.  Each
subcommand prints a few lines and writes a small JSON under ``--out``; its bulky folders (model
folders, the synthetic LMDB) go under ``--work`` (default: ``--out``):

  preflight     imports, Caffe's schema from the bundled libcaffe, the bundled nets and data
  parity        one fixed net and seed on the digits LMDBs, one epoch, in CPU or GPU mode;
                ``parity --compare`` checks the GPU run against the CPU run within tolerances
  synth         a synthetic 32x32x3 LMDB (random pixels and labels) for the speed runs
  speed         time per epoch of the published SVHN nets with K trainings per GPU at once
  torch         the same nets in the machine's PyTorch (fp32, cuDNN): the speed anchor
"""

import argparse
import concurrent.futures as cf
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARITY_ARCH = "[C(32,3,1), C(32,3,1), P(2,2), FC(64), SM(10)]"
PARITY_SEED = 1234
PARITY_LOSS_ITERS = 5  # iterations 0..4 compared
PARITY_LOSS_RTOL = 1e-3  # |gpu - cpu| <= rtol * max(1, |cpu|) at each of those iterations
PARITY_ACC_ATOL = 0.02  # validation accuracy after one epoch: |gpu - cpu| <= 2 points (6 of 300 images)
SVHN_EPOCH_ITERS = 4721  # the published SVHN solvers: 604,288 images / batch 128
SVHN_SEARCH_EPOCHS = 20  # solvers/search.toml


def _caffe() -> Path:
    from metaqnn.caffe.locate import find_caffe

    return find_caffe(gpu=True).binary


def _write(out: Path, name: str, data: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _nets(published: Path) -> List[Path]:
    return sorted((published / "prototxt").glob("svhn_*.prototxt"))


# -- preflight --------------------------------------------------------------------------------


def _missing_modules() -> List[str]:
    import importlib.util

    hints = {"numpy": "numpy", "h5py": "h5py", "lmdb": "lmdb (the bundle has wheels for CPython 3.10-3.13)"}
    hints.update({"google.protobuf": "protobuf", "jinja2": "jinja2"})
    if sys.version_info < (3, 11):
        hints["tomli"] = "tomli"
    missing = []
    for name, hint in hints.items():
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(hint)
    return missing


def cmd_preflight(args: argparse.Namespace) -> int:
    missing = _missing_modules()
    if missing:
        print(
            f"preflight: python {sys.version.split()[0]} ({sys.executable}) lacks {', '.join(missing)}: "
            "install what is missing there, or set PYTHON to a Python that has it all",
            file=sys.stderr,
        )
        return 1
    from google.protobuf import text_format

    from metaqnn.caffe.schema import load_schema
    from metaqnn.render import render_net  # noqa: F401  (jinja2 is importable)

    pb = load_schema()
    for net in _nets(args.published):
        text_format.Merge(net.read_text(), pb.NetParameter())
    manifest = json.loads((args.data / "manifest.json").read_text())
    import h5py
    import lmdb
    import numpy  # (the machine's own, like h5py: not in the bundle)

    print(
        f"python {sys.version.split()[0]}: schema ok ({len(_nets(args.published))} SVHN nets parse), "
        f"digits {manifest['sets']['train']['count']} train images, lmdb {lmdb.__version__}, "
        f"numpy {numpy.__version__}, h5py {h5py.__version__}"
    )
    return 0


# -- parity -----------------------------------------------------------------------------------


def _run(argv: List[str], cwd: Path, log: Path, timeout: float, env: Optional[Dict[str, str]] = None) -> Any:
    from metaqnn.caffe.runner import run_caffe

    return run_caffe(argv, cwd=cwd, log_path=log, timeout=timeout, stop_on_nan=False, env=env)


def cmd_parity(args: argparse.Namespace) -> int:
    if args.compare:
        return _parity_compare(args.out)
    from metaqnn.config import build_config
    from metaqnn.export import render_model

    folder = args.work / f"parity-{args.mode}"
    config = build_config("digits", [], None)
    render_model(config, PARITY_ARCH, folder, manifest_dir=args.data)
    manifest = json.loads((args.data / "manifest.json").read_text())
    ipe = math.ceil(manifest["sets"]["train"]["count"] / 128)
    (folder / "parity_solver.prototxt").write_text(
        "\n".join(
            [
                'net: "net.prototxt"',
                f"test_iter: {math.ceil(manifest['sets']['val']['count'] / 100)}",
                f"test_interval: {ipe}",
                "test_initialization: false",
                "base_lr: 0.01",
                "momentum: 0.9",
                "weight_decay: 0.0005",
                'lr_policy: "fixed"',
                "display: 1",
                f"max_iter: {ipe}",
                "snapshot_after_train: false",
                f"random_seed: {PARITY_SEED}",
                f"solver_mode: {args.mode.upper()}",
                'type: "SGD"',
                "",
            ]
        )
    )
    argv = [str(_caffe()), "train", "--solver=parity_solver.prototxt"] + (["--gpu=0"] if args.mode == "gpu" else [])
    t0 = time.monotonic()
    o = _run(argv, folder, folder / "train.log", args.timeout)
    losses = {int(r["NumIters"]): v for r in o.state.train_rows for k, v in r.items() if "loss" in k.lower()}
    acc = [v for r in o.state.test_rows for k, v in r.items() if k.lower().startswith("accuracy")]
    result = {
        "mode": args.mode,
        "returncode": o.returncode,
        "done": o.state.done,
        "losses": losses,
        "accuracy": acc[-1] if acc else None,
        "seconds": time.monotonic() - t0,
        "fatal": o.state.fatal[:2],
    }
    _write(args.out, f"parity-{args.mode}.json", result)
    first = ", ".join(f"{losses[i]:.5f}" for i in sorted(losses)[:PARITY_LOSS_ITERS])
    print(
        f"parity {args.mode}: rc {o.returncode}, loss at iterations 0-{PARITY_LOSS_ITERS - 1}: {first}; "
        f"accuracy after one epoch ({ipe} iterations): {result['accuracy']} ({result['seconds']:.1f} s)"
    )
    return 0 if o.returncode == 0 and o.state.done else 1


def _parity_compare(out: Path) -> int:
    cpu = json.loads((out / "parity-cpu.json").read_text())
    gpu = json.loads((out / "parity-gpu.json").read_text())
    ok = True
    rows = []
    for i in range(PARITY_LOSS_ITERS):
        c, g = cpu["losses"].get(str(i)), gpu["losses"].get(str(i))
        if c is None or g is None:
            ok = False
            rows.append(f"iter {i}: missing")
            continue
        good = abs(g - c) <= PARITY_LOSS_RTOL * max(1.0, abs(c))
        ok &= good
        rows.append(f"iter {i}: cpu {c:.5f} gpu {g:.5f} {'ok' if good else 'DIFFERS'}")
    ca, ga = cpu["accuracy"], gpu["accuracy"]
    acc_ok = ca is not None and ga is not None and abs(ga - ca) <= PARITY_ACC_ATOL
    ok &= acc_ok
    print("parity: " + "; ".join(rows))
    print(
        f"parity: accuracy after one epoch cpu {ca} gpu {ga} ({'ok' if acc_ok else 'DIFFERS'}; "
        f"tolerances: loss {PARITY_LOSS_RTOL:g} relative at iterations 0-{PARITY_LOSS_ITERS - 1}, "
        f"accuracy {PARITY_ACC_ATOL:g} absolute) => {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


# -- synthetic data and the speed of the published SVHN nets ---------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    import lmdb
    import numpy as np

    from metaqnn.caffe.schema import load_schema

    pb = load_schema()
    path = args.work / "synth32.lmdb"
    if (path / "data.mdb").exists():
        print(f"synth: {path} exists")
        return 0
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(args.images):
            d = pb.Datum(channels=3, height=32, width=32, label=int(rng.integers(0, 10)))
            d.data = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8).tobytes()
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()
    print(f"synth: {args.images} random 32x32x3 images in {path}")
    return 0


def _speed_folder(work: Path, net: Path, tag: str, data: Path) -> Path:
    folder = work / "speed" / tag
    folder.mkdir(parents=True, exist_ok=True)
    text = net.read_text()
    for name in ("train.lmdb", "val.lmdb"):
        text = text.replace(f'source: "{name}"', f'source: "{data}"')
    (folder / "net.prototxt").write_text(text)
    (folder / "solver.prototxt").write_text(
        'net: "net.prototxt"\ntest_iter: 1\ntest_interval: 1000000\ntest_initialization: false\n'
        'base_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\ndisplay: 1\n'
        'max_iter: 1000000\nsnapshot_after_train: false\nrandom_seed: 1\nsolver_mode: GPU\ntype: "SGD"\n'
    )
    return folder


def _iters_per_sec(state: Any) -> Optional[float]:
    """Steady state: from the first display after start-up to the last one."""
    rows = [(r["NumIters"], r["Seconds"]) for r in state.train_rows if "Seconds" in r and r["NumIters"] > 0]
    if len(rows) < 3:
        return None
    (i0, t0), (i1, t1) = rows[1], rows[-1]
    return (i1 - i0) / (t1 - t0) if t1 > t0 else None


def cmd_speed(args: argparse.Namespace) -> int:
    nets = _nets(args.published)
    caffe = str(_caffe())
    data = args.work / "synth32.lmdb"
    results: Dict[str, Any] = {}
    for k in args.k:
        # K=1: each net alone; K>1: K trainings at once, the nets taken in turn
        groups = [[n] for n in nets] if k == 1 else [[nets[i % len(nets)] for i in range(k)]]
        per_net: List[Tuple[str, Optional[float]]] = []
        for group in groups:
            folders = [_speed_folder(args.work, n, f"k{k}_{j}_{n.stem}", data) for j, n in enumerate(group)]
            with cf.ThreadPoolExecutor(max_workers=len(folders)) as pool:
                futures = [
                    pool.submit(
                        _run,
                        [caffe, "train", "--solver=solver.prototxt", "--gpu=0"],
                        f,
                        f / "train.log",
                        args.seconds + 2 * k,  # more trainings at once: each is slower to show a rate
                    )
                    for f in folders
                ]
                outcomes = [fu.result() for fu in futures]
            for n, o in zip(group, outcomes):
                if o.state.out_of_memory:
                    per_net.append((n.stem, None))
                    print(f"speed K={k}: {n.stem} out of memory")
                    continue
                per_net.append((n.stem, _iters_per_sec(o.state)))
        rates = [r for _, r in per_net if r]
        epoch_s = [SVHN_EPOCH_ITERS / r for r in rates]
        row: Dict[str, Any] = {"per_net": {name: r for name, r in per_net}}
        if epoch_s:
            mean_epoch = statistics.mean(epoch_s)
            per_hour = k * 3600 / (SVHN_SEARCH_EPOCHS * mean_epoch)
            row.update(mean_epoch_s=mean_epoch, models_per_hour=per_hour)
            detail = ", ".join(f"{name} {SVHN_EPOCH_ITERS / r:.0f}s" for name, r in per_net if r)
            print(
                f"speed K={k}: time per epoch (604,288 images) {mean_epoch:.0f} s on average [{detail}]; "
                f"{per_hour:.2f} models/hour at {SVHN_SEARCH_EPOCHS} epochs each"
            )
        else:
            print(f"speed K={k}: no measurement (see {args.work / 'speed'})")
        results[str(k)] = row
        _write(args.out, "speed.json", results)  # after each packing level: a cut-off run keeps the levels done
        sys.stdout.flush()
    return 0 if any("mean_epoch_s" in row for row in results.values()) else 1


# -- the PyTorch anchor ------------------------------------------------------------------------


def _torch_net(net: Path) -> Any:
    import torch
    from google.protobuf import text_format

    from metaqnn.caffe.schema import load_schema

    pb = load_schema()
    spec = pb.NetParameter()
    text_format.Merge(net.read_text(), spec)
    layers: List[Any] = []
    channels = 3
    for layer in spec.layer:
        if layer.type == "Convolution":
            p = layer.convolution_param
            stride = p.stride[0] if p.stride else 1
            pad = p.pad[0] if p.pad else 0
            layers.append(torch.nn.Conv2d(channels, p.num_output, p.kernel_size[0], stride, pad))
            channels = p.num_output
        elif layer.type == "Pooling":
            p = layer.pooling_param
            layers.append(torch.nn.MaxPool2d(p.kernel_size, p.stride, p.pad, ceil_mode=True))
        elif layer.type == "ReLU":
            layers.append(torch.nn.ReLU(inplace=True))
        elif layer.type == "Dropout":
            layers.append(torch.nn.Dropout(layer.dropout_param.dropout_ratio))
        elif layer.type == "InnerProduct":
            layers += [torch.nn.Flatten(), torch.nn.LazyLinear(layer.inner_product_param.num_output)]
    return torch.nn.Sequential(*layers)


def _steps(model: Any, opt: Any, loss_fn: Any, x: Any, y: Any, n: int) -> None:
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()


def cmd_torch(args: argparse.Namespace) -> int:
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda:0")
    speed: Dict[str, Optional[float]] = {}
    try:  # Caffe's figures at one training per GPU, where the speed step got that far
        speed = json.loads((args.out / "speed.json").read_text()).get("1", {}).get("per_net", {})
    except (OSError, ValueError) as e:
        print(f"torch: no Caffe figures to compare with ({e.__class__.__name__}: {e}); PyTorch's alone")
    results: Dict[str, Any] = {"torch_version": torch.__version__}
    ratios = []
    for net in _nets(args.published):
        model = _torch_net(net).to(dev)
        x = torch.randn(128, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (128,), device=dev)
        model(x)  # materialise the lazy layers
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.0005)
        loss_fn = torch.nn.CrossEntropyLoss()

        _steps(model, opt, loss_fn, x, y, 10)  # warm-up (cuDNN autotuning)
        torch.cuda.synchronize()
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            _steps(model, opt, loss_fn, x, y, 10)
            torch.cuda.synchronize()
            n += 10
        rate = n / (time.monotonic() - t0)
        caffe_rate = speed.get(net.stem)
        ratio = rate / caffe_rate if caffe_rate else None
        if ratio:
            ratios.append(ratio)
        results[net.stem] = {"torch_iters_per_s": rate, "caffe_iters_per_s": caffe_rate, "caffe_over_torch": ratio}
        print(
            f"torch {net.stem}: {SVHN_EPOCH_ITERS / rate:.0f} s per epoch (fp32, cuDNN); "
            + (
                f"Caffe {SVHN_EPOCH_ITERS / caffe_rate:.0f} s: ratio {ratio:.2f}"
                if caffe_rate and ratio
                else "no Caffe figure"
            )
        )
        _write(args.out, "torch.json", results)  # after each net: a cut-off run keeps the nets done
        del model, opt
        torch.cuda.empty_cache()
    if ratios:
        print(
            f"torch: Caffe's epoch time / PyTorch's, geometric mean over the SVHN nets: {statistics.geometric_mean(ratios):.2f}"
        )
    _write(args.out, "torch.json", results)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the small JSON results")
    parser.add_argument("--work", type=Path, help="model folders and the synthetic LMDB (default: --out)")
    parser.add_argument("--data", type=Path, help="the digits LMDBs (with manifest.json)")
    parser.add_argument("--published", type=Path, help="the published Caffe files (prototxt/svhn_*.prototxt)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("preflight")
    p = sub.add_parser("parity")
    p.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("synth")
    p.add_argument("--images", type=int, default=2560)
    p = sub.add_parser("speed")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=20)
    p = sub.add_parser("torch")
    p.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args(argv)
    if args.work is None:
        args.work = args.out
    commands = {
        "preflight": cmd_preflight,
        "parity": cmd_parity,
        "synth": cmd_synth,
        "speed": cmd_speed,
        "torch": cmd_torch,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
