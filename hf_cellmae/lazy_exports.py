"""Public names of a package imported on first access (PEP 562), so ``cellmae --help`` starts fast."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a relative module) on first use.

    Usage, in a package's ``__init__.py``: ``__getattr__ = lazy_exports(__name__, {"Name": ".module"})``.
    The value is cached in the package, so later accesses are plain attribute lookups.
    """

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
