"""The results store and the summary: intervals, locks, atomic parts."""

import json
import os

import numpy as np
import pytest

from explorer.sweep.results import ResultStore, SweepLocked, bootstrap_ci, empty_row, read_results, summarize


def test_bootstrap_interval_holds_the_mean_and_ignores_row_order():
    v = np.random.default_rng(0).normal(0.5, 0.1, 300)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and hi - lo < 0.05
    assert bootstrap_ci(v[::-1]) == (lo, hi)
    assert bootstrap_ci(np.array([np.nan, 2.0])) == (2.0, 2.0)
    assert all(np.isnan(bootstrap_ci(np.array([np.nan]))))


def test_parts_are_atomic_and_summaries_group_by_setting(tmp_path):
    store = ResultStore(tmp_path / "out", "fp1")
    store.open()
    rows = [empty_row(item_id=str(i), model="m", method="pruning.topk", setting=json.dumps({"keep": k}),
                      task="reduction", cosine=c) for i, (k, c) in enumerate([(0.5, 0.9), (0.5, 0.7), (0.25, 0.5)])]
    rows.append(empty_row(item_id="9", model="m", method="pruning.topk", setting=json.dumps({"keep": 0.25}),
                          task="reduction", error="cannot read x"))
    store.write(rows[:2])
    store.write(rows[2:])
    assert not list((tmp_path / "out" / "results").glob(".*tmp"))
    keys, n = store.done()
    assert n == 4 and ("9", "m", "pruning.topk", '{"keep": 0.25}') in keys
    table = read_results(tmp_path / "out")
    by = {e["setting"]: e for e in summarize(table)}
    assert by['{"keep": 0.5}']["cosine"] == pytest.approx(0.8)
    assert by['{"keep": 0.25}']["failed"] == 1 and by['{"keep": 0.25}']["cosine"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown result columns"):
        empty_row(colour=1)
    store.close()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    store = ResultStore(out, "fp")
    store.open()  # the process that held it is gone
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(SweepLocked, match="another sweep"):
        ResultStore(out, "fp").open()
    store.close()
    assert not (out / ".lock").exists()
