"""Headless commands: ``run``, ``methods``, ``plugins``, ``compare`` and the ``eval-*`` commands.

``token-explorer run IMAGE --model SPEC --method ID [--text T ...] [--param k=v ...] --out FILE``
writes a PNG overlay at the original image's size, or the raw result as ``.npz``. Everything that
can be checked without the model (the image, ``--out``, ``--query-xy`` against the image's size,
the method's parameters) is checked before any model is loaded, so bad input fails fast; what
needs the model (a block index, whether a pixel is covered by a token) fails with the valid
range. Every failure prints one line ``error: ...`` on stderr and exits non-zero (2 for bad
input, 1 for a failed model or method, or an output that could not be written); the libraries' own
log records are not printed.

Outputs (``--out``, ``--json``, the tables of the ``eval-*`` commands, the files in an output
folder) are checked before any model loads (the folder is a writable folder, or can be created;
the path is not a folder; the name fits; the extension is known) and written atomically
(:mod:`explorer.core.atomic`): a full disk or a vanished folder at the end is one ``error:`` line,
leaves no partial file and never destroys an earlier output at that path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "COMMANDS"]

from explorer.backends.specs import DEFAULT_MODEL, default_model
from explorer.core.atomic import (OutputError, check_output_dir, check_output_path, os_error_reason, save_image_atomic,
                                  write_text_atomic)

COMMANDS = ("run", "methods", "plugins", "compare", "tokenize", "replay", "sweep", "eval-demo", "eval-maps", "eval-reduction", "eval-vlm", "eval-regions", "eval-tokenizers")


class CliError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _check_out(flag: str, path: str | None, suffixes: tuple[str, ...] | None = None) -> Path | None:
    """``check_output_path`` for a command's ``flag`` (before any model loads): a bad destination
    is one ``error: --flag: ...`` line, exit code 2."""
    if path is None:
        return None
    try:
        return check_output_path(path, suffixes)
    except OutputError as exc:
        raise CliError(f"{flag}: {exc}") from None


def _check_out_dir(flag: str, path: str | None) -> Path | None:
    """``check_output_dir`` for a command's output folder ``flag`` (exit code 2 when unusable)."""
    if path is None:
        return None
    try:
        return check_output_dir(path)
    except OutputError as exc:
        raise CliError(f"{flag}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="token-explorer",
        description="See where vision transformers look. Without a command, opens the window.",
    )
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", help="run one method on one image and write an overlay PNG or an .npz")
    r.add_argument("image", help="image file")
    r.add_argument("--model", default=None, help=f"model spec (default: {DEFAULT_MODEL!r}, or $EXPLORER_MODEL); "
                   "e.g. ViT-B-16@openai, ViT-B-16@/path/ckpt.pt, hf-hub:org/repo, local-dir:/path")
    r.add_argument("--method", required=True, help="method id (see `token-explorer methods`)")
    r.add_argument("--text", action="append", default=[], help="text prompt (repeat for several); for a VLM method (--model vlm:...) the question about the image")
    r.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter (repeatable), e.g. layer=-1; `token-explorer methods -v` lists them. "
                        "Pruning/merging methods start at a third of the model's depth unless layer is given")
    r.add_argument("--query", type=int, default=None, help="query token as a sequence index (default: [CLS])")
    r.add_argument("--query-xy", default=None, metavar="X,Y",
                   help="query token: the patch under this original-image pixel (it must lie in the part of "
                        "the image the model sees, e.g. inside a center crop)")
    r.add_argument("--out", required=True, help="output .png (overlay) or .npz (raw result)")
    r.add_argument("--colormap", default=None, help="colormap for the PNG (default: viridis, or RdBu_r for signed maps)")
    r.add_argument("--opacity", type=float, default=0.6, help="overlay opacity for the PNG (0-1)")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")

    m = sub.add_parser("methods", help="list the available methods")
    m.add_argument("--family", default=None, help="only this family")
    m.add_argument("--verbose", "-v", action="store_true", help="also print each method's parameters")
    m.add_argument("--checks", action="store_true",
                   help="a Markdown table of every method's check against its authors' code (docs/official-checks.md)")

    sub.add_parser("plugins", help="list the installed plugins and the ones that failed")

    c = sub.add_parser("compare", help="compare token pruning/merging methods on one image (executed for real)")
    c.add_argument("image", help="image file")
    c.add_argument("--model", default=None, help=f"model spec (default: {DEFAULT_MODEL!r}, or $EXPLORER_MODEL)")
    c.add_argument("--methods", required=True, help="comma-separated methods, e.g. topk,tome,divprune "
                   "(`token-explorer methods --family pruning` and `--family merging` list them)")
    c.add_argument("--keep", type=float, default=None, help="keep ratio for every method (default: each method's)")
    c.add_argument("--layer", type=int, default=None,
                   help="reduction block for every method (default: a third of the model's depth, as in the "
                        "window: block 1 of the demo CLIP's 5; negative counts from the last)")
    c.add_argument("--labels", default="auto",
                   help="zero-shot label set: auto (ImageNet; scene captions for the demo model), imagenet, scenes, "
                        "or a text file with one label per line")
    c.add_argument("--out", default=None, help="grid PNG of the selections")
    c.add_argument("--json", default=None, help="metrics as JSON")
    c.add_argument("--throughput", type=int, default=None, metavar="BATCH",
                   help="also report images per second of every method and of the unreduced model at this batch size")
    c.add_argument("--quiet", action="store_true")

    tk = sub.add_parser("tokenize", help="what an image tokenizer makes of an image: ids, reconstruction, every "
                                         "token's influence map, PSNR per prefix (or one tokenizer method)")
    tk.add_argument("image", help="image file")
    tk.add_argument("--model", default="tok:demo", help="tokenizer spec (default tok:demo; tok:demo-grid, "
                                                        "tok:/folder with config.json + model.safetensors, tok:org/name)")
    tk.add_argument("--out", required=True, help="output folder")
    tk.add_argument("--method", default=None, help="run one tokenizer method instead (tok.influence, tok.attention, "
                                                   "tok.gradient, tok.prefix, tok.swap, tok.region, tok.codebook "
                                                   "with --param folder=DIR)")
    tk.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="method parameter (repeatable)")
    tk.add_argument("--token", action="append", type=int, default=[], help="token the method explains (repeatable)")
    tk.add_argument("--quiet", action="store_true", help="no progress on stderr")

    rp = sub.add_parser("replay", help="draw a saved session (File > Save session) into a folder, without a window "
                                       "or a model: view, regions, answer, comparison")
    rp.add_argument("session", help="session bundle (.tesession)")
    rp.add_argument("--out", required=True, help="output folder (created; files in it are replaced)")

    from explorer.sweep.spec import spec_reference

    sw = sub.add_parser(
        "sweep", help="run methods x settings over a dataset on Ray (resumable; Parquet results, summary, plots)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every method x setting of SPEC over its dataset and write DIR/results (Parquet, one row per "
                    "image x model x method x setting x target), DIR/summary.md and PNG plots. Rerunning with the same "
                    "SPEC and DIR computes only what is missing. Without --address Ray starts on this machine.",
        epilog="SPEC fields (TOML; a commented example: docs/sweep-example.toml):\n" + spec_reference())
    sw.add_argument("spec", help="the SPEC file (TOML)")
    sw.add_argument("--out", required=True, help="results folder (created; rerun to resume)")
    sw.add_argument("--address", default=None, help="an existing Ray cluster (ray://HOST:10001, HOST:6379 or auto)")
    sw.add_argument("--quiet", action="store_true", help="no progress on stderr")

    e = sub.add_parser("eval-demo", help="score the shipped demo models on fresh synthetic scenes")
    e.add_argument("--scenes", type=int, default=500, help="scenes per figure (default 500)")
    e.add_argument("--only", action="append", choices=["clip", "sam", "vlm"], help="only this model (repeatable)")

    em = sub.add_parser("eval-maps", help="pointing game and deletion AUC of every map method on synthetic scenes")
    em.add_argument("--model", default="demo", help="model spec (default: the demo CLIP)")
    em.add_argument("--scenes", type=int, default=500, help="two-object scenes (default 500)")
    em.add_argument("--method", action="append", default=[], help="only this method (repeatable)")
    em.add_argument("--deletion-steps", type=int, default=16, help="steps of the deletion curve (0: skip it)")
    em.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/map-methods.md)")
    em.add_argument("--results", default=None, metavar="DIR",
                       help="keep the sweep's results here (rerun to resume; default: a temporary folder)")
    em.add_argument("--workers", type=int, default=1, help="Ray workers, each holding the model (default 1)")
    em.add_argument("--address", default=None, help="an existing Ray cluster (default: Ray on this machine)")

    er = sub.add_parser("eval-reduction", help="keep-ratio sweep of every token-reduction method on synthetic scenes")
    er.add_argument("--model", default="demo", help="model spec (default: the demo CLIP)")
    er.add_argument("--scenes", type=int, default=200, help="scenes (default 200)")
    er.add_argument("--method", action="append", default=[], help="only this method (repeatable)")
    er.add_argument("--layer", type=int, default=None, help="reduction block for every method")
    er.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/token-reduction.md)")
    er.add_argument("--results", default=None, metavar="DIR",
                       help="keep the sweep's results here (rerun to resume; default: a temporary folder)")
    er.add_argument("--workers", type=int, default=1, help="Ray workers, each holding the model (default 1)")
    er.add_argument("--address", default=None, help="an existing Ray cluster (default: Ray on this machine)")

    ev = sub.add_parser("eval-vlm", help="grounding of caption words and VLM pruning accuracy on synthetic scenes")
    ev.add_argument("--model", default="vlm:demo", help="VLM spec (default: the demo VLM)")
    ev.add_argument("--scenes", type=int, default=200, help="scenes (default 200)")
    ev.add_argument("--method", action="append", default=[], help="only this pruning method (repeatable)")
    ev.add_argument("--out", default=None, help="write the markdown tables here (e.g. docs/vlm-grounding.md)")
    ev.add_argument("--results", default=None, metavar="DIR",
                       help="keep the sweep's results here (rerun to resume; default: a temporary folder)")
    ev.add_argument("--workers", type=int, default=1, help="Ray workers, each holding the model (default 1)")
    ev.add_argument("--address", default=None, help="an existing Ray cluster (default: Ray on this machine)")

    et = sub.add_parser("eval-tokenizers", help="demo tokenizers on fresh scenes: PSNR per prefix length, where "
                                                "each token's influence lands")
    et.add_argument("--model", action="append", default=[], help="tokenizer spec (repeatable; default: tok:demo and "
                                                                 "tok:demo-grid)")
    et.add_argument("--scenes", type=int, default=100, help="scenes (default 100)")
    et.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/tokenizers.md)")

    eg = sub.add_parser("eval-regions", help="one click per object: mask IoU, CLIP label top-1, VLM region caption")
    eg.add_argument("--clip", default="demo", help="CLIP spec (default: the demo CLIP)")
    eg.add_argument("--sam", default="sam:demo", help="SAM spec (default: the demo SAM)")
    eg.add_argument("--vlm", default="vlm:demo", help="VLM spec (default: the demo VLM)")
    eg.add_argument("--scenes", type=int, default=200, help="scenes (default 200)")
    eg.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/regions.md)")
    return p


