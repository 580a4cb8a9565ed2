"""LMDB writing speed (issue 6): 60,000 28x28 uint8 images through our writer vs Caffe's
convert_mnist_data on the same IDX input, measured in one run.  Target: byte-identical, and within
2x of convert_mnist_data (a fraction of a second for MNIST; issue 13 traded the byte-splicing
encoder that reached ratio ~0.8 for the plain one-message encoder of metaqnn/caffe/datum.py).

    .venv/bin/python bench/bench_lmdb.py
"""

import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.lmdb_writer import iter_lmdb, write_lmdb
from data_prep.sources import read_idx_images, read_idx_labels
from metaqnn.caffe.locate import find_caffe


def main() -> None:
    n = 60000
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "img").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, (n, 784), np.uint8).tobytes()
        )
        (d / "lab").write_bytes(struct.pack(">II", 2049, n) + rng.integers(0, 10, n).astype(np.uint8).tobytes())
        tool = find_caffe().tool("convert_mnist_data")
        t0 = time.perf_counter()
        subprocess.run(
            [str(tool), str(d / "img"), str(d / "lab"), str(d / "caffe.lmdb"), "--backend=lmdb"],
            check=True,
            capture_output=True,
        )
        caffe_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_lmdb(d / "ours.lmdb", read_idx_images(d / "img"), read_idx_labels(d / "lab"))
        ours_s = time.perf_counter() - t0
        identical = list(iter_lmdb(d / "ours.lmdb")) == list(iter_lmdb(d / "caffe.lmdb"))
    print(
        f"convert_mnist_data: {caffe_s:.2f} s; ours (read IDX + write LMDB): {ours_s:.2f} s; "
        f"byte-identical: {identical}"
    )
    print(f"ratio ours/caffe: {ours_s / caffe_s:.2f}")


if __name__ == "__main__":
    main()
