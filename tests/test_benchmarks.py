"""The benchmark suite runs end to end (a dry run on tiny models), so that the one command meant
for an unattended GPU run is known to work before it gets there."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_suite_dry_run_reports_every_figure(tmp_path):
    out = tmp_path / "suite.json"
    md = tmp_path / "suite.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--device", "cpu", "--tiny", "--runs", "1",
                           "--json", str(out), "--md", str(md)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    figures = [r["figure"] for r in data["rows"]]
    for expected in ("traced forward, every layer's attention / bare", "Attention rollout from the cache / bare",
                     "GEM similarity from the cache / bare", "8 reduction selections from the cache / bare",
                     "executed ToMe r=4 from block 0, batch 2: share of ideal speed-up",
                     "executed Top-K keep 0.5 from block 1, batch 1: share of ideal speed-up",
                     "generation of 32 tokens keeping every layer's image rows / model.generate",
                     "FastV keep 0.25 after layer 2: prefill / unpruned prefill"):
        assert expected in figures, expected
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in data["rows"])
    assert all(r["target"] is None for r in data["rows"])  # a dry run is not held to the targets
    assert "| Figure | Model | Measured | Target | Met |" in md.read_text()


def test_startup_benchmark_times_the_real_start(tmp_path):
    """One start of ``python -m explorer IMAGE``: the window reports its milestones in order and
    quits after the first overlay; the CLI run writes its PNG."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import startup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    events = startup.window_start(tmp_path, "offscreen")
    assert 0 < events["window_shown"] < events["model_loaded"] <= events["first_overlay"]
    assert events["image_shown"] < events["first_overlay"]
    assert startup.cli_run(tmp_path) > 0
    text = startup.table({"window_shown": [0.5], "first_overlay": [5.0], "cli_run": [4.0]})
    assert "| window shown | 0.50 | 1.5 | yes |" in text and "| first overlay on the demo scene | 5.00 | 4.0 | no |" in text
