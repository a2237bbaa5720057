"""The results of a sweep: one Parquet dataset, written incrementally, and what is read from it.

``DIR/results/part-*.parquet`` holds one row per image × model × method × setting × target
(:data:`COLUMNS`: the keys, every metric as float64 with NaN where it does not apply, the VLM
answers, the error of a failed item). Each part is written to a temporary name and renamed, so a
crash never leaves half a part; a rerun reads the keys already written (:meth:`ResultStore.done`)
and computes only the rest, so nothing is computed or written twice. ``DIR/spec.json`` pins the
SPEC's fingerprint: a folder holds the results of one SPEC. ``DIR/.lock`` keeps a second sweep
out while one runs (a lock left by a process that no longer exists is taken over).

Reading needs only pyarrow or pandas (``pandas.read_parquet("DIR/results")``) or DuckDB
(``SELECT * FROM 'DIR/results/*.parquet'``).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from explorer.core.atomic import atomic_write, write_text_atomic

__all__ = ["setting_text", "COLUMNS", "KEY", "METRIC_COLUMNS", "ResultStore", "SweepLocked", "empty_row", "summarize",
           "bootstrap_ci", "write_summary", "write_plots"]

KEY = ("item_id", "model", "method", "setting")
STRING_COLUMNS = ("item_id", "image", "model", "method", "setting", "target", "task", "params", "answer",
                  "answer_full", "error")
METRIC_COLUMNS = ("seconds", "pointing_game", "mass_inside", "deletion_auc", "random_deletion_auc", "miou",
                  "pixel_accuracy", "kept", "cosine", "top1_agree", "kl", "macs_ratio", "speedup", "ideal_speedup",
                  "object_share", "object_share_groups", "object_chance", "vqa_correct", "vqa_correct_full", "same_answer",
                  "image_tokens_kept", "image_tokens", "prefill_ratio", "logprob_drop")
COLUMNS = ("index",) + STRING_COLUMNS + METRIC_COLUMNS
# higher is better (True), lower is better (False), for plots and the summary's arrows
DIRECTION = {"pointing_game": True, "mass_inside": True, "deletion_auc": False, "miou": True, "pixel_accuracy": True,
             "cosine": True, "top1_agree": True, "kl": False, "macs_ratio": False, "speedup": True,
             "object_share": True, "vqa_correct": True, "same_answer": True, "prefill_ratio": False,
             "logprob_drop": False, "seconds": False}


def empty_row(**values: Any) -> dict[str, Any]:
    """A row with every column: strings empty, metrics NaN, then ``values``."""
    row: dict[str, Any] = {"index": -1}
    row.update({c: "" for c in STRING_COLUMNS})
    row.update({c: float("nan") for c in METRIC_COLUMNS})
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns: {', '.join(sorted(unknown))}")
    row.update(values)
    return row


def _schema():
    import pyarrow as pa

    fields = [pa.field("index", pa.int64())]
    fields += [pa.field(c, pa.string()) for c in STRING_COLUMNS]
    fields += [pa.field(c, pa.float64()) for c in METRIC_COLUMNS]
    return pa.schema(fields)


class SweepLocked(RuntimeError):
    """Another sweep writes this folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultStore:
    """The results folder of one SPEC (see the module docstring)."""

    def __init__(self, out_dir: str | Path, fingerprint: str, spec_json: dict | None = None) -> None:
        self.dir = Path(out_dir)
        self.parts = self.dir / "results"
        self.fingerprint = fingerprint
        self.spec_json = spec_json or {}
        self._locked = False

    # -- the folder -----------------------------------------------------------------------------
    def open(self) -> None:
        """Take the lock and check (or pin) the SPEC; leftovers of a crash are removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        pinned = self.dir / "spec.json"
        if pinned.is_file():
            try:
                old = json.loads(pinned.read_text()).get("fingerprint")
            except (OSError, json.JSONDecodeError):
                old = None
            if old != self.fingerprint:
                self.close()
                raise ValueError(f"{self.dir} holds the results of another SPEC (fingerprint {old}, this one "
                                 f"{self.fingerprint}): use another --out folder")
        else:
            tmp = pinned.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "spec": self.spec_json}, indent=1))
            os.replace(tmp, pinned)
        self.parts.mkdir(exist_ok=True)
        for stale in self.parts.glob(".part-*.tmp"):
            stale.unlink(missing_ok=True)

    def _lock(self) -> None:
        lock = self.dir / ".lock"
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    held = json.loads(lock.read_text())
                except (OSError, json.JSONDecodeError):
                    held = {}
                same_host = held.get("host") == me["host"]
                if same_host and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
                    lock.unlink(missing_ok=True)  # left by a process that is gone
                    continue
                raise SweepLocked(f"another sweep (process {held.get('pid', '?')} on {held.get('host', '?')}) is "
                                  f"writing {self.dir}; wait for it to finish or use another --out folder") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self._locked = True
            return
        raise SweepLocked(f"cannot lock {self.dir}")

    def close(self) -> None:
        if self._locked:
            (self.dir / ".lock").unlink(missing_ok=True)
            self._locked = False

    # -- rows -----------------------------------------------------------------------------------
    def done(self) -> tuple[set[tuple[str, str, str, str]], int]:
        """Keys (:data:`KEY`) with rows written, and the number of those rows."""
        table = self.read(columns=list(KEY))
        if table is None:
            return set(), 0
        cols = [table.column(c).to_pylist() for c in KEY]
        return set(zip(*cols)), table.num_rows

    def write(self, rows: list[dict[str, Any]]) -> Path | None:
        """Append ``rows`` as one new part (atomically); returns its path."""
        if not rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _schema()
        table = pa.Table.from_pylist([empty_row(**{k: v for k, v in r.items() if k in COLUMNS}) for r in rows],
                                     schema=schema)
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.parts / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.parts / name)
        return self.parts / name

    def read(self, columns: list[str] | None = None):
        """Every row written so far as a pyarrow Table (None when there is none)."""
        return read_results(self.dir, columns)


def read_results(out_dir: str | Path, columns: list[str] | None = None):
    """The rows of a results folder (``DIR`` or ``DIR/results``) as a pyarrow Table, or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(out_dir)
    parts_dir = root / "results" if (root / "results").is_dir() else root
    parts = sorted(parts_dir.glob("part-*.parquet"))
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p, columns=columns, schema=_schema()) for p in parts])


