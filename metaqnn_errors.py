"""The project's own error types, in a module no package owns.

qagent (the pure agent), data_prep and metaqnn all raise these; keeping them here lets data_prep
and metaqnn share them without importing the agent, and the agent without importing either.

Every error a user can cause (bad architecture string, bad config value, an
experiment already open elsewhere) is one of these, so the command line can
print a single clear line and exit non-zero instead of a traceback.
"""


class MetaQNNError(Exception):
    """Base class: anything the CLI reports as a one-line error."""


class ArchitectureSyntaxError(MetaQNNError, ValueError):
    """An architecture string that does not parse (points at the offending token)."""


class InvalidArchitectureError(MetaQNNError, ValueError):
    """A well-formed architecture that the state space does not allow."""


class ConfigError(MetaQNNError, ValueError):
    """An invalid configuration value or an unknown preset/key."""


class StoreError(MetaQNNError):
    """The experiment store cannot be opened or is inconsistent."""


class StoreLockedError(StoreError):
    """Another process already holds this experiment open for writing."""


def quote(value: object, limit: int = 150) -> str:
    """``repr(value)`` cut to about ``limit`` characters: a 1 MB argument is not echoed back whole."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...{text[-12:]} ({len(text)} characters)"
