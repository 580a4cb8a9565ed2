"""Many small trainings per GPU (``--trainings-per-gpu K``).

MetaQNN's nets are small: one training leaves most of a modern GPU idle.  Each GPU is given ``K``
units; a training packed ``k`` to a GPU takes ``ceil(K / k)`` of them, so at the start ``K``
trainings share a GPU.  Each training is handed the least-loaded GPU at the moment it starts and
sees only that one (``CUDA_VISIBLE_DEVICES``; Caffe's ``--gpu=0``).  A training that runs out of
GPU memory is run again at half the packing (K, K/2, ..., 1: alone on its GPU at last); only
then is the out-of-memory recorded as the model's result.
"""

import threading
from dataclasses import fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence


def packing_levels(per_gpu: int) -> List[int]:
    """The packings tried in turn after an out-of-memory: K, K//2, ..., 1."""
    if per_gpu < 1:
        raise ValueError(f"trainings per GPU must be at least 1, got {per_gpu}")
    levels = [per_gpu]
    while levels[-1] > 1:
        levels.append(levels[-1] // 2)
    return levels


def units(per_gpu: int, packing: int) -> int:
    """GPU units (of ``per_gpu``) that one training packed ``packing`` to a GPU takes."""
    return -(-per_gpu // packing)


def gpu_env(gpu: int) -> Dict[str, str]:
    """What a training on ``gpu`` sees: that GPU alone (as device 0), numbered like nvidia-smi."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu)}


def on_gpu(job: Any, gpu: int) -> Any:
    """The job run on ``gpu``: with an ``env`` field, it sees only that GPU (device 0); else ``--gpu=gpu``."""
    if any(f.name == "env" for f in fields(job)):
        return replace(job, gpu=0, env=tuple(sorted(gpu_env(gpu).items())))
    return replace(job, gpu=gpu)


def is_oom(result: Any) -> bool:
    return getattr(result, "status", None) == "oom"


class GpuPool:
    """Hands out GPUs to trainings, up to ``per_gpu`` units each; thread-safe, blocking.

    A request for more units than any GPU has free marks the GPU with the most free units as
    draining: no new training starts there until the request is served, so a retry alone on a
    GPU is not starved by a stream of packed trainings.
    """

    def __init__(self, gpus: Sequence[int], per_gpu: int) -> None:
        if not gpus:
            raise ValueError("a GPU pool needs at least one GPU")
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"GPU ids repeat: {list(gpus)}")
        packing_levels(per_gpu)
        self.gpus = list(gpus)
        self.per_gpu = per_gpu
        self.used: Dict[int, int] = {g: 0 for g in self.gpus}
        self._draining: Dict[int, object] = {}  # gpu -> the request it is held for
        self._cond = threading.Condition()

    @property
    def slots(self) -> int:
        return len(self.gpus) * self.per_gpu

    def _pick(self, need: int, me: object) -> Optional[int]:
        free = [g for g in self.gpus if self.per_gpu - self.used[g] >= need and self._draining.get(g, me) is me]
        if not free:
            return None
        return min(free, key=lambda g: (self.used[g], self.gpus.index(g)))  # least loaded, then first listed

    def acquire(self, packing: int) -> int:
        need = units(self.per_gpu, packing)
        me = object()
        with self._cond:
            while True:
                g = self._pick(need, me)
                if g is not None:
                    self.used[g] += need
                    for d, who in list(self._draining.items()):
                        if who is me:
                            del self._draining[d]
                    self._cond.notify_all()
                    return g
                if need > 1 and me not in self._draining.values():
                    candidates = [g for g in self.gpus if g not in self._draining]
                    if candidates:
                        self._draining[min(candidates, key=lambda g: self.used[g])] = me
                self._cond.wait()

    def release(self, gpu: int, packing: int) -> None:
        with self._cond:
            self.used[gpu] -= units(self.per_gpu, packing)
            assert self.used[gpu] >= 0, f"GPU {gpu} released more than it was given"
            self._cond.notify_all()


def run_packed(
    run: Callable[[Any], Any],
    job: Any,
    pool: GpuPool,
    set_gpu: Callable[[Any, int], Any] = on_gpu,
    log: Optional[Callable[[str], None]] = None,
) -> Any:
    """Run ``job`` on a GPU of ``pool``; on out-of-memory run it again at half the packing."""
    levels = packing_levels(pool.per_gpu)
    result: Any = None
    for i, packing in enumerate(levels):
        gpu = pool.acquire(packing)
        try:
            result = run(set_gpu(job, gpu))
        finally:
            pool.release(gpu, packing)
        if not is_oom(result):
            return result
        if i + 1 < len(levels) and log is not None:
            log(f"out of memory on GPU {gpu} at {packing} per GPU: retrying at {levels[i + 1]} per GPU")
    if len(levels) > 1 and hasattr(result, "message"):
        result.message = f"{result.message} (also alone on a GPU, after {len(levels) - 1} retries at lower packing)"
    return result
