"""Run a sweep on Ray: Ray Data feeds the items to an actor pool per model (each actor holds the
model once, :class:`~explorer.sweep.work.SweepWorker`), the driver writes the result rows as they
arrive (:class:`~explorer.sweep.results.ResultStore`), then the summary and the plots.

Without ``address`` Ray starts inside the command on this machine (and stops with it); with one
(``ray://host:10001`` or ``host:6379``, or ``auto``) the same sweep runs on that cluster, whose
nodes need this package installed. A worker that dies loses only its current batch: Ray restarts
the actor and runs the batch again (its rows reach the driver once); a failing image becomes a
row with its error. ``plain=True`` runs the same worker in this process without Ray (the
reference of ``benchmarks/sweep_scaling.py``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .datasets import categories_of, list_items
from .results import KEY, ResultStore, read_results, rows_of, write_plots, write_summary
from .spec import SweepSpec, settings_of, task_of

__all__ = ["run_sweep", "SweepReport", "plan", "gpus_for", "missing_libraries"]


@dataclass
class SweepReport:
    """What a run did: items and rows written now, rows that were there already, seconds, files."""

    items: int = 0
    items_done_before: int = 0
    rows_written: int = 0
    rows_before: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, items done) per write

    @property
    def steady_items_per_second(self) -> float:
        """Items per second between the first and the last write (start-up left out)."""
        if len(self.arrivals) < 2 or self.arrivals[-1][0] <= self.arrivals[0][0]:
            return float("nan")
        (t0, n0), (t1, n1) = self.arrivals[0], self.arrivals[-1]
        return (n1 - n0) / (t1 - t0)

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def missing_libraries() -> list[str]:
    """The libraries of the ``sweep`` extra that are not installed."""
    import importlib.util

    return [name for name in ("ray", "pyarrow", "pandas", "matplotlib") if importlib.util.find_spec(name) is None]


def plan(spec: SweepSpec, done: set, items: list[dict] | None = None, host=None) -> dict[str, list[dict]]:
    """Per model, the items with settings left to compute (``pending``: JSON list of
    ``[method, setting]``), in the dataset's order."""
    from explorer.backends.registry import parse_model_spec
    from explorer.plugin_host.host import PluginHost

    host = host or PluginHost()
    items = list_items(spec) if items is None else items
    out: dict[str, list[dict]] = {}
    for model in spec.models:
        is_vlm = parse_model_spec(model).kind == "vlm"
        settings = [s for m in spec.methods if (task_of(host.method(m.id)) == "vlm") == is_vlm for s in settings_of(m)]
        work = []
        for it in items:
            pending = [[s.method, s.key] for s in settings if (it["item_id"], model, s.method, s.key) not in done]
            if pending:
                work.append({**it, "pending": json.dumps(pending)})
        if work:
            out[model] = work
    return out


def gpus_for(spec: SweepSpec, model: str) -> float:
    """GPUs per actor: the SPEC's number, or for ``auto`` 1 when the model's device resolves to
    CUDA here (its ``device`` option, else whether this machine has CUDA)."""
    if spec.run.gpus_per_actor != "auto":
        return float(spec.run.gpus_per_actor)
    from explorer.backends.registry import parse_model_spec

    device = parse_model_spec(model).device
    if device == "cpu" or device == "mps":
        return 0.0
    if device.startswith("cuda"):
        return 1.0
    try:
        import torch
    except ImportError:
        return 0.0
    return 1.0 if torch.cuda.is_available() else 0.0


def _quiet_ray() -> None:
    """Ray's own progress and notices off (the sweep prints one progress line of its own); its
    errors still show."""
    for name in ("ray", "ray.data", "ray._private", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False


def run_sweep(spec: SweepSpec, out_dir: str | Path, address: str | None = None,
              progress: Callable[[str], None] | None = None, plain: bool = False,
              command: str = "") -> SweepReport:
    """Compute what ``out_dir`` lacks of ``spec`` and write it (see the module docstring)."""
    from explorer.plugin_host.host import PluginHost

    say = progress or (lambda _m: None)
    store = ResultStore(out_dir, spec.fingerprint(), spec.model_dump(mode="json", exclude={"base"}))
    store.open()
    report = SweepReport()
    started_ray = False
    try:
        host = PluginHost()
        items = list_items(spec)
        done, report.rows_before = store.done()
        work = plan(spec, done, items, host)
        total_items = len(items)
        pending_items = {it["item_id"] for rows in work.values() for it in rows}
        report.items_done_before = total_items - len(pending_items)
        categories = categories_of(spec)
        spec_data = spec.model_dump(mode="json")
        if report.items_done_before:
            say(f"{report.items_done_before} of {total_items} items already done in {out_dir}")
        t0 = time.perf_counter()
        written: set = set(done)
        seen: set[str] = set()

        def take(batch: dict[str, Any]) -> None:
            rows = [r for r in rows_of(batch) if tuple(str(r[k]) for k in KEY) not in written]
            if not rows:
                return
            store.write(rows)
            written.update(tuple(str(r[k]) for k in KEY) for r in rows)
            report.rows_written += len(rows)
            seen.update(str(r["item_id"]) for r in rows)
            n = len(seen)
            report.arrivals.append((time.perf_counter() - t0, n))
            rate = n / max(time.perf_counter() - t0, 1e-9)
            left = len(pending_items) - n
            eta = f", ETA {left / rate:.0f} s" if rate > 0 and left > 0 else ""
            say(f"{n + report.items_done_before}/{total_items} items, {rate:.2f} items/s{eta}")

        if work and not plain:
            import ray

            _quiet_ray()
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                         configure_logging=True)
                started_ray = True
        for model, rows in work.items():
            if plain:
                from .work import SweepWorker

                worker = SweepWorker(spec_data, model, categories)
                for i in range(0, len(rows), spec.run.batch_size):
                    chunk = rows[i:i + spec.run.batch_size]
                    take(worker({k: [r[k] for r in chunk] for k in chunk[0]}))
                continue
            import ray.data

            from .work import SweepWorker

            ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / spec.run.batch_size)))
            mapped = ds.map_batches(SweepWorker, fn_constructor_kwargs={"spec": spec_data, "model": model,
                                                                          "categories": categories},
                                    batch_size=spec.run.batch_size,
                                    compute=ray.data.ActorPoolStrategy(size=spec.run.actors),
                                    num_cpus=spec.run.cpus_per_actor, num_gpus=gpus_for(spec, model),
                                    batch_format="numpy")
            for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
                take(batch)
        report.items = len(seen)
        report.seconds = time.perf_counter() - t0
        table = read_results(out_dir)
        if table is not None:
            titles = {m.id: m.title for m in host.methods()}
            report.files.append(str(write_summary(out_dir, table, titles, command)))
            report.files += [str(p) for p in write_plots(out_dir, table, titles)]
        return report
    finally:
        store.close()
        if started_ray:
            import ray

            ray.shutdown()
