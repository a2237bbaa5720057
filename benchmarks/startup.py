"""Start-up times, each from a fresh process as a user starts the program.

* ``window_shown``: ``token-explorer resources/samples/scene-01.png`` until the window is shown
  (its first paint processed);
* ``first_overlay``: the same start until the first map is drawn over the demo scene (the demo
  model loaded, the image traced, the default method run);
* ``cli_run``: ``token-explorer run resources/samples/scene-01.png --method attention.rollout
  --out …png`` from start to exit.

The window reports its milestones through ``EXPLORER_STARTUP_REPORT`` (see ``explorer/qt/app.py``)
and quits after the first overlay; it runs on Qt's offscreen platform unless ``--platform`` says
otherwise. Settings and caches live in a temporary folder, so the default (demo) model is used and
no earlier trace helps. Each figure is the median of ``--repeat`` starts (the first start also
pays a cold disk cache; all are listed).

    python benchmarks/startup.py [--repeat 5] [--md docs/startup.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "samples" / "scene-01.png"
TARGETS = {"window_shown": 1.5, "first_overlay": 4.0, "cli_run": 6.0}


def _env(tmp: Path, platform: str) -> dict:
    env = dict(os.environ)
    env.update({"QT_QPA_PLATFORM": platform, "XDG_CONFIG_HOME": str(tmp / "config"),
                "EXPLORER_CACHE_DIR": str(tmp / "cache"), "EXPLORER_CONFIG_DIR": str(tmp / "config"),
                "HF_HUB_OFFLINE": "1"})
    env.pop("EXPLORER_MODEL", None)
    return env


def window_start(tmp: Path, platform: str, timeout: float = 120.0) -> dict[str, float]:
    report = tmp / "startup.jsonl"
    report.unlink(missing_ok=True)
    env = _env(tmp, platform)
    env["EXPLORER_STARTUP_REPORT"] = str(report)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "explorer", str(SAMPLE)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if not report.is_file():
        raise RuntimeError(f"the window reported nothing (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    events = {e["event"]: e["t"] - t0 for e in map(json.loads, report.read_text().splitlines())}
    if "first_overlay" not in events:
        raise RuntimeError(f"no overlay was drawn (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return events


def cli_run(tmp: Path, timeout: float = 120.0) -> float:
    out = tmp / "rollout.png"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "explorer", "run", str(SAMPLE), "--method", "attention.rollout",
                           "--out", str(out), "--quiet"], env=_env(tmp, "offscreen"), capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds


IMPORTS = """
import json, time
t0 = time.perf_counter(); import torch
t1 = time.perf_counter(); import open_clip
t2 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "open_clip": t2 - t1}))
"""


def library_imports(tmp: Path) -> dict[str, float]:
    """What importing the model libraries costs in a fresh process (no code of this program):
    ``torch``, then ``open_clip`` (which imports torchvision, torch._dynamo and transformers)."""
    proc = subprocess.run([sys.executable, "-c", IMPORTS], env=_env(tmp, "offscreen"), capture_output=True,
                          text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(repeat: int, platform: str) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {k: [] for k in (*TARGETS, "model_loaded", "import_torch", "import_open_clip")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for _ in range(repeat):
            events = window_start(tmp, platform)
            for key in ("window_shown", "model_loaded", "first_overlay"):
                runs[key].append(events[key])
            runs["cli_run"].append(cli_run(tmp))
            imports = library_imports(tmp)
            runs["import_torch"].append(imports["torch"])
            runs["import_open_clip"].append(imports["open_clip"])
    return runs


def table(runs: dict[str, list[float]]) -> str:
    lines = ["| Start-up | Median (s) | Target (s) | Met | Every start (s) |", "|---|---|---|---|---|"]
    names = {"window_shown": "window shown", "model_loaded": "demo CLIP loaded (in the window)",
             "first_overlay": "first overlay on the demo scene", "cli_run": "CLI `run` with the demo model",
             "import_torch": "of which: `import torch` alone", "import_open_clip":
             "of which: `import open_clip` after torch (torchvision, torch._dynamo, transformers)"}
    for key, values in runs.items():
        med = statistics.median(values)
        target = TARGETS.get(key)
        met = ("yes" if med <= target else "no") if target else ""
        lines.append(f"| {names[key]} | {med:.2f} | {f'{target:.1f}' if target else ''} | {met} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="starts per figure (default 5)")
    p.add_argument("--platform", default="offscreen", help="Qt platform for the window (default offscreen; xcb "
                                                            "under a display)")
    p.add_argument("--md", default=None, help="also write the table to this markdown file")
    p.add_argument("--json", default=None, help="also write every start's figures as JSON")
    args = p.parse_args(argv)
    runs = measure(args.repeat, args.platform)
    text = table(runs)
    print(text)
    if args.md:
        cmd = f"python benchmarks/startup.py --repeat {args.repeat}" + (
            f" --platform {args.platform}" if args.platform != "offscreen" else "")
        Path(args.md).write_text(f"# Start-up\n\nMeasured by `{cmd}` on {os.cpu_count()} CPU cores, Qt platform "
                                 f"`{args.platform}`; seconds from process start.\n\n{text}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
