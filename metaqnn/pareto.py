"""Accuracy against cost: the non-dominated models (higher accuracy, lower cost) of an experiment.

Used by ``report`` (a figure per cost: params, MACs, latency) and ``export --pareto``.  Latency
figures are compared only among models timed on one machine: a front mixing two machines would
rank hardware, not nets.
"""

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

COSTS = ("params", "macs", "latency")
LABELS = {"params": "learnable parameters", "macs": "multiply-accumulates (batch 1)", "latency": "forward latency (ms)"}


def pareto_front(points: Sequence[Tuple[Any, float, float]]) -> List[Any]:
    """The ids of the points (id, accuracy, cost) that no other point beats in both -- at least
    as accurate and at most as costly, better in one -- ordered by cost.  Of two identical points
    both are on the front."""
    ordered = sorted(points, key=lambda p: (p[2], -p[1]))
    front: List[Any] = []
    best: Optional[float] = None
    last: Optional[Tuple[float, float]] = None
    for key, accuracy, cost in ordered:
        if best is None or accuracy > best or (last is not None and (accuracy, cost) == last):
            front.append(key)
            best = accuracy if best is None else max(best, accuracy)
            last = (accuracy, cost)
    return front


def cost_of(metrics: Dict[str, Any], cost: str) -> Optional[float]:
    """A model's cost from its stored metrics (latency: forward ms), None when it was not measured."""
    if cost == "latency":
        latency = metrics.get("latency")
        return float(latency["forward_ms"]) if isinstance(latency, dict) and "forward_ms" in latency else None
    value = metrics.get(cost)
    return None if value is None else float(value)


def device_of(metrics: Dict[str, Any]) -> Optional[str]:
    latency = metrics.get("latency")
    return str(latency.get("device")) if isinstance(latency, dict) else None


def comparable(
    rows: Sequence[Tuple[Any, float, Dict[str, Any]]], cost: str
) -> Tuple[List[Tuple[Any, float, float]], str]:
    """The (id, accuracy, cost) points that can be compared, and a note on what was left out.

    Latency: only the machine most models were timed on (the note names the others)."""
    points = [(key, acc, cost_of(m, cost)) for key, acc, m in rows]
    kept = [(k, a, c) for k, a, c in points if c is not None]
    note = ""
    if cost == "latency" and kept:
        devices = Counter(device_of(m) for _, _, m in rows if cost_of(m, cost) is not None)
        main, _ = devices.most_common(1)[0]
        kept = [(k, a, c) for (k, a, c), (_, _, m) in zip(points, rows) if c is not None and device_of(m) == main]
        others = {d: n for d, n in devices.items() if d != main}
        note = f"latency measured on {main}" + (
            "; left out, timed on other machines: " + ", ".join(f"{n} on {d}" for d, n in others.items())
            if others
            else ""
        )
    return kept, note
