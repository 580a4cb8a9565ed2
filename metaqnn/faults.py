"""Named kill points for crash tests: ``METAQNN_KILL_AT=<point>[:<n>]`` kill -9s this process
the n-th time (default the first) it reaches ``point(<point>)``.  Unset, a point costs one lookup.

The points mark the windows a crash-consistent search must survive: ``trained`` (caffe has
finished, result.json is not written yet), ``result-written`` (the
model's result.json is on disk, snapshots not yet pruned), ``pruning`` (half-way through the final
pruning), ``pruned`` (the final pruning is done,
the trainer has not returned), ``commit`` (the search is about to commit a result to the store).
"""

import os
import signal
from typing import Dict

_reached: Dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("METAQNN_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
