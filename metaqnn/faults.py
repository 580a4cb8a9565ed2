"""Named fault points for tests that must prove what happens when something breaks.

* ``METAQNN_FAULT=<point>`` makes :func:`inject` raise at that point, in whichever process
  reaches it (a pool thread, a Ray worker): the search must then react the same way everywhere.
* ``METAQNN_KILL_AT=<point>[:<n>]`` kill -9s this process the n-th time (default the first) it
  reaches :func:`point`.  The kill points mark the windows a crash-consistent search must
  survive: ``trained`` (caffe has finished, result.json is not written yet), ``result-written``
  (the model's result.json is on disk, snapshots not yet pruned), ``pruning`` (half-way through
  the final pruning), ``pruned`` (the final pruning is done, the trainer has not returned),
  ``commit`` (the search is about to commit a result to the store), ``probe-finished`` (a probe's
  caffe has ended, state.json does not record it yet), ``latency-measured`` (``caffe time`` has
  timed the model and latency.json is written, its training has not begun).

Unset -- always, outside tests -- each costs one lookup.
"""

import os
import signal
from typing import Dict

_reached: Dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Stands for a bug or a broken machine at a named point."""


def inject(name: str) -> None:
    if os.environ.get("METAQNN_FAULT") == name:
        raise InjectedFault(f"fault injected at {name} (METAQNN_FAULT)")


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
