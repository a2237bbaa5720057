"""Faulty and hostile plugins: a package installed beside the program (a real ``.dist-info`` with
its RECORD, found by ``importlib.metadata``) that impersonates a built-in method, runs code when
imported, returns maps that cannot be drawn, calls ``sys.exit`` and raises in ``capture()``. Each
fault is contained: refused, listed, or a :class:`PluginError` naming the method."""

from __future__ import annotations

import csv
import importlib.metadata as md
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from explorer.core.jobs import run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.host import BUILTIN_DISTRIBUTION, PluginError, PluginHost

MANIFEST = """
name = "faulty"
version = "0.1"
[[methods]]
id = "attention.rollout"
title = "Impostor rollout"
family = "attention"
python_name = "faulty.sub.impl:Impostor"
{methods}
"""

FAULTS = {  # method id -> (class name, body of run())
    "faulty.nan": ("NanMap", "return Heatmap(layout=trace.layout, token_values=np.full(n, np.nan))"),
    "faulty.inf": ("InfMap", "v = np.arange(n, dtype=float); v[0] = np.inf\n        return Heatmap(layout=trace.layout, token_values=v)"),
    "faulty.zero": ("ZeroMap", "return Heatmap(layout=trace.layout, token_values=np.zeros(n))"),
    "faulty.labels": ("BadLabels", "return LabelMap(layout=trace.layout, labels=np.full(n, 7), class_names=('a', 'b'))"),
    "faulty.order": ("BadOrder", "return TokenSelection(layout=trace.layout, kept=np.ones(n, bool), order=np.arange(n) + 5)"),
    "faulty.exit": ("Exits", "sys.exit(3)"),
    "faulty.good": ("Ramp", "return Heatmap(layout=trace.layout, token_values=np.arange(n, dtype=float))"),
    "faulty.osexit": ("OsExit", "import os; os._exit(42)"),
    "faulty.segv": ("Segfault", "import ctypes; ctypes.string_at(0)"),
    "faulty.hang": ("Hangs", "import time; time.sleep(3600)"),
    "faulty.keyerror": ("KeyErr", "return {}['missing']"),
}

IMPL = '''
import sys
import numpy as np
from explorer.core.results import Heatmap, LabelMap, TokenSelection
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method

class Impostor(Method):
    def run(self, trace, params, *, target, cancel, backend=None):
        n = trace.layout.n_image_tokens
        return Heatmap(layout=trace.layout, token_values=np.arange(n, dtype=float))

class CaptureKeyError(Method):
    def capture(self, params, model, target):
        return {}["missing"]
    def run(self, trace, params, *, target, cancel, backend=None):
        return None
'''


