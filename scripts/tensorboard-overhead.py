"""The cost of the event files to a training: bench/bench_trainer_overhead.py's training, with and without
the monitor's writer following it (issue 23: within 1%).

The same real search-protocol training of a digits network (probe + 19 epochs, the CPU caffe), run
alternately without and with the monitor's writer (metaqnn.monitor.EventSync) in a thread of the same
process, as in the search's head: it reads the model's caffe logs as they grow and writes its run every
``--interval`` seconds (default 1 s, the fastest tensorboard.flush_seconds allows; the search's default
is 15), then writes its final points and session.  Prints each training's wall time and the time spent
outside caffe, and the medians.

    .venv/bin/python scripts/tensorboard-overhead.py [--rounds 3] [--interval 1]
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_trainer_overhead import ARCH, digits_job  # the benchmark's own network and training

from data_prep.prepare import PrepOptions, prepare
from metaqnn.experiment import model_dir
from metaqnn.monitor import EventSync
from metaqnn.trainer import Trainer, TrainJob, TrainResult
from qagent.status import ModelStatus


@dataclass
class Row:
    """What the monitor reads of a model from the store (a ModelRow's fields)."""

    id: int
    arch: str
    status: ModelStatus
    epsilon: float = 1.0
    metrics: Dict[str, Any] = field(default_factory=dict)
    started: Optional[float] = None
    finished: Optional[float] = None

    @property
    def accuracy(self) -> Optional[float]:
        return self.metrics.get("best_accuracy")


def train(job: TrainJob, exp: Optional[Path], interval: float) -> Dict[str, float]:
    sync = EventSync(exp, 134, [1.0]) if exp is not None else None
    row = Row(1, ARCH, ModelStatus.RUNNING, started=time.time())
    stop = threading.Event()
    cpu = {"s": 0.0}

    def follow() -> None:
        assert sync is not None
        while not stop.wait(interval):
            t = time.thread_time()
            sync.sync([], [row])
            sync.flush()
            cpu["s"] += time.thread_time() - t  # the CPU the writer took from the machine

    thread = threading.Thread(target=follow, daemon=True)
    if sync is not None:
        thread.start()
    t0 = time.monotonic()
    r: TrainResult = Trainer(job).train()
    wall = time.monotonic() - t0
    stop.set()
    final = 0.0
    if sync is not None:
        thread.join()
        t1 = time.monotonic()
        sync.sync([], [replace(row, status=r.status, metrics=r.metrics(), finished=time.time())])
        sync.close()
        final = time.monotonic() - t1
    return {
        "wall": wall,
        "outside": r.wall_time - r.caffe_time,
        "points": float(sync.written if sync else 0),
        "final": final,
        "cpu": cpu["s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        m = prepare(PrepOptions("digits", validation_size=300), d / "data", log=lambda _m: None)
        runs: Dict[str, List[Dict[str, float]]] = {"off": [], "on": []}
        for k in range(args.rounds):
            for mode in ("off", "on"):
                exp = d / f"{mode}{k}"
                job = digits_job(d / "data", m, model_dir(exp, 1), seed=1)
                got = train(job, exp if mode == "on" else None, args.interval)
                runs[mode].append(got)
                print(
                    f"round {k} writer {mode:3s}: wall {got['wall']:.2f} s, outside caffe {got['outside']:.3f} s "
                    f"({100 * got['outside'] / got['wall']:.2f} %), {int(got['points'])} points"
                    + (
                        f", writer CPU {1000 * got['cpu']:.1f} ms ({100 * got['cpu'] / got['wall']:.2f} % of the wall), "
                        f"final points + session {1000 * got['final']:.1f} ms"
                        if mode == "on"
                        else ""
                    ),
                    flush=True,
                )
    med = {
        mode: {k: statistics.median(r[k] for r in rs) for k in ("wall", "outside", "cpu")} for mode, rs in runs.items()
    }
    for mode in ("off", "on"):
        w, o = med[mode]["wall"], med[mode]["outside"]
        print(f"median, writer {mode:3s}: wall {w:.2f} s, outside caffe {o:.3f} s ({100 * o / w:.2f} %)")
    print(
        f"writer on vs off: wall {100 * (med['on']['wall'] / med['off']['wall'] - 1):+.2f} %, "
        f"outside caffe {100 * (med['on']['outside'] - med['off']['outside']) / med['off']['wall']:+.2f} points of the wall time, "
        f"writer CPU {100 * med['on']['cpu'] / med['on']['wall']:.2f} % of the wall"
    )


if __name__ == "__main__":
    main()
