"""Module paths of steersample 0.1's flat layout, kept importable for one release.

``import steersample.judge`` (or ``from steersample.attractor import AttractorRepulsion``) still
works and returns the module at its new home (``steersample.evaluation.judge``) with a
``DeprecationWarning`` naming that home. The aliases are resolved by a meta-path finder, so the
tree holds no shim files; the finder is installed by ``steersample/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

# old module (0.1) -> new module; the old names that are now packages (reference, oracle, sampling,
# steering) import as packages and re-export what they held, so they need no alias
MOVED: dict[str, str] = {
    "steersample.sharded": "steersample.reference.sharded",
    "steersample.store": "steersample.reference.store",
    "steersample.index": "steersample.reference.index",
    "steersample.encode": "steersample.reference.encode",
    "steersample.phases": "steersample.oracle.phases",
    "steersample.schedules": "steersample.sampling.schedules",
    "steersample.scheduler": "steersample.sampling.scheduler",
    "steersample.guidance": "steersample.sampling.guidance",
    "steersample.guider": "steersample.sampling.guider",
    "steersample.telemetry": "steersample.sampling.telemetry",
    "steersample.attractor": "steersample.steering.attractor",
    "steersample.hull": "steersample.steering.hull",
    "steersample.representation": "steersample.steering.representation",
    "steersample.detect": "steersample.steering.detect",
    "steersample.metrics": "steersample.evaluation.metrics",
    "steersample.judge": "steersample.evaluation.judge",
    "steersample.audit": "steersample.evaluation.audit",
}


class _Alias(importlib.abc.Loader):
    """Loads an old module name as the module at its new path (one object, two names)."""

    def __init__(self, new: str) -> None:
        self.new = new
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new} in steersample 0.2; import it from there "
            f"(the old path goes away in the next release)",
            DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # importlib set the alias spec; the module keeps its own


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))
        return None


def install() -> None:
    """Add the alias finder to ``sys.meta_path`` once."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
