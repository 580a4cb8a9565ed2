"""Data preparation at paper size (issue 25): wall time and peak memory of the real ``prepare``.

    .venv/bin/python bench/bench_prepare_scale.py --out build/bench-prepare            # the whole matrix
    .venv/bin/python bench/bench_prepare_scale.py --out /tmp/bp --scales 0.02           # a quick run
    .venv/bin/python bench/bench_prepare_scale.py --datasets svhn --preprocess lcn --scales 0.25

Synthetic releases of the paper's sizes, in the files the readers read (data_prep/sources.py):
SVHN ``train/extra/test_32x32.mat`` (73,257 + 531,131 + 26,032 32x32x3 images, labels 1..10,
uncompressed MAT v5 where the real files are zlib-compressed) and CIFAR-10's six ``.bin`` batch
files (50,000 + 10,000).  Each (dataset, preprocessing, scale) runs ``data_prep.prepare.prepare``
with the preset's options (pad 5 for CIFAR-10, validation 5,000 x scale) in a fresh child process
and measures its wall time and peak RSS: the child's own ``VmHWM`` (Linux ``ru_maxrss`` of a child
carries its parent's peak across exec, so the sources are made in another child and the parent
stays small; ``ru_maxrss`` from ``wait4`` is recorded too).  Time linearity: seconds per 1,000
records written at each scale.  Target: every run under 8 GB.  Results are merged into
``OUT/results.json`` (one entry per dataset x preprocessing x scale, so several invocations fill one
table) and printed.  The prepared LMDBs (float32 SVHN: ~8.5 GB) are deleted after each run, the
sources after each (dataset, scale).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Paper-size releases: (file set, images) per dataset, before --scale.
SIZES: Dict[str, Dict[str, int]] = {
    "svhn": {"train": 73257, "extra": 531131, "test": 26032},
    "cifar10": {"data_batch": 50000, "test_batch": 10000},
}
PREPROCESS = ("none", "mean", "gcn", "lcn", "zca")
BUDGET_GB = 8.0


def scaled(n: int, scale: float) -> int:
    return max(20, round(n * scale))


# -- synthetic sources (run in a child: the parent's peak would otherwise show in every child) ------


def make_sources(dataset: str, scale: float, folder: Path) -> None:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if dataset == "svhn":
        from scipy.io import savemat

        for name, n in SIZES["svhn"].items():
            k = scaled(n, scale)
            x = np.empty((32, 32, 3, k), np.uint8)
            for a in range(0, k, 65536):  # the release's 32x32x3xN layout; filled in slices
                b = min(k, a + 65536)
                x[..., a:b] = rng.integers(0, 256, (32, 32, 3, b - a), dtype=np.uint8)
            y = rng.integers(1, 11, (k, 1)).astype(np.uint8)  # SVHN writes digit 0 as 10
            savemat(str(folder / f"{name}_32x32.mat"), {"X": x, "y": y})
            del x
    else:
        per_file = [scaled(SIZES["cifar10"]["data_batch"] // 5, scale)] * 5 + [
            scaled(SIZES["cifar10"]["test_batch"], scale)
        ]
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name, k in zip(names, per_file):
            rec = rng.integers(0, 256, (k, 3073), dtype=np.uint8)
            rec[:, 0] = rng.integers(0, 10, k)
            (folder / name).write_bytes(rec.tobytes())


# -- one measured preparation ---------------------------------------------------------------------


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child_prepare(spec: Dict[str, Any]) -> None:
    """Runs in the measured child: the project's real prepare, its log lines timed."""
    from data_prep.prepare import PrepOptions, prepare

    t0 = time.perf_counter()
    events: List[Tuple[float, str]] = []

    def log(message: str) -> None:
        events.append((time.perf_counter() - t0, message))
        print(f"{events[-1][0]:8.1f} s  {message}", flush=True)

    kwargs = {"chunk_size": spec["chunk_size"]} if spec.get("chunk_size") else {}
    manifest = prepare(PrepOptions(**spec["options"]), Path(spec["out"]), Path(spec["source"]), log=log, **kwargs)
    result = {
        "records": sum(s["count"] for s in manifest["sets"].values()),
        "counts": {k: s["count"] for k, s in manifest["sets"].items()},
        "events": events,
        "vmhwm_kib": peak_rss_kib(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(argv: Sequence[str], log_path: Path) -> Tuple[int, float, Any, str]:
    """(exit status, wall s, rusage from wait4, stdout) of ``argv`` in a child."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.append(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    return proc.returncode, time.perf_counter() - t0, usage, "".join(lines)


def prep_options(dataset: str, preprocess: str, scale: float) -> Dict[str, Any]:
    """The preset's options with ``preprocess`` and a validation set scaled like the rest."""
    from metaqnn.config import build_config
    from metaqnn.search import prep_options as preset_options

    options = preset_options(build_config(dataset, [f'dataset.preprocess="{preprocess}"']))
    return asdict(replace(options, validation_size=max(10, round(options.validation_size * scale))))


def measure(dataset: str, preprocess: str, scale: float, source: Path, work: Path, out: Path, chunk: int) -> Dict:
    data = work / f"data-{dataset}-{preprocess}"
    shutil.rmtree(data, ignore_errors=True)
    spec = {
        "options": prep_options(dataset, preprocess, scale),
        "out": str(data),
        "source": str(source),
        "chunk_size": chunk,
    }
    tag = f"{dataset}-{preprocess}-{scale:g}"
    print(f"== {tag}", flush=True)
    load = os.getloadavg()[0]
    rc, wall, usage, stdout = run_child(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], out / "logs" / f"{tag}.log"
    )
    disk = sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) if data.exists() else 0
    shutil.rmtree(data, ignore_errors=True)
    entry: Dict[str, Any] = {
        "dataset": dataset,
        "preprocess": preprocess,
        "scale": scale,
        "rc": rc,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),  # OpenBLAS threads spin: not the work alone
        "ru_maxrss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "load_before": round(load, 2),  # 1-minute load average: others' work on a shared machine
        "lmdb_gb": round(disk / 1e9, 3),
        "options": spec["options"],
        "chunk_size": chunk,
        "machine": {"cpus": os.cpu_count()},
    }
    found = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if rc == 0 and found:
        result = json.loads(found[-1][len("RESULT ") :])
        entry.update(result)
        entry["peak_rss_gb"] = round(result["vmhwm_kib"] * 1024 / 1e9, 3)
        entry["s_per_1k_records"] = round(1000 * wall / result["records"], 3)
    return entry


