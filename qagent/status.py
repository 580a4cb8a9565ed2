"""What became of a sampled model: one str-valued enum, stored as its value.

``done`` and ``failed`` are rewarded (failed with the failure reward) and count towards the
epsilon schedule; ``stopped`` was stopped early by a performance-prediction rule and rewarded
with its *predicted* final accuracy (never a measured one: exports and reports keep it apart); ``duplicate`` is a re-sample answered from the replay dictionary;
``oom`` could not be trained at all and is never handed out again; ``running`` is in flight;
``deferred`` was set aside without a reward because what went wrong was not shown to be the
net's doing (caffe died by a signal in every attempt, or the circuit breaker blamed the set-up):
it is trained again, first, when the search is next run; ``rejected`` was over a budget that
only a rendered net shows (its measured latency, ``[constraints] max_latency_ms``): never trained,
rewarded with the failure reward so that the agent learns to avoid it, but no trained model --
it does not count towards the epsilon schedule or ``--max-models``.
"""

from enum import Enum


class ModelStatus(str, Enum):
    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    OOM = "oom"
    DUPLICATE = "duplicate"
    DEFERRED = "deferred"
    REJECTED = "rejected"

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


TRAINED = (ModelStatus.DONE, ModelStatus.FAILED, ModelStatus.STOPPED)  # rewarded, replayed, counted per epsilon
REWARDED = (*TRAINED, ModelStatus.REJECTED)  # in the replay memory and the replay dictionary
MEASURED = (ModelStatus.DONE,)  # a reward that is a measured validation accuracy (rankable as one)
