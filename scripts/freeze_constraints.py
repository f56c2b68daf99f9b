"""Write ``constraints.txt``: the versions of steersample[test] and everything it pulls in, as
installed in the running environment (the one the suite just passed in).

    .venv/bin/python scripts/freeze_constraints.py > constraints.txt

Only the dependency closure of ``steersample[test]`` is pinned (not whatever else sits in the
venv); torch is pinned without its local tag (``2.13.0``, which ``2.13.0+cpu`` satisfies), so the
README's CPU wheel and CUDA builds of the same release both meet it.
"""

from __future__ import annotations

from datetime import date
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _requirements(dist: metadata.Distribution, extras: set[str]) -> list[Requirement]:
    """``dist``'s requirements whose markers hold here with ``extras`` requested."""
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def closure(root: str = "steersample", extras: frozenset[str] = frozenset({"test"})) -> dict:
    """Installed distributions reachable from ``root[extras]``: name -> distribution."""
    seen: dict[str, tuple[metadata.Distribution, set[str]]] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a marker-less optional dependency not installed
            continue
        key = canonicalize_name(name)
        done = seen.get(key)
        if done is not None and wanted <= done[1]:
            continue
        seen[key] = (dist, (done[1] if done else set()) | wanted)
        todo += [(req.name, set(req.extras)) for req in _requirements(dist, wanted)]
    seen.pop(canonicalize_name(root), None)
    return {key: dist for key, (dist, _) in seen.items()}


def main() -> int:
    print(f"# Tested versions of steersample[test] and its dependencies ({date.today()}),")
    print("# written by scripts/freeze_constraints.py from the venv the suite passed in.")
    print('# Used as: pip install -e ".[test]" -c constraints.txt   (README, .ci/run)')
    for key, dist in sorted(closure().items()):
        version = dist.version.split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
        print(f"{dist.metadata['Name']}=={version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
