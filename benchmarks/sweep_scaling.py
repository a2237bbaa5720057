"""How a sweep scales here: images per second with 1 and 2 Ray workers, and the Ray path against
the same work in a plain loop in one process.

Each configuration runs in a fresh process on the same SPEC (``--scenes`` synthetic scenes at
224x224, the demo CLIP, Top-K at keep 0.5 and MaskCLIP with two objects per scene, its pointing game
and an 8-step deletion curve per object) into a fresh
results folder:

* ``plain``: :func:`explorer.sweep.run.run_sweep` with ``plain=True`` (the worker called in a loop),
  torch on one thread;
* ``ray-1``: Ray started inside, one worker with one CPU (torch on one thread: the same compute);
* ``ray-2``: two workers with one CPU each.

Reported: wall time from the call to the summary, and the steady rate between the first and the
last rows written (start-up — Ray, the workers' imports and model load — left out).

    python benchmarks/sweep_scaling.py [--scenes 200] [--md docs/sweep-scaling.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"plain": {"plain": True, "actors": 1}, "ray-1": {"plain": False, "actors": 1},
           "ray-2": {"plain": False, "actors": 2}}


def spec_dict(scenes: int, actors: int) -> dict:
    return {"models": ["demo"], "dataset": {"kind": "synthetic", "count": scenes, "objects": 2, "size": [224, 224]},
            "methods": [{"id": "pruning.topk", "grid": {"keep": [0.5]}},
                        {"id": "similarity.maskclip", "params": {"templates": "none"}}],
            "metrics": ["cosine", "top1_agree", "kept", "pointing_game", "deletion_auc"],
            "run": {"batch_size": 8, "actors": actors, "cpus_per_actor": 1, "gpus_per_actor": 0, "deletion_steps": 8}}


def child(config: str, scenes: int, out: str) -> dict:
    cfg = CONFIGS[config]
    if cfg["plain"]:
        import torch

        torch.set_num_threads(1)
    from explorer.sweep.run import run_sweep
    from explorer.sweep.spec import load_spec

    spec = load_spec(spec_dict(scenes, cfg["actors"]))
    t0 = time.perf_counter()
    report = run_sweep(spec, out, plain=cfg["plain"])
    return {"config": config, "wall": time.perf_counter() - t0, "items": report.items,
            "steady": report.steady_items_per_second, "rows": report.rows_written}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--md", default=None, help="also write the table here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.scenes, args.out)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in CONFIGS:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, __file__, "--child", config, "--scenes", str(args.scenes),
                                   "--out", str(Path(tmp) / config)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[config]
            print(f"{config}: {r['items']} items, wall {r['wall']:.1f} s ({r['items'] / r['wall']:.2f} items/s), "
                  f"steady {r['steady']:.2f} items/s", file=sys.stderr)
    plain, one, two = results["plain"], results["ray-1"], results["ray-2"]
    lines = [f"# Sweep scaling\n\nMeasured by `python benchmarks/sweep_scaling.py --scenes {args.scenes}` on "
             f"{os.cpu_count()} CPU cores: {args.scenes} synthetic scenes at 224x224, the demo CLIP, Top-K keep 0.5 "
             "and MaskCLIP on two objects per scene with an 8-step deletion curve each (3 rows per scene); every run in a fresh process, one torch "
             "thread per worker.\n",
             "| Run | Wall (s) | Items/s end to end | Items/s steady |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['wall']:.1f} | {r['items'] / r['wall']:.2f} | {r['steady']:.2f} |")
    lines += ["", "| Figure | Measured | Target |", "|---|---|---|",
              f"| 2 workers / 1 worker, steady | {two['steady'] / one['steady']:.2f}x | >= 1.7x |",
              f"| 2 workers / 1 worker, end to end | {(two['items'] / two['wall']) / (one['items'] / one['wall']):.2f}x | |",
              f"| Ray (1 worker) time / plain loop time, steady | {plain['steady'] / one['steady']:.2f}x | <= 1.15x |",
              f"| Ray (1 worker) time / plain loop time, end to end | {one['wall'] / plain['wall']:.2f}x | |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