# -- summary --------------------------------------------------------------------------------------
def bootstrap_ci(values: np.ndarray, n: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN dropped); (nan, nan) if empty.
    Seeded, and independent of the order of ``values``."""
    v = np.sort(np.asarray(values, dtype=np.float64))  # sorted: the interval does not depend on the rows' order
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarize(table) -> list[dict[str, Any]]:
    """Per model × method × setting: rows, failures, and for every metric present the mean and
    its 95 % bootstrap interval (over the rows: images, or images × targets)."""
    df = table.to_pandas()
    out = []
    for (model, method, setting), g in df.groupby(["model", "method", "setting"], sort=True):
        ok = g[g["error"] == ""]
        entry: dict[str, Any] = {"model": model, "method": method, "setting": setting, "rows": int(len(g)),
                                 "failed": int((g["error"] != "").sum()), "task": g["task"].iloc[0],
                                 "images": int(g["item_id"].nunique())}
        for col in METRIC_COLUMNS:
            vals = ok[col].to_numpy(dtype=np.float64)
            if np.isfinite(vals).any():
                entry[col] = float(np.nanmean(vals))
                entry[f"{col}_ci"] = bootstrap_ci(vals)
        out.append(entry)
    return out


def setting_text(setting: str) -> str:
    """``{"keep": 0.25}`` -> ``keep=0.25`` (``defaults`` for an empty setting)."""
    try:
        point = json.loads(setting)
    except json.JSONDecodeError:
        return setting
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "defaults"


def write_summary(out_dir: str | Path, table, titles: dict[str, str] | None = None, command: str = "") -> Path:
    """``DIR/summary.md``: per task, one table of the metrics' means with 95 % bootstrap intervals."""
    titles = titles or {}
    entries = summarize(table)
    lines = ["# Sweep summary", ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += ["Means over rows (images, or images × targets for maps) with 95 % bootstrap intervals "
              "(1000 resamples); ↑ higher is better, ↓ lower is better.", ""]
    for task in ("maps", "reduction", "vlm"):
        rows = [e for e in entries if e["task"] == task]
        if not rows:
            continue
        metrics = [c for c in METRIC_COLUMNS if any(c in e for e in rows) and c != "random_deletion_auc"]
        head = " | ".join(f"{m} {'↑' if DIRECTION.get(m) else '↓' if m in DIRECTION else ''}".strip() for m in metrics)
        lines += [f"## {task}", "", f"| model | method | setting | images | failed | {head} |",
                  "|---|---|---|---|---|" + "---|" * len(metrics)]
        for e in rows:
            cells = []
            for m in metrics:
                if m not in e:
                    cells.append("–")
                else:
                    lo, hi = e[f"{m}_ci"]
                    cells.append(f"{e[m]:.3f} [{lo:.3f}, {hi:.3f}]")
            name = titles.get(e["method"], e["method"])
            lines.append(f"| {e['model']} | {name} | {setting_text(e['setting'])} | {e['images']} | {e['failed']} | "
                         f"{' | '.join(cells)} |")
        lines.append("")
    return write_text_atomic(Path(out_dir) / "summary.md", "\n".join(lines))


def _quality_metric(entries: list[dict]) -> str | None:
    for m in ("cosine", "vqa_correct", "pointing_game", "miou", "top1_agree"):
        if any(m in e for e in entries):
            return m
    return None


def _save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    return path


def write_plots(out_dir: str | Path, table, titles: dict[str, str] | None = None) -> list[Path]:
    """PNG plots in ``DIR``: per task, the quality metric against the keep ratio (one line per
    method, where the settings vary ``keep``) and time against quality with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    titles = titles or {}
    entries = summarize(table)
    written = []
    for task in ("reduction", "vlm", "maps"):
        rows = [e for e in entries if e["task"] == task]
        metric = _quality_metric(rows)
        if not rows or metric is None:
            continue
        by_method: dict[tuple[str, str], list[tuple[float, dict]]] = {}
        for e in rows:
            point = json.loads(e["setting"]) if e["setting"].startswith("{") else {}
            if "keep" in point and metric in e:
                by_method.setdefault((e["model"], e["method"]), []).append((float(point["keep"]), e))
        if by_method:
            fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
            for (model, method), pts in sorted(by_method.items()):
                pts.sort(key=lambda p: p[0])
                xs = [k for k, _ in pts]
                ys = [e[metric] for _, e in pts]
                lo = [e[f"{metric}_ci"][0] for _, e in pts]
                hi = [e[f"{metric}_ci"][1] for _, e in pts]
                label = titles.get(method, method) + (f" ({model})" if len({m for m, _ in by_method}) > 1 else "")
                line, = ax.plot(xs, ys, marker="o", label=label)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set_xlabel("keep ratio")
            ax.set_ylabel(f"{metric} (mean, 95 % interval)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            written.append(_save_figure(fig, Path(out_dir) / f"{task}-{metric}-vs-keep.png"))
        timed = [e for e in rows if metric in e and "seconds" in e]
        if len(timed) >= 2:
            fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
            xs = np.array([1000 * e["seconds"] for e in timed])
            ys = np.array([e[metric] for e in timed])
            better_high = DIRECTION.get(metric, True)
            ax.scatter(xs, ys, s=18, alpha=0.8)
            for e, x, y in zip(timed, xs, ys):
                ax.annotate(f"{titles.get(e['method'], e['method']).split(' (')[0]} {setting_text(e['setting'])}",
                            (x, y), fontsize=6, alpha=0.8, xytext=(3, 2), textcoords="offset points")
            order = np.argsort(xs)
            front, best = [], -np.inf
            for i in order:
                score = ys[i] if better_high else -ys[i]
                if score > best:
                    best = score
                    front.append(i)
            ax.plot(xs[front], ys[front], color="#d62728", lw=1.5, label="Pareto front (faster and better)")
            ax.set_xlabel("time per image (ms)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            written.append(_save_figure(fig, Path(out_dir) / f"{task}-pareto.png"))
    return written


def rows_of(batch: dict[str, Iterable]) -> list[dict[str, Any]]:
    """Columns (a Ray batch) -> rows."""
    cols = list(batch)
    n = len(batch[cols[0]]) if cols else 0
    out = []
    for i in range(n):
        row = {}
        for c in cols:
            v = batch[c][i]
            row[c] = v.item() if isinstance(v, np.generic) else v
        out.append(row)
    return out
