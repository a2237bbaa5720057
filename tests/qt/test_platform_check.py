"""Whether the window can open: a display, and the libraries of Qt's xcb plugin (checked before Qt
starts, because Qt aborts the process when its platform plugin cannot load)."""

import subprocess
import sys

from explorer.qt.platform_check import XCB_PACKAGES, packages_for, parse_ldd, window_problem

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f1)
\tlibxcb-cursor.so.0 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxkbcommon-x11.so.0 => not found
\tlibxcb-cursor.so.0 => not found
\tlibGL.so.1 => /lib/x86_64-linux-gnu/libGL.so.1 (0x00007f2)
\tlibweird.so.9 => not found
"""


def test_missing_libraries_are_named_with_their_packages():
    missing = parse_ldd(LDD)
    assert missing == ["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxkbcommon-x11.so.0", "libweird.so.9"]
    assert packages_for(missing) == ["libxcb-cursor0", "libxcb-icccm4", "libxkbcommon-x11-0", "libweird.so.9"]
    assert {"libxcb-cursor0", "libxkbcommon-x11-0", "libegl1"} <= set(XCB_PACKAGES)


def test_a_display_without_the_libraries_names_the_packages(monkeypatch):
    import explorer.qt.platform_check as pc

    monkeypatch.setattr(pc, "missing_libraries", lambda: ["libxcb-cursor.so.0", "libxkbcommon-x11.so.0"])
    text = window_problem({"DISPLAY": ":0"}, "linux")
    assert text.endswith("sudo apt-get install libxcb-cursor0 libxkbcommon-x11-0") and "\n" not in text
    monkeypatch.setattr(pc, "missing_libraries", lambda: [])
    assert window_problem({"DISPLAY": ":0"}, "linux") is None


def test_ldd_is_asked_about_the_installed_plugin():
    import explorer.qt.platform_check as pc

    files = pc._qt_files()
    assert files and files[0].name == "libqxcb.so"
    assert isinstance(pc.missing_libraries(), list)  # empty where the README's packages are installed


def test_no_display_or_another_platform():
    assert "DISPLAY is not set" in window_problem({}, "linux")
    assert window_problem({"QT_QPA_PLATFORM": "offscreen"}, "linux") is None
    assert window_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux") is None
    assert window_problem({}, "darwin") is None
    assert "DISPLAY is not set" in window_problem({"QT_QPA_PLATFORM": "xcb"}, "linux")


def test_the_program_says_so_instead_of_aborting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "explorer"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no display") and "xvfb-run" in lines[0]
