"""The agent's error types: they live in the neutral :mod:`metaqnn_errors`, shared by every package."""

from metaqnn_errors import (
    ArchitectureSyntaxError,
    ConfigError,
    InvalidArchitectureError,
    MetaQNNError,
    StoreError,
    StoreLockedError,
    quote,
)

__all__ = [
    "ArchitectureSyntaxError",
    "ConfigError",
    "InvalidArchitectureError",
    "MetaQNNError",
    "StoreError",
    "StoreLockedError",
    "quote",
]
