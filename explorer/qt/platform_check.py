"""Can the window open here? A check before Qt starts, because Qt aborts the process (no Python
exception) when its platform plugin cannot load.

On Linux the window uses Qt's ``xcb`` platform plugin, which links a dozen X11/xcb libraries that a
minimal Debian or Ubuntu install (a container, a fresh server) does not have. :func:`window_problem`
asks the dynamic loader (``ldd``) which of the plugin's libraries are missing and returns one
message naming the Debian/Ubuntu packages that provide them, or says that there is no display at
all. Nothing is checked when Qt is told to use another platform (``QT_QPA_PLATFORM``) or a Wayland
session is running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["window_problem", "missing_libraries", "parse_ldd", "packages_for", "XCB_PACKAGES"]

# shared object -> Debian/Ubuntu package (the libraries Qt 6's xcb plugin links beyond glibc)
SONAME_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb.so.1": "libxcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libGLX.so.0": "libglx0",
    "libOpenGL.so.0": "libopengl0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
}
# what a fresh Debian/Ubuntu needs for the window (the README lists the same)
XCB_PACKAGES = ("libxcb-cursor0", "libxcb-icccm4", "libxcb-image0", "libxcb-keysyms1", "libxcb-render-util0",
                "libxcb-randr0", "libxcb-shape0", "libxcb-xkb1", "libxkbcommon-x11-0", "libx11-xcb1", "libegl1",
                "libgl1", "libfontconfig1", "libdbus-1-3", "libglib2.0-0")


def parse_ldd(text: str) -> list[str]:
    """The libraries ``ldd`` reports as ``not found`` (in its order, without repeats)."""
    out: list[str] = []
    for name in re.findall(r"^\s*(\S+)\s*=>\s*not found", text, flags=re.M):
        if name not in out:
            out.append(name)
    return out


def packages_for(sonames: list[str]) -> list[str]:
    """Debian/Ubuntu packages providing ``sonames`` (unknown ones are named as they are)."""
    out: list[str] = []
    for name in sonames:
        pkg = SONAME_PACKAGES.get(name, name)
        if pkg not in out:
            out.append(pkg)
    return out


def _qt_files() -> list[Path]:
    import PySide6

    root = Path(PySide6.__file__).resolve().parent / "Qt"
    return [p for p in (root / "plugins" / "platforms" / "libqxcb.so", *sorted((root / "lib").glob("libQt6XcbQpa.so*")))
            if p.is_file()][:2]


def missing_libraries() -> list[str]:
    """Libraries of Qt's xcb plugin that the loader cannot find (empty when all are there, or
    when ``ldd`` is not available to ask)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    missing: list[str] = []
    for path in _qt_files():
        try:
            text = subprocess.run([ldd, str(path)], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        missing += [n for n in parse_ldd(text) if n not in missing]
    return missing


def window_problem(environ: dict | None = None, platform: str = sys.platform) -> str | None:
    """Why the window cannot open here (one message with the fix), or ``None``."""
    env = os.environ if environ is None else environ
    if not platform.startswith("linux"):
        return None
    qpa = env.get("QT_QPA_PLATFORM", "").split(":")[0].strip().lower()
    if qpa and qpa != "xcb":
        return None  # offscreen, wayland, vnc…: Qt was told what to use
    if not qpa and env.get("WAYLAND_DISPLAY"):
        return None
    if not env.get("DISPLAY"):
        return ("no display to open the window on (DISPLAY is not set): start it in a desktop session or under "
                "Xvfb (xvfb-run token-explorer …); `token-explorer run`, `compare` and `replay` need no display")
    missing = missing_libraries()
    if not missing:
        return None
    pkgs = packages_for(missing)
    return (f"Qt's xcb platform cannot load: {', '.join(missing)} missing. On Debian/Ubuntu: "
            f"sudo apt-get install {' '.join(pkgs)}")
