"""Where trainings run: inline (one at a time), a local pool, or a Ray cluster -- one interface.

The search loop hands an executor a key (the architecture) and a picklable job; ``wait_any``
blocks until at least one job has finished and returns (key, result or exception).  The loop
never knows which executor it drives, so the semantics are the same everywhere: up to ``slots``
models in flight, results applied as they arrive.

* :class:`InlineExecutor` -- runs a job when it is waited for: the sequential search, with the
  exact sample -> train -> learn order of Algorithm 1 (and its determinism).
* :class:`LocalExecutor` -- a thread pool (each training is a caffe subprocess); GPUs, when given,
  are handed out per training, ``per_gpu`` trainings to a GPU (see :mod:`metaqnn.packing`).
* :class:`RayExecutor` -- Ray tasks with ``1/per_gpu`` GPU (or ``cpus_per_trial`` CPUs) each,
  assigned by Ray; an out-of-memory is run again with a larger share of a GPU; a task whose worker or node dies is retried by Ray, and the retried trainer resumes from
  the model's last snapshot when the model folder is on a shared file system.
"""

import concurrent.futures as cf
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from metaqnn.packing import GpuPool, is_oom, on_gpu, packing_levels, run_packed
from qagent.errors import MetaQNNError

Outcome = Union[Any, BaseException]


class ExecutorError(MetaQNNError):
    pass


class InlineExecutor:
    def __init__(self, run: Callable[[Any], Any]) -> None:
        self.slots = 1
        self._run = run
        self._queue: Dict[str, Any] = {}  # insertion-ordered

    def submit(self, key: str, job: Any) -> None:
        self._queue[key] = job

    def wait_any(self) -> List[Tuple[str, Outcome]]:
        key = next(iter(self._queue))
        job = self._queue.pop(key)
        try:
            return [(key, self._run(job))]
        except Exception as exc:  # handed back like the other executors do; Ctrl-C propagates
            return [(key, exc)]

    def close(self) -> None:
        self._queue.clear()


class LocalExecutor:
    def __init__(self, run: Callable[[Any], Any], slots: int, gpus: Sequence[int] = (), per_gpu: int = 1) -> None:
        if slots < 1:
            raise ExecutorError(f"need at least one worker slot, got {slots}")
        if per_gpu < 1:
            raise ExecutorError(f"trainings per GPU must be at least 1, got {per_gpu}")
        if gpus and len(gpus) * per_gpu < slots:
            raise ExecutorError(f"{slots} slots but only {len(gpus)} GPUs ({list(gpus)}) x {per_gpu} trainings per GPU")
        self.slots = slots
        self._run = run
        self._pool = cf.ThreadPoolExecutor(max_workers=slots, thread_name_prefix="train")
        self._futures: Dict[cf.Future, str] = {}
        self.gpu_pool = GpuPool(gpus, per_gpu) if gpus else None

    def _with_gpu(self, job: Any) -> Any:
        if self.gpu_pool is None:
            return self._run(job)
        return run_packed(self._run, job, self.gpu_pool, _set_gpu)

    def submit(self, key: str, job: Any) -> None:
        self._futures[self._pool.submit(self._with_gpu, job)] = key

    def wait_any(self) -> List[Tuple[str, Outcome]]:
        done, _ = cf.wait(list(self._futures), return_when=cf.FIRST_COMPLETED)
        out = []
        for f in done:
            key = self._futures.pop(f)
            exc = f.exception()
            out.append((key, exc if exc is not None else f.result()))
        return out

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)


def _set_gpu(job: Any, gpu: int) -> Any:
    return on_gpu(job, gpu)


def _ray_train(job: Any, run: Callable[[Any], Any], use_gpu: bool) -> Any:
    """Runs on a Ray worker: its own caffe, and device 0 of the GPU Ray assigned to this task."""
    from dataclasses import is_dataclass, replace

    if is_dataclass(job) and not isinstance(job, type) and hasattr(job, "caffe"):
        from metaqnn.caffe.locate import find_caffe

        job = replace(job, caffe=find_caffe(gpu=use_gpu).binary, gpu=0 if use_gpu else None)
    result = run(job)
    if hasattr(result, "worker"):
        import ray

        result.worker += f" ray-node {ray.get_runtime_context().get_node_id()[:12]}"
    return result


