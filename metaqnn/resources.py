"""Where the project's data files and working folders are, in a checkout and in an installed wheel.

In a checkout (an editable install, or running from the tree) the presets, protocols and
templates are the top-level folders users edit, and ``data/``, ``experiments/`` and the private
Caffe prefix ``.deps/`` sit beside them.  In a wheel installed with ``pip install .`` the data
files are package data of :mod:`metaqnn.assets`, found with :mod:`importlib.resources`, and the
working folders are relative to the current directory (``METAQNN_HOME`` overrides it).
"""

import importlib
import os
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
ASSETS = ("presets", "solvers", "prototxt_templates")


def is_checkout() -> bool:
    return (CHECKOUT / "pyproject.toml").is_file() and all((CHECKOUT / a).is_dir() for a in ASSETS)


def asset_dir(name: str) -> Path:
    """The folder of one kind of data file: the checkout's, else the installed package data."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset folder {name!r}")
    if is_checkout():
        return CHECKOUT / name
    if sys.version_info >= (3, 9):
        from importlib.resources import files  # novermin

        return Path(str(files("metaqnn.assets") / name))
    return Path(importlib.import_module("metaqnn.assets").__path__[0]) / name  # pragma: no cover - Python 3.8


def workspace() -> Path:
    """Where ``data/``, ``experiments/`` and ``.deps/`` go: the checkout, or the current folder."""
    home = os.environ.get("METAQNN_HOME")
    if home:
        return Path(home).resolve()
    return CHECKOUT if is_checkout() else Path.cwd()
