"""The learning rate a rendered solver gives Caffe at every iteration, and checks on it (issue 15).

Caffe's ``SGDSolver::GetLearningRate`` for the policies the protocols use: ``fixed``;
``step``: ``base_lr * gamma ^ floor(iter / stepsize)``; ``multistep``: one more factor of
``gamma`` each time ``iter`` reaches the next ``stepvalue``.  The update of iteration ``t``
(0 .. max_iter-1) uses the rate of ``t``.

A schedule is only as long as its iterations: a protocol written in epochs for 60,000 images
(MNIST) decays to nothing within a few dozen updates on 1,497 (the digits demo).  So besides
"every step point lies inside training" and a floor on the final rate, the check that matters
counts *updates at a meaningful rate* (at least ``MEANINGFUL`` of the base rate): finetuning
is there to train the chosen architecture to its best, so it must not give a model fewer of
them than the search that chose it did.
"""

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

# "Meaningful": within two orders of magnitude of the base rate.  Every published schedule
# (SVHN, MNIST) and the paper's CIFAR-10 one spends its first 10-15 epochs above it; what they
# train below it are the settling phases (SVHN's 0.0001/0.00001, MNIST's last 25 epochs).
MEANINGFUL = 1e-2
# The lowest rate a schedule may end at, relative to base_lr: the published MNIST solvers end
# at 0.2^7 = 1.28e-5 (x0.2 every 5 of 40 epochs), SVHN's and CIFAR-10's at 4e-4.  One more x0.2
# step (45 epochs on MNIST's schedule) falls below it.
FINAL_FLOOR = 1e-5


@dataclass(frozen=True)
class RateSchedule:
    base_lr: float
    policy: str
    max_iter: int
    iters_per_epoch: int
    gamma: float = 1.0
    stepsize: int = 0
    stepvalues: Tuple[int, ...] = ()

    @classmethod
    def from_fields(cls, fields: Sequence[Tuple[str, Any]]) -> "RateSchedule":
        """From ``solver_fields`` output (an epoch is ``test_interval`` = ``snapshot`` iterations)."""
        one = dict(fields)
        return cls(
            base_lr=float(one["base_lr"]),
            policy=str(one["lr_policy"]),
            max_iter=int(one["max_iter"]),
            iters_per_epoch=int(one["test_interval"]),
            gamma=float(one.get("gamma", 1.0)),
            stepsize=int(one.get("stepsize", 0)),
            stepvalues=tuple(int(v) for k, v in fields if k == "stepvalue"),
        )

    def rate(self, iteration: int) -> float:
        if self.policy == "step":
            return self.base_lr * self.gamma ** (iteration // self.stepsize)
        if self.policy == "multistep":
            return self.base_lr * self.gamma ** sum(iteration >= v for v in self.stepvalues)
        return self.base_lr

    @property
    def epochs(self) -> int:
        return self.max_iter // self.iters_per_epoch

    def epoch_rates(self) -> List[float]:
        """The rate at the first iteration of each epoch."""
        return [self.rate(e * self.iters_per_epoch) for e in range(self.epochs)]

    def step_points(self) -> List[int]:
        """Iterations where the rate changes (for ``step``: the multiples of stepsize up to max_iter)."""
        if self.policy == "step":
            return list(range(self.stepsize, self.max_iter, self.stepsize)) if self.stepsize > 0 else []
        return list(self.stepvalues)

    def phases(self) -> List[Tuple[int, int, float]]:
        """(first, end, rate): the runs of iterations [first, end) at one rate."""
        cuts = sorted({0, self.max_iter, *(p for p in self.step_points() if 0 < p < self.max_iter)})
        return [(a, b, self.rate(a)) for a, b in zip(cuts, cuts[1:])]

    def meaningful_updates(self, fraction: float = MEANINGFUL) -> int:
        """Number of updates at a rate of at least ``fraction`` of the base rate."""
        bound = fraction * self.base_lr * (1 - 1e-9)
        return sum(b - a for a, b, r in self.phases() if r >= bound)

    def problems(self) -> List[str]:
        """What is wrong with this schedule on its own (empty: nothing)."""
        out = []
        if self.policy == "step" and not 0 < self.stepsize < self.max_iter:
            out.append(f"stepsize {self.stepsize} is not inside training (max_iter {self.max_iter})")
        late = [v for v in self.stepvalues if not 0 < v < self.max_iter]
        if late:
            out.append(f"stepvalue(s) {late} are not inside training (max_iter {self.max_iter})")
        final = self.rate(self.max_iter - 1) / self.base_lr
        if final < FINAL_FLOOR:
            out.append(
                f"the rate ends at {final:.3g} x base_lr (below {FINAL_FLOOR:g}): it reaches that at iteration "
                f"{next(a for a, _, r in self.phases() if r / self.base_lr < FINAL_FLOOR)} "
                f"of {self.max_iter}"
            )
        return out

    def describe(self) -> str:
        ends = self.rate(self.max_iter - 1) / self.base_lr
        return (
            f"{self.epochs} epochs x {self.iters_per_epoch} iterations = {self.max_iter}; "
            f"{self.meaningful_updates()} updates at >= {MEANINGFUL:g} x base_lr; ends at {ends:.3g} x base_lr"
        )


def finetune_problems(finetune: RateSchedule, search: RateSchedule) -> List[str]:
    """A finetuning schedule's own problems, plus: fewer meaningful updates than the search gave."""
    out = finetune.problems()
    if finetune.meaningful_updates() < search.meaningful_updates():
        out.append(
            f"finetuning gives {finetune.meaningful_updates()} updates at >= {MEANINGFUL:g} x base_lr, "
            f"fewer than the search's {search.meaningful_updates()}"
        )
    return out