def _parse_param_flags(flags: Sequence[str]) -> dict[str, str]:
    out = {}
    for flag in flags:
        name, sep, value = flag.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--param {flag!r} must look like NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def cmd_methods(args) -> int:
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    methods = host.methods(family=args.family)
    if not methods:
        print("no methods found" + (f" in family {args.family!r}" if args.family else ""))
    if args.checks:
        print(official_checks_table(methods), end="")
        return 0
    for info in methods:
        c = info.contribution
        print(f"{c.id:<28} {c.family:<12} {c.title}")
        req = ", ".join(c.requires) or "nothing"
        print(f"{'':<28} backends: {', '.join(c.backends)}; requires: {req}")
        if c.citation:
            print(textwrap.fill(c.citation, width=100, initial_indent=" " * 29, subsequent_indent=" " * 29))
        if c.adaptation:
            print(textwrap.fill("adaptation: " + c.adaptation, width=100, initial_indent=" " * 29, subsequent_indent=" " * 29))
        if args.verbose:
            check = c.official_check or "not checked against the authors' code yet"
            print(textwrap.fill("official code: " + check, width=100, initial_indent=" " * 29,
                                subsequent_indent=" " * 29))
            from explorer.plugin_host.api import param_fields
            from explorer.plugin_host.host import PluginError

            try:
                for f in param_fields(host.params_model(c.id)):
                    bounds = ""
                    if f.minimum is not None or f.maximum is not None:
                        bounds = f" [{f.minimum if f.minimum is not None else ''}..{f.maximum if f.maximum is not None else ''}]"
                    choices = f" {{{', '.join(map(str, f.choices))}}}" if f.choices else ""
                    print(f"{'':<31}--param {f.name}={f.default}{choices}{bounds}  {f.description}")
            except PluginError as exc:
                print(f"{'':<31}(parameters unavailable: {exc})")
    for name, err in host.errors:
        print(f"! {name}: {err}", file=sys.stderr)
    return 0


