"""Forward latency with `caffe time` (metaqnn/latency.py): the parser on a recorded real log, the
deploy net, the stored record, and real runs of the CPU caffe on tiny digits nets."""

import json
import math
import re
from pathlib import Path

import pytest
from digits import digits_net
from google.protobuf import text_format

from metaqnn import latency as latency_module
from metaqnn.caffe.schema import load_schema
from metaqnn.latency import (
    DEPLOY_NET,
    LATENCY_LOG,
    Latency,
    LatencyError,
    deploy_spec,
    machine_name,
    measure_latency,
    parse_caffe_time,
    steady_forward_ms,
    time_argv,
    write_deploy,
)
from metaqnn.render import render_net

LOGS = Path(__file__).resolve().parent / "fixtures" / "logs"
TINY = "[C(16,3,1), P(2,2), FC(32), SM(10)]"


def recorded() -> str:
    return (LOGS / "caffe_time.log").read_text()


def message_numbers(text: str, prefix: str) -> list:
    """The numbers of the log's messages that start with ``prefix``, read independently of the parser."""
    found = re.findall(r"\] " + re.escape(prefix) + r"([0-9.e+-]+) ms\.$", text, re.M)
    return [float(x) for x in found]


def tiny_spec(arch: str = TINY):
    return digits_net(Path("unused"), arch)


def test_recorded_log_is_parsed_exactly():
    text = recorded()
    per_iteration = [float(t) for t in re.findall(r"\] Iteration: \d+ forward-backward time: (\S+) ms\.$", text, re.M)]
    assert len(per_iteration) == 12 and "Testing for 12 iterations." in text
    parsed = parse_caffe_time(text, warmup=3)
    assert parsed.iteration_ms == tuple(per_iteration)
    assert parsed.forward_ms == pytest.approx(sum(per_iteration[3:]) / 9, abs=1e-12)
    assert parsed.average_forward_ms == message_numbers(text, "Average Forward pass: ")[0]
    assert parsed.average_backward_ms == message_numbers(text, "Average Backward pass: ")[0]
    assert parsed.average_forward_backward_ms == message_numbers(text, "Average Forward-Backward: ")[0]
    assert parsed.total_ms == message_numbers(text, "Total Time: ")[0]
    # Caffe's Forward-Backward is its Total Time over the iterations
    assert parsed.average_forward_backward_ms == pytest.approx(parsed.total_ms / 12, rel=1e-5)
    # the deploy net's frozen blobs make the backward half of an iteration nothing: forward-backward is forward
    assert parsed.average_backward_ms < 0.01 * parsed.average_forward_ms
    # (the total is floored to whole ms on the CPU, so the forward sum may exceed it by under 1 ms)
    assert parsed.average_forward_backward_ms >= parsed.average_forward_ms - 1 / 12
    # CPU timer: whole milliseconds per iteration
    assert all(t == int(t) for t in per_iteration)


def test_warmup_must_leave_an_iteration():
    text = recorded()
    assert len(parse_caffe_time(text, warmup=11).iteration_ms) == 12  # one measured iteration is enough
    with pytest.raises(LatencyError, match=r"12 iterations: none is left after a warm-up of 12 \(run at least 13\)"):
        parse_caffe_time(text, warmup=12)
    with pytest.raises(LatencyError, match="non-negative"):
        parse_caffe_time(text, warmup=-1)


def test_fatal_line_is_the_reason():
    text = (LOGS / "rejected.log").read_text()
    f_line = next(ln for ln in text.splitlines() if ln.startswith("F"))
    with pytest.raises(LatencyError) as err:
        parse_caffe_time(text, warmup=0)
    assert str(err.value) == "caffe time failed: " + f_line.split("] ", 1)[1].strip()
    assert "\n" not in str(err.value)


def test_logs_without_timings_or_cut_short_are_refused():
    with pytest.raises(LatencyError, match="no timing lines"):
        parse_caffe_time((LOGS / "normal.log").read_text(), warmup=0)
    with pytest.raises(LatencyError, match="no timing lines"):
        parse_caffe_time("", warmup=0)
    lines = recorded().splitlines()
    cut = "\n".join(lines[: next(i for i, ln in enumerate(lines) if "Iteration: 6 " in ln)])
    with pytest.raises(LatencyError, match="5 iterations of the 12 it announced"):
        parse_caffe_time(cut, warmup=0)
    no_total = "\n".join(ln for ln in lines if "Total Time" not in ln)
    with pytest.raises(LatencyError, match="no 'Total Time' line"):
        parse_caffe_time(no_total, warmup=0)
    twice = recorded() + recorded()
    with pytest.raises(LatencyError, match="not numbered"):
        parse_caffe_time(twice, warmup=0)


