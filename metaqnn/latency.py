"""A model's forward latency, measured by Caffe's own ``caffe time`` on the model's deploy net.

The deploy net is the training net of :func:`metaqnn.netspec.build_net` with the two Data layers
replaced by one Input layer (top ``data``, batch x channels x size x size) and the Accuracy and
SoftmaxWithLoss layers removed, so the last layer is the classifier InnerProduct.  It needs no
weights (Caffe fills them) and no data (the Input blob is zeros; convolutions and inner products
cost the same on any values).  It is rendered through the same template as every training net.

What ``caffe time -phase TEST`` of this Caffe 1.0 (Debian's, CPU) does, read off real runs here
(the recorded one is tests/fixtures/logs/caffe_time.log):

* it runs the backward pass even in TEST phase ("Performing Backward", then per-layer
  ``backward:`` times): each layer's Backward is called directly, and a convolution or inner
  product whose blobs may learn computes its weight gradients although nothing needs them (a
  4x3x32x32 conv + inner product probe: 1.39 ms forward, 1.97 ms backward per iteration).  So
  the deploy net freezes every learnable blob (``param { lr_mult: 0 }``): with no blob learning
  and no bottom needing a gradient every Backward returns at once (the same probe: 0.01 ms; the
  recorded log: Average Backward pass 0.06 ms against 28.8 ms forward), and each iteration's
  "forward-backward time" is the forward latency;
* per iteration it prints ``Iteration: k forward-backward time: T ms.``; at the end
  ``Average Forward pass`` (the sum of the forward timer, microsecond resolution, over *all*
  iterations), ``Average Backward pass``, ``Average Forward-Backward`` (Total Time / iterations)
  and ``Total Time``;
* on the CPU its timer gives the per-iteration and total times in *whole milliseconds*,
  truncated (boost's ``total_milliseconds``): a 1.3 ms iteration prints ``1 ms``, a 10 us one
  ``0 ms``.  The GPU timer (CUDA events) prints fractions.  ``Average Forward pass`` has
  microseconds but includes every iteration of a run.  :attr:`Latency.forward_ms` is therefore
  the difference of two runs' forward totals (``warmup`` iterations, then ``warmup + iterations``),
  :func:`steady_forward_ms`: microsecond resolution, warm-up excluded.
"""

import math
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from metaqnn.netspec import CaffeLayer, NetSpec
from metaqnn.render import write_net
from qagent.errors import MetaQNNError

DEPLOY_NET = "deploy.prototxt"
LATENCY_LOG = "latency.log"
# Layers a deploy net leaves out: the data readers (replaced by one Input layer) and the layers
# that need labels.  An Input layer is left out too, so a deploy net of a deploy net is the same.
_NOT_DEPLOYED = frozenset({"data", "input", "accuracy", "loss"})

_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+[^\]]*\]\s?(.*)$")
_ITERATION = re.compile(r"^Iteration: (\d+) forward-backward time: " + _NUM + r" ms\.$")
_AVERAGE_FORWARD = re.compile(r"^Average Forward pass: " + _NUM + r" ms\.$")
_AVERAGE_BACKWARD = re.compile(r"^Average Backward pass: " + _NUM + r" ms\.$")
_AVERAGE_FORWARD_BACKWARD = re.compile(r"^Average Forward-Backward: " + _NUM + r" ms\.$")
_TOTAL = re.compile(r"^Total Time: " + _NUM + r" ms\.$")
_TESTING_FOR = re.compile(r"^Testing for (\d+) iterations\.$")
_GPU_NAME = re.compile(r"^GPU (\d+): (.+)$")  # "GPU 0: NVIDIA H200", as Caffe's train prints it


class LatencyError(MetaQNNError):
    """A latency that cannot be measured: bad arguments, a Caffe refusal, a cut or unreadable log."""


# ---------------------------------------------------------------------------------------------
# The deploy net


def input_layer(batch: int, channels: int, image_size: int) -> CaffeLayer:
    """``Input`` with top ``data`` of shape batch x channels x size x size (input_param's nested shape)."""
    dims = (("dim", batch), ("dim", channels), ("dim", image_size), ("dim", image_size))
    return CaffeLayer("input", "data", "Input", (), ("data",), params=(("shape", dims),))