def official_checks_table(methods) -> str:
    """Markdown: each method, whether its output is compared with its authors' code (the golden
    file, what is equal, at which tolerance) or why not — the manifests' ``official_check``."""
    rows = ["| Method | Checked against the authors' code |", "|---|---|"]
    counts = {"golden": 0, "none": 0, "no": 0}
    for info in sorted(methods, key=lambda m: (m.contribution.family, m.id)):
        c = info.contribution
        check = c.official_check or "not checked against the authors' code yet"
        counts["golden" if check.startswith("tests/golden/") else "none" if check.startswith("none:") else "no"] += 1
        rows.append(f"| {c.title} (`{c.id}`) | {check.replace('|', '/')} |")
    head = (f"{counts['golden']} of {len(methods)} methods are compared with their authors' code through golden files "
            f"(`tests/golden/`, provenance in `tests/golden/PROVENANCE.md`); {counts['none']} have no official code to "
            f"compare with (the reason is given); {counts['no']} are not checked yet. Produced by "
            "`token-explorer methods --checks`.\n\n")
    return head + "\n".join(rows) + "\n"


def cmd_plugins(args) -> int:
    from explorer.plugin_host.host import PluginHost

    host = PluginHost()
    for rec in host.plugins:
        if rec.ok:
            ids = ", ".join(m.id for m in rec.manifest.methods)
            dist = f" [{rec.distribution}]" if rec.distribution else ""
            print(f"ok     {rec.name} {rec.manifest.version}{dist}: {ids}")
        else:
            print(f"failed {rec.name}: {rec.error}")
    for c in host.conflicts:
        print(f"conflict {c.method_id}: {c.kept!r} keeps it, {c.refused!r} refused ({c.reason})")
    return 0


