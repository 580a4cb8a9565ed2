"""Whose failure is it: the model's (a reward) or the infrastructure's (stop the search).

Only a model's own failures may become rewards: it diverged, never learned, Caffe
refused this net, or this net did not fit in memory.  Everything else -- the
binary missing or crashing on every net, unreadable data, a lost device, a full
disk, an exception in this project's code -- would fill the experiment with fake
results, so it stops the search with one line and leaves the models in flight
"running" in the store, to be retried on resume.  The same rule holds for the
sequential, local-pool and Ray executors because it is applied by the search
loop to whatever an executor hands back.
"""

import errno
import re
from collections import deque
from enum import Enum
from typing import Deque, List, Optional, Tuple

from qagent.errors import MetaQNNError
from qagent.status import ModelStatus

# Log lines that mean the machine, not the net, is broken.
_DEVICE_LOST = (
    "no CUDA-capable device is detected",
    "all CUDA-capable devices are busy or unavailable",
    "CUDA driver version is insufficient",
    "unspecified launch failure",
    "an illegal memory access was encountered",
    "device-side assert",
    "ECC error",
    "GPU has fallen off the bus",
    "initialization error",
)
_DISK_FULL = ("No space left on device", "Disk quota exceeded")


class FailureKind(str, Enum):
    """Why a model's training failed: each is the model's own doing (see the module docstring)."""

    NO_LEARNING = "no_learning"  # never beat the random-predictor threshold in any restart
    DIVERGED = "diverged"  # NaN/inf loss before it beat the threshold
    REJECTED = "rejected"  # caffe refused the net (a FATAL check)
    CRASHED = "crashed"  # caffe died without saying why
    TIMEOUT = "timeout"  # the wall-clock limit, after one retry
    STALLED = "stalled"  # silent past the stall watchdog, after one retry
    OOM = "oom"  # this net does not fit in the device's memory
    OVER_LATENCY = "over_latency"  # timed over constraints.max_latency_ms before training: never trained

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class InfrastructureError(MetaQNNError):
    """Broken set-up: stops the search; the models in flight are retried on resume."""


def infrastructure_reason(fatal_lines: List[str], log_tail: str = "") -> Optional[str]:
    """A one-line reason when Caffe's fatal output blames the device or the disk, else None."""
    text = "\n".join(fatal_lines) + "\n" + log_tail
    for needle in _DISK_FULL:
        if needle in text:
            return f"the disk is full ({needle})"
    for needle in _DEVICE_LOST:
        if needle in text:
            return f"the GPU is unusable ({needle})"
    return None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def signature(failure: Optional[str], message: str) -> str:
    """What makes two failures "the same": the kind and the message with numbers blanked."""
    return f"{failure}: {re.sub(r'[0-9]+(?:[.][0-9]+)?', 'N', message)[:200]}"


class BreakerTripped(InfrastructureError):
    """The circuit breaker blamed the set-up: ``model_ids`` are the failures it blames."""

    def __init__(self, message: str, model_ids: List[int]) -> None:
        super().__init__(message)
        self.model_ids = model_ids


class CircuitBreaker:
    """Trips after ``limit`` consecutive model failures with one signature.

    A real search has failures, but a run of identical ones (the same crash, the
    same refusal) on different sampled nets says the set-up is broken.  Outcomes
    of training proper (never learned, diverged) are left out: a poor region of
    the space legitimately produces many of them in a row.
    """

    COUNTED = frozenset(
        {FailureKind.CRASHED, FailureKind.REJECTED, FailureKind.TIMEOUT, FailureKind.STALLED, FailureKind.OOM}
    )

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the circuit breaker needs a limit of at least 1")
        self.limit = limit
        self._recent: Deque[Tuple[str, int]] = deque(maxlen=limit)

    def counted(self, status: str, failure: Optional[str]) -> bool:
        return status != ModelStatus.DONE and failure in self.COUNTED

    def starts_streak(self, status: str, failure: Optional[str], message: str) -> bool:
        """Whether this result, if counted, begins a new run of identical failures: the store then
        keeps a checkpoint of the Q-values, to take the run back if the breaker trips."""
        if not self.counted(status, failure):
            return False
        return not self._recent or self._recent[-1][0] != signature(failure, message)

    def observe(self, model_id: int, status: str, failure: Optional[str], message: str) -> None:
        """Record one committed result; raise :class:`BreakerTripped` when the breaker trips."""
        if not self.counted(status, failure):
            self._recent.clear()
            return
        sig = signature(failure, message)
        if self._recent and self._recent[-1][0] != sig:
            self._recent.clear()
        self._recent.append((sig, model_id))
        if len(self._recent) >= self.limit:
            blamed = [m for _, m in self._recent]
            ids = ", ".join(f"#{m}" for m in blamed)
            raise BreakerTripped(
                f"{self.limit} models in a row ({ids}) failed the same way ({message[:150]}): "
                "this looks like a broken set-up, not bad nets; their failures are not kept as rewards; "
                "fix it and rerun to train them again",
                blamed,
            )
