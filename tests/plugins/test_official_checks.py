"""What ``token-explorer methods -v`` says about checks against the authors' code is true: every
method whose manifest names a golden file has that file under tests/golden/, listed in
PROVENANCE.md with a repository and a commit, and a test module that reads it; the others say why
not (``none: …``) or that they are not checked yet."""

import re
from pathlib import Path

import pytest

from explorer.plugin_host.host import PluginHost

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
HOST = PluginHost()


@pytest.mark.parametrize("method_id", [m.id for m in HOST.methods() if m.contribution.official_check])
def test_a_named_golden_file_exists_and_is_tested(method_id):
    check = HOST.method(method_id).contribution.official_check
    if check.startswith("none:"):
        assert len(check) > len("none: ") + 10, f"{method_id}: say why it is not checked"
        return
    m = re.match(r"tests/golden/([\w.-]+\.npz) ", check)
    assert m, f"{method_id}: official_check must start with tests/golden/<file>.npz or none:"
    name = m.group(1)
    assert (GOLDEN / name).is_file(), name
    provenance = (GOLDEN / "PROVENANCE.md").read_text()
    line = next((l for l in provenance.splitlines() if f"`{name}`" in l), "")
    assert "https://github.com/" in line and re.search(r"`[0-9a-f]{40}`", line), f"{name}: no repository and commit"
    readers = [p for p in (ROOT / "tests").rglob("test_*.py") if name in p.read_text()]
    assert readers, f"no test reads {name}"


def test_the_methods_listing_says_it(capsys):
    from explorer.cli.main import main

    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert sum(line.lstrip().startswith("official code: ") for line in out.splitlines()) == len(HOST.methods())
    assert "tests/golden/tome_bipartite.npz" in out and "none: no official code was found" in out


def test_the_checks_table_in_docs_is_current(capsys):
    """docs/official-checks.md is what `token-explorer methods --checks` prints, and says how many are checked."""
    from explorer.cli.main import main

    assert main(["methods", "--checks"]) == 0
    out = capsys.readouterr().out
    assert (ROOT / "docs" / "official-checks.md").read_text() == out, \
        "rerun: token-explorer methods --checks > docs/official-checks.md"
    golden = [m for m in HOST.methods() if m.contribution.official_check.startswith("tests/golden/")]
    assert out.startswith(f"{len(golden)} of {len(HOST.methods())} methods")