def _parse_query_xy(text: str, size: tuple[int, int]) -> tuple[float, float]:
    """``--query-xy X,Y`` as original-image pixel coordinates inside an image of ``size = (H, W)``
    (checked before any model loads)."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--query-xy must be X,Y in original-image pixels, not {text!r}") from None
    h, w = size
    if not (0 <= x < w and 0 <= y < h):
        raise CliError(f"--query-xy {x:g},{y:g} is outside the {w}x{h} image (x in 0..{w - 1}, y in 0..{h - 1})")
    return x, y


def _covered_text(layout, size: tuple[int, int]) -> str:
    """Which original-image pixels the model's tokens cover, e.g. ``x 64..383, y 0..319``."""
    from explorer.core.layout import Box

    h, w = size
    box = layout.segments[0].image_rect.intersect(Box(0.0, 0.0, float(w), float(h)))
    if box is None:
        return "no pixel of the image"
    x0, y0 = int(box.x0 + 0.5), int(box.y0 + 0.5)
    x1, y1 = max(x0, int(box.x1 + 0.5) - 1), max(y0, int(box.y1 + 0.5) - 1)
    return f"x {x0}..{x1}, y {y0}..{y1}"


def cmd_run(args) -> int:
    from explorer.core.image_io import ImageLoadError, load_image

    out = _check_out("--out", args.out, (".png", ".npz"))
    if not 0.0 <= args.opacity <= 1.0:
        raise CliError("--opacity must be between 0 and 1")
    if args.query is not None and args.query_xy is not None:
        raise CliError("give --query or --query-xy, not both")
    # 1. the image, before anything heavy
    try:
        image = load_image(args.image)
    except ImageLoadError as exc:
        raise CliError(str(exc)) from None
    query_xy = _parse_query_xy(args.query_xy, image.size) if args.query_xy is not None else None
    # 2. the method and its parameters (manifest + plugin code, no model yet)
    from explorer.plugin_host.api import ParamError
    from explorer.plugin_host.defaults import default_params, is_clip_reduction
    from explorer.plugin_host.host import PluginError, PluginHost

    host = PluginHost()
    values = _parse_param_flags(args.param)
    try:
        info = host.method(args.method)
        params = host.make_params(args.method, values)
    except (ParamError, ValueError) as exc:
        raise CliError(str(exc)) from None
    except PluginError as exc:
        raise CliError(str(exc), code=1) from None
    if info.requires("text") and not args.text:
        raise CliError(f"{info.title} needs a text prompt: add --text \"...\"")
    if args.colormap is not None:
        from explorer.core.render import lookup_table

        try:
            lookup_table(args.colormap)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    # 3. the model and the run
    from explorer.backends.registry import parse_model_spec
    from explorer.core.jobs import Progress, run_sync
    from explorer.core.target import Target
    from explorer.plugin_host.engine import Engine

    try:
        spec = parse_model_spec(args.model or default_model())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    engine = Engine(host)
    live = not args.quiet and sys.stderr.isatty()  # progress redraws only on a terminal

    def show(p: Progress) -> None:
        if live and p.message:
            pct = "" if p.fraction is None else f"{100 * p.fraction:3.0f}% "
            print(f"\r{pct}{p.message:<60}", end="", file=sys.stderr, flush=True)

    try:
        backend = run_sync(engine.backend_job(spec), on_progress=show)
        if is_clip_reduction(host, args.method):  # the window's starting block, unless --param layer=
            params = default_params(host, args.method, backend.info, values)
        query = args.query
        if query_xy is not None:
            layout = backend.prepare(image).layout
            query = layout.token_at(*query_xy)
            if query is None:
                h, w = image.size
                raise CliError(f"pixel ({query_xy[0]:g}, {query_xy[1]:g}) is not covered by any image token of "
                               f"{backend.info.name}: its preprocessing keeps {_covered_text(layout, image.size)} "
                               f"of this {w}x{h} image", code=2)
        target = Target(prompts=tuple(args.text), query=query)
        result = run_sync(engine.run_job(spec, image, args.method, params, target), on_progress=show)
    except CliError:
        raise
    except ParamError as exc:  # a parameter out of range for this model (the message says the range)
        raise CliError(str(exc), code=2) from None
    except ValueError as exc:  # bad input for this model/method, model load errors
        raise CliError(str(exc), code=1) from None
    except (PluginError, RuntimeError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code=1) from None
    finally:
        if live:
            print("\r" + " " * 66 + "\r", end="", file=sys.stderr)
    try:
        _write_output(result, image, out, args, backend)
    except OutputError as exc:
        raise CliError(str(exc), code=1) from None
    if not args.quiet:
        print(f"wrote {out} ({result.label if hasattr(result, 'label') else type(result).__name__}; "
              f"model {backend.info.name} on {backend.info.device})", file=sys.stderr)
    return 0


