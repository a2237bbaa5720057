"""Every speed figure of the program in one process, on the CPU or on a GPU, side by side.

    python benchmarks/suite.py --device cpu  [--json F] [--md F] [--runs N] [--only SECTION ...]
    python benchmarks/suite.py --device cuda [--json F] [--md F]

Random weights at real shapes (nothing is downloaded). Each figure is a ratio of two things
measured in turn in this process (medians of ``--runs`` interleaved runs, each call between two
device synchronisations), so machine noise cancels. Prints a markdown table (figure, model,
measured, target, met) and writes it with ``--md``; ``--json`` writes every raw time too.

Sections (``--only``):

* ``clip``: per model (CPU: ViT-B-16 fp32 at 224 px; GPU: ViT-L-14-336 in fp16 and fp32, and
  ViT-B-16 fp16 for ToMe's r = 13), batch 1 unless said:
  - traced forward with every layer's attention (and with hidden states too) / bare
    ``encode_image``;
  - each map method from the cached trace / bare forward (non-gradient maps; attention flow is a
    host max-flow and is reported, not a target), and the gradient methods (Chefer, Grad-CAM) /
    bare forward;
  - 8 reduction selections from the cached trace / bare forward;
  - executed ToMe from block 0 (r = 13 on B/16, r = 8 on L/14-336) and executed Top-K keep 0.5
    from a third of the depth: the speed-up over the same backend's unreduced run, as a share of
    its ideal ``1 / MACs ratio``; batch 1 (and batch 64 on a GPU);
  - throughput: images/s of the unreduced run and of plain timm with fused attention
    (``vit_base_patch16_224`` / ``vit_large_patch14_clip_336``), the reference forward.
* ``vlm``: a LLaVA-1.5 (CPU: scaled down to 6 LLM layers of width 512, CLIP-L/14-336 geometry
  with 576 image tokens and a 2-layer tower; GPU: LLaVA-1.5-7B shapes in bf16):
  - generation of 32 tokens keeping every layer's image rows / ``model.generate``;
  - FastV keep 0.25 after layer 2: prefill time / unpruned prefill time.

What a bare GPU machine with only torch, transformers and timm installed lacks, to carry as
wheels (x86-64, the machine's Python) and install with ``pip install --no-index --no-deps``:
``open_clip_torch`` (and its ``ftfy``, ``wcwidth``), ``pydantic``, ``pydantic-core``,
``annotated-types``, ``typing-inspection``, ``array-api-compat``, ``platformdirs``, ``cmap``, and the
``transformers`` release this project pins when the machine's is older; the project itself runs
from the source tree (``PYTHONPATH=.:plugins``). ``benchmarks/gpu_suite.sh`` does all of it in one
command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from explorer.backends.clip import ClipBackend, PreparedImage  # noqa: E402
from explorer.backends.devices import synchronize  # noqa: E402
from explorer.backends.specs import ClipSpec  # noqa: E402
from explorer.core.image_io import load_image  # noqa: E402
from explorer.core.jobs import CancelToken, run_sync  # noqa: E402
from explorer.core.target import Target  # noqa: E402
from explorer.core.trace import CaptureSpec  # noqa: E402
from explorer.plugin_host.host import PluginHost  # noqa: E402
from explorer.plugin_host.reduction import default_layer, full_macs  # noqa: E402
from explorer.testing.images import png_bytes  # noqa: E402

MAP_METHODS = ["attention.raw", "attention.rollout", "attribution.globenc", "similarity.maskclip",
               "similarity.sclip", "similarity.clearclip", "similarity.naclip", "similarity.segearth_ov",
               "similarity.clip_surgery", "similarity.gem", "attention.flow"]
GRADIENT_METHODS = ["attribution.chefer", "attribution.gradcam"]
SELECTIONS = ["pruning.random", "pruning.spatial", "pruning.topk", "pruning.evit", "merging.tome",
              "pruning.divprune", "pruning.dart", "merging.kmedoids"]
PROMPTS = ("a photo of a dog", "a photo of a cat")

TARGETS = {  # figure -> (cpu target, gpu target, 'le' or 'ge')
    "trace": (1.10, 1.25, "le"),
    "map": (0.05, 0.25, "le"),
    "selections": (0.10, 0.50, "le"),
    "tome_share": (0.8, 0.8, "ge"),
    "tome_share_b1_L": (None, 1.0, "ge"),
    "topk_share": (0.8, 0.8, "ge"),
    "vlm_capture": (None, 1.15, "le"),
    "fastv_prefill": (0.6, 0.6, "le"),
}


class Suite:
    def __init__(self, device: str, runs: int, tiny: bool = False) -> None:
        self.tiny = tiny
        self.device = torch.device(device)
        self.gpu = self.device.type != "cpu"
        self.runs = runs
        self.rows: list[dict] = []
        self.raw: dict = {}

    # -- timing ------------------------------------------------------------------------------------
    def timed(self, fn: Callable[[], object]) -> float:
        synchronize(self.device)
        t = time.perf_counter()
        fn()
        synchronize(self.device)
        return time.perf_counter() - t

    def measure(self, cases: dict[str, Callable[[], object]], runs: int | None = None, warmup: int = 1) -> dict[str, float]:
        """Medians of ``cases`` run in turn (the order rotating every run)."""
        runs = runs or self.runs
        for _ in range(warmup):
            for fn in cases.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        items = list(cases.items())
        for r in range(runs):
            for name, fn in items[r % len(items):] + items[: r % len(items)]:
                times[name].append(self.timed(fn))
        return {k: statistics.median(v) for k, v in times.items()}

    # -- reporting ---------------------------------------------------------------------------------
    def row(self, figure: str, model: str, value: float, key: str | None, unit: str = "ratio", note: str = "") -> None:
        target, kind = None, None
        if key is not None and not self.tiny:  # a dry run on tiny models measures nothing against the targets
            cpu_t, gpu_t, kind = TARGETS[key]
            target = gpu_t if self.gpu else cpu_t
        met = None if target is None else (value <= target if kind == "le" else value >= target)
        self.rows.append({"figure": figure, "model": model, "value": value, "unit": unit, "target": target,
                          "kind": kind, "met": met, "note": note})
        shown = f"{value:.3f}" if unit == "ratio" else f"{value:.1f} {unit}"
        tgt = "" if target is None else f"{'≤' if kind == 'le' else '≥'} {target:g}"
        print(f"  {figure:<62} {model:<22} {shown:>12}  {tgt:<8} {'' if met is None else ('met' if met else 'NOT met')} {note}",
              flush=True)

    def markdown(self) -> str:
        lines = [f"Device: {self.describe()}", "",
                 "| Figure | Model | Measured | Target | Met |", "|---|---|---|---|---|"]
        for r in self.rows:
            shown = f"{r['value']:.3f}" if r["unit"] == "ratio" else f"{r['value']:.1f} {r['unit']}"
            if r["note"]:
                shown += f" ({r['note']})"
            tgt = "" if r["target"] is None else f"{'≤' if r['kind'] == 'le' else '≥'} {r['target']:g}"
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            lines.append(f"| {r['figure']} | {r['model']} | {shown} | {tgt} | {met} |")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)}, torch {torch.__version__}"
        return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}"


# -- CLIP ------------------------------------------------------------------------------------------
def clip_models(gpu: bool, tiny: bool = False) -> list[tuple[str, str, dict]]:
    """(architecture, precision, what to run on it)."""
    if tiny:
        return [("tiny", "fp32", {"tome_r": 4, "batches": [1, 2]})]
    if not gpu:
        return [("ViT-B-16", "fp32", {"tome_r": 13, "batches": [1]})]
    return [("ViT-L-14-336", "fp16", {"tome_r": 8, "batches": [1, 64]}),
            ("ViT-L-14-336", "fp32", {"tome_r": 8, "batches": [1, 64]}),
            ("ViT-B-16", "fp16", {"tome_r": 13, "batches": [1, 64], "only_reduction": True})]


def timm_reference(arch: str, device, dtype):
    import timm

    name = {"ViT-B-16": "vit_base_patch16_224", "ViT-L-14-336": "vit_large_patch14_clip_336"}[arch]
    model = timm.create_model(name, pretrained=False, num_classes=0).to(device, dtype).eval()
    return name, model


def load_clip(arch: str, device, precision: str, scratch: Path) -> ClipBackend:
    if arch == "tiny":  # the test suite's tiny open_clip ViT, saved and loaded through open_clip
        from explorer.testing.tiny import make_tiny_clip

        spec = make_tiny_clip(scratch / "tiny-clip")
        return ClipBackend.load(spec.model_copy(update={"device": str(device), "precision": precision}))
    return ClipBackend.load(ClipSpec(model=arch, device=str(device), precision=precision))


def bench_clip(s: Suite, host: PluginHost, scratch: Path) -> None:
    image = load_image(png_bytes(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)))
    for arch, precision, what in clip_models(s.gpu, s.tiny):
        torch.manual_seed(0)
        label = f"{arch} {precision}"
        print(f"\n{label} on {s.device}", flush=True)
        backend = load_clip(arch, s.device, precision, scratch)
        raw = s.raw.setdefault(label, {})
        prepared = backend.prepare(image)
        L = backend.info.n_layers
        everything = CaptureSpec.everything(L)

        def bare():
            with torch.inference_mode():
                backend.model.encode_image(prepared.pixels)

        if not what.get("only_reduction"):
            attn_all = CaptureSpec(attention_layers=range(L))
            med = s.measure({"bare": bare, "attention": lambda: run_sync(backend.trace(prepared, attn_all)),
                             "everything": lambda: run_sync(backend.trace(prepared, everything))})
            raw["trace_ms"] = {k: 1000 * v for k, v in med.items()}
            s.row("traced forward, every layer's attention / bare", label, med["attention"] / med["bare"], "trace")
            s.row("traced forward, attention + hidden states / bare", label, med["everything"] / med["bare"], "trace")

            trace = run_sync(backend.trace(prepared, everything)).with_text(backend.encode_text(PROMPTS))
            target = Target(prompts=PROMPTS)
            cases = {"bare": bare}
            for mid in MAP_METHODS + GRADIENT_METHODS:
                model = host.params_model(mid)
                values = {"templates": "none"} if "templates" in model.model_fields else {}
                if mid == "attention.flow":
                    if trace.layout.n_tokens > 200:
                        continue  # one max-flow per token: minutes at 577 tokens, not a figure to wait for
                    values["max_tokens"] = 4096
                params = host.make_params(mid, values)
                cases[mid] = (lambda m=mid, p=params: run_sync(host.run(m, trace, p, target=target, cancel=CancelToken(),
                                                                         backend=backend)))
            runs = {k: fn for k, fn in cases.items() if k != "attention.flow"}
            med = s.measure(runs)
            if "attention.flow" in cases:
                med.update(s.measure({"bare": bare, "attention.flow": cases["attention.flow"]}, runs=3))
            raw["map_ms"] = {k: 1000 * v for k, v in med.items()}
            for mid in MAP_METHODS + GRADIENT_METHODS:
                if mid not in med:
                    continue
                gradient = mid in GRADIENT_METHODS
                key = None if gradient or mid == "attention.flow" else "map"
                note = "gradient pass" if gradient else ("host max-flow" if mid == "attention.flow" else "")
                s.row(f"{host.method(mid).title} from the cache / bare", label, med[mid] / med["bare"], key, note=note)

            methods = [(host.load(m), host.make_params(m, {"keep": 0.5, "layer": default_layer(L)})) for m in SELECTIONS]

            def selections():
                for method, params in methods:
                    method.select(trace, params, backend)

            med = s.measure({"bare": bare, "selections": selections})
            raw["selections_ms"] = {k: 1000 * v for k, v in med.items()}
            s.row(f"{len(methods)} reduction selections from the cache / bare", label, med["selections"] / med["bare"],
                  "selections")
            del trace

        bench_reductions(s, host, backend, prepared, label, what, raw)
        bench_throughput(s, backend, prepared, arch, precision, what, label, raw)
        del backend
        if s.gpu:
            torch.cuda.empty_cache()


def batch_of(prepared: PreparedImage, n: int) -> PreparedImage:
    return PreparedImage(prepared.pixels.expand(n, *prepared.pixels.shape[1:]).contiguous(), prepared.layout,
                         prepared.sha256)


def bench_reductions(s: Suite, host, backend, prepared, label: str, what: dict, raw: dict) -> None:
    L = backend.info.n_layers
    tome = host.load("merging.tome")
    tome_p = host.make_params("merging.tome", {"r": what["tome_r"], "layer": 0})
    topk = host.load("pruning.topk")
    topk_p = host.make_params("pruning.topk", {"keep": 0.5, "layer": default_layer(L)})
    full = full_macs(backend.info, prepared.layout.n_tokens)
    for b in what["batches"]:
        batch = batch_of(prepared, b)
        runs = max(3, s.runs if b == 1 else s.runs // 2)
        med = s.measure({"unreduced": lambda: backend.run_reduced(batch, ()),
                         "tome": lambda: tome.executed(backend, batch, tome_p),
                         "topk": lambda: topk.executed(backend, batch, topk_p)}, runs=runs)
        raw[f"reduction_ms_batch{b}"] = {k: 1000 * v for k, v in med.items()}
        for name, method, params, key in (("ToMe", tome, tome_p, "tome_share"), ("Top-K", topk, topk_p, "topk_share")):
            run = method.executed(backend, batch, params)
            ideal = full / run.macs
            speedup = med["unreduced"] / med[name.lower().replace("-", "")]
            share = speedup / ideal
            what_ = (f"executed ToMe r={what['tome_r']} from block 0" if name == "ToMe"
                     else f"executed Top-K keep 0.5 from block {default_layer(L)}")
            raw[f"{name}_batch{b}"] = {"speedup": speedup, "ideal": ideal, "macs_ratio": run.macs / full}
            key_b = key
            if name == "ToMe" and s.gpu and b == 1:
                key_b = "tome_share_b1_L" if "L-14" in label else None
            elif s.gpu and b == 1:
                key_b = None  # the GPU targets are at batch 64
            s.row(f"{what_}, batch {b}: share of ideal speed-up", label, share, key_b,
                  note=f"speed-up {speedup:.2f}x of ideal {ideal:.2f}x")


def bench_throughput(s: Suite, backend, prepared, arch: str, precision: str, what: dict, label: str, raw: dict) -> None:
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    try:
        name, ref = timm_reference(arch, s.device, dtype)
    except Exception as exc:  # noqa: BLE001 - timm missing or unknown: the figure is skipped, said so
        print(f"  (timm reference skipped: {type(exc).__name__}: {exc})")
        return
    for b in what["batches"]:
        batch = batch_of(prepared, b)
        x = batch.pixels.to(dtype)

        def timm_forward():
            with torch.inference_mode():
                ref(x)

        med = s.measure({"ours": lambda: backend.run_reduced(batch, ()), "timm": timm_forward},
                        runs=max(3, s.runs // 2))
        raw[f"throughput_batch{b}"] = {"ours_ims": b / med["ours"], "timm_ims": b / med["timm"]}
        s.row(f"throughput, unreduced run, batch {b}", label, b / med["ours"], None, unit="im/s",
              note=f"timm {name}: {b / med['timm']:.1f} im/s")
    del ref


# -- VLM -------------------------------------------------------------------------------------------
def llava_config(gpu: bool, tiny: bool = False):
    from transformers import CLIPVisionConfig, LlamaConfig

    if tiny:  # the geometry alone (576 image tokens), every width tiny: a dry run of the section
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
        text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096)
    elif gpu:  # LLaVA-1.5-7B: CLIP-L/14-336 tower, Llama-2-7B language model
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    else:  # the same geometry (576 image tokens), scaled down to run on a CPU
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
        text = LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    return vision, text


def build_llava(device, gpu: bool, tiny: bool = False):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from explorer.backends.specs import VlmSpec
    from explorer.backends.vlm import VlmBackend
    from explorer.testing.tiny_vlm import word_tokenizer

    tok = word_tokenizer(["<image>"], {"image_token": "<image>"})
    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    vision, text = llava_config(gpu, tiny)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=576, vision_feature_select_strategy="default", vision_feature_layer=-2)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.eval()
    spec = VlmSpec(model="llava-1.5-7b-shapes" if gpu else "llava-1.5-scaled", device=str(device),
                   precision="bf16" if gpu else "fp32")
    return VlmBackend(spec, model, proc, torch.device(device))


def bench_vlm(s: Suite, host: PluginHost) -> None:
    backend = build_llava(s.device, s.gpu, s.tiny)
    label = "LLaVA-1.5 tiny" if s.tiny else ("LLaVA-1.5-7B bf16" if s.gpu else "LLaVA-1.5 scaled fp32")
    print(f"\n{label} on {s.device}", flush=True)
    raw = s.raw.setdefault(label, {})
    image = load_image(png_bytes(np.random.default_rng(1).integers(0, 256, (336, 448, 3), dtype=np.uint8)))
    prepared = backend.prepare(image, "describe the image please")
    n_new = 32
    backend.eos_ids = set()  # random weights: generate exactly n_new tokens in both loops
    inputs = {k: (v.to(s.device) if hasattr(v, "to") else v) for k, v in prepared.inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(backend.model.dtype)
    L = backend.info.n_layers

    def hf_generate():
        with torch.inference_mode():
            backend.model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)

    def ours(layers):
        return lambda: run_sync(backend.generate_job(prepared, max_new_tokens=n_new, attention_layers=layers))

    med = s.measure({"generate": hf_generate, "capture_all": ours(list(range(L))), "no_capture": ours(())},
                    runs=max(3, s.runs // 2))
    raw["generation_ms"] = {k: 1000 * v for k, v in med.items()}
    s.row(f"generation of {n_new} tokens keeping every layer's image rows / model.generate", label,
          med["capture_all"] / med["generate"], "vlm_capture")
    s.row(f"generation of {n_new} tokens, no capture / model.generate", label, med["no_capture"] / med["generate"], None)

    fastv = host.load("vlm.fastv")
    params = host.make_params("vlm.fastv", {"keep": 0.25, "layer": 2})
    plan = (fastv.prune_layer(params, L), lambda st: fastv.decide(st, params), fastv.needs_keys(params))
    prefill: dict[str, list[float]] = {"full": [], "fastv": []}
    for _ in range(max(3, s.runs)):
        for name, prune in (("full", None), ("fastv", plan)):
            gen = run_sync(backend.generate_job(prepared, max_new_tokens=1, attention_layers=(), prune=prune))
            prefill[name].append(gen.prefill_seconds)
    med = {k: statistics.median(v) for k, v in prefill.items()}
    raw["prefill_ms"] = {k: 1000 * v for k, v in med.items()}
    s.row("FastV keep 0.25 after layer 2: prefill / unpruned prefill", label, med["fastv"] / med["full"],
          "fastv_prefill")

    # MustDrop's three stages (vision-tower merge, prefill filter, cut KV cache): prefill and decoding
    mustdrop = host.load("vlm.mustdrop")
    mparams = host.make_params("vlm.mustdrop", {"preset": "64"})
    mplan = mustdrop.plan(backend, mparams, lambda st: mustdrop.decide(st, mparams))
    runs: dict[str, list] = {"full": [], "mustdrop": []}
    for _ in range(max(3, s.runs // 2)):
        for name, prune in (("full", None), ("mustdrop", mplan)):
            runs[name].append(run_sync(backend.generate_job(prepared, max_new_tokens=n_new, attention_layers=(),
                                                            prune=prune)))
    pre = {k: statistics.median(g.prefill_seconds for g in v) for k, v in runs.items()}
    dec = {k: statistics.median(g.decode_seconds / max(1, len(g.ids) - 1) for g in v) for k, v in runs.items()}
    last = runs["mustdrop"][-1]
    raw["mustdrop_ms"] = {"prefill": {k: 1000 * v for k, v in pre.items()},
                          "decode_per_token": {k: 1000 * v for k, v in dec.items()},
                          "image_tokens_per_layer": last.tokens_per_layer, "kv_cache_per_layer": last.cache_lengths}
    note = (f"{last.vision_tokens} image tokens into the LLM, {last.tokens_per_layer[-1]} after the last stage; "
            f"KV cache {last.cache_lengths[-1]} of {runs['full'][-1].cache_lengths[-1]} entries")
    s.row("MustDrop preset 64: prefill / unpruned prefill", label, pre["mustdrop"] / pre["full"], None, note=note)
    s.row("MustDrop preset 64: decoding time per token / unpruned", label, dec["mustdrop"] / dec["full"], None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--runs", type=int, default=None, help="interleaved runs per figure (default 7 on CPU, 15 on a GPU)")
    ap.add_argument("--json", type=Path, help="write every figure and raw time here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    ap.add_argument("--only", nargs="*", choices=["clip", "vlm"], help="sections to run (default: all)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny models instead of the real shapes: a dry run of the whole suite in seconds (tests)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but CUDA is not available here")
    s = Suite(args.device, args.runs or (15 if args.device.startswith("cuda") else 7), tiny=args.tiny)
    host = PluginHost()
    print(f"benchmark suite on {s.describe()}", flush=True)
    t0 = time.perf_counter()
    sections = args.only or ["clip", "vlm"]
    with tempfile.TemporaryDirectory() as scratch:
        if "clip" in sections:
            bench_clip(s, host, Path(scratch))
        if "vlm" in sections:
            bench_vlm(s, host)
    elapsed = time.perf_counter() - t0
    command = " ".join(["python benchmarks/suite.py"] + sys.argv[1:])
    md = s.markdown() + f"\nCommand: `{command}` ({elapsed:.0f} s)\n"
    print("\n" + md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps({"device": s.describe(), "seconds": elapsed, "rows": s.rows, "raw": s.raw},
                                        indent=1))


if __name__ == "__main__":
    main()
