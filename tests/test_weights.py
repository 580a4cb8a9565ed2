"""Issue 13: export writes each model's best weights as HDF5 in Caffe's own layout (h5py, no Caffe needed)."""

import numpy as np
from digits import digits_net

from metaqnn.caffe.runner import run_caffe, train_argv
from metaqnn.render import write_training_files
from metaqnn.solverspec import load_protocol, solver_fields
from metaqnn.weights import caffemodel_to_hdf5, read_caffemodel, read_hdf5


def _train(caffe, folder, data, manifest, snapshot_format):
    """Two iterations of a small net with a fixed seed; CPU Caffe then writes the same weights every time."""
    folder.mkdir()
    (folder / "snapshots").mkdir()
    spec = digits_net(data, "[C(8,3,1), P(2,2), FC(16), SM(10)]")
    proto = load_protocol("search_digits").with_overrides(random_seed=7)
    fields = solver_fields(
        proto, net="net.prototxt", train_size=64, test_size=manifest["sets"]["val"]["count"], whole_test_set=True
    )
    fields = [(k, 2 if k in ("max_iter", "snapshot") else v) for k, v in fields]
    fields.append(("snapshot_format", snapshot_format))
    write_training_files(folder, spec, fields)
    out = run_caffe(
        train_argv(caffe.binary, folder / "solver.prototxt"), cwd=folder, log_path=folder / "log", timeout=300
    )
    assert out.returncode == 0 and out.state.done, (folder / "log").read_text()[-2000:]


def test_hdf5_export_equals_caffes_own_hdf5_snapshot(caffe, digits_data, tmp_path):
    data, manifest = digits_data
    _train(caffe, tmp_path / "binary", data, manifest, "BINARYPROTO")
    _train(caffe, tmp_path / "hdf5", data, manifest, "HDF5")
    caffemodel = tmp_path / "binary" / "snapshots" / "model_iter_2.caffemodel"
    theirs = read_hdf5(tmp_path / "hdf5" / "snapshots" / "model_iter_2.caffemodel.h5")  # written by Caffe
    ours_path = tmp_path / "weights.h5"
    assert caffemodel_to_hdf5(caffemodel, ours_path) == 6  # conv, fc, classifier: weights + bias each
    ours = read_hdf5(ours_path)
    blobs = read_caffemodel(caffemodel)
    assert set(ours) == set(theirs) == set(blobs) == {"Convolution1", "InnerProduct1", "InnerProduct2"}
    for name in ours:
        assert [a.shape for a in ours[name]] == [a.shape for a in theirs[name]]
        for mine, caffes, original in zip(ours[name], theirs[name], blobs[name]):
            assert mine.dtype == np.float32
            np.testing.assert_array_equal(mine, caffes)
            np.testing.assert_array_equal(mine, original)
    assert ours["Convolution1"][0].shape == (8, 1, 3, 3) and ours["InnerProduct2"][1].shape == (10,)