def _write_output(result, image, out: Path, args, backend) -> None:
    from explorer.core.results import Heatmap, save_result

    meta = {"model": backend.info.spec, "method": args.method, "image_sha256": image.sha256, "device": backend.info.device,
            "demo_model": backend.info.demo}
    if out.suffix.lower() == ".npz":
        save_result(result, out, extra_meta=meta)
        return
    if not isinstance(result, Heatmap):
        raise CliError(f"{type(result).__name__} results are written as .npz; use --out FILE.npz", code=2)
    from explorer.core.render import default_colormap, heatmap_overlay_image

    vmin, vmax = result.value_range
    cmap = args.colormap or default_colormap(result.signed)
    # drawn band by band into the PNG's image: no full-size float map, no second RGB array
    save_image_atomic(out, heatmap_overlay_image(image.rgb, result, cmap, vmin, vmax, args.opacity), "PNG")


def cmd_compare(args) -> int:
    from explorer.core.image_io import ImageLoadError, load_image

    _check_out("--out", args.out, (".png",))
    _check_out("--json", args.json)
    if args.keep is not None and not 0.0 < args.keep <= 1.0:
        raise CliError("--keep must be in (0, 1]")
    if not (args.out or args.json):
        raise CliError("give --out grid.png and/or --json metrics.json")
    if args.throughput is not None and args.throughput < 1:
        raise CliError("--throughput must be a batch size of at least 1")
    try:
        image = load_image(args.image)
    except ImageLoadError as exc:
        raise CliError(str(exc)) from None
    custom: list[str] = []
    labels = args.labels
    if labels not in ("auto", "imagenet", "scenes"):
        path = Path(labels)
        if not path.is_file():
            raise CliError(f"--labels {labels!r}: not auto/imagenet/scenes and no such file")
        custom = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        labels = "custom"
    from explorer.backends.registry import parse_model_spec
    from explorer.core.jobs import run_sync
    from explorer.plugin_host.compare import compare_job, resolve_method_ids
    from explorer.plugin_host.engine import Engine
    from explorer.plugin_host.host import PluginError

    engine = Engine()
    try:
        ids = resolve_method_ids(engine, args.methods.split(","))
        spec = parse_model_spec(args.model or default_model())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        cmp = run_sync(compare_job(engine, spec, image, ids, keep=args.keep, layer=args.layer, labels=labels,
                                   custom_labels=custom, batch=args.throughput))
    except (ValueError, PluginError, RuntimeError) as exc:
        raise CliError(str(exc).splitlines()[0], code=1) from None
    for mid, err in cmp.errors.items():
        print(f"warning: {mid}: {err}", file=sys.stderr)
    if args.json:
        import json

        data = cmp.to_json()  # "layer": the block every method reduced at (given or the default)
        data.update({"image": str(args.image), "model": spec.canonical(), "keep": args.keep})
        try:
            write_text_atomic(args.json, json.dumps(data, indent=2))
        except OutputError as exc:
            raise CliError(str(exc), code=1) from None
    if args.out:
        from explorer.core.render import selection_overlay, tile_grid

        tiles = []
        for mid in ids:
            title = engine.host.method(mid).title
            if mid not in cmp.selections:
                tiles.append((title, f"failed: {cmp.errors.get(mid, '')}"[:60], image.rgb))
                continue
            m = cmp.metrics[mid].values
            sub = f"kept {int(m['kept'])}  cos {m['cosine']:.3f}  top1 {'=' if m['top1_agree'] else 'x'}  MACs {m['macs_ratio']:.2f}"
            tiles.append((title, sub, selection_overlay(image.rgb, cmp.selections[mid])))
        try:
            save_image_atomic(args.out, tile_grid(tiles), "PNG")
        except OutputError as exc:
            raise CliError(str(exc), code=1) from None
    if not args.quiet:
        how = "--layer" if args.layer is not None else "a third of the depth; --layer to change"
        print(f"reduction from block {cmp.layer} of {cmp.n_layers} ({how})")
        rate = f" {'im/s':>8}" if cmp.batch else ""
        print(f"{'method':<22} {'kept':>5} {'cosine':>7} {'top1':>5} {'KL':>7} {'MACs':>6} {'ms':>7} {'speed-up':>9} "
              f"{'ideal':>6}{rate}")
        for mid in ids:
            if mid in cmp.metrics:
                m = cmp.metrics[mid].values
                speed = f"{m['speedup']:8.2f}x {m['ideal_speedup']:5.2f}x" if "speedup" in m else f"{'':>9} {'':>6}"
                extra = f" {cmp.throughput[mid]:8.1f}" if mid in cmp.throughput else ""
                print(f"{mid:<22} {int(m['kept']):>5} {m['cosine']:7.4f} {int(m['top1_agree']):>5} {m['kl']:7.4f} "
                      f"{m['macs_ratio']:6.2f} {1000 * m['seconds']:7.1f} {speed}{extra}")
        if cmp.batch:
            print(f"unreduced model at batch {cmp.batch}: {cmp.throughput['unreduced']:.1f} images/s "
                  f"({engine.loaded_backend(spec.canonical()).device_text()})")
        print("times: the device synchronised; speed-up over the same model's unreduced blocks, next to the ideal "
              "(1 / MACs ratio)")
    return 0


