"""Where trainings run: inline (one at a time), a local pool, or a Ray cluster -- one interface.

The search loop hands an executor a key (the architecture) and a picklable job; ``wait_any``
blocks until at least one job has finished and returns (key, result or exception).  The loop
never knows which executor it drives, so the semantics are the same everywhere: up to ``slots``
models in flight, results applied as they arrive.

* :class:`InlineExecutor` -- runs a job when it is waited for: the sequential search, with the
  exact sample -> train -> learn order of Algorithm 1 (and its determinism).
* :class:`LocalExecutor` -- a thread pool (each training is a caffe subprocess); GPUs, when given,
  are handed out one per training.
* :class:`RayExecutor` -- Ray tasks with one GPU (or ``cpus_per_trial`` CPUs) each, assigned by
  Ray; a task whose worker or node dies is retried by Ray, and the retried trainer resumes from
  the model's last snapshot when the model folder is on a shared file system.
"""

import concurrent.futures as cf
import logging
import os
import queue
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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
    def __init__(self, run: Callable[[Any], Any], slots: int, gpus: Sequence[int] = ()) -> None:
        if slots < 1:
            raise ExecutorError(f"need at least one worker slot, got {slots}")
        if gpus and len(gpus) < slots:
            raise ExecutorError(f"{slots} slots but only {len(gpus)} GPUs ({list(gpus)}): one GPU per training")
        self.slots = slots
        self._run = run
        self._pool = cf.ThreadPoolExecutor(max_workers=slots, thread_name_prefix="train")
        self._futures: Dict[cf.Future, str] = {}
        self._gpus: queue.Queue[Optional[int]] = queue.Queue()  # novermin (never evaluated)
        devices: List[Optional[int]] = list(gpus) if gpus else [None] * slots
        for g in devices:
            self._gpus.put(g)

    def _with_gpu(self, job: Any) -> Any:
        gpu = self._gpus.get()
        try:
            return self._run(job if gpu is None else _set_gpu(job, gpu))
        finally:
            self._gpus.put(gpu)

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
    from dataclasses import replace

    return replace(job, gpu=gpu)


def _ray_train(job: Any, run: Callable[[Any], Any], use_gpu: bool) -> Any:
    """Runs on a Ray worker: its own caffe, and device 0 of the GPU Ray assigned to this task."""
    from dataclasses import is_dataclass, replace

    if is_dataclass(job) and not isinstance(job, type) and hasattr(job, "caffe"):
        from metaqnn.caffe.locate import find_caffe

        job = replace(job, caffe=find_caffe().binary, gpu=0 if use_gpu else None)
    result = run(job)
    if hasattr(result, "worker"):
        import ray

        result.worker += f" ray-node {ray.get_runtime_context().get_node_id()[:12]}"
    return result


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
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "--ray needs the ray package: pip install 'ray>=2.9' (or `pip install -e .[ray]`)"
            ) from None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as exc:
            raise ExecutorError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
        self._ray = ray
        resources = ray.cluster_resources()
        capacity = int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 0) // cpus_per_trial)
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
        self._refs: Dict[Any, str] = {}

    def submit(self, key: str, job: Any) -> None:
        self._refs[self._remote.remote(job, self._run, self._use_gpu)] = key

    def wait_any(self) -> List[Tuple[str, Outcome]]:
        ready, _ = self._ray.wait(list(self._refs), num_returns=1)
        out = []
        for ref in ready:
            key = self._refs.pop(ref)
            try:
                out.append((key, self._ray.get(ref)))
            except self._ray.exceptions.RayTaskError as exc:  # an exception raised by the training itself
                out.append((key, exc.as_instanceof_cause()))
            except self._ray.exceptions.RayError as exc:  # worker/node lost beyond the retries
                out.append((key, ExecutorError(f"ray lost the training of {key}: {exc}")))
        return out

    def close(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._refs.clear()
        self._ray.shutdown()
