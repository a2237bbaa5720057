"""The open_clip backend: load any open_clip ViT, trace it, encode text.

Loading goes through ``open_clip.create_model_and_transforms`` exactly as a user would call it
(pretrained tag, ``hf-hub:`` name, ``local-dir:`` folder, or an architecture plus a local
checkpoint), with ``weights_only=True``. The model's own validation preprocessing is applied to
the image and turned into a :class:`TokenLayout` (:mod:`explorer.backends.preprocess`).

Tracing runs the vision tower block by block with open_clip's own modules (``_embeds``, the
residual blocks, ``_pool``, ``proj``); between blocks the cancel token is checked and progress is
reported. Attention probabilities are kept only for the layers asked for
(:func:`explorer.backends.attention.probe_attention`); every other layer uses the fused kernel.
Sequence layout of the vision tower: ``[CLS, patch(0,0), patch(0,1), ...]`` row-major.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Progress
from explorer.core.layout import TokenLayout
from explorer.core.reduction import ReducedRun, ReductionStep, TokenState, block_macs
from explorer.core.trace import CaptureSpec, ModelInfo, TextEncoding, Trace

from .attention import AttentionAdapter, adapter_for, probe_attention
from .devices import OutOfMemory, device_report, dtype_of, is_out_of_memory, resolve_device
from .preprocess import apply_with_geometry
from .specs import ClipSpec

log = logging.getLogger(__name__)

__all__ = ["ClipBackend", "ModelLoadError", "PreparedImage", "GradientPass", "template_strings"]


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class PreparedImage:
    """Model input ``pixels (1, 3, h, w)`` on the model's device, and its token layout."""

    pixels: torch.Tensor
    layout: TokenLayout
    sha256: str


@dataclass(frozen=True)
class GradientPass:
    """What :meth:`ClipBackend.gradient_pass` returns (numpy, CPU). See its docstring."""

    score: float
    attentions: dict
    attention_grads: dict
    hidden: dict
    hidden_grads: dict
    input_grad: np.ndarray  # (3, h, w) gradient of the score w.r.t. the model input