def deploy_spec(spec: NetSpec, batch: int, channels: int, image_size: int) -> NetSpec:
    """The deploy net of a training net: one Input layer, the same hidden layers, the classifier last.

    Every learnable layer keeps its blobs (the same ``params`` shapes) but with ``lr_mult: 0``
    on each, so that ``caffe time``'s backward pass, which runs in TEST phase too, does nothing
    (see the module docstring).  Pure: ``spec`` is not changed.
    """
    for what, value in (("batch", batch), ("channels", channels), ("image size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LatencyError(f"the deploy net's {what} must be a positive integer, got {value!r}")
    layers: List[CaffeLayer] = [input_layer(batch, channels, image_size)]
    for layer in spec.layers:
        if layer.kind in _NOT_DEPLOYED:
            continue
        shapes = spec.params.get(layer.name)
        if shapes is not None:
            layer = replace(layer, lr_mults=(0.0,) * len(shapes.shapes))
        layers.append(layer)
    if layers[-1].kind != "ip":
        raise LatencyError(f"a deploy net ends with the classifier InnerProduct, this one with {layers[-1].name}")
    return NetSpec(layers, spec.param_count, dict(spec.params))


def write_deploy(folder: Path, spec: NetSpec, *, batch: int, channels: int, image_size: int) -> Path:
    """Render the deploy net of ``spec`` to ``folder``/deploy.prototxt; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_net(folder / DEPLOY_NET, deploy_spec(spec, batch, channels, image_size))


# ---------------------------------------------------------------------------------------------
# The log of ``caffe time``


@dataclass(frozen=True)
class CaffeTime:
    """What one ``caffe time`` log says, in milliseconds; ``forward_ms`` discards ``warmup`` iterations."""

    iteration_ms: Tuple[float, ...]  # "Iteration: k forward-backward time: T ms.", k = 1..n
    warmup: int
    forward_ms: float  # mean of iteration_ms[warmup:]
    average_forward_ms: float  # "Average Forward pass": all n iterations
    average_backward_ms: Optional[float]  # "Average Backward pass" (a Caffe may print it for TRAIN only)
    average_forward_backward_ms: float  # "Average Forward-Backward" = Total Time / n
    total_ms: float  # "Total Time"


def glog_messages(text: str) -> List[Tuple[str, str]]:
    """(level, message) of every glog line (``I1202 15:53:21.471 21955 caffe.cpp:394] message``)."""
    out: List[Tuple[str, str]] = []
    for line in text.splitlines():
        m = _GLOG.match(line.rstrip())
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return out


def caffe_complaint(text: str) -> str:
    """Caffe's own reason from a log: the fatal line's message (not the stack trace after it), else the last line."""
    fatal = next((msg for level, msg in glog_messages(text) if level == "F"), None)
    if fatal is not None:
        return fatal[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:300]


def _one(found: Dict[str, float], key: str, what: str) -> float:
    if key not in found:
        raise LatencyError(f"the caffe time log has no {what!r} line (the run was cut short)")
    return found[key]


def parse_caffe_time(text: str, warmup: int) -> CaffeTime:
    """Parse the log of ``caffe time``: per-iteration times, Caffe's averages and the total.

    Pure.  Refused with a one-line :class:`LatencyError`: a log with a fatal (F) line (its
    message is the reason), one without timing lines, one cut before Caffe's averages, one whose
    iterations are not numbered 1..n or are fewer than ``Testing for n iterations`` said, and one
    with fewer than ``warmup + 1`` iterations (nothing would be left to average).
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise LatencyError(f"warmup must be a non-negative integer, got {warmup!r}")
    messages = glog_messages(text)
    fatal = next((msg for level, msg in messages if level == "F"), None)
    if fatal is not None:
        raise LatencyError(f"caffe time failed: {fatal[:300]}")
    numbers: List[Tuple[int, float]] = []
    found: Dict[str, float] = {}
    announced: Optional[int] = None
    patterns = {
        "forward": _AVERAGE_FORWARD,
        "backward": _AVERAGE_BACKWARD,
        "forward_backward": _AVERAGE_FORWARD_BACKWARD,
        "total": _TOTAL,
    }
    for level, msg in messages:
        if level != "I":
            continue
        m = _ITERATION.match(msg)
        if m:
            numbers.append((int(m.group(1)), float(m.group(2))))
            continue
        m = _TESTING_FOR.match(msg)
        if m:
            announced = int(m.group(1))
            continue
        for key, pattern in patterns.items():
            m = pattern.match(msg)
            if m:
                found[key] = float(m.group(1))
    if not numbers and not found:
        raise LatencyError("the caffe time log has no timing lines (not a log of `caffe time`?)")
    if [k for k, _ in numbers] != list(range(1, len(numbers) + 1)):
        raise LatencyError("the caffe time log's iterations are not numbered 1..n (two runs in one log?)")
    if announced is not None and len(numbers) != announced:
        raise LatencyError(f"the caffe time log has {len(numbers)} iterations of the {announced} it announced")
    average_forward = _one(found, "forward", "Average Forward pass")
    average_forward_backward = _one(found, "forward_backward", "Average Forward-Backward")
    total = _one(found, "total", "Total Time")
    times = tuple(t for _, t in numbers)
    if len(times) < warmup + 1:
        raise LatencyError(
            f"the caffe time log has {len(times)} iterations: none is left after a warm-up of {warmup} "
            f"(run at least {warmup + 1})"
        )
    if not all(math.isfinite(t) and t >= 0 for t in (*times, average_forward, average_forward_backward, total)):
        raise LatencyError("the caffe time log has a negative or non-finite time")
    measured = times[warmup:]
    return CaffeTime(
        iteration_ms=times,
        warmup=warmup,
        forward_ms=sum(measured) / len(measured),
        average_forward_ms=average_forward,
        average_backward_ms=found.get("backward"),
        average_forward_backward_ms=average_forward_backward,
        total_ms=total,
    )


# ---------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class Latency:
    """One measured forward latency, as stored in JSON.

    ``forward_ms`` is the mean forward time of the ``iterations`` measured iterations after
    ``warmup`` discarded ones, at microsecond resolution (:func:`steady_forward_ms`).  The two
    ``caffe_*`` numbers are Caffe's own averages over all ``warmup + iterations`` of the second run.
    ``device`` names the machine ("cpu: AMD EPYC", "gpu 0: NVIDIA H200"): latencies of different
    machines are not comparable.
    """

    forward_ms: float
    caffe_average_forward_ms: float
    caffe_average_forward_backward_ms: float
    iterations: int
    warmup: int
    batch: int
    device: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Latency":
        """The inverse of :meth:`to_dict`; a record with missing, unknown or mistyped fields is refused."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise LatencyError(f"not a latency record: missing {missing}, unknown {unknown}")
        values: Dict[str, Any] = {}
        for name in names:
            value = data[name]
            if name == "device":
                ok = isinstance(value, str)
            elif name in ("iterations", "warmup", "batch"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                value = float(value) if ok else value
            if not ok:
                raise LatencyError(f"latency record field {name} has a bad value {value!r}")
            values[name] = value
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# The machine and the run


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _nvidia_smi_name(gpu: int) -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    argv = [smi, "--query-gpu=name", "--format=csv,noheader", "-i", str(gpu)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[0] if proc.returncode == 0 and lines else None


def machine_name(gpu: Optional[int], log: str = "") -> str:
    """The machine a latency was measured on: "cpu: <model name of /proc/cpuinfo>" or "gpu <id>: <name>".

    A GPU's name comes from nvidia-smi, else from a ``GPU <id>: <name>`` line of a Caffe
    ``log``, else it is "unknown".
    """
    if gpu is None:
        return f"cpu: {_cpu_model()}"
    name = _nvidia_smi_name(gpu)
    if name is None:
        for _level, msg in glog_messages(log):
            m = _GPU_NAME.match(msg)
            if m and int(m.group(1)) == gpu:
                name = m.group(2).strip()
                break
    return f"gpu {gpu}: {name or 'unknown'}"


def time_argv(caffe_binary: Path, model: str, iterations: int, gpu: Optional[int] = None) -> List[str]:
    """``caffe time`` of a deploy net in TEST phase (``model`` relative to the run's folder)."""
    argv = [str(caffe_binary), "time", f"--model={model}", "--phase=TEST", f"--iterations={iterations}"]
    if gpu is not None:
        argv.append(f"--gpu={gpu}")
    return argv


def _text(output: Any) -> str:
    if output is None:
        return ""
    return output.decode("utf-8", "replace") if isinstance(output, bytes) else str(output)


def _write_log(path: Path, argv: Sequence[str], stdout: Any, stderr: Any) -> str:
    """The log as caffe wrote it (glog goes to stderr), after a ``# <argv>`` line; returns Caffe's part."""
    text = _text(stdout) + _text(stderr)
    path.write_text(f"# {' '.join(argv)}\n{text}", encoding="utf-8")
    return text


def _run_caffe_time(
    caffe_binary: Path, net: Path, iterations: int, gpu: Optional[int], timeout: float, log_path: Path
) -> Tuple[CaffeTime, str]:
    """One ``caffe time`` of ``iterations`` (none discarded by the parser); its log is kept at ``log_path``."""
    argv = time_argv(caffe_binary, net.name, iterations, gpu)
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    try:
        proc = subprocess.run(
            argv,
            cwd=str(net.parent),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        _write_log(log_path, argv, exc.stdout, exc.stderr)
        raise LatencyError(f"caffe time ran past its limit of {timeout} s on {net} (log: {log_path})") from None
    except OSError as exc:
        raise LatencyError(f"cannot run {caffe_binary}: {exc.strerror or exc}") from None
    text = _write_log(log_path, argv, proc.stdout, proc.stderr)
    if proc.returncode != 0:
        code = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise LatencyError(f"caffe time failed ({code}) on {net}: {caffe_complaint(text)}")
    try:
        parsed = parse_caffe_time(text, 0)
    except LatencyError as exc:
        raise LatencyError(f"{log_path}: {exc}") from None
    if len(parsed.iteration_ms) != iterations:
        raise LatencyError(f"{log_path}: {len(parsed.iteration_ms)} iterations, {iterations} were asked for")
    return parsed, text


def steady_forward_ms(warm: CaffeTime, full: CaffeTime, warmup: int, iterations: int) -> float:
    """The mean forward time of the ``iterations`` that follow ``warmup`` ones, at microsecond resolution.

    Caffe's microsecond figure, "Average Forward pass", averages *every* iteration of a run, and
    its per-iteration lines are whole milliseconds on the CPU.  So two runs are timed: ``warm``
    of ``warmup`` iterations and ``full`` of ``warmup + iterations``; their total forward times
    differ by the steady iterations.  Noise can make that difference negative on a very fast
    net; then the full run's own average stands.
    """
    if warmup == 0:
        return full.average_forward_ms
    steady = (full.average_forward_ms * (warmup + iterations) - warm.average_forward_ms * warmup) / iterations
    return steady if steady > 0 else full.average_forward_ms


def measure_latency(
    caffe_binary: Path,
    spec: NetSpec,
    *,
    channels: int,
    image_size: int,
    folder: Path,
    batch: int = 1,
    iterations: int = 50,
    warmup: int = 5,
    gpu: Optional[int] = None,
    timeout: float = 600,
) -> Latency:
    """Measure the forward latency of ``spec``'s deploy net with ``caffe time``.

    Writes ``folder``/deploy.prototxt, then times ``warmup`` iterations and ``warmup + iterations``
    iterations in two runs (:func:`steady_forward_ms`; the warm-up covers caches, allocations,
    a GPU's clocks), keeping their logs in ``folder`` (latency-warmup.log, latency.log).  A
    nonzero exit, a timeout or a log that cannot be read raises :class:`LatencyError` with one
    line.  INFO logging to stderr is forced (GLOG_logtostderr=1, GLOG_minloglevel=0): the
    timings are INFO lines.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise LatencyError(f"iterations must be a positive integer, got {iterations!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise LatencyError(f"warmup must be a non-negative integer, got {warmup!r}")
    folder = Path(folder)
    net = write_deploy(folder, spec, batch=batch, channels=channels, image_size=image_size)
    warm = None
    if warmup:
        warm, _ = _run_caffe_time(caffe_binary, net, warmup, gpu, timeout, folder / "latency-warmup.log")
    parsed, text = _run_caffe_time(caffe_binary, net, warmup + iterations, gpu, timeout, folder / LATENCY_LOG)
    return Latency(
        forward_ms=steady_forward_ms(warm or parsed, parsed, warmup, iterations),
        caffe_average_forward_ms=parsed.average_forward_ms,
        caffe_average_forward_backward_ms=parsed.average_forward_backward_ms,
        iterations=iterations,
        warmup=warmup,
        batch=batch,
        device=machine_name(gpu, text),
    )