def cmd_tokenize(args) -> int:
    from explorer.backends.registry import parse_model_spec
    from explorer.core.image_io import ImageLoadError, load_image

    from .tokenize import tokenize_image

    _check_out_dir("--out", args.out)

    try:
        spec = parse_model_spec(args.model, kind="tokenizer")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if spec.kind != "tokenizer":
        raise CliError(f"--model {args.model!r} is a {spec.kind} model: give a tokenizer (tok:demo, tok:demo-grid, "
                       "tok:/folder)")
    try:
        load_image(args.image)
    except ImageLoadError as exc:
        raise CliError(str(exc)) from None
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        info = tokenize_image(args.image, spec.canonical(), args.out, args.method, _parse_param_flags(args.param),
                              tuple(args.token), progress=say)
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0], code=1) from None
    if args.method:
        print(f"{Path(args.out) / (args.method + '.npz')}: {info['label']}")
    else:
        best = max(info["prefix_psnr"].values())
        print(f"{info['tokens']} tokens ({info['layout']}), reconstruction PSNR {info['psnr']:.2f} dB (best prefix "
              f"{best:.2f} dB); {Path(args.out) / 'tokens.json'}")
    return 0


def cmd_replay(args) -> int:
    from explorer.core.bundle import BundleError

    from .replay import replay_session

    _check_out_dir("--out", args.out)
    try:
        summary = replay_session(args.session, args.out)
    except BundleError as exc:
        raise CliError(str(exc), code=1) from None
    what = ", ".join(f"{kind} ({name})" for kind, name in summary["files"].items()) or "nothing to draw"
    print(f"{Path(args.out) / 'session.json'}: {what}")
    return 0


