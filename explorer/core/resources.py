"""Where the program's resources and user folders are.

``resources/`` sits next to the ``explorer`` package in a source checkout; installed copies get
it through ``EXPLORER_RESOURCES`` or the bundled data directory. User folders (cache, config,
logs) come from platformdirs.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir, user_config_dir, user_log_dir

__all__ = ["resources_dir", "demo_model_dir", "samples_dir", "cache_dir", "config_dir", "log_dir"]

APP = "token-explorer"


def resources_dir() -> Path:
    env = os.environ.get("EXPLORER_RESOURCES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "resources"


def demo_model_dir(kind: str) -> Path:
    """Folder of the shipped demo model ``kind`` ('clip', 'sam', 'vlm', 'tok', 'tok-grid')."""
    return resources_dir() / "models" / f"demo-{kind}"


def samples_dir() -> Path:
    return resources_dir() / "samples"


def cache_dir() -> Path:
    return Path(os.environ.get("EXPLORER_CACHE_DIR") or user_cache_dir(APP))


def config_dir() -> Path:
    return Path(os.environ.get("EXPLORER_CONFIG_DIR") or user_config_dir(APP))


def log_dir() -> Path:
    return Path(user_log_dir(APP))
