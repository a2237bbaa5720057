"""Shared fixtures: a tiny real open_clip model saved and loaded through open_clip's loader,
test images, and an isolated environment (offscreen Qt, temporary cache and settings)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("explorer-home")
    os.environ["EXPLORER_CACHE_DIR"] = str(base / "cache")
    os.environ["EXPLORER_CONFIG_DIR"] = str(base / "config")
    os.environ["XDG_CONFIG_HOME"] = str(base / "xdg-config")
    yield


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory):
    """A tiny open_clip ViT (64 px, 8 px patches -> 8x8 grid, 3 blocks, 4 heads) saved as safetensors."""
    from explorer.testing.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_spec):
    from explorer.backends.clip import ClipBackend

    return ClipBackend.load(tiny_clip_spec)


@pytest.fixture
def make_image():
    """``make_image(h, w, seed)`` -> LoadedImage of random RGB pixels through the real loader."""
    from explorer.testing.images import random_image

    return random_image


@pytest.fixture(scope="session")
def tiny_vlm_backends(tmp_path_factory):
    """``get(name)`` -> a loaded :class:`VlmBackend` of the tiny variant ``name`` (built, saved with
    ``save_pretrained`` and loaded once per session)."""
    from explorer.backends.vlm import VlmBackend
    from explorer.testing.tiny_vlm import make_tiny_vlm

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = VlmBackend.load(make_tiny_vlm(tmp_path_factory.mktemp(name.replace("-", "_")), name))
        return cache[name]

    return get


@pytest.fixture
def image_file(tmp_path):
    """``image_file(h, w, name)`` -> path of a PNG with a smooth pattern."""

    def make(h: int = 120, w: int = 160, name: str = "img.png") -> Path:
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], -1).astype(np.uint8)
        path = tmp_path / name
        Image.fromarray(rgb).save(path)
        return path

    return make


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for one module's sweeps (sweeps reuse a running Ray), stopped after
    the module so that no Ray threads outlive it into other tests."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