# -- the table ------------------------------------------------------------------------------------


def table(results: List[Dict[str, Any]]) -> str:
    head = "| dataset | preprocess | scale | records | wall s | peak RSS GB | s / 1k records | vs smallest scale |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]

    def key(r: Dict[str, Any]) -> Tuple[str, int, float]:
        return r["dataset"], PREPROCESS.index(r["preprocess"]), r["scale"]

    smallest: Dict[Tuple[str, str], float] = {}
    for r in sorted(results, key=key):
        if r.get("rc") != 0 or "s_per_1k_records" not in r:
            lines.append(f"| {r['dataset']} | {r['preprocess']} | {r['scale']:g} | failed (rc {r.get('rc')}) |||||")
            continue
        base = smallest.setdefault((r["dataset"], r["preprocess"]), r["s_per_1k_records"])
        over = " (over budget)" if r["peak_rss_gb"] > BUDGET_GB else ""
        lines.append(
            f"| {r['dataset']} | {r['preprocess']} | {r['scale']:g} | {r['records']:,} | {r['wall_s']:.1f} | "
            f"{r['peak_rss_gb']:.2f}{over} | {r['s_per_1k_records']:.3f} | {r['s_per_1k_records'] / base:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench-prepare")
    p.add_argument("--work", type=Path, help="sources and prepared data (default OUT/work); needs ~12 GB")
    p.add_argument("--datasets", default="svhn,cifar10")
    p.add_argument("--preprocess", default=",".join(PREPROCESS))
    p.add_argument("--scales", default="0.25,1", help="fractions of the paper sizes, e.g. 0.02 for a quick run")
    p.add_argument("--chunk-size", type=int, default=0, help="images per chunk (default: the project's)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--make-sources", nargs=3, metavar=("DATASET", "SCALE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_prepare(json.loads(args.child))
        return
    if args.make_sources:
        make_sources(args.make_sources[0], float(args.make_sources[1]), Path(args.make_sources[2]))
        return
    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.preprocess.split(",") if m]
    scales = sorted(float(s) for s in args.scales.split(",") if s)
    for d in datasets:
        if d not in SIZES:
            p.error(f"unknown dataset {d}; known: {', '.join(SIZES)}")
    for m in methods:
        if m not in PREPROCESS:
            p.error(f"unknown preprocessing {m}; known: {', '.join(PREPROCESS)}")
    out: Path = args.out
    work: Path = args.work or out / "work"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: List[Dict[str, Any]] = json.loads(results_path.read_text()) if results_path.exists() else []
    for dataset in datasets:
        for scale in scales:
            source = work / f"source-{dataset}-{scale:g}"
            shutil.rmtree(source, ignore_errors=True)
            t0 = time.perf_counter()
            rc, _, _, _ = run_child(
                [sys.executable, str(Path(__file__).resolve()), "--make-sources", dataset, str(scale), str(source)],
                out / "logs" / f"sources-{dataset}-{scale:g}.log",
            )
            if rc != 0:
                raise SystemExit(f"making the {dataset} sources failed: see {out / 'logs'}")
            print(f"sources {dataset} x{scale:g}: {time.perf_counter() - t0:.1f} s", flush=True)
            for method in methods:
                entry = measure(dataset, method, scale, source, work, out, args.chunk_size)
                results = [
                    r for r in results if (r["dataset"], r["preprocess"], r["scale"]) != (dataset, method, scale)
                ]
                results.append(entry)
                results_path.write_text(json.dumps(results, indent=2))
                print(
                    f"   {entry['wall_s']:.1f} s, peak RSS {entry.get('peak_rss_gb', float('nan')):.2f} GB, "
                    f"{entry.get('s_per_1k_records', float('nan')):.3f} s / 1k records (rc {entry['rc']})",
                    flush=True,
                )
            shutil.rmtree(source, ignore_errors=True)
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    failed = [r for r in results if r.get("rc") != 0 or r.get("peak_rss_gb", 0) > BUDGET_GB]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed or went over {BUDGET_GB} GB: see {results_path}")


if __name__ == "__main__":
    main()