def cmd_sweep(args) -> int:
    from explorer.sweep.results import SweepLocked
    from explorer.sweep.spec import SpecError, load_spec

    _check_out_dir("--out", args.out)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        lines = str(exc).splitlines()
        raise CliError(f"{args.spec}: " + ("; ".join(lines) if len(lines) < 4 else "\n  " + "\n  ".join(lines))) from None
    from explorer.sweep.run import missing_libraries, run_sweep

    missing = missing_libraries()
    if missing:
        raise CliError(f"token-explorer sweep needs {', '.join(missing)}: pip install 'token-explorer[sweep]'")

    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    command = f"token-explorer sweep {args.spec} --out {args.out}"
    try:
        report = run_sweep(spec, args.out, address=args.address, progress=say, command=command)
    except SweepLocked as exc:
        raise CliError(str(exc), code=1) from None
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0], code=1) from None
    print(f"{report.rows_written} rows written for {report.items} items in {report.seconds:.1f} s "
          f"({report.rows_before} were there already); {Path(args.out) / 'results'}")
    for f in report.files:
        print(f"wrote {f}")
    return 0


def cmd_eval_demo(args) -> int:
    from explorer.demo.evaluate import evaluate_demo, format_report

    if args.scenes < 1:
        raise CliError("--scenes must be at least 1")
    try:
        figures = evaluate_demo(args.scenes, args.only, progress=lambda m: print(m, file=sys.stderr))
    except ValueError as exc:
        raise CliError(str(exc), code=1) from None
    print(format_report(figures, args.scenes))
    return 0


def _run_eval(args, evaluate: Callable[[Callable[[str], None]], Any], render: Callable[[Any], str]) -> int:
    """What every ``eval-*`` command does: check ``--scenes``, run ``evaluate(progress)`` (a
    ``ValueError`` becomes one ``error:`` line), render the markdown, write it to ``--out`` when
    given, print it."""
    if args.scenes < 1:
        raise CliError("--scenes must be at least 1")
    _check_out("--out", args.out)
    _check_out_dir("--results", getattr(args, "results", None))
    try:
        result = evaluate(lambda m: print(m, file=sys.stderr))
    except ValueError as exc:  # an OutputError of the sweep's results folder too
        raise CliError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code=1) from None
    text = render(result)
    if args.out:
        try:
            write_text_atomic(args.out, text)
        except OutputError as exc:
            raise CliError(str(exc), code=1) from None
    print(text)
    return 0


def _sweep_args(args) -> dict:
    """The options of the eval commands that run as sweeps."""
    from explorer.sweep.run import missing_libraries

    missing = missing_libraries()
    if missing:
        raise CliError(f"{args.command} runs as a sweep and needs {', '.join(missing)}: "
                       "pip install 'token-explorer[sweep]'")
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    return {"results_dir": args.results, "actors": args.workers, "address": args.address}


def cmd_eval_maps(args) -> int:
    from explorer.sweep.presets import evaluate_maps, markdown_table

    header = (f"Map methods on {args.scenes} synthetic two-object scenes, model `{args.model}`; pointing game: the "
              f"map's peak inside the named object's mask; deletion AUC: CLIP logit of the caption as patches are "
              f"removed in the map's order ({args.deletion_steps} steps), normalised by the unmasked score (lower is "
              f"better; a random order in brackets). Produced by `token-explorer eval-maps --scenes {args.scenes}`.")
    return _run_eval(args, lambda progress: evaluate_maps(args.model, args.scenes, methods=args.method or None,
                                                          deletion_steps=args.deletion_steps, progress=progress,
                                                          **_sweep_args(args)),
                     lambda rows: markdown_table(rows, header))


def cmd_eval_reduction(args) -> int:
    from explorer.sweep.presets import KEEPS, evaluate_reduction, reduction_table

    block = args.layer if args.layer is not None else "n_layers // 3, 1 of 5 for the demo CLIP"
    header = (f"Token reduction on {args.scenes} synthetic scenes (1-4 objects), model `{args.model}`, executed for real "
              f"(tokens removed or merged from the reduction block on: block {block}). Produced by "
              f"`token-explorer eval-reduction --scenes {args.scenes}`.")
    return _run_eval(args, lambda progress: evaluate_reduction(args.model, args.scenes, KEEPS, args.method or None,
                                                               args.layer, progress=progress, **_sweep_args(args)),
                     lambda acc: reduction_table(acc, KEEPS, header))


