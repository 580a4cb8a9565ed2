"""Named fault-injection points, for tests that must prove what happens when something breaks.

``METAQNN_FAULT=<point>`` makes :func:`inject` raise at that point, in whichever
process reaches it (a pool thread, a Ray worker): the search must then react the
same way everywhere.  Unset -- always, outside tests -- it costs one lookup.
"""

import os


class InjectedFault(RuntimeError):
    """Stands for a bug or a broken machine at a named point."""


def inject(point: str) -> None:
    if os.environ.get("METAQNN_FAULT") == point:
        raise InjectedFault(f"fault injected at {point} (METAQNN_FAULT)")
