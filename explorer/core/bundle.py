"""Session bundles: one file that saves what a :class:`~explorer.core.session.SessionModel` shows
and opens it again to the same view.

A bundle is a zip archive (``.tesession``) written to a temporary file next to its destination and
moved into place (``os.replace``), so a crash or a full disk never leaves half a bundle and never
destroys an earlier one. It holds:

* ``session.json``: ``schema_version``, the image's path (absolute and relative to the bundle) and
  SHA-256, the model specs per kind, the method and every method's parameters, the prompts, the
  query, the display, the regions (COCO run-length encoding with their names, visibility, scores,
  captions and labels), the VLM answer's text, tokens and layout, and the comparison's methods,
  metrics and errors;
* ``view.npz``: the result on the canvas; ``vlm.npz``: the answer's attention rows;
  ``compare/<i>.npz``: each compared method's result (the results are stored, so a bundle reopens
  to the same maps without loading a model).

A bundle from a newer schema, or a damaged one, is refused with :class:`BundleError` (one line);
nothing of the current session changes then.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import OutputError, atomic_write
from .generation import Generation
from .image_io import LoadedImage, load_image
from .layout import TokenLayout
from .regions import RegionSet, rle_decode, rle_encode, rle_from_string, rle_to_string
from .results import jsonable, load_result, save_result
from .session import SessionModel, View, VlmAnswer
from .trace import CaptureSpec, ModelInfo, Trace

__all__ = ["SCHEMA_VERSION", "BundleError", "save_session", "read_bundle", "apply_bundle", "Bundle", "SUFFIX"]

SCHEMA_VERSION = 1
SUFFIX = ".tesession"


class BundleError(ValueError):
    """A bundle that cannot be written or read; the message is one line."""


@dataclass
class Bundle:
    """A bundle read into memory: its JSON, its results, and the image it refers to."""

    data: dict
    image: LoadedImage
    image_path: str
    view: Any | None
    vlm_arrays: dict[str, np.ndarray]
    compare: dict[str, Any]


def _json(value: Any) -> Any:
    return jsonable(value, strict=True)


# -- writing -------------------------------------------------------------------------------------
def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _result_bytes(result: Any) -> bytes:
    buf = io.BytesIO()
    save_result(result, buf)
    return buf.getvalue()


def _regions_json(regions: RegionSet | None) -> list[dict]:
    if regions is None:
        return []
    out = []
    for r in regions:
        rle = rle_encode(r.mask)
        out.append({"id": r.id, "name": r.name, "visible": r.visible, "score": r.score, "caption": r.caption,
                    "labels": [[n, float(p)] for n, p in r.labels], "prompt": _json(r.prompt),
                    "rle": {"size": rle["size"], "counts": rle_to_string(rle["counts"])}})
    return out


def save_session(model: SessionModel, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (``.tesession`` added when missing), atomically."""
    if model.image is None:
        raise BundleError("nothing to save: open an image first")
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    files: dict[str, bytes] = {}
    image_path = str(Path(model.image_path).resolve()) if model.image_path else None
    relative = None
    if image_path:
        try:
            relative = os.path.relpath(image_path, path.resolve().parent)
        except ValueError:  # another drive (Windows)
            relative = None
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "app": "token-explorer",
        "image": {"path": image_path, "relative": relative, "sha256": model.image.sha256,
                  "size": list(model.image.size)},
        "models": {k: (s.spec or s.wanted) for k, s in model.models.items()},
        "method": model.method_id,
        "params": {mid: p.model_dump(mode="json") for mid, p in model.params.items() if hasattr(p, "model_dump")},
        "prompts": list(model.prompts),
        "query": model.query,
        "display": {"colormap": model.colormap, "opacity": model.opacity, "overlay": model.overlay},
        "regions": _regions_json(model.regions),
        "region_id": model.region_id,
        "compare_mode": model.compare_mode,
        "compare_checked": model.compare_checked,
        "compare_keep": model.compare_keep,
        "compare_layer": model.compare_layer,
    }
    view = model.view
    if view.result is not None:
        files["view.npz"] = _result_bytes(view.result)
        data["view"] = {"method": view.method_id, "file": "view.npz", "model": view.model_spec}
    if model.vlm is not None:
        gen = model.vlm.generation
        data["vlm"] = {"spec": model.vlm.spec, "prompt": model.vlm.prompt, "max_new_tokens": model.vlm.max_new_tokens,
                       "tokens": list(model.vlm.tokens), "image_sha256": model.vlm.image_sha256,
                       "layout": model.vlm.trace.layout.to_dict(), "model": _model_info_json(model.vlm.trace.model),
                       "ids": list(gen.ids), "token_strings": list(gen.tokens), "text": gen.text,
                       "prefill_seconds": gen.prefill_seconds, "seconds": gen.seconds, "prompt_length": gen.prompt_length,
                       "logprob": gen.logprob, "decode_seconds": gen.decode_seconds, "device": gen.device,
                       "attention_layers": sorted(int(l) for l in gen.attention),
                       "capture_note": model.vlm.trace.extras.get("capture_note", "")}
        arrays = {f"attention_{l}": np.asarray(a) for l, a in gen.attention.items()}
        arrays["image_mass"] = np.asarray(gen.image_mass)
        arrays.update({f"kept_{l}": np.asarray(v) for l, v in gen.kept.items()})
        if gen.groups is not None:
            arrays["groups"] = np.asarray(gen.groups)
        files["vlm.npz"] = _npz_bytes(arrays)
    c = model.comparison
    if c is not None:
        results = {}
        for i, mid in enumerate(c.method_ids):
            if mid in c.results:
                name = f"compare/{i}.npz"
                files[name] = _result_bytes(c.results[mid])
                results[mid] = name
        data["comparison"] = {"mode": c.mode, "method_ids": c.method_ids, "image_sha256": c.image_sha256, "keep": c.keep,
                              "layer": c.layer, "results": results, "metrics": _json(c.metrics), "errors": c.errors}
        if c.agreement is not None:
            data["comparison"]["agreement"] = {"values": _json(np.asarray(c.agreement[0], dtype=float)),
                                               "kinds": _json(np.asarray(c.agreement[1]).astype(str))}
        if c.sweep is not None:
            keeps, sweep = c.sweep
            data["comparison"]["sweep"] = {
                "keeps": list(keeps),
                "metrics": {mid: [None if v is None else _json(dict(v.values)) for v in vals]
                            for mid, vals in sweep.items()}}
    files["session.json"] = json.dumps(data, indent=1).encode()
    try:
        with atomic_write(path, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, blob in files.items():
                zf.writestr(name, blob)
    except OutputError as exc:  # the folder, the name or the disk: nothing written, an earlier file kept
        raise BundleError(f"session not saved to {path}: {exc.reason}") from None
    return path


def _model_info_json(info: ModelInfo) -> dict:
    return {"kind": info.kind, "spec": info.spec, "name": info.name, "n_layers": info.n_layers, "n_heads": info.n_heads,
            "width": info.width, "device": info.device, "dtype": info.dtype, "demo": info.demo}


# -- reading -------------------------------------------------------------------------------------
def read_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle (``BundleError`` for a newer schema, a damaged file, a missing or
    changed image). Nothing is applied to a session here."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            data = json.loads(zf.read("session.json"))
            blobs = {n: zf.read(n) for n in names if n != "session.json"}
    except FileNotFoundError:
        raise BundleError(f"{path}: no such session file") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise BundleError(f"{path.name} is not a readable session bundle ({type(exc).__name__})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise BundleError(f"{path.name} is not a session bundle (no schema version)")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{path.name} was saved by a newer version of the program (schema {version}; this one "
                          f"reads up to {SCHEMA_VERSION}): update token-explorer to open it")
    try:
        img = data["image"]
        candidates = [p for p in (img.get("path"), img.get("relative") and str(path.parent / img["relative"])) if p]
        found = next((Path(p) for p in candidates if Path(p).is_file()), None)
        if found is None:
            raise BundleError(f"the session's image is not found (looked for {', '.join(candidates) or 'no path'})")
        image = load_image(found)
        if image.sha256 != img["sha256"]:
            raise BundleError(f"{found} changed since the session was saved (its content differs)")
        view = None
        if "view" in data:
            view = _read_result(blobs, data["view"]["file"])
        vlm_arrays = {}
        if "vlm" in data:
            with np.load(io.BytesIO(blobs["vlm.npz"]), allow_pickle=False) as npz:
                vlm_arrays = {k: npz[k] for k in npz.files}
        compare = {}
        for mid, name in data.get("comparison", {}).get("results", {}).items():
            compare[mid] = _read_result(blobs, name)
    except BundleError:
        raise
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BundleError(f"{path.name} is damaged: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return Bundle(data=data, image=image, image_path=str(found), view=view, vlm_arrays=vlm_arrays, compare=compare)


def _read_result(blobs: dict[str, bytes], name: str):
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "r.npz"
        p.write_bytes(blobs[name])
        return load_result(p)


def _regions(items: list[dict], image_size: tuple[int, int]) -> RegionSet:
    regions = RegionSet(image_size)
    for item in items:
        rle = dict(item["rle"])
        if isinstance(rle["counts"], str):
            rle["counts"] = rle_from_string(rle["counts"])
        mask = rle_decode(rle)
        region = regions.add(mask, item["name"], visible=bool(item.get("visible", True)), score=item.get("score"),
                             caption=item.get("caption", ""), labels=tuple((n, float(p)) for n, p in item.get("labels", ())),
                             prompt=item.get("prompt") or {})
        regions.regions[-1] = replace(region, id=int(item["id"]))  # the saved ids (selection, provenance)
    regions._next = max([r.id for r in regions] + [0]) + 1
    return regions


def apply_bundle(bundle: Bundle, model: SessionModel, make_params) -> None:
    """Put a read bundle into ``model`` (its events fire as for user changes).

    ``make_params(method_id, values) -> params`` validates each method's saved parameters (the
    plugin host's); a method that no longer exists is skipped. Model specs are set as the wanted
    models of their kinds (the caller loads them)."""
    d = bundle.data
    for kind, spec in d.get("models", {}).items():
        if spec and kind in model.models:
            slot = model.models[kind]
            slot.wanted = spec
            if slot.spec != spec:
                slot.spec, slot.info, slot.error = None, None, None
            model.events.model.emit(kind)
    model.set_image(bundle.image, bundle.image_path)
    params = {}
    for mid, values in d.get("params", {}).items():
        try:
            params[mid] = make_params(mid, values)
        except (ValueError, KeyError):
            continue
    model.params.update(params)
    disp = d.get("display", {})
    model.set_display(colormap=disp.get("colormap"), opacity=disp.get("opacity"), overlay=disp.get("overlay"))
    model.set_prompts(tuple(d.get("prompts", ())))
    method = d.get("method")
    if method and method in params:
        model.set_method(method, params[method])
    model.set_query(d.get("query"))
    model.regions = _regions(d.get("regions", []), bundle.image.size)
    model.region_id = d.get("region_id")
    model.events.regions.emit()
    if "vlm" in d:
        v = d["vlm"]
        layers = v.get("attention_layers", [])
        arr = bundle.vlm_arrays
        gen = Generation(ids=[int(i) for i in v["ids"]], tokens=list(v["token_strings"]), text=v["text"],
                         attention={int(l): arr[f"attention_{l}"] for l in layers}, image_mass=arr["image_mass"],
                         kept={int(k.split("_")[1]): arr[k] for k in arr if k.startswith("kept_")},
                         prefill_seconds=float(v.get("prefill_seconds", 0.0)), seconds=float(v.get("seconds", 0.0)),
                         prompt_length=int(v.get("prompt_length", 0)), logprob=float(v.get("logprob", 0.0)),
                         groups=arr.get("groups"), decode_seconds=float(v.get("decode_seconds", 0.0)),
                         device=v.get("device", "cpu"))
        info = ModelInfo(**{k: v["model"][k] for k in ("kind", "spec", "name", "n_layers", "n_heads", "width", "device",
                                                       "dtype", "demo")})
        trace = Trace(layout=TokenLayout.from_dict(v["layout"]), model=info, image_sha256=v["image_sha256"],
                      capture=CaptureSpec(), extras={"generation": gen, "prompt": v["prompt"],
                                                     "capture_note": v.get("capture_note", ""),
                                                     "attention_layers": layers})
        model.set_vlm_answer(VlmAnswer(spec=v["spec"], prompt=v["prompt"], trace=trace,
                                       max_new_tokens=int(v.get("max_new_tokens", 32)), tokens=tuple(v.get("tokens", ()))))
    model.set_compare_settings(keep=d.get("compare_keep"), layer=d.get("compare_layer"))
    cm = d.get("compare_checked")
    if isinstance(cm, dict):
        model.compare_checked.update({k: list(v) for k, v in cm.items()})
    if "comparison" in d:
        c = d["comparison"]
        comp = model.start_comparison(c["mode"], list(c["method_ids"]), keep=c.get("keep"), layer=c.get("layer"))
        for mid in comp.method_ids:
            if mid in bundle.compare:
                model.comparison_result(comp.id, mid, bundle.compare[mid], c.get("metrics", {}).get(mid) or {})
            elif mid in c.get("errors", {}):
                model.comparison_error(comp.id, mid, c["errors"][mid])
        if "agreement" in c:
            model.comparison_agreement(comp.id, np.asarray([[np.nan if v is None else v for v in row]
                                                            for row in c["agreement"]["values"]], dtype=float),
                                       np.asarray(c["agreement"]["kinds"], dtype=object))
        if "sweep" in c:
            from .results import Metrics

            sweep = {mid: [None if v is None else Metrics(values=v) for v in vals]
                     for mid, vals in c["sweep"]["metrics"].items()}
            model.comparison_sweep(comp.id, c["sweep"]["keeps"], sweep)
    else:
        model.compare_mode = d.get("compare_mode", model.compare_mode)
    if bundle.view is not None and d.get("view", {}).get("method") == model.method_id:
        spec = d.get("view", {}).get("model")
        model.view = View(result=bundle.view, method_id=model.method_id, image_sha256=bundle.image.sha256, model_spec=spec)
        model.events.view.emit(model.view)