def test_deploy_net_has_an_input_layer_and_the_training_nets_parameters():
    train = tiny_spec()
    before = render_net(train)
    deploy = deploy_spec(train, batch=4, channels=1, image_size=8)
    assert render_net(train) == before  # pure
    first = deploy.layers[0]
    assert (first.kind, first.type, first.name, first.bottoms, first.tops) == ("input", "Input", "data", (), ("data",))
    assert first.params == (("shape", (("dim", 4), ("dim", 1), ("dim", 8), ("dim", 8))),)
    assert not {"Data", "Accuracy", "SoftmaxWithLoss"} & {layer.type for layer in deploy.layers}
    assert deploy.layers[-1].type == "InnerProduct" and deploy.layers[-1].name == "InnerProduct2"
    assert deploy.params == train.params and deploy.param_count == train.param_count
    learnable = [layer.name for layer in deploy.layers if layer.name in deploy.params]
    assert learnable == [layer.name for layer in train.layers if layer.name in train.params]
    assert all(layer.lr_mults == (0.0, 0.0) for layer in deploy.layers if layer.name in deploy.params)
    hidden = [layer for layer in train.layers if layer.kind not in ("data", "accuracy", "loss")]
    assert [(la.name, la.params, la.bottoms, la.tops) for la in deploy.layers[1:]] == [
        (la.name, la.params, la.bottoms, la.tops) for la in hidden
    ]
    assert deploy_spec(deploy, 4, 1, 8) == deploy  # a deploy net's deploy net is itself
    text = render_net(deploy)
    assert (
        '  name: "data"\n  type: "Input"\n  top: "data"\n  input_param {\n    shape {\n'
        "      dim: 4\n      dim: 1\n      dim: 8\n      dim: 8\n    }\n  }\n}\n"
    ) in text
    with pytest.raises(LatencyError, match="batch must be a positive integer"):
        deploy_spec(train, 0, 1, 8)


def test_deploy_net_reads_as_caffes_net_parameter(caffe, tmp_path):
    path = write_deploy(tmp_path, tiny_spec(), batch=2, channels=1, image_size=8)
    assert path == tmp_path / DEPLOY_NET
    net = text_format.Parse(path.read_text(), load_schema().NetParameter())
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 1, 8, 8]
    assert [p.lr_mult for p in net.layer[1].param] == [0.0, 0.0]


def test_latency_record_round_trips_through_json():
    record = Latency(1.5, 1.25, 1.75, iterations=10, warmup=2, batch=1, device="cpu: AMD EPYC")
    assert Latency.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    data = record.to_dict()
    with pytest.raises(LatencyError, match="missing"):
        Latency.from_dict({k: v for k, v in data.items() if k != "batch"})
    with pytest.raises(LatencyError, match="unknown"):
        Latency.from_dict({**data, "extra": 1})
    with pytest.raises(LatencyError, match="iterations"):
        Latency.from_dict({**data, "iterations": 2.5})
    with pytest.raises(LatencyError, match="forward_ms"):
        Latency.from_dict({**data, "forward_ms": "fast"})


def test_machine_names(monkeypatch):
    assert machine_name(None).startswith("cpu: ") and len(machine_name(None)) > len("cpu: ")
    monkeypatch.setattr(latency_module.shutil, "which", lambda _name: None)  # no nvidia-smi
    log = "I1202 15:53:21.469657 21955 caffe.cpp:150] GPU 1: NVIDIA H200\n"
    assert machine_name(1, log) == "gpu 1: NVIDIA H200"
    assert machine_name(0, log) == "gpu 0: unknown"


def test_argv():
    argv = time_argv(Path("/c/caffe"), DEPLOY_NET, 12, gpu=1)
    assert argv == ["/c/caffe", "time", "--model=deploy.prototxt", "--phase=TEST", "--iterations=12", "--gpu=1"]
    assert time_argv(Path("caffe"), DEPLOY_NET, 3)[-1] == "--iterations=3"


