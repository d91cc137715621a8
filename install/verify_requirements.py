"""Whether the requirements of installed packages and of fatscale itself are met by what this
Python sees (its own packages and those on PYTHONPATH), versions included.

    python install/verify_requirements.py [--dists NAME ...] [--project pyproject.toml] [--ignore NAME ...]

--dists: each requirement of each of these installed distributions (install_bundle.sh passes the
bundle's); --project: the dependencies of that pyproject.toml (fatscale's); --ignore: packages
left out on purpose (a bundle's omitted ones), whose requirements pass. Prints one line per
unmet requirement and exits 1 if there is one. Markers are evaluated for this interpreter; extras
are not followed. Two substitutes count as the package they stand for (ALTERNATIVES).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

# A requirement on the key is met by any of these too: mlflow-skinny is MLflow's tracking client
# and store without the server and UI (fatscale uses only the former; with sqlalchemy and alembic
# for the sqlite store), and DALI's CUDA 12 build replaces the CUDA 13 one on older drivers.
ALTERNATIVES = {"mlflow": ("mlflow-skinny",), "nvidia-dali-cuda130": ("nvidia-dali-cuda120",)}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(line: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # an interpreter without packaging still has pip's copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(line)


def installed_versions() -> dict[str, str]:
    """Every distribution this interpreter sees, normalized name -> version (the first found wins, as imports do)."""
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        versions.setdefault(normalize(dist.metadata["Name"]), dist.version)
    return versions


def unmet(owner: str, requirements: list[str], versions: dict[str, str], ignore: frozenset[str] = frozenset()) -> list[str]:
    """The requirements of ``owner`` that ``versions`` leaves unmet, one readable line each."""
    problems = []
    for line in requirements:
        req = _requirement(line)
        if (req.marker is not None and not req.marker.evaluate({"extra": ""})) or normalize(req.name) in ignore:
            continue
        names = (normalize(req.name), *ALTERNATIVES.get(normalize(req.name), ()))
        found = [(name, versions[name]) for name in names if name in versions]
        if not found:
            problems.append(f"{owner}: {line}: not installed")
        elif not any(req.specifier.contains(version, prereleases=True) for _, version in found):
            problems.append(f"{owner}: {line}: " + ", ".join(f"{n} {v}" for n, v in found) + " installed")
    return problems


def project_requirements(pyproject: Path) -> tuple[str, list[str]]:
    """(name, dependencies) of a pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed project's metadata instead
        return "fatscale", metadata.requires("fatscale") or []
    project = tomllib.loads(pyproject.read_text())["project"]
    return project["name"], project["dependencies"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dists", nargs="*", default=[], metavar="NAME", help="installed distributions to check")
    parser.add_argument("--project", type=Path, help="a pyproject.toml whose dependencies to check")
    parser.add_argument("--ignore", nargs="*", default=[], metavar="NAME", help="requirements on these pass")
    args = parser.parse_args(argv)
    versions = installed_versions()
    ignore = frozenset(normalize(name) for name in args.ignore)
    problems = []
    for name in args.dists:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        problems += unmet(name, requires, versions, ignore)
    if args.project is not None:
        if not args.project.is_file():
            parser.error(f"--project {args.project}: no such file")
        problems += unmet(*project_requirements(args.project), versions, ignore)
    for problem in problems:
        print(f"unmet: {problem}")
    print(f"verify_requirements: {len(args.dists)} distributions{' and ' + str(args.project) if args.project else ''}: "
          + (f"{len(problems)} unmet requirements" if problems else "every requirement met"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
