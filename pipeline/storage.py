"""Where persistent state lives: paths and URIs as every room names them.

Ray workers and tasks run in other working directories (on a cluster, on other machines), so a relative
path given on the command line means nothing to them: the driver makes every path absolute before Ray
starts. A URI (``scheme://...``) is kept as it is.
"""

from __future__ import annotations

import os


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` (object stores, MLflow servers), False for file-system paths."""
    return "://" in location


def absolute(location: str) -> str:
    """A path made absolute against this process's working directory (``~`` expanded); URIs unchanged."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))