def _install(site: Path, name: str = "faulty") -> Path:
    """Write the package and its ``.dist-info`` (METADATA, entry_points.txt, RECORD) as pip would."""
    pkg = site / name
    (pkg / "sub").mkdir(parents=True)
    marker = site / "imported.txt"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('package imported\\n')\n")
    (pkg / "sub" / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('sub imported\\n')\n")
    methods = "".join(
        f'[[methods]]\nid = "{mid}"\ntitle = "{cls}"\nfamily = "attention"\npython_name = "{name}.sub.impl:{cls}"\n'
        for mid, (cls, _) in FAULTS.items())
    methods += f'[[methods]]\nid = "faulty.capture"\ntitle = "Capture fails"\nfamily = "attention"\npython_name = "{name}.sub.impl:CaptureKeyError"\n'
    (pkg / "sub" / "manifest.toml").write_text(MANIFEST.format(methods=methods))
    impl = IMPL + "".join(
        f"\nclass {cls}(Method):\n    def run(self, trace, params, *, target, cancel, backend=None):\n"
        f"        n = trace.layout.n_image_tokens\n        {body}\n" for cls, body in FAULTS.values())
    (pkg / "sub" / "impl.py").write_text(impl)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[explorer.plugins]\nfaulty = {name}.sub:manifest.toml\n")
    files = [p for p in site.rglob("*") if p.is_file() and p != marker]
    with open(info / "RECORD", "w", newline="") as f:
        w = csv.writer(f)
        for p in files:
            w.writerow([p.relative_to(site).as_posix(), "", ""])
        w.writerow([f"{info.name}/RECORD", "", ""])
    return marker


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    marker = _install(site)
    monkeypatch.syspath_prepend(str(site))
    return site, marker


def test_listing_runs_no_plugin_code_and_builtins_keep_their_ids(faulty):
    site, marker = faulty
    host = PluginHost()
    assert not marker.exists(), marker.read_text()  # neither faulty/__init__ nor faulty/sub/__init__ ran
    rec = next(r for r in host.plugins if r.name == "faulty")
    assert rec.ok and rec.distribution == "faulty" and rec.manifest_path == site / "faulty" / "sub" / "manifest.toml"
    rollout = host.method("attention.rollout")
    assert rollout.plugin == "attention-rollout" and rollout.title != "Impostor rollout"
    assert any(r.name == "attention-rollout" and r.distribution == BUILTIN_DISTRIBUTION for r in host.plugins)
    (c,) = host.conflicts
    assert (c.method_id, c.kept, c.refused) == ("attention.rollout", "attention-rollout", "faulty")
    assert any(name == "faulty" and "attention.rollout" in msg for name, msg in host.errors)
    assert host.method("faulty.good").plugin == "faulty"  # its other methods stay
    # a user who wants the other implementation says so
    preferred = PluginHost(prefer={"attention.rollout": "faulty"})
    assert preferred.method("attention.rollout").title == "Impostor rollout"
    assert preferred.conflicts[0].refused == "attention-rollout"


def test_the_plugins_command_lists_the_conflict_without_importing(faulty):
    site, marker = faulty
    env_path = str(site)
    code = ("import sys; sys.path.insert(0, %r); from explorer.cli.main import main; sys.exit(main(['plugins']))"
            % env_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "conflict attention.rollout: 'attention-rollout' keeps it, 'faulty' refused" in out.stdout
    assert not marker.exists()


@pytest.mark.parametrize("method_id, message", [
    ("faulty.nan", r"NanMap \(faulty\) returned a map with no finite value"),
    ("faulty.inf", r"InfMap \(faulty\) returned a map with 1 infinite value"),
    ("faulty.zero", r"ZeroMap \(faulty\) returned a constant map \(every value 0\)"),
    ("faulty.labels", r"BadLabels \(faulty\) returned labels outside the 2 classes"),
    ("faulty.order", r"BadOrder \(faulty\) returned an order with token indices outside"),
    ("faulty.exit", r"Exits \(faulty\) called sys.exit\(3\)"),
])
def test_results_that_cannot_be_drawn_are_refused_by_name(faulty, tiny_clip, make_image, method_id, message):
    host = PluginHost()
    trace = run_sync(tiny_clip.trace(make_image(64, 64), CaptureSpec()))
    with pytest.raises(PluginError, match=message):
        run_sync(host.run(method_id, trace, host.make_params(method_id), target=Target()))
    good = run_sync(host.run("faulty.good", trace, host.make_params("faulty.good"), target=Target()))
    assert np.isfinite(good.token_values).all()  # the host goes on


def test_capture_failures_name_the_method(faulty, tiny_clip, make_image):
    from explorer.plugin_host.engine import Engine

    engine = Engine(PluginHost())
    engine.adopt(tiny_clip)
    with pytest.raises(PluginError, match=r"Capture fails \(faulty\) failed in capture\(\): KeyError"):
        run_sync(engine.run_job(tiny_clip.info.spec, make_image(64, 64), "faulty.capture", {}, Target()))


def test_installed_distribution_is_found_by_metadata(faulty):
    site, _ = faulty
    dist = md.distribution("faulty")
    assert any(str(f) == "faulty/sub/manifest.toml" for f in dist.files)


@pytest.mark.parametrize("method_id, message", [
    ("faulty.osexit", r"OsExit \(faulty\) crashed: the worker process exited with code 42; the program goes on"),
    ("faulty.segv", r"Segfault \(faulty\) crashed: the worker process died \(a segmentation fault, SIGSEGV\)"),
    ("faulty.keyerror", r"KeyErr \(faulty\) failed: KeyError: 'missing'"),
])
def test_a_method_that_kills_its_process_takes_only_its_worker(faulty, tiny_clip, make_image, method_id, message):
    host = PluginHost()
    assert host.isolated(method_id) and not host.isolated("attention.rollout")
    trace = run_sync(tiny_clip.trace(make_image(64, 64), CaptureSpec()))
    with pytest.raises(PluginError, match=message):
        run_sync(host.run(method_id, trace, host.make_params(method_id), target=Target()))
    # this process is alive, and the plugin's next method gets a fresh worker
    good = run_sync(host.run("faulty.good", trace, host.make_params("faulty.good"), target=Target()))
    assert good.token_values.shape == (trace.layout.n_image_tokens,)
    host.close()


def test_cancel_ends_a_hung_method_within_half_a_second(faulty, tiny_clip, make_image):
    import threading
    import time

    from explorer.core.jobs import CancelToken, Cancelled

    host = PluginHost()
    trace = run_sync(tiny_clip.trace(make_image(64, 64), CaptureSpec()))
    run_sync(host.run("faulty.good", trace, host.make_params("faulty.good"), target=Target()))  # worker started
    cancel = CancelToken()
    out = {}

    def hang():
        try:
            run_sync(host.run("faulty.hang", trace, host.make_params("faulty.hang"), target=Target(), cancel=cancel))
        except Cancelled:
            out["ended"] = time.perf_counter()

    t = threading.Thread(target=hang)
    t.start()
    time.sleep(1.0)
    worker = host._isolation._workers["faulty"].process
    assert worker.is_alive()
    asked = time.perf_counter()
    cancel.cancel()
    t.join(5)
    assert not t.is_alive() and out["ended"] - asked < 0.5, out
    assert not worker.is_alive()  # killed, not left running
    # the slot is free: the next call runs at once in a new worker
    good = run_sync(host.run("faulty.good", trace, host.make_params("faulty.good"), target=Target()))
    assert np.isfinite(good.token_values).all()
    host.close()
