"""Every ``token-explorer`` command in README.md's shell blocks works as written with the demo model.

The commands are taken from the ```bash blocks (backslash continuations joined, comments dropped)
and run through the CLI in process, with ``photo.jpg`` replaced by a shipped sample image, a
``--model`` that needs the network replaced by the demo CLIP, a ``*.tesession`` replaced by a
session saved by the tests and ``--out``/``--json`` written into the test's folder. Commands that open the window are skipped. Also: every subcommand's ``--help``
prints, and the method names its examples give resolve.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from explorer.cli.main import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "resources" / "samples" / "scene-01.png"
OFFLINE_MODELS = ("demo", "clip:demo", "sam:demo", "vlm:demo", "tok:demo", "tok:demo-grid")


def readme_commands(text: str) -> list[str]:
    """The lines of the ```bash blocks that start with ``token-explorer`` (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n[ \t]*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("token-explorer")]
    return commands


def _local_model(value: str) -> bool:
    return value in OFFLINE_MODELS or value.startswith(("local-dir:", "/", "./", "~")) or Path(value).exists()


def offline_argv(command: str, out_dir: Path, session: Path | None = None) -> list[str]:
    """The command's arguments with the sample image, a saved session (for ``*.tesession``), an
    offline model and outputs in ``out_dir``."""
    argv = shlex.split(command, comments=True)[1:]
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--model", "--out", "--json") and i + 1 < len(argv):
            value = argv[i + 1]
            if arg == "--model":
                value = value if _local_model(value) else "demo"
            else:
                value = str(out_dir / Path(value).name)
            out += [arg, value]
            i += 2
            continue
        if arg == "photo.jpg":
            arg = str(SAMPLE)
        elif arg.endswith(".tesession") and session is not None:
            arg = str(session)
        out.append(arg)
        i += 1
    return out


def starts_the_window(command: str) -> bool:
    """``token-explorer`` alone or with an image or folder path: the window, not a headless command
    (any other first argument is run, so that a misspelt subcommand fails here)."""
    argv = shlex.split(command, comments=True)[1:]
    return not argv or (argv[0] not in COMMANDS and not argv[0].startswith("-")
                        and (bool(Path(argv[0]).suffix) or "/" in argv[0]))


COMMANDS_IN_README = readme_commands((ROOT / "README.md").read_text())
HEADLESS = [c for c in COMMANDS_IN_README if not starts_the_window(c)]


def test_readme_has_the_headless_commands():
    # the listings and the run/compare examples are all found; only window starts are left out
    subcommands = {c.split()[1] for c in HEADLESS}
    assert {"methods", "plugins", "run", "compare", "replay"} <= subcommands
    assert len(HEADLESS) >= 7
    assert starts_the_window("token-explorer resources/samples/scene-01.png") and starts_the_window("token-explorer")
    assert not starts_the_window("token-explorer comapre photo.jpg --methods topk")


@pytest.mark.parametrize("command", HEADLESS)
def test_readme_command_works_with_the_demo_model(command, tmp_path, capsys, session_bundle):
    argv = offline_argv(command, tmp_path, session_bundle[0])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: a misspelt subcommand or flag
        code = exc.code
    err = capsys.readouterr().err
    assert code == 0, f"README command failed ({code}): {command}\n  ran: token-explorer {shlex.join(argv)}\n{err}"
    for flag in ("--out", "--json"):
        if flag in argv:
            written = Path(argv[argv.index(flag) + 1])
            if written.is_dir():  # replay writes a folder
                assert any(written.iterdir()), f"{command}: {written} is empty"
            else:
                assert written.is_file() and written.stat().st_size > 0, f"{command}: {written} not written"


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_help_prints(capsys):
    for command in COMMANDS:
        assert f"token-explorer {command}" in _help(command, capsys)


def test_method_examples_in_help_resolve(capsys):
    from explorer.plugin_host.compare import resolve_method_ids
    from explorer.plugin_host.engine import Engine

    examples = re.findall(r"e\.g\. ([\w.]+(?:,[\w.]+)+)", _help("compare", capsys))
    assert examples
    for example in examples:
        names = example.split(",")
        assert len(resolve_method_ids(Engine(), names)) == len(names)
