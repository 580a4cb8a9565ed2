"""Issue 2: a real caffe, its schema, and a real `caffe train` on a tiny LMDB written here."""

import subprocess

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, text_format

from data_prep.lmdb_writer import write_lmdb
from metaqnn.caffe import schema
from metaqnn.caffe.runner import run_caffe, train_argv
from metaqnn.netspec import Transform, build_net
from metaqnn.render import write_training_files
from metaqnn.solverspec import load_protocol, solver_fields
from qagent.arch import parse_architecture


def test_schema_routes_agree(caffe):
    cands = caffe.schema_candidates()
    py = next(p for p in cands if p.suffix == ".py")
    so = next(p for p in cands if ".so" in p.name)
    a = descriptor_pb2.FileDescriptorProto.FromString(schema.descriptor_from_pb2_source(py))
    b = descriptor_pb2.FileDescriptorProto.FromString(schema.descriptor_from_binary(so))
    a.name = b.name = "caffe.proto"
    assert a == b and a.package == "caffe"
    pb = schema.load_schema()
    d = pb.Datum(channels=1, height=2, width=2, data=b"\x01\x02\x03\x04", label=3)
    assert pb.Datum.FromString(d.SerializeToString()) == d
    net = pb.NetParameter()
    text_format.Merge('layer { name: "x" type: "ReLU" }', net)
    assert net.layer[0].type == "ReLU"


def test_missing_schema_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "caffe"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CAFFE_BIN", str(fake))
    schema.load_schema.cache_clear()
    monkeypatch.setattr(schema, "_pycaffe", lambda: None)
    try:
        with pytest.raises(schema.SchemaNotFoundError, match="searched: pycaffe"):
            schema.load_schema()
    finally:
        schema.load_schema.cache_clear()


def _wrapper(folder, real):
    """What users do to add environment or a profiler: a script that execs the real caffe."""
    folder.mkdir()
    path = folder / "caffe"
    path.write_text(f'#!/bin/sh\nMY_PROFILER=1 exec {real} "$@"\n')
    path.chmod(0o755)
    return path


def test_a_wrapper_script_as_caffe_bin_finds_its_schema_through_caffe_schema_or_caffe_root(caffe, tmp_path):
    from commandline import cli, one_line_error

    wrapper = _wrapper(tmp_path / "wrap", caffe.binary)
    env = {"CAFFE_BIN": str(wrapper), "CAFFE_ROOT": "", "CAFFE_SCHEMA": ""}
    line = one_line_error(cli("caffe-info", env=env, timeout=120), "Caffe protobuf schema not found")
    assert "CAFFE_SCHEMA" in line and "caffe_pb2.py, caffe.proto or libcaffe.so" in line and str(wrapper) in line
    cands = caffe.schema_candidates()
    so = next(p for p in cands if ".so" in p.name)
    py = next(p for p in cands if p.suffix == ".py")
    for extra in ({"CAFFE_SCHEMA": str(so)}, {"CAFFE_SCHEMA": str(py)}, {"CAFFE_ROOT": str(caffe.root)}):
        ok = cli("caffe-info", env={**env, **extra}, timeout=120)
        assert ok.returncode == 0, (extra, ok.stderr)
        assert f"caffe: {wrapper} (CAFFE_BIN), caffe version 1.0.0" in ok.stdout, ok.stdout
        assert f"schema: descriptor from {extra.get('CAFFE_SCHEMA') or py}" in ok.stdout, ok.stdout
    missing = one_line_error(
        cli("caffe-info", env={**env, "CAFFE_SCHEMA": str(tmp_path / "nope.py")}, timeout=120), "CAFFE_SCHEMA="
    )
    assert "does not exist" in missing
    one_line_error(cli("caffe-info", env={**env, "CAFFE_SCHEMA": str(wrapper)}, timeout=120), "no usable Caffe schema")


def test_a_search_runs_end_to_end_through_a_wrapper_script(caffe, tmp_path, digits_data):
    from commandline import cli

    data, _ = digits_data
    wrapper = _wrapper(tmp_path / "wrap", caffe.binary)
    env = {"CAFFE_BIN": str(wrapper), "CAFFE_ROOT": "", "CAFFE_SCHEMA": str(caffe.root)}
    tiny = ["--set", "schedule.steps=[[1.0, 1]]", "--set", "space.max_depth=2"]
    exp = tmp_path / "exp"
    ok = cli("search", "--exp", str(exp), "--data-dir", str(data), "--max-models", "1", *tiny, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"caffe {wrapper} (CAFFE_BIN" in ok.stdout and (exp / "store.sqlite").is_file()
    assert list((exp / "models").glob("*/train*.log"))  # the wrapper trained it
    rendered = cli("render", "--arch", "[C(8,3,1), SM(10)]", "--out", str(tmp_path / "r"), env=env)
    assert rendered.returncode == 0, rendered.stderr


def test_caffe_binary_runs(caffe):
    out = subprocess.run([str(caffe.binary), "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert "caffe version 1.0.0" in out.stdout + out.stderr


def _tiny_lmdb(path, n, rng):
    """Two separable classes: bright top half (label 1) or bright bottom half (label 0)."""
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 40, (n, 1, 8, 8)).astype(np.uint8)
    for i, y in enumerate(labels):
        rows = slice(0, 4) if y else slice(4, 8)
        images[i, 0, rows, :] += 200
    write_lmdb(path, images, labels)


def test_real_caffe_train_on_a_tiny_lmdb(caffe, tmp_path):
    rng = np.random.default_rng(0)
    _tiny_lmdb(tmp_path / "train.lmdb", 256, rng)
    _tiny_lmdb(tmp_path / "val.lmdb", 100, rng)
    spec = build_net(
        parse_architecture("[C(8,3,1), P(2,2), SM(2)]"),
        image_size=8,
        channels=1,
        num_classes=2,
        train_source="train.lmdb",
        test_source="val.lmdb",
        transform=Transform(scale=1 / 256),
        train_batch=32,
    )
    # seeded: Caffe seeds its fillers from the clock otherwise, and this test would pass by chance
    proto = load_protocol("search_digits").with_overrides(display=1, test_initialization=True, random_seed=1)
    fields = solver_fields(proto, net="net.prototxt", train_size=256, test_size=100, whole_test_set=True, max_epochs=10)
    write_training_files(tmp_path, spec, fields)
    (tmp_path / "snapshots").mkdir()
    outcome = run_caffe(
        train_argv(caffe.binary, tmp_path / "solver.prototxt"),
        cwd=tmp_path,
        log_path=tmp_path / "train.log",
        timeout=300,
    )
    st = outcome.state
    assert outcome.returncode == 0 and st.done and not st.fatal
    # a test pass at iteration 0 and after each of the 10 epochs of 8 iterations
    assert [int(r["NumIters"]) for r in st.test_rows] == list(range(0, 81, 8))
    losses = [r["SoftmaxWithLoss1"] for r in st.train_rows]
    assert len(losses) == 80 and np.mean(losses[-8:]) < 0.5 * np.mean(losses[:4])
    assert st.test_rows[-1]["Accuracy1"] > 0.9 > st.test_rows[0]["Accuracy1"] - 0.4
    assert (tmp_path / "snapshots" / "model_iter_80.caffemodel").exists()
