"""Where the program's resources and user folders are.

The resources (demo models, sample images) are the repository's ``resources/`` folder, installed
as the package ``explorer_resources`` (package data of every file type) and found through
:func:`importlib.resources.files`, so a wheel installed from an index has them as a source checkout
does. ``EXPLORER_RESOURCES`` points elsewhere (a folder with the same layout). User folders
(cache, config, logs) come from platformdirs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from platformdirs import user_cache_dir, user_config_dir, user_log_dir

__all__ = ["resources_dir", "demo_model_dir", "samples_dir", "cache_dir", "config_dir", "log_dir"]

APP = "token-explorer"
RESOURCES_PACKAGE = "explorer_resources"


@lru_cache(maxsize=1)
def _installed_resources() -> Path:
    """The folder of the ``explorer_resources`` package.

    The loaders read folders (``from_pretrained``, safetensors, open_clip configs), so this is a
    real directory: pip installs wheels unpacked, and an editable install maps the package onto
    ``resources/`` in the checkout. A checkout used without installing (only ``PYTHONPATH``) finds
    ``resources/`` beside the ``explorer`` package.

    Raises
    ------
    FileNotFoundError
        The package is not installed and there is no checkout's ``resources/``, or it is installed
        inside a zip archive (no folder to hand to the loaders).
    """
    try:
        root = files(RESOURCES_PACKAGE)
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parents[2] / "resources"
        if checkout.is_dir():
            return checkout
        raise FileNotFoundError(
            f"the package {RESOURCES_PACKAGE!r} (demo models and samples) is not installed; "
            "reinstall token-explorer, or set EXPLORER_RESOURCES to a resources folder") from None
    if not isinstance(root, Path) or not root.is_dir():
        raise FileNotFoundError(
            f"{RESOURCES_PACKAGE!r} is not a folder on disk ({root}); install token-explorer "
            "unpacked (as pip does), or set EXPLORER_RESOURCES to a resources folder")
    return root


def resources_dir() -> Path:
    """The resources folder: ``EXPLORER_RESOURCES`` when set, else the installed package's folder."""
    env = os.environ.get("EXPLORER_RESOURCES")
    if env:
        return Path(env)
    return _installed_resources()


def demo_model_dir(kind: str) -> Path:
    """Folder of the shipped demo model ``kind`` ('clip', 'sam', 'vlm', 'tok', 'tok-grid')."""
    return resources_dir() / "models" / f"demo-{kind}"


def samples_dir() -> Path:
    """Folder of the shipped sample images (``scene-*.png`` with their ``.txt`` captions, photos)."""
    return resources_dir() / "samples"


def cache_dir() -> Path:
    return Path(os.environ.get("EXPLORER_CACHE_DIR") or user_cache_dir(APP))


def config_dir() -> Path:
    return Path(os.environ.get("EXPLORER_CONFIG_DIR") or user_config_dir(APP))


def log_dir() -> Path:
    return Path(user_log_dir(APP))