RAY_CONNECT_TIMEOUT = 30.0  # seconds for the probe and ray.init together: an unreachable cluster is one line
RAY_PROBE_TIMEOUT = 5.0  # seconds for the TCP connection to the head's GCS port
_NO_PROBE = {"auto", "local"}  # addresses ray.init resolves itself (the current cluster, a new local one)


def ray_endpoint(address: str) -> Optional[Tuple[str, int]]:
    """(host, port) of a Ray address ('10.0.0.1:6379', 'ray://head:10001', '[::1]:6379'); None for auto/local.

    A malformed address is an :class:`ExecutorError` naming it.
    """
    text = address.strip()
    if text.lower() in _NO_PROBE:
        return None
    rest = text[len("ray://") :] if text.startswith("ray://") else text
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ExecutorError(
            f"--ray takes the address of a running Ray cluster, HOST:PORT (the head's GCS port, "
            f"`ray start --head --port`), ray://HOST:PORT or auto; got {address!r}"
        )
    return host, int(port)


def probe_ray(address: str, timeout: float = RAY_PROBE_TIMEOUT) -> None:
    """A TCP connection to the cluster's address within ``timeout`` s, or one :class:`ExecutorError` line."""
    endpoint = ray_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror as exc:
        raise ExecutorError(f"cannot connect to the Ray cluster at {address}: unknown host {host!r} ({exc})") from None
    except socket.timeout:
        raise ExecutorError(
            f"cannot connect to the Ray cluster at {address}: no answer within {timeout:g} s "
            "(a firewall, or a host that is down?)"
        ) from None
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ExecutorError(
            f"cannot connect to the Ray cluster at {address}: {reason} "
            f"(nothing listens on port {port} of {host}: is `ray start --head --port={port}` running there?)"
        ) from None


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[Dict[str, bool]]:
    """Point file descriptor 2 at ``path`` (Ray's C++ core writes its warnings there) for the block.

    If the block sets ``state["hung"]`` (a thread that may still write is left behind), fd 2 stays
    on the file and Python's ``sys.stderr`` moves to a copy of the real stderr instead.
    """
    state = {"hung": False}
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to protect
        yield state
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield state
    finally:
        if state["hung"]:
            sys.stderr = open(saved, "w", buffering=1, closefd=True)  # noqa: SIM115 -- the process's stderr now
        else:
            os.dup2(saved, 2)
            os.close(saved)


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*(?:[\w.]+:\d+:\s*)?|^\S+ \S+\s+\w+ [\w.]+:\d+ -- ")


