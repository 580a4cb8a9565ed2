"""Issue 21 with the real Caffe: `metaqnn train` and `metaqnn transfer` on small real data.

* digits (10 classes) -> digits59 (the digits 5..9 as a 5-class task), from scratch and finetuned:
  the finetune's iteration-0 weights are the source's in every copied layer, not in the
  re-initialised classifier (read back from the HDF5 export);
* the authors' published SVHN and MNIST nets train on synthetic data of their targets' shapes;
* CIFAR-10-shaped weights onto MNIST-shaped data (32x32x3 -> 28x28x1), the documented decision;
* bad requests are one line, exit status 2, and create nothing;
* a training killed -9 resumes from its snapshot, and a finished one is never trained again.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from commandline import ROOT, cli, one_line_error

from data_prep.prepare import build
from data_prep.sources import Dataset, Split
from metaqnn.config import build_config
from metaqnn.search import prep_options
from metaqnn.weights import caffemodel_to_hdf5, read_hdf5

SMALL = "[C(16,3,1), P(2,2), FC(32), SM(10)]"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A workspace of its own (data/, experiments/): what the commands create is seen here."""
    return tmp_path_factory.mktemp("home")


def workspace_env(home: Path) -> dict:
    """A workspace of its own, and the project's Caffe: a workspace's .deps/ would be searched otherwise."""
    from metaqnn.caffe.locate import find_caffe

    return {"METAQNN_HOME": str(home), "CAFFE_BIN": str(find_caffe().binary)}


def run(home: Path, *args: str, **kw):
    return cli(*args, env=workspace_env(home), **kw)


@pytest.fixture(scope="module")
def digits_model(home, caffe):
    """A digits model trained by `metaqnn train` (10 classes): the source of the transfers."""
    out = home / "src"
    r = run(home, "train", "--arch", SMALL, "--dataset", "digits", "--protocol-set", "epochs=4", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def synthetic(folder: Path, preset: str, sets=(("train", 6), ("test", 2)), classes=10) -> list:
    """Prepared data of a preset's shape from random pixels; returns the --set arguments that fit it."""
    overrides = ["dataset.validation_size=2"]
    cfg = build_config(preset, overrides)
    rng = np.random.default_rng(0)
    size, channels = cfg.space.image_size, cfg.dataset.channels
    parts = {}
    for name, n in sets:
        labels = np.arange(n) % classes
        parts[name] = Split(rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8), labels.astype(np.int64))
    build(Dataset(preset, classes, parts), prep_options(cfg), folder, lambda _m: None)
    return [a for o in overrides for a in ("--set", o)]


def blobs_of(caffemodel: Path, tmp: Path) -> dict:
    h5 = tmp / (caffemodel.stem + ".h5")
    caffemodel_to_hdf5(caffemodel, h5)
    return read_hdf5(h5)


def test_finetune_starts_from_the_source_weights_and_renews_only_the_classifier(home, digits_model, tmp_path):
    root = home / "transfer59"
    r = run(home, "transfer", "--from", str(digits_model), "--to", "digits59", "--protocol-set", "epochs=2",
            "--out", str(root))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "re-initialised InnerProduct2 (classes 10 -> 5), renamed InnerProduct2_reinit" in r.stdout
    tuned = root / "digits59_finetune"
    meta = json.loads((tuned / "metadata.json").read_text())
    assert meta["copied"] == ["Convolution1", "InnerProduct1"]
    assert [(x["layer"], x["renamed"], x["lr_mult"]) for x in meta["reinitialised"]] == [
        ("InnerProduct2", "InnerProduct2_reinit", 10.0)
    ]
    source = read_hdf5(digits_model / "weights.h5")
    start = blobs_of(tuned / "init.caffemodel", tmp_path)
    for layer in meta["copied"]:
        assert all(np.array_equal(a, b) for a, b in zip(source[layer], start[layer])), layer
    assert start["InnerProduct2_reinit"][0].shape == (5, 32) and source["InnerProduct2"][0].shape == (10, 32)
    assert not np.allclose(start["InnerProduct2_reinit"][0], source["InnerProduct2"][0][:5])
    # the trained weights are the plain architecture's again, and differ from where they started
    final = read_hdf5(tuned / "weights.h5")
    assert set(final) == {"Convolution1", "InnerProduct1", "InnerProduct2"}
    assert not np.array_equal(final["Convolution1"][0], source["Convolution1"][0])
    scratch = json.loads((root / "digits59_scratch" / "metadata.json").read_text())
    assert scratch["reinitialised"] == [] and scratch["source"]["weights"] is None
    assert not (root / "digits59_scratch" / "init.caffemodel").exists()
    table = json.loads((root / "table5.json").read_text())
    assert set(table["rows"]) == {"scratch", "finetune"} and table["targets"] == ["digits59"]
    for init in ("scratch", "finetune"):
        result = json.loads((root / f"digits59_{init}" / "result.json").read_text())
        assert table["rows"][init]["digits59"]["test_error"] == result["test_error"]
        assert result["test_images"] == 149 and 0.0 <= result["test_error"] <= 1.0
    md = (root / "table5.md").read_text()
    assert "| from scratch |" in md and "| finetuned |" in md and "digits59" in md
    # a second run trains nothing: every cell is already there
    logs = {p: p.stat().st_size for p in root.glob("*/train.log")}
    again = run(home, "transfer", "--from", str(digits_model), "--to", "digits59", "--protocol-set", "epochs=2",
                "--out", str(root))  # fmt: skip
    assert again.returncode == 0 and again.stdout.count("already trained") == 2, again.stdout + again.stderr
    assert {p: p.stat().st_size for p in root.glob("*/train.log")} == logs


