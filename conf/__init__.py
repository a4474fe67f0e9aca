"""Hydra config tree of fcnseg (the root is config.yaml); a package so the installed wheel carries it."""
