"""Shared pieces of the demo-model trainers: seeding, a resumable time-boxed run, schedules.

A :class:`ResumableRun` keeps ``step``, the accumulated training seconds, and the model,
optimizer and RNG states in ``workdir/<name>/state.pt`` (written atomically every
``save_every`` steps and at the end), so an interrupted training continues where it stopped and
a finished one is not repeated. The budget (``minutes``, ``max_steps``) counts across resumes.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["seed_everything", "ResumableRun", "cosine_lr", "TrainSettings"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.05) -> float:
    """Linear warm-up then cosine decay to ``floor * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainSettings:
    """Options every trainer takes (the command line of ``python -m explorer.demo.train``)."""

    out_dir: Path
    work_dir: Path
    seed: int = 0
    minutes: float = 30.0
    max_steps: int | None = None
    threads: int | None = None
    resume: bool = True
    log_every: int = 50
    save_every: int = 200
    extra: dict[str, Any] = field(default_factory=dict)


class ResumableRun:
    """Step counter, time budget and checkpointing for one trainer (see module docstring)."""

    def __init__(self, settings: TrainSettings, name: str, total_steps: int) -> None:
        self.settings = settings
        self.name = name
        self.total_steps = int(settings.max_steps or total_steps)
        self.dir = Path(settings.work_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.pt"
        self.step = 0
        self.seconds = 0.0
        self._t0 = time.perf_counter()
        self._seconds_at_start = 0.0
        self.finished = False
        self.history: list[dict[str, float]] = []

    # -- budget ---------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self._seconds_at_start + (time.perf_counter() - self._t0)

    def should_stop(self) -> bool:
        return self.step >= self.total_steps or self.elapsed >= self.settings.minutes * 60.0

    # -- state ----------------------------------------------------------------------------------
    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Load the saved state if resuming; returns True when something was restored."""
        if not (self.settings.resume and self.path.is_file()):
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=False)  # our own file
        model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self._seconds_at_start = float(state["seconds"])
        self.finished = bool(state.get("finished", False))
        self.history = list(state.get("history", []))
        rng = state.get("rng")
        if rng:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        self._t0 = time.perf_counter()
        log.info("%s: resumed at step %d (%.0f s trained)", self.name, self.step, self._seconds_at_start)
        return True

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, finished: bool = False) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "step": self.step,
            "seconds": self.elapsed,
            "finished": finished,
            "history": self.history,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.finished = finished

    def log(self, **values: float) -> None:
        entry = {"step": float(self.step), "seconds": round(self.elapsed, 1), **{k: float(v) for k, v in values.items()}}
        self.history.append(entry)
        log.info("%s step %d/%d %.0fs %s", self.name, self.step, self.total_steps, self.elapsed,
                 " ".join(f"{k}={v:.4g}" for k, v in values.items()))