def test_the_published_nets_train_on_their_targets(home, published, caffe, tmp_path):
    for dataset, shape_note in (("svhn", "32x32x3"), ("mnist", "28x28x1")):
        data = tmp_path / dataset
        sets = synthetic(data, dataset)
        nets = sorted((published / "prototxt").glob(f"{dataset}_*.prototxt"))
        assert nets, published
        for net in nets:
            out = tmp_path / f"run_{net.stem}"
            r = run(home, "train", "--net", str(net), "--dataset", dataset, "--data-dir", str(data), *sets,
                    "--protocol-set", "train_batch=4", "--protocol-set", "test_batch=2", "--protocol-set", "epochs=1",
                    "--out", str(out))  # fmt: skip
            assert r.returncode == 0, (net.name, r.stdout + r.stderr)
            assert f"on {dataset} ({shape_note}, 10 classes)" in r.stdout, r.stdout
            result = json.loads((out / "result.json").read_text())
            assert result["iterations"] == 1 and (out / "weights.caffemodel").is_file(), net.name
            recovered = cli("arch", str(net)).stdout.strip()
            assert json.loads((out / "metadata.json").read_text())["arch"] == recovered


def test_cifar10_weights_onto_mnist_images(home, caffe, tmp_path):
    """32x32x3 -> 28x28x1: each dataset at its own shape; the first convolution and the FC a smaller map feeds are new."""
    cifar, mnist = tmp_path / "cifar", tmp_path / "mnist"
    cifar_sets, mnist_sets = synthetic(cifar, "cifar10"), synthetic(mnist, "mnist")
    arch = "[C(8,3,1), P(5,3), C(8,3,1), P(3,2), FC(16), SM(10)]"
    src = tmp_path / "src"
    r = run(home, "train", "--arch", arch, "--dataset", "cifar10", "--data-dir", str(cifar), *cifar_sets,
            "--protocol-set", "train_batch=4", "--protocol-set", "epochs=1", "--out", str(src))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "to_mnist"
    r = run(home, "train", "--from", str(src), "--dataset", "mnist", "--data-dir", str(mnist), *mnist_sets,
            "--init", "finetune", "--protocol-set", "train_batch=4", "--protocol-set", "epochs=1",
            "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((out / "metadata.json").read_text())
    # 32 -> P(5,3) -> 10 -> P(3,2) -> 5 (8x5x5 = 200) against 28 -> 9 -> 4 (8x4x4 = 128)
    assert {x["layer"]: x["reason"] for x in meta["reinitialised"]} == {
        "Convolution1": "input channels 3 -> 1",
        "InnerProduct1": "input size 200 -> 128",
    }
    assert meta["copied"] == ["Convolution2", "InnerProduct2"]
    source, start = read_hdf5(src / "weights.h5"), blobs_of(out / "init.caffemodel", tmp_path)
    for layer in meta["copied"]:
        assert all(np.array_equal(a, b) for a, b in zip(source[layer], start[layer])), layer
    assert start["Convolution1_reinit"][0].shape == (8, 1, 3, 3)


def test_bad_requests_are_one_line_and_create_nothing(home, digits_model, tmp_path):
    fresh = tmp_path / "home"  # nothing may appear in it: no data/, no experiments/
    fresh.mkdir()
    out = tmp_path / "out"
    weights = str(digits_model / "weights.caffemodel")
    predicted = tmp_path / "predicted"
    predicted.mkdir()
    (predicted / "arch.txt").write_text(SMALL + "\n")
    (predicted / "metadata.json").write_text(json.dumps({"arch": SMALL, "reward_kind": "predicted", "model_id": 3}))
    cases = [
        (["train", "--arch", SMALL, "--dataset", "nosuch"], "unknown dataset/preset 'nosuch'"),
        (["transfer", "--from", str(digits_model), "--to", "digits59,nosuch"], "unknown dataset/preset 'nosuch'"),
        (
            [
                "train",
                "--arch",
                "[C(16,3,1), P(2,2), SM(10)]",
                "--weights",
                weights,
                "--dataset",
                "digits59",
                "--init",
                "finetune",
            ],
            "the weights belong to another architecture",
        ),
        (
            ["train", "--arch", SMALL, "--dataset", "digits59", "--init", "finetune"],
            "--init finetune needs the source's weights",
        ),
        (["train", "--from", str(predicted), "--dataset", "digits59"], "stopped early by the search"),
        (
            ["train", "--arch", "[C(240,7,1), P(3,2), C(120,5,2), FC(50), SM(10)]", "--dataset", "digits"],
            "cannot run on digits: layer 3 (C(120,5,2)) on 8x8 images: receptive field 5",
        ),
        (["transfer", "--from", str(digits_model), "--to", "digits59", "--init", "both"], "--init takes"),
        (["train", "--dataset", "digits59"], "give the architecture exactly one way"),
        (["train", "--arch", SMALL, "--from", str(digits_model), "--dataset", "digits59"], "exactly one way"),
        (["transfer", "--from", str(digits_model), "--exp", "x", "--to", "digits59"], "--from MODEL_FOLDER or --exp E"),
        (["train", "--arch", SMALL, "--weights", weights, "--dataset", "digits59"], "read only by --init finetune"),
        (["train", "--arch", "[C(99999999,3,1), SM(10)]"], "more than a Caffe blob can"),
        (["train", "--arch", SMALL, "--out", str(digits_model / "arch.txt" / "x")], "is not a folder"),
        (["train", "--arch", SMALL, "--dataset", "digits59", "--out", str(digits_model)], "holds another training"),
        (["train", "--arch", SMALL, "--out", str(tmp_path)], "is not empty and holds no training"),
    ]
    for args, fragment in cases:
        r = cli(*args, *([] if "--out" in args else ["--out", str(out)]), env=workspace_env(fresh))
        one_line_error(r, fragment)
        assert not out.exists() and list(fresh.iterdir()) == [], (args, list(fresh.iterdir()))


def test_another_plan_in_the_same_folder_is_refused(home, digits_model, tmp_path):
    out = tmp_path / "t"
    ok = run(home, "train", "--from", str(digits_model), "--dataset", "digits59", "--protocol-set", "epochs=1",
             "--out", str(out))  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    before = sorted(p.name for p in out.iterdir())
    other = run(home, "train", "--from", str(digits_model), "--dataset", "digits59", "--init", "finetune",
                "--protocol-set", "epochs=1", "--out", str(out))  # fmt: skip
    one_line_error(other, "holds another training")
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_training_killed_by_sigkill_resumes_from_its_snapshot(home, digits_model, tmp_path):
    out = tmp_path / "long"
    argv = [sys.executable, "-m", "metaqnn", "train", "--from", str(digits_model), "--dataset", "digits59",
            "--protocol-set", "epochs=150", "--out", str(out)]  # fmt: skip
    env = {**os.environ, **workspace_env(home)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list((out / "snapshots").glob("*.solverstate"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "no snapshots before the kill"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = [line for line in r.stdout.splitlines() if "resuming from iteration" in line]
    assert resumed and int(resumed[0].split("iteration ")[1].split()[0]) > 0, r.stdout
    tests = (out / "curves.test").read_text().splitlines()[1:]
    iters = [int(float(line.split(",")[0])) for line in tests]
    assert iters == sorted(set(iters)) and iters[-1] == 150 * 23  # every epoch once, to the end
    assert not (out / "snapshots").exists()  # pruned once the result is written
    again = run(home, "train", "--from", str(digits_model), "--dataset", "digits59", "--protocol-set", "epochs=150",
                "--out", str(out))  # fmt: skip
    assert again.returncode == 0 and "already trained" in again.stdout, again.stdout + again.stderr


@pytest.fixture(scope="module")
def experiment(home, digits_data, tmp_path_factory):
    """A tiny real digits search (3 models, 3 epochs), as in test_export_recovery."""
    from test_export_recovery import short

    data, _ = digits_data
    root = tmp_path_factory.mktemp("exp")
    search = short("search_digits", root, epochs=3, step_epochs=1)
    exp = root / "exp"
    r = run(home, "search", "--exp", str(exp), "--data-dir", str(data), "--seed", "3",
            "--set", "schedule.steps=[[1.0, 3]]", "--set", "space.max_depth=3",
            "--set", f"protocol.search='{search}'")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return exp


def test_transfer_of_an_experiments_best_model_lands_in_its_report(home, experiment, tmp_path):
    import shutil
    import sqlite3

    exp = tmp_path / "exp"
    shutil.copytree(experiment, exp)
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        best, arch, iteration = conn.execute(
            "SELECT id, arch, json_extract(metrics, '$.best_iteration') FROM models WHERE status = 'done' "
            "ORDER BY reward DESC, id ASC LIMIT 1"
        ).fetchone()
    r = run(home, "transfer", "--exp", str(exp), "--to", "digits59", "--init", "finetune",
            "--protocol-set", "epochs=1")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    tuned = exp / "transfer" / "digits59_finetune"
    meta = json.loads((tuned / "metadata.json").read_text())
    assert meta["source"]["model"] == best and meta["source_arch"] == arch
    kept = next((exp / "models" / f"{best:05d}" / "snapshots").glob(f"*_iter_{iteration}.caffemodel"))
    assert meta["source"]["weights"] == str(kept) and "not finetuned" in meta["source"]["weights_from"]
    source, start = blobs_of(kept, tmp_path), blobs_of(tuned / "init.caffemodel", tmp_path)
    for layer in meta["copied"]:
        assert all(np.array_equal(a, b) for a, b in zip(source[layer], start[layer])), layer
    report = run(home, "report", "--exp", str(exp))
    assert report.returncode == 0, report.stderr
    page = (exp / "report" / "report.md").read_text()
    assert "## Transfer (Table 5)" in page and "| finetuned |" in page
    # a model the search only predicted is no source unless asked
    with sqlite3.connect(str(exp / "store.sqlite")) as conn:
        conn.execute("UPDATE models SET status = 'stopped' WHERE id = ?", (best,))
    refused = run(home, "train", "--exp", str(exp), "--model", str(best), "--dataset", "digits59",
                  "--init", "finetune", "--out", str(tmp_path / "never"))  # fmt: skip
    one_line_error(refused, "stopped early by the search")
    assert not (tmp_path / "never").exists()


def test_relative_out_folders_and_every_target_checked_before_the_first_trains(home, digits_model, tmp_path):
    """--out relative to where the command runs; a target whose data cannot be made stops the transfer first."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, **workspace_env(home)}
    argv = [sys.executable, "-m", "metaqnn", "train", "--from", str(digits_model), "--dataset", "digits59",
            "--protocol-set", "epochs=1", "--out", "rel"]  # fmt: skip
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and (cwd / "rel" / "result.json").is_file(), r.stdout + r.stderr
    root = tmp_path / "t"
    r = run(home, "transfer", "--from", str(digits_model), "--to", "digits59,mnist", "--out", str(root))
    one_line_error(r, "dataset mnist needs its release files")
    assert not list(root.glob("digits59_*"))  # nothing trained: mnist was refused first


def test_table5_keeps_the_cells_of_earlier_transfers_of_the_same_source(home, digits_model, tmp_path):
    root = tmp_path / "t"
    for target in ("digits59", "digits"):
        r = run(home, "transfer", "--from", str(digits_model), "--to", target, "--init", "scratch",
                "--protocol-set", "epochs=1", "--out", str(root))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    table = json.loads((root / "table5.json").read_text())
    assert table["targets"] == ["digits59", "digits"] and set(table["rows"]["scratch"]) == {"digits59", "digits"}
