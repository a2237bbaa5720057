"""What ``pip install token-explorer`` gets: the sdist and the wheel carry every file the program
reads at run time.

``resources/`` (demo models, samples) installs as the package ``explorer_resources``; the plugins
as ``explorer_plugins``. The distributions are built the way an index gets them (``python -m
build``: the sdist, then the wheel from the unpacked sdist), without build isolation so that no
index is needed (``setuptools``, ``wheel`` and ``build`` come with the test extra).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
META = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _files_under(folder: Path) -> set[str]:
    """Files under ``folder`` as posix paths relative to it, without bytecode caches."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_every_package_folder_is_listed():
    """``[tool.setuptools] packages`` names every folder with an ``__init__.py`` (a new plugin too)."""
    listed = set(META["tool"]["setuptools"]["packages"])
    dirs = META["tool"]["setuptools"]["package-dir"]
    assert dirs == {"explorer_plugins": "plugins/explorer_plugins", "explorer_resources": "resources"}
    on_disk = {"explorer_resources"}
    on_disk |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "explorer").rglob("__init__.py")}
    on_disk |= {".".join(p.parent.relative_to(ROOT / "plugins").parts)
                for p in (ROOT / "plugins" / "explorer_plugins").rglob("__init__.py")}
    assert sorted(on_disk - listed) == [], "add these to [tool.setuptools] packages in pyproject.toml"
    assert sorted(listed - on_disk) == [], "listed in [tool.setuptools] packages but not on disk"


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (wheel,), (sdist,) = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    return wheel, sdist


def test_wheel_carries_every_resource(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    expected = {f"explorer_resources/{rel}" for rel in _files_under(ROOT / "resources")}
    assert "explorer_resources/samples/scene-01.png" in expected
    assert "explorer_resources/models/demo-clip/open_clip_model.safetensors" in expected
    assert sorted(expected - names) == []
    assert not any(n.endswith(".pyc") for n in names)


def test_wheel_carries_every_module_and_manifest(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    expected = {f"explorer/{rel}" for rel in _files_under(ROOT / "explorer")}
    expected |= {f"explorer_plugins/{rel}" for rel in _files_under(ROOT / "plugins" / "explorer_plugins")}
    assert sorted(expected - names) == []
    for name, target in META["project"]["entry-points"]["explorer.plugins"].items():
        module, _, manifest = target.partition(":")
        assert f"{module.replace('.', '/')}/{manifest}" in names, name
        assert f"{name} = {target}" in entry_points
    assert "token-explorer = explorer.__main__:main" in entry_points


def test_sdist_carries_every_resource(dists):
    """An index serves the sdist too; ``pip install`` from it builds the wheel above."""
    _, sdist = dists
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert sorted(f"resources/{rel}" for rel in _files_under(ROOT / "resources") if f"resources/{rel}" not in names) == []
