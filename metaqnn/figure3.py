"""Figure 3's line: the rolling mean accuracy over the search's iterations.

Kept apart from ``metaqnn.report`` (which draws it with matplotlib) so that the search's TensorBoard
writer (``metaqnn.monitor``) computes the very same values without importing a plotting library
into the search's process.
"""

from typing import List, Tuple


def rolling_mean(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def figure3_window(schedule_total: int) -> int:
    """Figure 3's rolling window: a tenth of the schedule's models, 5 to 100 (the paper-scale
    schedules' 2,700 models: 100).  A function of the schedule, not of the samples found, so the
    live TensorBoard curve (metaqnn.monitor) and every report of an experiment draw the same one."""
    return min(100, max(5, int(schedule_total) // 10))


def figure3_curve(samples: List[Tuple[int, float, float]], window: int) -> List[Tuple[int, float]]:
    """(iteration, rolling mean accuracy): the line of Figure 3."""
    return list(zip([s[0] for s in samples], rolling_mean([s[2] for s in samples], window)))
