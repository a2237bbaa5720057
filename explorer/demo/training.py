"""Shared pieces of the demo-model trainers: seeding, a resumable time-boxed run, schedules.

A :class:`ResumableRun` keeps ``step``, the accumulated training seconds, and the model,
optimizer and RNG states in ``workdir/<name>/state.pt`` (written atomically every
``save_every`` steps and at the end), so an interrupted training continues where it stopped and
a finished one is not repeated. The budget (``minutes``, ``max_steps``) counts across resumes.

The state holds only tensors and plain Python values (the NumPy RNG state as a tensor), and it is
read back with ``torch.load(weights_only=True)``: a file that holds anything else (code, pickled
objects) is refused with one line (:class:`StateFileError`), never unpickled. The work folder is
made absolute when the run starts, so what resumes is the folder that was named.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["seed_everything", "ResumableRun", "StateFileError", "default_work_dir", "cosine_lr", "TrainSettings"]


class StateFileError(ValueError):
    """A saved training state could not be resumed; the message is one line naming the file."""


def default_work_dir(out_dir: str | os.PathLike) -> Path:
    """Where the training state of models written to ``out_dir`` is kept when no work folder is
    named: in the program's cache folder, under a name made from the absolute ``out_dir`` (never a
    path relative to the working directory, so no other folder's state is ever resumed)."""
    import hashlib

    from explorer.core.resources import cache_dir

    out = Path(out_dir).expanduser().resolve()
    tag = hashlib.sha256(str(out).encode()).hexdigest()[:12]
    return cache_dir() / "demo-training" / f"{out.name or 'root'}-{tag}"


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


def _numpy_state_to(state: tuple) -> dict[str, Any]:
    """NumPy's legacy RNG state ``(name, keys uint32 (624,), pos, has_gauss, cached_gaussian)`` as
    plain values and a tensor, which ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from(saved: dict[str, Any]) -> tuple:
    keys = saved["keys"].numpy().astype(np.uint32)
    return (saved["name"], keys, int(saved["pos"]), int(saved["has_gauss"]), float(saved["cached_gaussian"]))


class ResumableRun:
    """Step counter, time budget and checkpointing for one trainer (see module docstring)."""

    def __init__(self, settings: TrainSettings, name: str, total_steps: int) -> None:
        self.settings = settings
        self.name = name
        self.total_steps = int(settings.max_steps or total_steps)
        self.dir = Path(settings.work_dir).expanduser().resolve() / name
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
        """Load the saved state if resuming; returns True when something was restored.

        Raises
        ------
        StateFileError
            The file holds objects other than tensors and plain values (refused unread), or it
            is damaged or of another layout.
        """
        if not (self.settings.resume and self.path.is_file()):
            return False
        fresh = "start over with --fresh"
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise StateFileError(f"{self.path} holds code or objects that are not plain tensors; refused (only "
                                 f"weights are loaded): {fresh}") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            lines = str(exc).strip().splitlines()
            raise StateFileError(f"{self.path} could not be read ({lines[0] if lines else type(exc).__name__}): "
                                 f"{fresh}") from None
        if not isinstance(state, dict) or not {"model", "step", "seconds"} <= state.keys():
            raise StateFileError(f"{self.path} is not a training state of this program: {fresh}")
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
            np.random.set_state(_numpy_state_from(rng["numpy"]))
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
            "rng": {"python": random.getstate(), "numpy": _numpy_state_to(np.random.get_state()),
                    "torch": torch.get_rng_state()},
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
