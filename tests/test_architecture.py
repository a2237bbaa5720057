"""The design's import contracts (import-linter, as napari does) and packaging facts."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" in out.stdout and "0 broken" in out.stdout


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest" in ci and "QT_QPA_PLATFORM=offscreen" in ci
    assert "pip install -e \".[test]\"" in readme and "pip install -e \".[test]\"" in ci


def test_console_script_and_plugin_entry_points_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["token-explorer"] == "explorer.__main__:main"
    eps = meta["project"]["entry-points"]["explorer.plugins"]
    folders = sorted(p.parent.name for p in (ROOT / "plugins" / "explorer_plugins").glob("*/manifest.toml"))
    assert sorted(v.split(":")[0].split(".")[-1] for v in eps.values()) == folders
