"""The reliability table: every file of the hostile corpus through the command line and the window,
each in its own process so that a crash is counted, not suffered.

* command line: ``token-explorer run FILE --method attention.raw --out OUT.png`` per file, with an
  earlier good ``OUT.png`` in place; *clean*: a valid image gives exit code 0 and a readable PNG,
  anything else exit code 1 or 2 with exactly one ``error:`` line and no traceback; *crashed*: a
  traceback, a signal or a hang (60 s); *data lost*: the earlier output changed by a failed run;
* window: one offscreen window opens every file in turn; *clean*: a valid image is shown, anything
  else leaves a one-line error message and the previous image; *crashed*: the window process died
  or hung (the files after it are counted as crashed too).

    python tools/reliability.py [--md docs/reliability.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WINDOW_SCRIPT = r"""
import json, sys, time
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication
from explorer.testing.hostile_files import make_corpus
app = QApplication.instance() or QApplication([sys.argv[0]])
from explorer.qt.app import create_window
tmp = sys.argv[1]
w = create_window("demo", settings=QSettings(tmp + "/s.ini", QSettings.Format.IniFormat))
w.show()
for c in make_corpus(tmp + "/corpus"):
    before = w.model.image_path
    w.model.clear_message()
    w.open_image(str(c.path))
    t = time.monotonic()
    while time.monotonic() - t < 30:
        app.processEvents()
        if w.model.image_path == str(c.path) or (w.model.message is not None and w.model.message.kind == "error"):
            break
        time.sleep(0.01)
    opened = w.model.image_path == str(c.path)
    msg = w.model.message.text if w.model.message is not None else ""
    clean = opened if c.loads else (not opened and w.model.image_path == before and bool(msg) and "\n" not in msg)
    print(json.dumps({"name": c.name, "clean": clean, "message": msg}), flush=True)
w.close()
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--md", default=None, help="write the table here")
    args = p.parse_args(argv)
    from PIL import Image

    from explorer.testing.hostile_files import make_corpus

    tmp = Path(tempfile.mkdtemp(prefix="explorer-reliability-"))
    corpus = make_corpus(tmp / "corpus")
    env = dict(os.environ, EXPLORER_CACHE_DIR=str(tmp / "cache"), HF_HUB_OFFLINE="1", QT_QPA_PLATFORM="offscreen")
    cli = {"clean": 0, "crashed": 0, "lost": 0, "details": []}
    out = tmp / "out.png"
    earlier = tmp / "earlier.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(earlier)
    for c in corpus:
        out.write_bytes(earlier.read_bytes())
        try:
            r = subprocess.run([sys.executable, "-m", "explorer", "run", str(c.path), "--method", "attention.raw",
                                "--out", str(out)], capture_output=True, text=True, timeout=60, env=env)
            code, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired:
            code, err = None, "hung"
        lines = [line for line in err.splitlines() if line.strip()]
        if code is None or code < 0 or "Traceback" in err:
            cli["crashed"] += 1
            cli["details"].append(f"{c.name}: crashed ({code}) {err[-200:]}")
        elif c.loads and code == 0:
            cli["clean"] += 1
        elif not c.loads and code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "):
            cli["clean"] += 1
        else:
            cli["details"].append(f"{c.name}: code {code}: {err.strip()[:200]}")
        if not c.loads and out.read_bytes() != earlier.read_bytes():
            cli["lost"] += 1
        print(f"cli  {c.name}: {code} {lines[-1] if lines else ''}"[:160], flush=True)
    win = {"clean": 0, "crashed": 0, "details": []}
    try:
        r = subprocess.run([sys.executable, "-c", WINDOW_SCRIPT, str(tmp / "win")], capture_output=True, text=True,
                           timeout=60 * len(corpus), env=env)
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        died = r.returncode != 0
    except subprocess.TimeoutExpired as exc:
        rows = [json.loads(line) for line in (exc.stdout or b"").decode().splitlines() if line.startswith("{")]
        died = True
    for row in rows:
        win["clean"] += bool(row["clean"])
        if not row["clean"]:
            win["details"].append(f"{row['name']}: {row['message']}")
        print(f"window {row['name']}: {'clean' if row['clean'] else 'NOT clean'} {row['message'][:100]}", flush=True)
    if died or len(rows) < len(corpus):
        win["crashed"] = len(corpus) - len(rows)
    n, bad = len(corpus), sum(not c.loads for c in corpus)
    table = ["| Path | Files tried | Handled cleanly | Crashed | Earlier output lost |", "|---|---|---|---|---|",
             f"| `token-explorer run FILE … --out OUT.png` | {n} ({bad} bad or hostile) | {cli['clean']} | "
             f"{cli['crashed']} | {cli['lost']} |",
             f"| the window (File ▸ Open) | {n} ({bad} bad or hostile) | {win['clean']} | {win['crashed']} | – |"]
    print("\n".join(table))
    for d in cli["details"] + win["details"]:
        print("  ", d)
    if args.md:
        lines = ["# Reliability: hostile files through the command line and the window", "",
                 "`python tools/reliability.py --md docs/reliability.md`; the corpus is "
                 "`explorer.testing.hostile_files` (generated, nothing shipped). Each command-line run is its own "
                 "process, the window one offscreen process.", "", *table, "", "| File | What it is | Expected |",
                 "|---|---|---|"]
        lines += [f"| `{c.name}` | {c.what} | {'opens' if c.loads else 'refused with one line'} |" for c in corpus]
        if cli["details"] or win["details"]:
            lines += ["", "Not clean:", ""] + [f"- {d}" for d in cli["details"] + win["details"]]
        Path(args.md).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