def template_strings(templates: str | None) -> list[str] | None:
    """Format strings for a template set name (see :meth:`ClipBackend.encode_text`)."""
    if templates is None or templates in ("", "none"):
        return None
    if templates == "imagenet-80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if templates == "single":
        return ["a photo of a {}."]
    if "{}" in templates:
        return [templates]
    raise ValueError(f"unknown prompt templates {templates!r}; use none, single, imagenet-80 or a string with {{}}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ClipBackend:
    """A loaded open_clip model (image and text towers) and what the explorer needs from it."""

    kind = "clip"
    PREPARED_KEPT = 8  # prepared images remembered for :meth:`prepared_for`

    def __init__(self, spec: ClipSpec, model, preprocess, tokenizer, device: torch.device) -> None:
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.visual = model.visual
        self.lock = threading.RLock()  # one pass at a time per model
        self._check_tower()
        self.blocks = list(self.visual.transformer.resblocks)
        self.adapters: list[AttentionAdapter] = [adapter_for(b.attn) for b in self.blocks]
        self.forward_count = 0  # vision-tower passes run (tests count them)
        self._text_cache: dict = {}
        self._prepared: OrderedDict[str, PreparedImage] = OrderedDict()  # last prepared images by sha256
        self._states: dict = {}  # token states of cached traces, by (image, capture, block, stages)
        self._prepared_lock = threading.Lock()
        t = self.visual.transformer
        self.info = ModelInfo(
            kind="clip",
            spec=spec.canonical(),
            name=spec.display_name,
            n_layers=len(self.blocks),
            n_heads=self.adapters[0].num_heads,
            width=int(t.width),
            embed_dim=int(self.visual.output_dim),
            patch_size=tuple(int(p) for p in self.visual.patch_size),
            input_size=tuple(int(s) for s in self.visual.image_size),
            device=str(device),
            dtype=spec.precision,
            demo=spec.is_demo,
        )

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: ClipSpec) -> "ClipBackend":
        """Load through ``open_clip.create_model_and_transforms``; ``ModelLoadError`` on failure."""
        import open_clip

        device = resolve_device(spec.device)
        if spec.config:
            cfg = Path(spec.config).expanduser()
            if not cfg.is_file():
                raise ModelLoadError(f"model config {cfg} does not exist")
            open_clip.add_model_config(cfg)
        model_name = spec.model
        pretrained = spec.weights
        if model_name.startswith("local-dir:"):
            folder = Path(model_name[len("local-dir:"):]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise ModelLoadError(
                    f"{folder} is not an open_clip model folder (no open_clip_config.json)"
                    + (" - train the demo models with `python -m explorer.demo.train`" if spec.is_demo else "")
                )
        elif not model_name.startswith("hf-hub:"):
            if model_name not in open_clip.list_models():
                close = [m for m in open_clip.list_models() if model_name.lower() in m.lower()][:5]
                hint = f"; similar: {', '.join(close)}" if close else "; `open_clip.list_models()` lists them"
                raise ModelLoadError(f"unknown open_clip architecture {model_name!r}{hint}")
            if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
                path = Path(pretrained).expanduser()
                if not path.is_file():
                    raise ModelLoadError(f"checkpoint {path} does not exist")
                pretrained = str(path)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained,
                precision=spec.precision,
                device=device,
                weights_only=True,
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            msg = _first_line(exc)
            low = msg.lower()
            if any(s in low for s in ("connection", "offline", "resolve", "network", "max retries", "cannot find the requested files", "localentrynotfound")):
                raise ModelLoadError(
                    f"could not fetch weights for {spec.display_name}: no network or not in the cache "
                    f"({msg}); pass a local checkpoint with MODEL@/path/to/checkpoint"
                ) from exc
            if "size mismatch" in low or "missing key" in low or "unexpected key" in low:
                raise ModelLoadError(f"checkpoint does not match architecture {model_name}: {msg}") from exc
            raise ModelLoadError(f"could not load {spec.display_name}: {msg}") from exc
        except Exception as exc:  # noqa: BLE001 - third-party loaders raise anything (pickle, safetensors)
            raise ModelLoadError(f"could not load {spec.display_name}: {type(exc).__name__}: {_first_line(exc)}") from exc
        model.eval()
        return cls(spec, model, preprocess, tokenizer, device)

    def _check_tower(self) -> None:
        from open_clip.transformer import VisionTransformer

        if not isinstance(self.visual, VisionTransformer):
            raise ModelLoadError(
                f"the explorer traces open_clip VisionTransformer image towers; this model's tower is "
                f"{type(self.visual).__name__}"
            )
        if not getattr(self.visual.transformer, "batch_first", True):
            raise ModelLoadError("open_clip transformer built with batch_first=False is not supported")

    # -- images ---------------------------------------------------------------------------------
    def prepare(self, image: LoadedImage) -> PreparedImage:
        """Apply the model's preprocessing and build the token layout for ``image``."""
        pil = Image.fromarray(image.rgb, mode="RGB")
        pixels, geometry = apply_with_geometry(self.preprocess, pil)
        h, w = geometry.frame_size
        ih, iw = self.info.input_size
        if (h, w) != (ih, iw):
            raise ValueError(f"preprocessing produced {w}x{h}, the model expects {iw}x{ih}")
        ph, pw = self.info.patch_size
        layout = TokenLayout.single_grid(
            geometry,
            rows=h // ph,
            cols=w // pw,
            n_prefix=1,
            description=f"{self.info.name}: " + "; ".join(geometry.describe()),
        )
        dtype = dtype_of(self.spec.precision)
        prepared = PreparedImage(pixels.unsqueeze(0).to(self.device, dtype), layout, image.sha256)
        with self._prepared_lock:
            self._prepared[image.sha256] = prepared
            self._prepared.move_to_end(image.sha256)
            while len(self._prepared) > self.PREPARED_KEPT:
                self._prepared.popitem(last=False)
        return prepared

    def prepared_for(self, trace: Trace) -> PreparedImage:
        """The :class:`PreparedImage` of the image ``trace`` was made from (``trace.image_sha256``).

        Gradient methods need the model input, which a trace does not hold; :meth:`prepare` keeps
        the last :attr:`PREPARED_KEPT` prepared images. ``ValueError`` when it is no longer kept.
        """
        with self._prepared_lock:
            prepared = self._prepared.get(trace.image_sha256)
        if prepared is None:
            raise ValueError(
                f"the image of this trace (sha256 {trace.image_sha256[:12]}...) is no longer held by "
                f"{self.info.name}; trace the image again"
            )
        return prepared

    def n_tokens(self, image_size: tuple[int, int]) -> int:
        """Sequence length of the vision tower for an image of ``image_size`` (fixed input size)."""
        (ih, iw), (ph, pw) = self.info.input_size, self.info.patch_size
        return 1 + (ih // ph) * (iw // pw)

    def trace(
        self,
        image: LoadedImage | PreparedImage,
        capture: CaptureSpec,
        cancel: CancelToken | None = None,
    ):
        """Job: run the vision tower once and return a :class:`Trace` with what ``capture`` asks.

        Yields :class:`Progress` between blocks; raises :class:`Cancelled` between blocks when
        ``cancel`` is set.
        """
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)
        L = self.info.n_layers
        bad = [i for i in capture.attention_layers if i >= L] + [i for i in capture.hidden_layers if i > L]
        if bad:
            raise ValueError(f"capture asks for layers {sorted(bad)} but the model has {L} blocks")
        n = prepared.layout.n_tokens
        if capture.attention_rows is not None and any(r >= n for r in capture.attention_rows):
            raise ValueError(f"attention rows {capture.attention_rows} outside a sequence of {n}")
        start = time.perf_counter()
        hidden: dict[int, np.ndarray] = {}
        yield Progress(0.0, "vision tower")
        # inference mode is entered per step, never across a yield (it is thread-local state)
        with self.lock:
            try:
                with probe_attention([b.attn for b in self.blocks], capture.attention_layers, capture.attention_rows) as probe:
                    with torch.inference_mode():
                        x = self.visual._embeds(prepared.pixels)
                    if 0 in capture.hidden_layers:
                        hidden[0] = x[0].float().cpu().numpy()
                    for i, block in enumerate(self.blocks):
                        if cancel is not None:
                            cancel.raise_if_cancelled()
                        with torch.inference_mode():
                            x = block(x)
                        if i + 1 in capture.hidden_layers:
                            hidden[i + 1] = x[0].float().cpu().numpy()
                        yield Progress((i + 1) / (L + 1), f"block {i + 1}/{L}")
                    with torch.inference_mode():
                        pooled, _ = self.visual._pool(x)
                        if self.visual.proj is not None:
                            pooled = pooled @ self.visual.proj
                        embedding = F.normalize(pooled.float(), dim=-1)[0].cpu().numpy()
                    attentions = {l: p[0].float().cpu().numpy() for l, p in probe.probs.items()}
            except RuntimeError as exc:
                if is_out_of_memory(exc):
                    raise OutOfMemory(
                        f"out of memory on {self.device} while tracing; capture fewer layers or use device=cpu"
                    ) from exc
                raise
            finally:
                self.forward_count += 1
        trace = Trace(
            layout=prepared.layout,
            model=self.info,
            image_sha256=prepared.sha256,
            capture=capture,
            hidden_states=hidden,
            attentions=attentions,
            attention_rows=capture.attention_rows,
            image_embedding=embedding.astype(np.float32),
            logit_scale=float(self.model.logit_scale.exp().item()),
            seconds=time.perf_counter() - start,
        )
        yield Progress(1.0, "traced")
        return trace

    # -- executed token reduction ----------------------------------------------------------------
    def run_reduced(
        self,
        source: "Trace | LoadedImage | PreparedImage",
        stages: Sequence[int],
        reduce: Callable[[TokenState], ReductionStep],
        proportional_attention: bool = False,
        cancel: CancelToken | None = None,
    ) -> ReducedRun:
        """Run the vision tower with token reduction executed for real.

        At every block in ``stages``, after the attention branch and before the MLP, the current
        tokens are handed to ``reduce`` (a :class:`TokenState` of numpy arrays) and its
        :class:`ReductionStep` is applied: dropped tokens leave the sequence, merged tokens
        become size-weighted means, and every later block runs on the shorter sequence. With
        ``proportional_attention`` (ToMe) each key's logit gets ``+log(size)``. Blocks before
        the first stage are identical to the plain model, so from a :class:`Trace` holding the
        hidden state entering that block the run starts there; from an image it runs them too.
        The reduction blocks compute their attention explicitly (the reduction reads it); the
        other blocks use the fused kernel.
        """
        if not stages:
            raise ValueError("a reduction needs at least one stage")
        stages = tuple(sorted(set(int(s) for s in stages)))
        L = self.info.n_layers
        if stages[0] < 0 or stages[-1] >= L:
            raise ValueError(f"reduction blocks {stages} outside 0..{L - 1}")
        if self.visual.attn_pool is not None:
            raise ValueError("token reduction is not supported for towers with an attention pooler")
        start = stages[0]
        t0 = time.perf_counter()
        D = self.info.width
        mlp_width = int(self.blocks[0].mlp.c_fc.out_features)
        rows, cols = self.info.input_size[0] // self.info.patch_size[0], self.info.input_size[1] // self.info.patch_size[1]
        n_img = rows * cols
        n_prefix = 1
        macs = 0.0
        tokens_per_block = []
        with self.lock, torch.inference_mode():
            if isinstance(source, Trace) and start in source.hidden_states:
                x = self.to_tensor(source.hidden(start))
                first = start
            else:
                if isinstance(source, PreparedImage):
                    prepared = source
                elif isinstance(source, LoadedImage):
                    prepared = self.prepare(source)
                else:
                    prepared = self.prepared_for(source)
                x = self.visual._embeds(prepared.pixels)
                first = 0
            N0 = x.shape[1]
            for l in range(first):
                tokens_per_block.append(N0)
                macs += block_macs(N0, N0, D, mlp_width)
            if first < start:
                for l in range(first, start):
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    x = self.blocks[l](x)
                    tokens_per_block.append(N0)
                    macs += block_macs(N0, N0, D, mlp_width)
            sizes = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
            assign = np.arange(n_img, dtype=np.int64)
            positions = np.stack(np.divmod(np.arange(n_img), cols), 1).astype(np.float64)
            stage_assign, first_scores = [], None
            for l in range(start, L):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                n_in = x.shape[1]
                adapter, q, k, v = self.block_qkv(l, x)
                bias = torch.log(sizes)[None, None, None, :] if proportional_attention else None
                if l not in stages:  # nothing reads the probabilities: the fused kernel
                    x = x + self.block_attention_output(l, adapter.fused(q, k, v, attn_mask=bias))
                else:
                    logits = adapter.logits(q, k)
                    if bias is not None:
                        logits = logits + bias
                    probs = torch.softmax(logits, dim=-1)
                    x = x + self.block_attention_output(l, probs @ v)
                if l in stages:
                    state = TokenState(
                        layer=l, stage=stages.index(l), x=x[0].float().cpu().numpy(),
                        keys=k[0].float().cpu().numpy(), attention=probs[0].float().cpu().numpy(),
                        sizes=sizes.float().cpu().numpy(), n_prefix=n_prefix, assign=assign,
                        positions=positions, grid=(rows, cols), n_stages=len(stages))
                    step = reduce(state)
                    if first_scores is None and step.scores is not None:
                        first_scores = np.where(assign >= 0, np.asarray(step.scores)[np.clip(assign, 0, None)], np.nan)
                    x, sizes, assign, positions = self._apply_step(x, sizes, state, step)
                    stage_assign.append(assign.copy())
                n_mid = x.shape[1]
                macs += block_macs(n_in, n_mid, D, mlp_width)
                tokens_per_block.append(n_in)
                x = x + self.block_mlp(l, x)
            if self.visual.pool_type == "avg":  # size-weighted mean over the (merged) patch tokens
                w = sizes[n_prefix:, None]
                pooled = self.visual.ln_post((x[0, n_prefix:] * w).sum(0, keepdim=True) / w.sum())
            else:
                pooled, _ = self.visual._pool(x)
            if self.visual.proj is not None:
                pooled = pooled @ self.visual.proj
            embedding = F.normalize(pooled.float(), dim=-1)[0].cpu().numpy()
            self.forward_count += 1
        return ReducedRun(
            embedding=embedding, tokens_per_block=tuple(tokens_per_block), assign=assign,
            sizes=sizes.float().cpu().numpy(), stage_assign=tuple(stage_assign), scores=first_scores,
            macs=macs, seconds=time.perf_counter() - t0, stages=stages,
        )

    def token_state(self, trace: Trace, layer: int, n_stages: int = 1) -> TokenState:
        """The :class:`TokenState` of block ``layer`` of the unreduced model, from a trace holding
        the hidden state entering that block: one block's attention branch is computed (cheap),
        the attention comes from the trace when captured. Used to compute a first-stage selection
        without running the tower."""
        if layer not in trace.hidden_states:
            raise ValueError(f"the trace does not hold the hidden state entering block {layer}")
        key = (trace.image_sha256, trace.capture.key(), layer, n_stages)
        with self._prepared_lock:
            hit = self._states.get(key)
        if hit is not None:  # several methods deciding at the same block share one state
            return replace(hit, extras={})
        rows, cols = trace.layout.segments[0].rows, trace.layout.segments[0].cols
        n_img = rows * cols
        with self.lock, torch.inference_mode():
            x = self.to_tensor(trace.hidden(layer))
            adapter, q, k, v = self.block_qkv(layer, x)
            probs = torch.softmax(adapter.logits(q, k), dim=-1)
            x = x + self.block_attention_output(layer, probs @ v)
        attn = trace.attentions.get(layer) if trace.attention_rows is None else None
        state = TokenState(
            layer=layer, stage=0, x=x[0].float().cpu().numpy(), keys=k[0].float().cpu().numpy(),
            attention=attn if attn is not None else probs[0].float().cpu().numpy(),
            sizes=np.ones(x.shape[1], dtype=np.float32), n_prefix=1, assign=np.arange(n_img, dtype=np.int64),
            positions=np.stack(np.divmod(np.arange(n_img), cols), 1).astype(np.float64), grid=(rows, cols),
            n_stages=n_stages)
        for arr in (state.x, state.keys, state.attention, state.sizes, state.assign, state.positions):
            arr.setflags(write=False)  # shared between methods: read-only
        with self._prepared_lock:
            self._states[key] = state
            while len(self._states) > 16:
                self._states.pop(next(iter(self._states)))
        return replace(state, extras={})

    def _apply_step(self, x: torch.Tensor, sizes: torch.Tensor, state: TokenState, step: ReductionStep):
        """The torch twin of :func:`explorer.core.reduction.apply_step` (tested against it)."""
        p = state.n_prefix
        x_pat, s_pat = x[0, p:], sizes[p:]
        n = x_pat.shape[0]
        if step.keep is not None:
            if step.keep.size and (step.keep.min() < 0 or step.keep.max() >= n):
                raise ValueError(f"keep index outside 0..{n - 1}")
            idx = torch.as_tensor(step.keep, device=x.device)
            new_x, new_s = x_pat.index_select(0, idx), s_pat.index_select(0, idx)
            new_pos = state.positions[step.keep]
            remap = np.full(n, -1, dtype=np.int64)
            remap[step.keep] = np.arange(step.keep.size)
        else:
            m = torch.as_tensor(step.merge, device=x.device)
            G = int(step.merge.max()) + 1
            new_s = torch.zeros(G, device=x.device, dtype=x.dtype).index_add_(0, m, s_pat)
            new_x = torch.zeros(G, x.shape[-1], device=x.device, dtype=x.dtype).index_add_(0, m, x_pat * s_pat[:, None])
            new_x = new_x / new_s[:, None]
            w = state.sizes[p:].astype(np.float64)
            new_pos = np.zeros((G, 2))
            np.add.at(new_pos, step.merge, state.positions * w[:, None])
            new_pos = new_pos / np.bincount(step.merge, weights=w, minlength=G)[:, None]
            remap = step.merge
        if step.fuse is not None:
            wts = torch.as_tensor(np.asarray(step.fuse), device=x.device, dtype=x.dtype)
            members = np.asarray(step.fuse) != 0
            fused = (wts[:, None] * x_pat).sum(0, keepdim=True)
            f_index = new_x.shape[0]
            new_x = torch.cat([new_x, fused], 0)
            new_s = torch.cat([new_s, s_pat[torch.as_tensor(members, device=x.device)].sum().reshape(1)])
            new_pos = np.concatenate([new_pos, [state.positions[members].mean(0) if members.any() else [np.nan, np.nan]]], 0)
            remap = np.where((remap < 0) & members, f_index, remap)
        assign = np.where(state.assign >= 0, remap[np.clip(state.assign, 0, None)], -1)
        x = torch.cat([x[:, :p], new_x[None]], 1)
        sizes = torch.cat([sizes[:p], new_s])
        return x, sizes, assign, new_pos

    @torch.inference_mode()
    def encode_image_tensor(self, pixels: torch.Tensor) -> np.ndarray:
        """Plain ``encode_image`` on a batch ``(B, 3, h, w)``: ``(B, E)`` L2-normalised."""
        with self.lock:
            self.forward_count += 1
            feats = self.model.encode_image(pixels.to(self.device, dtype_of(self.spec.precision)), normalize=True)
        return feats.float().cpu().numpy()

    # -- gradients and scores --------------------------------------------------------------------
    def gradient_pass(
        self,
        image: LoadedImage | PreparedImage,
        text_embedding: np.ndarray,
        attention_layers: Sequence[int] = (),
        hidden_layers: Sequence[int] = (),
        cancel: CancelToken | None = None,
    ) -> "GradientPass":
        """One forward and backward pass of the image-text logit.

        The target is ``y = logit_scale * cos(f_image, t)`` for the (normalised) text embedding
        ``t (E,)``, CLIP's ``logits_per_image`` entry for that prompt. Returns the post-softmax
        attention ``(H, N, N)`` and its gradient ``dy/dA`` for ``attention_layers``, and the hidden
        states ``(N, D)`` with their gradients for ``hidden_layers`` (indices as in :class:`Trace`:
        0 = embeddings, ``l`` = output of block ``l - 1``). Methods ask for this; they never
        touch the model.
        """
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)
        t = torch.as_tensor(np.asarray(text_embedding, dtype=np.float32), device=self.device)
        t = F.normalize(t.float(), dim=-1)
        hidden: dict[int, torch.Tensor] = {}
        with self.lock, torch.enable_grad():
            pixels = prepared.pixels.detach().clone().requires_grad_(True)
            with probe_attention([b.attn for b in self.blocks], attention_layers, None, keep_graph=True) as probe:
                x = self.visual._embeds(pixels)
                if 0 in hidden_layers:
                    x.retain_grad()
                    hidden[0] = x
                for i, block in enumerate(self.blocks):
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    x = block(x)
                    if i + 1 in hidden_layers:
                        x.retain_grad()
                        hidden[i + 1] = x
                pooled, _ = self.visual._pool(x)
                if self.visual.proj is not None:
                    pooled = pooled @ self.visual.proj
                score = self.model.logit_scale.exp().float() * (F.normalize(pooled.float(), dim=-1)[0] @ t)
                score.backward()
            self.forward_count += 1
        return GradientPass(
            score=float(score.detach()),
            attentions={l: p[0].detach().float().cpu().numpy() for l, p in probe.probs.items()},
            attention_grads={l: p.grad[0].float().cpu().numpy() for l, p in probe.probs.items()},
            hidden={l: h[0].detach().float().cpu().numpy() for l, h in hidden.items()},
            hidden_grads={l: h.grad[0].float().cpu().numpy() for l, h in hidden.items()},
            input_grad=pixels.grad[0].float().cpu().numpy(),
        )

    def masked_inputs(self, prepared: PreparedImage, masks: np.ndarray, baseline: str = "mean") -> torch.Tensor:
        """Model inputs with the pixels of masked image tokens replaced by a baseline.

        ``masks (K, n_image_tokens)`` bool, True = remove that token's patch. Baselines: 'mean'
        (the normalisation mean, i.e. 0 after normalising), 'blur' (a heavily blurred copy),
        'zero' (black). Returns ``(K, 3, h, w)``.
        """
        masks = np.asarray(masks, dtype=bool)
        x = prepared.pixels[0]
        if baseline == "mean":
            base = torch.zeros_like(x)
        elif baseline == "zero":
            mean = torch.tensor(self.visual.preprocess_cfg.get("mean", (0.0, 0.0, 0.0)), device=x.device, dtype=x.dtype)
            std = torch.tensor(self.visual.preprocess_cfg.get("std", (1.0, 1.0, 1.0)), device=x.device, dtype=x.dtype)
            base = ((0.0 - mean) / std).view(3, 1, 1).expand_as(x)
        elif baseline == "blur":
            k = max(3, (min(x.shape[-2:]) // 8) | 1)
            base = F.avg_pool2d(x[None], k, stride=1, padding=k // 2, count_include_pad=False)[0]
        else:
            raise ValueError(f"unknown baseline {baseline!r}; use mean, blur or zero")
        seg = prepared.layout.segments[0]
        pix = torch.zeros((masks.shape[0], 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
        for k in range(masks.shape[0]):
            for t in np.nonzero(masks[k])[0]:
                r, c = divmod(int(t), seg.cols)
                b = seg.cell_box_frame(r, c)
                pix[k, 0, int(round(b.y0)):int(round(b.y1)), int(round(b.x0)):int(round(b.x1))] = 1
        return x[None] * (1 - pix) + base[None] * pix

    @torch.inference_mode()
    def score_inputs(self, pixels: torch.Tensor, text_embedding: np.ndarray | None = None,
                     reference: np.ndarray | None = None, batch_size: int = 32,
                     cancel: CancelToken | None = None) -> np.ndarray:
        """Scores of a batch of model inputs ``(B, 3, h, w)``: the image-text logit for
        ``text_embedding`` (``logit_scale * cos``), or the cosine to ``reference (E,)``. ``(B,)``."""
        if (text_embedding is None) == (reference is None):
            raise ValueError("give a text embedding or a reference embedding")
        vec = text_embedding if text_embedding is not None else reference
        t = F.normalize(torch.as_tensor(np.asarray(vec, dtype=np.float32), device=self.device), dim=-1)
        scale = float(self.model.logit_scale.exp()) if text_embedding is not None else 1.0
        out = []
        for i in range(0, pixels.shape[0], batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            with self.lock:
                f = self.model.encode_image(pixels[i:i + batch_size].to(self.device, dtype_of(self.spec.precision)), normalize=True)
                self.forward_count += 1
            out.append((scale * (f.float() @ t)).cpu().numpy())
        return np.concatenate(out)

    # -- text -----------------------------------------------------------------------------------
    def _pooled_position(self, row: np.ndarray) -> int:
        """Index of the token whose feature the text tower pools (mirrors ``text_global_pool``)."""
        pool = getattr(self.model, "text_pool_type", "argmax")
        if pool == "argmax":
            return int(row.argmax())
        if pool == "eos":
            hits = np.nonzero(row == getattr(self.model, "text_eos_id", -1))[0]
            return int(hits[0]) if hits.size else int(row.argmax())
        if pool == "first":
            return 0
        return len(row) - 1

    @torch.inference_mode()
    def _encode_strings(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer(list(texts))
        with self.lock:
            emb = self.model.encode_text(ids.to(self.device), normalize=True)
        return emb.float().cpu().numpy(), ids.cpu().numpy()

    def encode_text(self, prompts: Sequence[str], templates: str | None = None) -> TextEncoding:
        """Encode prompts with the text tower: ``(T, E)`` L2-normalised embeddings and tokens.

        ``templates``: ``None`` encodes each prompt as typed; ``"imagenet-80"`` (CLIP's 80 ImageNet
        prompt templates from open_clip), ``"single"`` (``"a photo of a {}."``) or any format
        string containing ``{}`` encode every template, L2-normalise, average and normalise again
        (the prompt-ensembling of CLIP and of the dense-map methods). Results are cached.
        """
        prompts = tuple(p.strip() for p in prompts if p.strip())
        if not prompts:
            raise ValueError("no text prompt given")
        key = (prompts, templates)
        cached = self._text_cache.get(key)
        if cached is not None:
            return cached
        fmt = template_strings(templates)
        emb_plain, ids = self._encode_strings(prompts)
        if fmt is None:
            emb = emb_plain
        else:
            rows = []
            for p in prompts:
                e, _ = self._encode_strings([f.format(p) for f in fmt])
                m = e.mean(0)
                rows.append(m / np.linalg.norm(m))
            emb = np.stack(rows).astype(np.float32)
        tokens, pooled = [], []
        for row in ids:
            end = self._pooled_position(row)
            pooled.append(end)
            tokens.append(tuple(self._token_strings(row[: end + 1])))
        enc = TextEncoding(prompts=prompts, embeddings=emb, tokens=tuple(tokens), pooled_index=tuple(pooled))
        if len(self._text_cache) > 256:
            self._text_cache.clear()
        self._text_cache[key] = enc
        return enc

    def _token_strings(self, ids: np.ndarray) -> list[str]:
        tok = self.tokenizer
        inner = getattr(tok, "tokenizer", None)  # open_clip HFTokenizer wraps a transformers tokenizer
        if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
            return [str(t) for t in inner.convert_ids_to_tokens([int(i) for i in ids])]
        decoder = getattr(tok, "decoder", None)
        if decoder is not None:
            out = []
            for i in ids:
                s = decoder.get(int(i), "?")
                out.append(s.replace("</w>", ""))
            return out
        return [str(int(i)) for i in ids]

    # -- blocks for dense-map methods ------------------------------------------------------------
    def block_qkv(self, layer: int, x: torch.Tensor) -> tuple[AttentionAdapter, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ln_1`` then the in-projection of block ``layer``: ``(adapter, q, k, v)``, each
        ``(B, H, N, dh)``; ``adapter.logits(q, k)`` gives the block's own attention scores."""
        adapter = self.adapters[layer]
        q, k, v = adapter.qkv(self.blocks[layer].ln_1(x))
        return adapter, q, k, v

    def block_attention_output(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        """Heads ``o (B, H, N, dh)`` -> the attention branch's output ``(B, N, D)`` (output
        projection, then the block's optional post-attention norm and layer scale)."""
        block = self.blocks[layer]
        a = self.adapters[layer].output(o)
        if hasattr(block, "ln_attn"):
            a = block.ln_attn(a)
        return getattr(block, "ls_1", torch.nn.Identity())(a)

    def block_mlp(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """The MLP branch of block ``layer`` on ``y (B, N, D)`` (``ls_2(mlp(ln_2(y)))``)."""
        block = self.blocks[layer]
        return getattr(block, "ls_2", torch.nn.Identity())(block.mlp(block.ln_2(y)))

    def run_block(
        self,
        layer: int,
        x: torch.Tensor,
        attention: Callable[[AttentionAdapter, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        residual: bool = True,
        ffn: bool = True,
    ) -> torch.Tensor:
        """Run block ``layer`` on ``x (B, N, D)`` with an optional replacement attention.

        ``attention(adapter, q, k, v) -> o (B, H, N, dh)`` replaces softmax(qk^T)v. Without
        ``residual`` the attention output is not added to ``x``; without ``ffn`` the MLP branch is
        skipped (ClearCLIP-style variants).
        """
        adapter, q, k, v = self.block_qkv(layer, x)
        o = torch.softmax(adapter.logits(q, k), dim=-1) @ v if attention is None else attention(adapter, q, k, v)
        a = self.block_attention_output(layer, o)
        y = x + a if residual else a
        if ffn:
            y = y + self.block_mlp(layer, y)
        return y

    def project_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj`` on every token: ``(B, N, D) -> (B, N, E)`` (not normalised)."""
        y = self.visual.ln_post(x)
        if self.visual.proj is not None:
            y = y @ self.visual.proj
        return y

    def to_tensor(self, array: np.ndarray) -> torch.Tensor:
        """A trace array ``(N, D)`` as a ``(1, N, D)`` tensor on the model's device and dtype."""
        return torch.as_tensor(np.asarray(array), device=self.device).to(dtype_of(self.spec.precision)).unsqueeze(0)

    def device_text(self) -> str:
        return device_report(self.device).text()