def cmd_eval_vlm(args) -> int:
    from explorer.sweep.presets import KEEPS, evaluate_vlm, vlm_tables

    header = (f"The VLM `{args.model}` on {args.scenes} synthetic scenes (1-4 objects), prompted for a scene caption. "
              f"Produced by `token-explorer eval-vlm --scenes {args.scenes}`.")
    return _run_eval(args, lambda progress: evaluate_vlm(args.model, args.scenes, KEEPS, args.method or None,
                                                         progress=progress, **_sweep_args(args)),
                     lambda res: vlm_tables(res, KEEPS, header))


def cmd_eval_tokenizers(args) -> int:
    from explorer.demo.evaluate_tokenizers import evaluate_tokenizer, tokenizer_table

    models = args.model or ["tok:demo", "tok:demo-grid"]
    header = (f"Tokenizers on {args.scenes} fresh synthetic scenes (64x64, 1-3 objects). PSNR of the reconstruction "
              "against the encoded image, from every token and from the first k; influence: decode with one token "
              "replaced (its tail token, or the codebook mean), |change| per pixel. Produced by "
              f"`token-explorer eval-tokenizers --scenes {args.scenes}`.")
    footer = ("\nIn the window (`python tools/screenshots.py` retakes them with the demo models): the Tokenizer dock "
              "with a token's influence and the first 8 tokens' reconstruction ([tokenizer.png](tokenizer.png)), the "
              "codebook usage of the samples folder with one code's mean region ([tokenizer-codebook.png]"
              "(tokenizer-codebook.png)), and the two demo tokenizers side by side with PSNR in a region "
              "([compare-tokenizers.png](compare-tokenizers.png)).\n")
    return _run_eval(args, lambda progress: [evaluate_tokenizer(m, args.scenes, progress=progress) for m in models],
                     lambda results: tokenizer_table(results, header) + footer)


def cmd_eval_regions(args) -> int:
    from explorer.demo.evaluate_regions import evaluate_regions, regions_table

    header = (f"Regions from one positive point per object on {args.scenes} synthetic scenes; models `{args.clip}`, "
              f"`{args.sam}`, `{args.vlm}`. Produced by `token-explorer eval-regions --scenes {args.scenes}`.")
    return _run_eval(args, lambda progress: evaluate_regions(args.clip, args.sam, args.vlm, args.scenes,
                                                             progress=progress),
                     lambda res: regions_table(res, header))


_LIBRARY_LOGGERS = ("huggingface_hub", "transformers", "urllib3", "httpx", "httpcore", "filelock", "open_clip", "timm")


def quiet_library_logging() -> None:
    """Keep the libraries' log records off stderr: the CLI reports every failure itself as one
    ``error:`` line. The root logger gets a ``NullHandler`` when it has none (open_clip logs with
    ``logging.error``, which would otherwise install a stderr handler through
    ``logging.basicConfig`` and print ``ERROR:root:`` lines, and every record after it), and the
    hub client's and the model libraries' own loggers (which carry their own handlers and print
    retries as warnings) are raised to ERROR, also through the variables those libraries read when
    they are imported later (``HF_HUB_VERBOSITY``, ``TRANSFORMERS_VERBOSITY``; a value already set
    is kept)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.ERROR:
            logger.setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logging()
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "methods":
            return cmd_methods(args)
        if args.command == "plugins":
            return cmd_plugins(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "tokenize":
            return cmd_tokenize(args)
        if args.command == "replay":
            return cmd_replay(args)
        if args.command == "eval-demo":
            return cmd_eval_demo(args)
        if args.command == "eval-maps":
            return cmd_eval_maps(args)
        if args.command == "eval-reduction":
            return cmd_eval_reduction(args)
        if args.command == "eval-vlm":
            return cmd_eval_vlm(args)
        if args.command == "eval-tokenizers":
            return cmd_eval_tokenizers(args)
        if args.command == "eval-regions":
            return cmd_eval_regions(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except OutputError as exc:  # an output that could not be written (the message names the path)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # any other file the command could not read or write: one line, no traceback
        where = f"'{exc.filename}': " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{os_error_reason(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    build_parser().print_help()
    return 2
