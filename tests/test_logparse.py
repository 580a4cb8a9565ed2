import math
from pathlib import Path

from metaqnn.caffe.logparse import LogParser, parse_lines, write_csvs

LOGS = Path(__file__).resolve().parent / "fixtures" / "logs"


def lines(name):
    return (LOGS / f"{name}.log").read_text().splitlines()


def test_normal_run_rows_match_parse_log_columns(tmp_path):
    st = parse_lines(lines("normal"))
    assert st.done and not st.diverged and not st.fatal
    assert [int(r["NumIters"]) for r in st.test_rows] == [37, 74, 111, 148, 185]  # one test per epoch
    assert all(set(r) >= {"NumIters", "Seconds", "LearningRate", "Accuracy1", "SoftmaxWithLoss1"} for r in st.test_rows)
    assert st.train_rows[0]["NumIters"] == 0 and st.train_rows[0]["LearningRate"] == 0.001
    assert st.train_rows[-1]["SoftmaxWithLoss1"] < st.train_rows[0]["SoftmaxWithLoss1"]
    assert st.snapshots[-2:] == ["snapshots/model_iter_185.caffemodel", "snapshots/model_iter_185.solverstate"]
    assert st.best_test("Accuracy1") == max(
        ((int(r["NumIters"]), r["Accuracy1"]) for r in st.test_rows), key=lambda p: p[1]
    )
    train_csv, test_csv = write_csvs(st, tmp_path / "normal.log")
    header = test_csv.read_text().splitlines()[0]
    assert header == "NumIters,Seconds,LearningRate,Accuracy1,SoftmaxWithLoss1"
    # the Accuracy layer has no phase rule, so the train net reports it too (as in the published nets)
    assert train_csv.read_text().splitlines()[0] == "NumIters,Seconds,LearningRate,Accuracy1,SoftmaxWithLoss1"
    assert len(test_csv.read_text().splitlines()) == 6


def test_streaming_equals_batch_parsing():
    parser = LogParser()
    for ln in lines("normal"):
        parser.feed(ln)
    assert parser.state.test_rows == parse_lines(lines("normal")).test_rows


def test_divergence_is_detected():
    st = parse_lines(lines("diverged"))
    assert st.diverged and not st.done
    nan_line = next(ln for ln in lines("diverged") if "loss = -nan" in ln or "loss = nan" in ln)
    assert st.last_iteration == int(nan_line.split("Iteration ")[1].split(" ")[0].rstrip(","))
    assert all(math.isfinite(r["SoftmaxWithLoss1"]) for r in st.train_rows)  # rows before it are intact


def test_fatal_and_out_of_memory():
    rejected = parse_lines(lines("rejected"))
    assert rejected.fatal and rejected.fatal[0].startswith("Check failed") and not rejected.out_of_memory
    oom = parse_lines(lines("oom"))
    assert oom.out_of_memory and "out of memory" in oom.fatal[0]


def test_loose_prefix_matching_and_nan_accuracy():
    raw = [
        "I0101 00:00:00.000001 12 solver.cpp:330] Iteration 0, Testing net (#0)",
        "I0101 00:00:01.500000 12 solver.cpp:397]     Test net output #0: acc = 0.5",
        "I0101 00:00:02.000000     7 solver.cpp:218] Iteration 5 (2.5 iter/s, 2s/5 iters), loss = inf",
        "I0101 00:00:03.000000 12 solver.cpp:330] Iteration 10, Testing net (#0)",
        "I0101 00:00:03.500000 12 solver.cpp:397]     Test net output #0: acc = 1",
    ]
    st = parse_lines(raw)
    assert st.diverged and abs(st.test_rows[1]["Seconds"] - 3.5) < 1e-5
    assert st.best_test("acc") == (0, 0.5)  # accuracy read after a NaN loss is not trusted
