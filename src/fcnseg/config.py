"""Where the Hydra config tree lives: ``conf/`` of the checkout, shipped in the package as ``fcnseg.conf``."""

from __future__ import annotations

import importlib.util

# The package's own location for ``fcnseg.conf``: the checkout's conf/ in an editable install, the installed copy
# otherwise (pyproject.toml maps the package onto conf/).
CONFIG_DIR: str = importlib.util.find_spec("fcnseg.conf").submodule_search_locations[0]
CONFIG_NAME = "config"
