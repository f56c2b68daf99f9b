"""Lazy attribute exports for steersample's packages (``import steersample`` stays light).

Each package lists ``public name -> defining module`` once and gets a module ``__getattr__`` that
imports the defining module on first use (PEP 562)::

    __getattr__, __dir__ = lazy_exports(__name__, {"ReferenceSet": "steersample.reference.reference_set"})
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str],
                 submodules: Mapping[str, str] | None = None
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> dotted module that defines it.
        submodules: attribute -> dotted module reachable as ``package.attribute``.
    """
    submodules = dict(submodules or {})

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if name in submodules:
            return importlib.import_module(submodules[name])
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | set(submodules))

    return __getattr__, __dir__
