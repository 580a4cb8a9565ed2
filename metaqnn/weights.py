"""A model's trained weights as HDF5, in Caffe's own ``snapshot_format: HDF5`` layout.

A ``.caffemodel`` is a binary NetParameter: readable only with Caffe's schema.  Caffe's
HDF5 snapshots (``Net::ToHDF5``) hold the same blobs as ``/data/<layer name>/<blob index>``
float32 datasets of the blob's shape, which h5py -- and so any framework -- opens without
Caffe.  ``export`` writes both for each model it finds trained weights for.
"""

from pathlib import Path
from typing import Any, Dict, Tuple

import h5py
import numpy as np

from metaqnn.caffe.schema import load_schema
from qagent.errors import MetaQNNError


class WeightsError(MetaQNNError):
    pass


def _shape(blob: Any) -> Tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    legacy = (blob.num, blob.channels, blob.height, blob.width)  # pre-BlobShape caffemodels
    return tuple(int(d) for d in legacy)


def read_caffemodel(path: Path) -> Dict[str, Tuple[np.ndarray, ...]]:
    """Layer name -> its blobs (weights, bias) as float32 arrays of the blob's shape."""
    net = load_schema().NetParameter()
    try:
        net.ParseFromString(Path(path).read_bytes())
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception:
        raise WeightsError(f"{path} is not a caffemodel (binary NetParameter)") from None
    layers = list(net.layer) or list(net.layers)  # V2 layers, or a V1 model
    out: Dict[str, Tuple[np.ndarray, ...]] = {}
    for layer in layers:
        if layer.blobs:
            out[layer.name] = tuple(np.asarray(b.data, dtype=np.float32).reshape(_shape(b)) for b in layer.blobs)
    return out


def caffemodel_to_hdf5(caffemodel: Path, h5_path: Path) -> int:
    """Write Caffe's HDF5 weight layout; returns the number of blobs written."""
    blobs = read_caffemodel(caffemodel)
    tmp = h5_path.with_name(h5_path.name + ".tmp")
    n = 0
    with h5py.File(tmp, "w") as h5:
        data = h5.create_group("data")
        for name, arrays in blobs.items():
            group = data.create_group(name)
            for i, array in enumerate(arrays):
                group.create_dataset(str(i), data=array)
                n += 1
    tmp.replace(h5_path)
    return n


def read_hdf5(path: Path) -> Dict[str, Tuple[np.ndarray, ...]]:
    """The blobs of a weights file in Caffe's HDF5 layout (ours or Caffe's own snapshot)."""
    with h5py.File(path, "r") as h5:
        data = h5["data"]
        return {
            name: tuple(np.asarray(data[name][str(i)]) for i in range(len(data[name])))
            for name in data
            if len(data[name])
        }