def _last_ray_line(path: str) -> str:
    """Ray's last complaint in the captured stderr, without its timestamp and source-file prefix."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "SIGTERM handler" in line:
            continue
        return _LOG_PREFIX.sub("", line)[:240]
    return ""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "--ray needs the ray package: pip install 'ray>=2.9' (or `pip install -e .[ray]`)"
        ) from None
    return ray


def connect_ray(address: str, timeout: float = RAY_CONNECT_TIMEOUT, probe: bool = True) -> Any:
    """Connect this process to the running Ray cluster at ``address``; returns the ``ray`` module.

    Bounded: the address is probed first (a TCP connection, :func:`probe_ray`; ``probe=False``
    skips it), then ``ray.init`` runs with ``timeout`` seconds in all; an unreachable or silent cluster is one
    :class:`ExecutorError` line and Ray's own warnings never reach the terminal.  Connecting again
    (``RayExecutor`` after the search connected early) does nothing.  Call it before creating
    anything that an unreachable cluster should not leave behind.
    """
    ray = import_ray()
    if getattr(ray, "is_initialized", lambda: False)():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.monotonic()
    if probe:
        probe_ray(address, min(RAY_PROBE_TIMEOUT, timeout))
    outcome: Dict[str, BaseException] = {}

    def init() -> None:
        try:
            ray.init(address=address, ignore_reinit_error=True, logging_level=logging.ERROR, log_to_driver=False)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    with tempfile.TemporaryDirectory(prefix="metaqnn-ray-") as tmp:
        captured = os.path.join(tmp, "stderr")
        with _stderr_to(captured) as state:
            worker = threading.Thread(target=init, name="ray-connect", daemon=True)
            worker.start()
            worker.join(max(0.1, timeout - (time.monotonic() - start)))
            state["hung"] = worker.is_alive()
        said = _last_ray_line(captured)
    if state["hung"]:
        raise ExecutorError(
            f"cannot connect to the Ray cluster at {address}: no answer within {timeout:g} s"
            + (f" (ray: {said})" if said else "")
            + "; is it the head's GCS port (`ray start --head --port=...`), and can this machine reach "
            "the address the head advertises?"
        )
    if "error" in outcome:
        exc = outcome["error"]
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ExecutorError(f"cannot connect to the Ray cluster at {address}: {text[:400]}")
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))  # what ray.init sets on the main thread
    return ray


class RayExecutor:
    """Ray tasks; ``address`` as for ``ray.init`` (a running cluster), e.g. '127.0.0.1:6379'."""

    def __init__(
        self,
        run: Callable[[Any], Any],
        address: str,
        slots: Optional[int] = None,
        use_gpu: bool = False,
        cpus_per_trial: float = 1.0,
        max_retries: int = 3,
        per_gpu: int = 1,
    ) -> None:
        # The search connects (with the probe) before it creates the experiment; connected already,
        # this returns at once, else it is still bounded by RAY_CONNECT_TIMEOUT.
        ray = connect_ray(address, probe=False)
        self._ray = ray
        resources = ray.cluster_resources()
        capacity = int(resources.get("GPU", 0) * per_gpu) if use_gpu else int(resources.get("CPU", 0) // cpus_per_trial)
        if capacity < 1:
            raise ExecutorError(f"the Ray cluster at {address} has no {'GPU' if use_gpu else 'CPU'} for a training")
        self.slots = slots or capacity
        self._remote = ray.remote(_ray_train).options(
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else cpus_per_trial,
            max_retries=max_retries,
            retry_exceptions=False,
        )
        self._run = run
        self._use_gpu = use_gpu
        self._levels = packing_levels(per_gpu) if use_gpu else [1]
        self._refs: Dict[Any, str] = {}
        self._jobs: Dict[str, Tuple[Any, int]] = {}  # key -> (job, index into the packing levels)

    def _send(self, key: str, job: Any, level: int) -> None:
        self._jobs[key] = (job, level)
        remote = self._remote.options(num_gpus=1.0 / self._levels[level]) if self._use_gpu else self._remote
        self._refs[remote.remote(job, self._run, self._use_gpu)] = key

    def submit(self, key: str, job: Any) -> None:
        self._send(key, job, 0)

    def wait_any(self) -> List[Tuple[str, Outcome]]:
        ready, _ = self._ray.wait(list(self._refs), num_returns=1)
        out = []
        for ref in ready:
            key = self._refs.pop(ref)
            job, level = self._jobs.pop(key)
            try:
                result = self._ray.get(ref)
                if is_oom(result) and level + 1 < len(self._levels):
                    self._send(key, job, level + 1)  # again, with a larger share of a GPU
                    continue
                out.append((key, result))
            except self._ray.exceptions.RayTaskError as exc:  # an exception raised by the training itself
                out.append((key, exc.as_instanceof_cause()))
            except self._ray.exceptions.RayError as exc:  # worker/node lost beyond the retries
                out.append((key, ExecutorError(f"ray lost the training of {key}: {exc}")))
        return out

    def close(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._refs.clear()
        self._jobs.clear()
        self._ray.shutdown()
