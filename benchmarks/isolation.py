"""What running a method in a worker process costs, and how fast Cancel ends a hung one.

* per built-in trace-only method (no model calls), on the demo CLIP's trace of the sample scene:
  the median time of a call in the program's process and in its plugin's worker process (the
  worker already started: the trace is copied to it and the result back), and their ratio;
* the worker's start (paid once per plugin);
* Cancel latency: a method that never returns (a plugin written to a temporary folder) is
  cancelled; the time from the cancel to the job's end, and whether its worker was killed.

    python benchmarks/isolation.py [--repeat 15] [--md docs/isolation.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("attention.raw", "attention.rollout", "attention.flow", "selection.random")


def _hang_plugin(site: Path) -> None:
    pkg = site / "bench_hang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "manifest.toml").write_text(textwrap.dedent('''
        name = "bench-hang"
        version = "0.1"
        [[methods]]
        id = "bench.hang"
        title = "Never returns"
        family = "attention"
        python_name = "bench_hang.impl:Hang"
        '''))
    (pkg / "impl.py").write_text(textwrap.dedent('''
        import time
        from explorer.plugin_host.api import Method
        class Hang(Method):
            def run(self, trace, params, *, target, cancel, backend=None):
                time.sleep(3600)
        '''))
    info = site / "bench_hang-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-hang\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[explorer.plugins]\nbench-hang = bench_hang:manifest.toml\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--md", default=None, help="write the table here")
    args = p.parse_args(argv)

    from explorer.core.image_io import load_image
    from explorer.core.jobs import CancelToken, Cancelled, run_sync
    from explorer.core.target import Target
    from explorer.core.trace import CaptureSpec
    from explorer.plugin_host.engine import Engine
    from explorer.plugin_host.host import PluginHost

    site = Path(tempfile.mkdtemp(prefix="explorer-bench-"))
    _hang_plugin(site)
    sys.path.insert(0, str(site))
    here, there = PluginHost(), PluginHost()
    here.isolate, there.isolate = "none", "all"
    engine = Engine(here)
    image = load_image(ROOT / "resources" / "samples" / "scene-01.png")
    backend = run_sync(engine.backend_job("demo"))
    trace = run_sync(engine.trace_job(backend, image, CaptureSpec.everything(backend.info.n_layers)))
    methods = [m for m in METHODS if m in {i.id for i in here.methods()} and there.isolated(m)]
    rows = []
    for mid in methods:
        params = here.make_params(mid)
        t0 = time.perf_counter()
        run_sync(there.run(mid, trace, params, target=Target()))  # starts the worker
        start = time.perf_counter() - t0
        times = {}
        for name, host in (("in process", here), ("worker", there)):
            ts = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                run_sync(host.run(mid, trace, params, target=Target()))
                ts.append(time.perf_counter() - t)
            times[name] = statistics.median(ts)
        rows.append((mid, times["in process"], times["worker"], start))
        print(f"{mid}: in process {1e3 * times['in process']:.1f} ms, worker {1e3 * times['worker']:.1f} ms "
              f"({times['worker'] / times['in process']:.2f}x), first call with the worker's start {start:.2f} s")

    hang = PluginHost()
    cancel = CancelToken()
    out: dict[str, float] = {}

    def run_hang():
        try:
            run_sync(hang.run("bench.hang", trace, hang.make_params("bench.hang"), target=Target(), cancel=cancel))
        except Cancelled:
            out["ended"] = time.perf_counter()

    th = threading.Thread(target=run_hang)
    th.start()
    time.sleep(2.0)
    worker = hang._isolation._workers["bench-hang"].process
    asked = time.perf_counter()
    cancel.cancel()
    th.join(10)
    latency = out.get("ended", float("nan")) - asked
    killed = not worker.is_alive()
    print(f"cancel of a hung method: ended {1e3 * latency:.0f} ms after the cancel (target 500 ms); worker killed: {killed}")
    for h in (here, there, hang):
        h.close()

    if args.md:
        lines = ["# Methods in a worker process", "",
                 f"`python benchmarks/isolation.py --repeat {args.repeat}` on the demo CLIP's trace of "
                 "resources/samples/scene-01.png (every layer captured), this machine's CPU. Median of "
                 f"{args.repeat} calls; the worker already started.", "",
                 "| Method | In process (ms) | In a worker (ms) | Ratio | First call, with the worker's start (s) |",
                 "|---|---|---|---|---|"]
        lines += [f"| {m} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.2f}x | {s:.2f} |" for m, a, b, s in rows]
        lines += ["", f"Cancel of a method that never returns: the job ended {1e3 * latency:.0f} ms after the cancel "
                      f"(target 500 ms); its worker process was {'killed' if killed else 'NOT killed'}.", ""]
        Path(args.md).write_text("\n".join(lines))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
