"""The package's version and the versions a result depends on: imports nothing heavy, so ``dsn-robust
--version`` and the crash report need neither torch nor pandas (:mod:`robustness.core.runtime` re-exports both)."""
from __future__ import annotations

import platform
from importlib import metadata

PACKAGE = "dsn-robustness"


def package_version() -> str:
    """This package's version as its installed metadata says (``dsn-robust --version``); ``"unknown"`` when the
    source tree is used without being installed."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    versions = {"python": platform.python_version()}
    for pkg in ("dsn-robustness", "torch", "torchvision", "torchattacks", "foolbox", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions
