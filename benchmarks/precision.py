"""What half precision does to every CLIP method: fp16 and bf16 against fp32, same weights, same image.

    python benchmarks/precision.py [--device cpu|cuda] [--model demo] [--out docs/precision.md]

The model (default: the demo CLIP, trained, so that maps have structure) is loaded three times
through its loader with ``precision=fp32|fp16|bf16``; its traces keep tensors in the model's dtype
(as on a GPU) and every method runs on them. Per method: for maps, the largest difference of the
min-max normalised maps and the overlap (IoU) of their top 10 % tokens; for label maps, the share
of tokens with the same label; for reductions, the IoU of the kept sets (first-stage selection and
executed run) and the cosine of the reduced image embedding to fp32's. Writes a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from explorer.backends.registry import load_backend, parse_model_spec  # noqa: E402
from explorer.core.image_io import load_image  # noqa: E402
from explorer.core.jobs import CancelToken, run_sync  # noqa: E402
from explorer.core.metrics import normalized_mutual_information  # noqa: E402
from explorer.core.results import Heatmap, LabelMap, TokenSelection  # noqa: E402
from explorer.core.target import Target  # noqa: E402
from explorer.core.trace import CaptureSpec  # noqa: E402
from explorer.plugin_host.host import PluginHost  # noqa: E402
from explorer.plugin_host.reduction import default_layer  # noqa: E402

PROMPTS = ("a red circle", "a blue square", "a green triangle")
SKIP = {"attribution.gscorecam"}  # hundreds of masked forwards: its precision follows the scores'


def minmax(v: np.ndarray) -> np.ndarray:
    v = np.where(np.isfinite(v), v, np.nan)
    lo, hi = np.nanmin(v), np.nanmax(v)
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def top_iou(a: np.ndarray, b: np.ndarray, share: float = 0.1) -> float:
    k = max(1, int(round(share * a.size)))
    ta = set(np.argsort(-np.nan_to_num(a, nan=-np.inf), kind="stable")[:k].tolist())
    tb = set(np.argsort(-np.nan_to_num(b, nan=-np.inf), kind="stable")[:k].tolist())
    return len(ta & tb) / len(ta | tb)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


def compare(ref, other) -> str:
    if isinstance(ref, Heatmap):
        a, b = minmax(ref.token_values), minmax(other.token_values)
        return f"max Δ {np.nanmax(np.abs(a - b)):.1e}, top-10 % IoU {top_iou(a, b):.2f}"
    if isinstance(ref, LabelMap):
        return f"same label {np.mean(ref.labels == other.labels):.3f}"
    if isinstance(ref, TokenSelection):
        text = f"kept IoU {iou(ref.kept, other.kept):.2f}"
        if ref.groups is not None and other.groups is not None:
            text += f", groups NMI {normalized_mutual_information(ref.groups, other.groups):.3f}"
        if "embedding" in ref.meta:
            e, f = np.asarray(ref.meta["embedding"]), np.asarray(other.meta["embedding"])
            text += f", embedding cos {float(e @ f / np.linalg.norm(e) / np.linalg.norm(f)):.4f}"
        return text
    return type(ref).__name__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--image", default=str(ROOT / "resources" / "samples" / "scene-01.png"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    host = PluginHost()
    image = load_image(args.image)
    results: dict[str, dict[str, object]] = {}
    for precision in ("fp32", "fp16", "bf16"):
        spec = parse_model_spec(f"{args.model}?precision={precision}&device={args.device}")
        backend = load_backend(spec)
        backend.trace_arrays = "torch"  # the model's dtype on every device, as a GPU trace keeps it
        L = backend.info.n_layers
        trace = run_sync(backend.trace(image, CaptureSpec.everything(L))).with_text(backend.encode_text(PROMPTS))
        backend.prepare(image)
        out = results.setdefault(precision, {})
        for info in host.methods(backend="clip"):
            if info.id in SKIP:
                continue
            model = host.params_model(info.id)
            values = {"templates": "none"} if "templates" in model.model_fields else {}
            if info.family in ("pruning", "merging"):
                values.update(keep=0.5, layer=default_layer(L))
                method = host.load(info.id)
                params = host.make_params(info.id, values)
                out[info.id + " (selection)"] = method.select(trace, params, backend)
            params = host.make_params(info.id, values)
            try:
                out[info.id] = run_sync(host.run(info.id, trace, params, target=Target(prompts=PROMPTS),
                                                 cancel=CancelToken(), backend=backend))
            except Exception as exc:  # noqa: BLE001 - a method that fails in half precision is reported so
                out[info.id] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    lines = [f"# Half precision against fp32\n",
             f"`python benchmarks/precision.py --device {args.device} --model {args.model}`: every CLIP method on "
             f"`{Path(args.image).name}` with the model in fp16 and in bf16 (traces in the model's dtype, as on a GPU) "
             f"against fp32, same weights. Maps: largest difference (Δ) of the min-max normalised maps and IoU of the top "
             f"10 % tokens; label maps: share of equal labels; reductions: IoU of the kept tokens (first-stage "
             f"selection and executed run), normalised mutual information of merge groups, and cosine of the "
             f"reduced embedding.\n",
             "| Method | fp16 | bf16 |", "|---|---|---|"]
    for key, ref in results["fp32"].items():
        cells = []
        for precision in ("fp16", "bf16"):
            other = results[precision].get(key)
            if isinstance(ref, str) or isinstance(other, str) or other is None:
                cells.append(str(other if isinstance(other, str) else ref))
            else:
                cells.append(compare(ref, other))
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
