"""Train the offline demo models from scratch: ``python -m explorer.demo.train``.

    python -m explorer.demo.train                      # all five, 30 minutes each at most
    python -m explorer.demo.train --only clip --minutes 10 --threads 1

Seeded and resumable: state is kept under ``--work`` (default: a folder for ``--out`` in the
program's cache folder); running the command again continues unfinished trainings and skips
finished ones (``--fresh`` starts over). The trained models are written to ``--out`` (default
``resources/models``) as ``demo-clip/``, ``demo-sam/``, ``demo-vlm/``, ``demo-tok/`` and ``demo-tok-grid/``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from explorer.core.resources import resources_dir

from .training import StateFileError, TrainSettings, default_work_dir

MODELS = {"clip": "explorer.demo.clip_model", "sam": "explorer.demo.sam_model", "vlm": "explorer.demo.vlm_model",
          "tok": "explorer.demo.tokenizer_model:train_1d", "tok-grid": "explorer.demo.tokenizer_model:train_grid"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m explorer.demo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(MODELS), action="append", help="train only this model (repeatable)")
    ap.add_argument("--out", type=Path, default=resources_dir() / "models")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder of the resumable training state (default: one for --out in the cache folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=30.0, help="time budget per model")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--fresh", action="store_true", help="ignore saved state and start over")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out.expanduser().resolve()
    args.work = args.work.expanduser().resolve() if args.work is not None else default_work_dir(args.out)
    for kind in args.only or list(MODELS):
        work = args.work / kind
        if args.fresh and work.exists():
            shutil.rmtree(work)
        settings = TrainSettings(out_dir=args.out, work_dir=args.work, seed=args.seed, minutes=args.minutes,
                                 max_steps=args.max_steps, threads=args.threads, resume=not args.fresh)
        module_name, _, function = MODELS[kind].partition(":")
        train = getattr(importlib.import_module(module_name), function or "train")
        t = time.perf_counter()
        try:
            folder = train(settings)
        except StateFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{kind}: {folder} ({time.perf_counter() - t:.0f} s this run)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
