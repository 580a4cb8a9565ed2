"""Wall time spent outside the caffe process while training one model (issue 5). Target: under 2%.

A real search-protocol training (probe epoch + 19 more epochs) of a digits network with the CPU
caffe; "outside" = Trainer.train() wall time minus the wall time of the caffe processes
(rendering, log parsing, CSV writing, snapshot pruning, state files).

    .venv/bin/python bench/bench_trainer_overhead.py
"""

import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.prepare import PrepOptions, prepare
from metaqnn.caffe.locate import find_caffe
from metaqnn.netspec import Transform
from metaqnn.solverspec import load_protocol
from metaqnn.trainer import Trainer, TrainJob
from qagent.arch import parse_architecture

ARCH = "[C(32,3,1), C(32,3,1), P(2,2), C(32,3,1), FC(64), SM(10)]"


def digits_job(data: Path, manifest: Dict[str, Any], model_dir: Path, **fields: Any) -> TrainJob:
    """The benchmark's training: ARCH on prepared digits (``data``), the digits search protocol."""
    return TrainJob(
        layers=parse_architecture(ARCH),
        model_dir=model_dir,
        caffe=find_caffe().binary,
        train_lmdb=data / "train.lmdb",
        val_lmdb=data / "val.lmdb",
        train_size=manifest["sets"]["train"]["count"],
        val_size=manifest["sets"]["val"]["count"],
        image_size=8,
        channels=1,
        num_classes=10,
        protocol=load_protocol("search_digits"),
        transform=Transform(scale=1 / 256),
        **fields,
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        m = prepare(PrepOptions("digits", validation_size=300), d / "data", log=lambda _m: None)
        r = Trainer(digits_job(d / "data", m, d / "model")).train()
    outside = r.wall_time - r.caffe_time
    print(f"{ARCH}: status {r.status}, best accuracy {r.best_accuracy}, {len(r.curve)} epochs")
    print(f"wall {r.wall_time:.2f} s, inside caffe {r.caffe_time:.2f} s, outside {outside:.3f} s")
    print(f"fraction outside caffe: {100 * outside / r.wall_time:.2f} %")


if __name__ == "__main__":
    main()