def _fake_caffe(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake_caffe"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return script


def test_exit_codes_and_unreadable_output_are_one_line_errors(tmp_path):
    spec = tiny_spec()
    failing = _fake_caffe(tmp_path, "echo 'something broke' >&2; exit 3")
    with pytest.raises(LatencyError, match=r"failed \(exit 3\) on .*deploy.prototxt: something broke$"):
        measure_latency(failing, spec, channels=1, image_size=8, folder=tmp_path / "a")
    assert (tmp_path / "a" / "latency-warmup.log").read_text().endswith("something broke\n")  # the first run
    silent = _fake_caffe(tmp_path, "echo hello")
    with pytest.raises(LatencyError, match=r"latency-warmup\.log: the caffe time log has no timing lines"):
        measure_latency(silent, spec, channels=1, image_size=8, folder=tmp_path / "b")
    with pytest.raises(LatencyError, match="iterations must be a positive integer"):
        measure_latency(silent, spec, channels=1, image_size=8, folder=tmp_path / "c", iterations=0)
    with pytest.raises(LatencyError, match="cannot run"):
        measure_latency(tmp_path / "missing", spec, channels=1, image_size=8, folder=tmp_path / "d")


def test_measure_tiny_net(caffe, tmp_path):
    result = measure_latency(
        caffe.binary, tiny_spec(), channels=1, image_size=8, folder=tmp_path, batch=1, iterations=5, warmup=2
    )
    assert (result.iterations, result.warmup, result.batch) == (5, 2, 1)
    assert result.device.startswith("cpu: ")
    assert result.caffe_average_forward_ms > 0 and result.caffe_average_forward_backward_ms >= 0
    # the CPU prints each iteration in whole (floored) ms, a tiny net's all 0: the steady-state
    # figure comes from the two runs' microsecond totals instead (steady_forward_ms)
    assert 0 < result.forward_ms < 10
    warm = (tmp_path / "latency-warmup.log").read_text()
    assert warm.startswith(f"# {caffe.binary} time --model=deploy.prototxt --phase=TEST --iterations=2\n")
    assert all(math.isfinite(x) for x in (result.forward_ms, result.caffe_average_forward_ms))
    log = (tmp_path / LATENCY_LOG).read_text()
    assert log.startswith(f"# {caffe.binary} time --model=deploy.prototxt --phase=TEST --iterations=7\n")
    full, warm_run = parse_caffe_time(log, 0), parse_caffe_time(warm, 0)
    assert result.forward_ms == pytest.approx(steady_forward_ms(warm_run, full, 2, 5))  # from the two logs
    assert result.caffe_average_forward_ms == full.average_forward_ms
    assert (tmp_path / DEPLOY_NET).read_text() == render_net(deploy_spec(tiny_spec(), 1, 1, 8))
    assert Latency.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_a_net_caffe_refuses_gives_caffes_reason(caffe, tmp_path):
    with pytest.raises(LatencyError) as err:
        measure_latency(caffe.binary, tiny_spec("[P(9,1), SM(10)]"), channels=1, image_size=8, folder=tmp_path)
    f_line = next(ln for ln in (tmp_path / "latency-warmup.log").read_text().splitlines() if ln.startswith("F"))
    reason = f_line.split("] ", 1)[1].strip()
    assert str(err.value).endswith(": " + reason) and "(signal 6)" in str(err.value) and "\n" not in str(err.value)


def test_timeout_is_a_latency_error(caffe, tmp_path):
    with pytest.raises(LatencyError, match=r"ran past its limit of 0\.001 s"):
        measure_latency(caffe.binary, tiny_spec(), channels=1, image_size=8, folder=tmp_path, timeout=0.001)
    assert (tmp_path / "latency-warmup.log").is_file()  # the first of the two runs


def test_the_steady_state_excludes_the_warm_up_at_microsecond_resolution():
    from metaqnn.latency import CaffeTime

    def run(n: int, average: float) -> CaffeTime:
        return CaffeTime(tuple([0.0] * n), 0, 0.0, average, 0.0, average, 0.0)

    # 2 warm-up iterations at 5 ms, then 8 at 1 ms: the full run averages (10 + 8) / 10 = 1.8 ms
    assert steady_forward_ms(run(2, 5.0), run(10, 1.8), 2, 8) == pytest.approx(1.0)
    assert steady_forward_ms(run(2, 5.0), run(10, 0.5), 2, 8) == pytest.approx(0.5)  # noise: the full average
    assert steady_forward_ms(run(0, 0.0), run(4, 0.7), 0, 4) == pytest.approx(0.7)
