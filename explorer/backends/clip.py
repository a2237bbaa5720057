"""The open_clip backend: load any open_clip ViT, trace it, encode text.

Loading goes through ``open_clip.create_model_and_transforms`` exactly as a user would call it
(pretrained tag, ``hf-hub:`` name, ``local-dir:`` folder, or an architecture plus a local
checkpoint), with ``weights_only=True``. Hub files that are neither cached nor reachable are
refused before the loader runs (:func:`hub_files`, :mod:`explorer.backends.network`), so an
offline load fails at once with one line instead of the hub client's retries; a local checkpoint
of another architecture is reported by the first tensor whose shape differs
(:func:`checkpoint_mismatch`), a damaged or code-carrying one by its file. The model's own
validation preprocessing is applied to the image and turned into a :class:`TokenLayout`
(:mod:`explorer.backends.preprocess`).

Tracing runs the vision tower block by block with open_clip's own modules (``_embeds``, the
residual blocks, ``_pool``, ``proj``); between blocks the cancel token is checked and progress is
reported. Attention probabilities are kept only for the layers asked for
(:func:`explorer.backends.attention.probe_attention`); every other layer uses the fused kernel.
Sequence layout of the vision tower: ``[CLS, patch(0,0), patch(0,1), ...]`` row-major.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
import warnings
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
from explorer.core.reduction import batch_step as _batch_step
from explorer.core.reduction import stack_steps as _stack_steps
from explorer.core.trace import CaptureSpec, ModelInfo, TextEncoding, Trace

from . import network
from .attention import AttentionAdapter, adapter_for, probe_attention
from .devices import (OutOfMemory, device_memory, device_report, dtype_of, host_view, is_out_of_memory,
                      release_memory, resolve_device, synchronize)
from .errors import ModelLoadError, find_bad_weights_file, weights_file_reason
from .preprocess import apply_with_geometry
from .specs import ClipSpec

log = logging.getLogger(__name__)

__all__ = ["ClipBackend", "ModelLoadError", "PreparedImage", "GradientPass", "OutputParts", "template_strings"]


@dataclass(frozen=True)
class PreparedImage:
    """Model input ``pixels (1, 3, h, w)`` on the model's device, and its token layout."""

    pixels: torch.Tensor
    layout: TokenLayout
    sha256: str


@dataclass(frozen=True)
class GradientPass:
    """What :meth:`ClipBackend.gradient_pass` returns. See its docstring. The arrays are the
    model's own tensors on its device (numpy for a CPU model), as traces keep them."""

    score: float
    attentions: dict
    attention_grads: dict
    hidden: dict
    hidden_grads: dict
    input_grad: object  # (3, h, w) gradient of the score w.r.t. the model input


@dataclass(frozen=True)
class OutputParts:
    """The linear pieces of one block from its heads to its MLP (see
    :meth:`ClipBackend.attention_output_parts`): ``out_weight (D, D)`` (columns ``h·dh:(h+1)·dh``
    belong to head ``h``), ``out_bias (D,)``, ``layer_scale (D,)``, ``head_scale (H,)``,
    ``ln2_weight (D,)`` and ``ln2_eps``; tensors on the model's device, read-only."""

    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    layer_scale: torch.Tensor | None
    head_scale: torch.Tensor | None
    ln2_weight: torch.Tensor
    ln2_eps: float
    n_heads: int


def _is_identity(module) -> bool:
    return module is None or isinstance(module, torch.nn.Identity)


def template_strings(templates: str | None) -> list[str] | None:
    """Format strings for a template set name (see :meth:`ClipBackend.encode_text`)."""
    if templates is None or templates in ("", "none"):
        return None
    if templates == "imagenet-80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if templates == "maskclip-85":  # MaskCLIP's prompt engineering: the 80 and five scene templates
        return template_strings("imagenet-80") + MASKCLIP_SCENE_TEMPLATES
    if templates == "single":
        return ["a photo of a {}."]
    if "{}" in templates:
        return [templates]
    raise ValueError(f"unknown prompt templates {templates!r}; use none, single, imagenet-80, maskclip-85 or a string "
                     "with {}")


# MaskCLIP (Zhou, Loy & Dai, ECCV 2022; chongzhou96/MaskCLIP, tools/maskclip_utils/prompt_engineering.py)
# ensembles CLIP's 80 ImageNet templates and these five
MASKCLIP_SCENE_TEMPLATES = ["there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
                            "this is the {} in the scene.", "this is one {} in the scene."]


LOCAL_CLIP_FORMS = "MODEL@/path/to/checkpoint or local-dir:/path"  # the spec forms that load local files


def hub_files(model_name: str, pretrained: str | None) -> list[tuple[str, tuple[str, ...]]]:
    """The Hugging Face hub files ``open_clip.create_model_and_transforms`` would fetch for this
    name and ``pretrained`` value, as ``(repository, alternatives)`` pairs (any one alternative
    serves, the first preferred): for ``hf-hub:org/repo`` its ``open_clip_config.json`` and its
    weights; for a pretrained tag the file its pretrained config names (``hf_hub``, safetensors
    first, as open_clip prefers). Empty when nothing comes from the hub (local folders and files,
    random weights, tags with only a download URL)."""
    from open_clip import pretrained as oc

    weights, safe = oc.HF_WEIGHTS_NAME, oc.HF_SAFE_WEIGHTS_NAME
    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:"):].strip()
        return [(repo, ("open_clip_config.json",)), (repo, (safe, weights))] if repo else []
    if model_name.startswith("local-dir:") or not pretrained:
        return []
    cfg = oc.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    if not cfg or cfg.get("file") or not cfg.get("hf_hub"):
        return []
    repo, filename = posixpath.split(cfg["hf_hub"])  # 'org/repo/' or 'org/repo/file', as open_clip splits it
    filename = filename or weights
    if filename == weights:
        names: tuple[str, ...] = (safe, weights)
    elif filename.endswith((".bin", ".pth")):
        names = (filename[:-4] + ".safetensors", filename)
    else:
        names = (filename,)
    return [(repo, names)]


def _fail_fast_offline(spec: ClipSpec, model_name: str, pretrained: str | None) -> None:
    """Refuse at once (``ModelLoadError``) a load whose hub files are not cached while the hub
    cannot be reached, instead of letting the loader retry for tens of seconds."""
    for repo, names in hub_files(model_name, pretrained):
        if network.cached_hub_file(repo, names) is None and not network.hub_reachable():
            raise ModelLoadError(network.offline_message(spec.display_name, LOCAL_CLIP_FORMS))


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + (",)" if len(shape) == 1 else ")")


def _listed(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def checkpoint_mismatch(model_name: str, checkpoint: str) -> str | None:
    """How the state dict in ``checkpoint`` does not fit the open_clip architecture ``model_name``:
    ``"positional_embedding is (77, 768) in the file, the model has (77, 512)"`` (the first tensor
    whose shape differs, and how many more do), or the tensors one has and the other lacks;
    ``None`` when the file fits (or cannot be read: the loader's own error stands then).

    The checkpoint is read as open_clip's loader reads it (``weights_only=True``, its key
    conversions) and compared with the architecture built on the ``meta`` device (no memory, no
    initialisation). Position embeddings whose width matches are not counted: the loader resizes
    them to the model's grid or context."""
    import open_clip
    from open_clip import factory

    try:
        with torch.device("meta"):
            model = open_clip.create_model(model_name, pretrained=None, device="meta", load_weights=False)
        state = factory.load_state_dict(checkpoint, device="cpu", weights_only=True)
        convert = getattr(factory, "convert_state_dict", None)
        if convert is not None:
            state = convert(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = factory.convert_to_custom_text_state_dict(state)
    except Exception:  # noqa: BLE001 - no diagnosis possible; the loader's message is reported
        return None
    expected = model.state_dict()
    differ = []
    for key, tensor in expected.items():
        if key not in state or not hasattr(state[key], "shape"):
            continue
        got, want = tuple(state[key].shape), tuple(tensor.shape)
        if got == want or (key.endswith("positional_embedding") and got[-1:] == want[-1:] and len(got) == len(want)):
            continue
        if key.endswith("logit_scale") or key.endswith("logit_bias"):
            if int(np.prod(got or (1,))) == int(np.prod(want or (1,))):
                continue  # scalar vs 1-element: the loader reshapes it
        differ.append((key, got, want))
    if differ:
        key, got, want = differ[0]
        more = f" ({len(differ) - 1} more tensors differ)" if len(differ) > 1 else ""
        return f"{key} is {_shape(got)} in the file, the model has {_shape(want)}{more}"
    ignored = ("position_ids", "logit_bias", "attn_mask")
    missing = [k for k in expected if k not in state and not k.endswith(ignored)]
    extra = [k for k in state if k not in expected and not k.endswith(ignored)]
    if missing:
        return f"the file lacks {len(missing)} tensors of the model ({_listed(missing)})"
    if extra:
        return f"the file has {len(extra)} tensors the model does not ({_listed(extra)})"
    return None


def _checkpoint_file(model_name: str, pretrained: str | None) -> str | None:
    """The local checkpoint file a load reads: an explicit path, or the weights in a
    ``local-dir:`` folder; ``None`` when the weights come from the hub or nowhere."""
    if pretrained and Path(pretrained).is_file():
        return pretrained
    if model_name.startswith("local-dir:"):
        from open_clip import factory

        find = getattr(factory, "_find_checkpoint_in_dir", None)
        if find is not None:
            found = find(Path(model_name[len("local-dir:"):]).expanduser())
            return str(found) if found else None
    return None


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
        self.dtype = dtype_of(spec.precision)
        # where traces keep their arrays: 'auto' = numpy for a CPU model, device tensors otherwise;
        # 'torch' keeps tensors on the CPU too (the array-API tests run every method both ways)
        self.trace_arrays = "auto"
        self._logit_scale = float(model.logit_scale.exp().item())
        self._text_cache: dict = {}
        self._prepared: OrderedDict[str, PreparedImage] = OrderedDict()  # last prepared images by sha256
        self._states: dict = {}  # token states of cached traces, by (image, capture, block, stages)
        self._unreduced: dict = {}  # seconds of the unreduced tower from a block, by (image, capture, block)
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
        _fail_fast_offline(spec, model_name, pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained,
                precision=spec.precision,
                device=device,
                weights_only=True,
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError, ValueError, KeyError, AssertionError) as exc:
            msg = _first_line(exc)
            checkpoint = _checkpoint_file(model_name, pretrained)
            if checkpoint is not None and (isinstance(exc, AssertionError) or "state_dict" in msg
                                           or "size mismatch" in msg.lower()):
                mismatch = checkpoint_mismatch(model_name, checkpoint)
                if mismatch is not None:
                    label = checkpoint if model_name.startswith("local-dir:") else f"{spec.model}@{checkpoint}"
                    raise ModelLoadError(f"{label} does not fit {model_name}: {mismatch}") from None
            if isinstance(exc, AssertionError):
                raise ModelLoadError(f"could not load {spec.display_name}: the checkpoint does not fit {model_name} "
                                     f"({msg})") from None
            low = msg.lower()
            if any(s in low for s in ("connection", "offline", "resolve", "network", "max retries", "cannot find the requested files", "localentrynotfound")):
                raise ModelLoadError(
                    f"could not fetch weights for {spec.display_name}: no network or not in the cache "
                    f"({msg}); pass a local checkpoint ({LOCAL_CLIP_FORMS})"
                ) from exc
            if "size mismatch" in low or "missing key" in low or "unexpected key" in low:
                raise ModelLoadError(f"checkpoint does not match architecture {model_name}: {msg}") from exc
            raise ModelLoadError(f"could not load {spec.display_name}: {msg}") from exc
        except Exception as exc:  # noqa: BLE001 - third-party loaders raise anything (pickle, safetensors)
            reason = weights_file_reason(exc)
            checkpoint = _checkpoint_file(model_name, pretrained) if reason else None
            if reason and checkpoint is None and model_name.startswith("local-dir:"):
                checkpoint = find_bad_weights_file(Path(model_name[len("local-dir:"):]).expanduser(), reason)
            if reason:
                where = f"{checkpoint}" if checkpoint else "its weights file"
                raise ModelLoadError(f"could not load {spec.display_name}: {where} {reason}") from None
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

    # -- where trace arrays live ---------------------------------------------------------------
    def host_arrays(self) -> bool:
        """True when traces keep numpy arrays: a model on the CPU (unless :attr:`trace_arrays` is
        ``'torch'``); on a GPU or MPS they stay tensors on the device, in the model's dtype."""
        if self.trace_arrays == "numpy":
            return True
        if self.trace_arrays == "torch":
            return False
        return self.device.type == "cpu"

    def _keep(self, t: torch.Tensor):
        """An array of the pass as a trace keeps it (see :meth:`host_arrays`). On the CPU the numpy
        array shares the tensor's memory (no copy)."""
        return host_view(t, self.host_arrays())

    @property
    def logit_scale(self) -> float:
        """CLIP's trained temperature ``exp(logit_scale)`` (100 for OpenAI's models)."""
        return self._logit_scale

    def to_trace_array(self, t: torch.Tensor):
        """A tensor the way traces keep arrays (numpy for a CPU model, the device tensor otherwise):
        methods return features in the namespace of the trace they explain."""
        return self._keep(t)

    def synchronize(self) -> None:
        synchronize(self.device)

    def trace(
        self,
        image: LoadedImage | PreparedImage,
        capture: CaptureSpec,
        cancel: CancelToken | None = None,
    ):
        """Job: run the vision tower once and return a :class:`Trace` with what ``capture`` asks.

        The captured arrays stay on the model's device (numpy on the CPU); the image embedding is
        copied to the host once at the end. Yields :class:`Progress` between blocks; raises
        :class:`Cancelled` between blocks when ``cancel`` is set. ``trace.seconds`` is measured
        with the device synchronised.
        """
        prepared = image if isinstance(image, PreparedImage) else self.prepare(image)
        L = self.info.n_layers
        bad = [i for i in capture.attention_layers if i >= L] + [i for i in capture.hidden_layers if i > L]
        if bad:
            raise ValueError(f"capture asks for layers {sorted(bad)} but the model has {L} blocks")
        n = prepared.layout.n_tokens
        if capture.attention_rows is not None and any(r >= n for r in capture.attention_rows):
            raise ValueError(f"attention rows {capture.attention_rows} outside a sequence of {n}")
        hidden: dict = {}
        yield Progress(0.0, "vision tower")
        # inference mode is entered per step, never across a yield (it is thread-local state)
        with self.lock:
            self.synchronize()
            start = time.perf_counter()
            try:
                with probe_attention([b.attn for b in self.blocks], capture.attention_layers, capture.attention_rows) as probe:
                    with torch.inference_mode():
                        x = self.visual._embeds(prepared.pixels)
                    if 0 in capture.hidden_layers:
                        hidden[0] = self._keep(x[0])
                    for i, block in enumerate(self.blocks):
                        if cancel is not None:
                            cancel.raise_if_cancelled()
                        with torch.inference_mode():
                            x = block(x)
                        if i + 1 in capture.hidden_layers:
                            hidden[i + 1] = self._keep(x[0])
                        yield Progress((i + 1) / (L + 1), f"block {i + 1}/{L}")
                    with torch.inference_mode():
                        pooled, _ = self.visual._pool(x)
                        if self.visual.proj is not None:
                            pooled = pooled @ self.visual.proj
                        embedding = F.normalize(pooled.float(), dim=-1)[0].cpu().numpy()
                    attentions = {l: self._keep(p[0]) for l, p in probe.probs.items()}
            except RuntimeError as exc:
                if is_out_of_memory(exc):
                    release_memory(self.device)
                    raise OutOfMemory(
                        f"out of memory on {self.device} while tracing; capture fewer layers or use device=cpu"
                    ) from exc
                raise
            finally:
                self.forward_count += 1
            seconds = time.perf_counter() - start
        trace = Trace(
            layout=prepared.layout,
            model=self.info,
            image_sha256=prepared.sha256,
            capture=capture,
            hidden_states=hidden,
            attentions=attentions,
            attention_rows=capture.attention_rows,
            image_embedding=embedding.astype(np.float32),
            logit_scale=self._logit_scale,
            seconds=seconds,
        )
        yield Progress(1.0, "traced")
        return trace

    # -- executed token reduction ----------------------------------------------------------------
    def run_reduced(
        self,
        source: "Trace | LoadedImage | PreparedImage",
        stages: Sequence[int],
        reduce: Callable[[TokenState], ReductionStep] | None = None,
        proportional_attention: bool = False,
        cancel: CancelToken | None = None,
        attention: str = "full",
        batched: bool = False,
        host: bool = True,
        from_block: int | None = None,
    ) -> ReducedRun:
        """Run the vision tower with token reduction executed for real.

        At every block in ``stages``, after the attention branch and before the MLP, the current
        tokens are handed to ``reduce`` (a :class:`TokenState`) and its :class:`ReductionStep` is
        applied: dropped tokens leave the sequence, merged tokens become size-weighted means, and
        every later block runs on the shorter sequence. With ``proportional_attention`` (ToMe)
        each key's logit gets ``+log(size)``, as an additive mask of the fused kernel.

        ``source``: a :class:`Trace` (one image; the run starts at the first stage from the hidden
        state entering it when the trace holds it), a :class:`LoadedImage`, or a
        :class:`PreparedImage` whose ``pixels`` may hold a batch ``(B, 3, h, w)``: every image
        keeps the same number of tokens. With no ``stages`` the same loop runs unreduced (the
        reference a reduction's time is compared with), from ``from_block`` of a trace holding
        that block's input when given (the blocks a reduction from that trace runs).

        Kernels: blocks run the fused ``scaled_dot_product_attention``; a reducing block computes
        the probabilities only as far as the method asked (``attention``): ``'none'``, ``'cls'``
        (the first prefix token's row alone, :attr:`TokenState.cls_row`) or ``'full'``
        (:attr:`TokenState.attention`). Decisions and bookkeeping stay on the device; what the
        run reports is copied to the host once at the end.

        ``reduce`` sees one image at a time (an unbatched state; numpy arrays with ``host``, else
        the device's tensors) unless ``batched``, when it decides for the whole batch at once.
        """
        stages = tuple(sorted(set(int(s) for s in stages)))
        L = self.info.n_layers
        if stages and (stages[0] < 0 or stages[-1] >= L):
            raise ValueError(f"reduction blocks {stages} outside 0..{L - 1}")
        if not stages and from_block is not None and isinstance(source, Trace) and from_block in source.hidden_states:
            return self._plain_from(source, int(from_block), cancel)
        if stages and reduce is None:
            raise ValueError("a reduction needs a decision function")
        if attention not in ("none", "cls", "full"):
            raise ValueError(f"attention must be none, cls or full, not {attention!r}")
        if stages and self.visual.attn_pool is not None:
            raise ValueError("token reduction is not supported for towers with an attention pooler")
        start = stages[0] if stages else L
        D = self.info.width
        mlp_width = int(self.blocks[0].mlp.c_fc.out_features)
        rows, cols = self.info.input_size[0] // self.info.patch_size[0], self.info.input_size[1] // self.info.patch_size[1]
        n_img = rows * cols
        n_prefix = 1
        macs = 0.0
        tokens_per_block = []
        with self.lock, torch.inference_mode():
            if isinstance(source, Trace) and stages and start in source.hidden_states:
                x = self.to_tensor(source.hidden(start))
                first = start
            else:
                if isinstance(source, PreparedImage):
                    prepared = source
                elif isinstance(source, LoadedImage):
                    prepared = self.prepare(source)
                else:
                    prepared = self.prepared_for(source)
                x = None
                first = 0
            self.synchronize()
            t0 = time.perf_counter()
            if x is None:
                x = self.visual._embeds(prepared.pixels.to(self.device, self.dtype))
            B, N0 = int(x.shape[0]), int(x.shape[1])
            for l in range(first):
                tokens_per_block.append(N0)
                macs += block_macs(N0, N0, D, mlp_width)
            for l in range(first, start):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                x = self.blocks[l](x)
                tokens_per_block.append(N0)
                macs += block_macs(N0, N0, D, mlp_width)
            dev = x.device
            pos_dtype = torch.float64 if dev.type == "cpu" else torch.float32
            sizes = torch.ones(B, x.shape[1], device=dev, dtype=torch.float32)
            grid = torch.arange(n_img, device=dev)
            assign = grid.expand(B, n_img).clone()
            positions = torch.stack([grid // cols, grid % cols], -1).to(pos_dtype).expand(B, n_img, 2).clone()
            stage_assign, first_scores = [], None
            merged = False  # sizes are all 1 until a merge: the bias log(size) is then 0
            for l in range(start, L):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                n_in = x.shape[1]
                bias = None
                if proportional_attention and merged:
                    bias = torch.log(sizes).to(x.dtype)[:, None, None, :]
                if l not in stages:
                    x = self.blocks[l](x) if bias is None else self._block_fused(l, x, bias)
                    tokens_per_block.append(n_in)
                    macs += block_macs(n_in, n_in, D, mlp_width)
                    continue
                adapter, q, k, v = self._qkv(l, x)
                probs = cls_row = None
                if attention == "full":
                    logits = adapter.logits(q, k)
                    if bias is not None:
                        logits = logits + bias
                    probs = torch.softmax(logits, dim=-1)
                    o = probs @ v
                else:
                    o = adapter.fused(q, k, v, attn_mask=bias)
                    if attention == "cls":
                        logits = adapter.logits(q[:, :, :1], k)
                        if bias is not None:
                            logits = logits + bias
                        cls_row = torch.softmax(logits, dim=-1)[:, :, 0]
                x = x + self._attention_output(l, o)
                state = TokenState(layer=l, stage=stages.index(l), x=x, keys=k, attention=probs, sizes=sizes,
                                   n_prefix=n_prefix, assign=assign, positions=positions, grid=(rows, cols),
                                   n_stages=len(stages), cls_row=cls_row)
                step = self._decide(state, reduce, batched, host)
                if first_scores is None and step.scores is not None:
                    sc = self.as_tensor(step.scores)
                    sc = sc.reshape(B, -1).to(torch.float32)
                    first_scores = torch.where(assign >= 0, sc.gather(1, assign.clamp(min=0)), float("nan"))
                x, sizes, assign, positions = self._apply_batched(x, sizes, assign, positions, step, n_prefix)
                merged = merged or step.merge is not None or step.fuse is not None
                stage_assign.append(assign)
                n_mid = x.shape[1]
                macs += block_macs(n_in, n_mid, D, mlp_width)
                tokens_per_block.append(n_in)
                x = x + self._mlp(l, x)
            if stages and self.visual.pool_type == "avg":  # size-weighted mean over the (merged) patch tokens
                w = sizes[:, n_prefix:, None].to(x.dtype)
                pooled = self.visual.ln_post((x[:, n_prefix:] * w).sum(1) / w.sum(1))
            else:
                pooled, _ = self.visual._pool(x)
            if self.visual.proj is not None:
                pooled = pooled @ self.visual.proj
            embeddings = F.normalize(pooled.float(), dim=-1)
            self.synchronize()
            seconds = time.perf_counter() - t0
            self.forward_count += 1
            macs_run = macs - sum(block_macs(N0, N0, D, mlp_width) for _ in range(first))
            # one copy of what is reported, after the clock stopped
            embeddings = embeddings.cpu().numpy()
            assigns = assign.cpu().numpy()
            sizes_h = sizes.cpu().numpy()
            stage_h = [a[0].cpu().numpy() for a in stage_assign]
            scores_h = None if first_scores is None else first_scores[0].cpu().numpy()
        return ReducedRun(
            embedding=embeddings[0], tokens_per_block=tuple(tokens_per_block), assign=assigns[0],
            sizes=sizes_h[0], stage_assign=tuple(stage_h), scores=scores_h, macs=macs, seconds=seconds,
            stages=stages, embeddings=embeddings, assigns=assigns, device=str(self.device), first_block=first,
            macs_run=macs_run,
        )

    def _plain_from(self, trace: Trace, block: int, cancel: CancelToken | None) -> ReducedRun:
        """The unreduced tower from ``trace``'s input of ``block`` to the embedding (timed)."""
        D, L = self.info.width, self.info.n_layers
        mlp_width = int(self.blocks[0].mlp.c_fc.out_features)
        with self.lock, torch.inference_mode():
            x = self.to_tensor(trace.hidden(block))
            self.synchronize()
            t0 = time.perf_counter()
            for l in range(block, L):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                x = self.blocks[l](x)
            pooled, _ = self.visual._pool(x)
            if self.visual.proj is not None:
                pooled = pooled @ self.visual.proj
            emb = F.normalize(pooled.float(), dim=-1)
            self.synchronize()
            seconds = time.perf_counter() - t0
            emb = emb.cpu().numpy()
        n = int(x.shape[1])
        per = block_macs(n, n, D, mlp_width)
        n_img = n - 1
        return ReducedRun(embedding=emb[0], tokens_per_block=(n,) * L, assign=np.arange(n_img), sizes=np.ones(n, np.float32),
                          stage_assign=(), scores=None, macs=per * L, seconds=seconds, stages=(), embeddings=emb,
                          assigns=np.arange(n_img)[None], device=str(self.device), first_block=block,
                          macs_run=per * (L - block))

    def unreduced_seconds(self, trace: Trace, block: int) -> float:
        """Seconds of the unreduced tower from ``block`` of ``trace`` (what a reduction run from the
        same trace computes), measured once per image and block (the second of two runs, warm) and
        remembered: the reference of every reduction's time."""
        key = (trace.image_sha256, trace.capture.key(), int(block))
        with self._prepared_lock:
            hit = self._unreduced.get(key)
        if hit is not None:
            return hit
        runs = [self.run_reduced(trace, (), from_block=block).seconds for _ in range(2)]
        with self._prepared_lock:
            self._unreduced[key] = runs[-1]
            while len(self._unreduced) > 64:
                self._unreduced.pop(next(iter(self._unreduced)))
        return runs[-1]

    def _decide(self, state: TokenState, reduce, batched: bool, host: bool) -> ReductionStep:
        """The method's step for a batched state: one call with ``batched``, else one call per
        image (numpy copies with ``host``), stacked."""
        if batched:
            step = reduce(state.to_host() if host else state)
            return step
        steps = []
        for b in range(state.batch_size):
            one = state.image(b)
            steps.append(reduce(one.to_host() if host else one))
        if len(steps) == 1:
            return _batch_step(steps[0])
        return _stack_steps(steps)

    def _apply_batched(self, x, sizes, assign, positions, step: ReductionStep, n_prefix: int):
        """Apply a batched step on the device (the torch twin of
        :func:`explorer.core.reduction.apply_step`, tested against it): ``x (B, N, D)``, ``sizes
        (B, N)`` float32, ``assign (B, n_img)``, ``positions (B, n, 2)``."""
        p = n_prefix
        dev = x.device
        x_pat, s_pat = x[:, p:], sizes[:, p:]
        B, n, D = x_pat.shape
        if step.keep is not None:
            keep = self.as_tensor(step.keep, torch.long).reshape(B, -1)
            if keep.numel() and dev.type == "cpu" and (int(keep.min()) < 0 or int(keep.max()) >= n):
                raise ValueError(f"keep index outside 0..{n - 1}")
            k = keep.shape[1]
            new_x = x_pat.gather(1, keep[..., None].expand(B, k, D))
            new_s = s_pat.gather(1, keep)
            new_pos = positions.gather(1, keep[..., None].expand(B, k, 2))
            remap = torch.full((B, n), -1, device=dev, dtype=torch.long)
            remap.scatter_(1, keep, torch.arange(k, device=dev).expand(B, k))
        else:
            m = self.as_tensor(step.merge, torch.long).reshape(B, n)
            G = int(step.n_groups) if step.n_groups is not None else int(m.max()) + 1
            w = s_pat
            new_s = torch.zeros(B, G, device=dev, dtype=w.dtype).scatter_add_(1, m, w)
            wx = (x_pat * w[..., None].to(x.dtype)).float() if x.dtype in (torch.float16, torch.bfloat16) else x_pat * w[..., None]
            new_x = torch.zeros(B, G, D, device=dev, dtype=wx.dtype).scatter_add_(1, m[..., None].expand(B, n, D), wx)
            new_x = (new_x / new_s[..., None].to(new_x.dtype)).to(x.dtype)
            wp = positions * w[..., None].to(positions.dtype)
            new_pos = torch.zeros(B, G, 2, device=dev, dtype=positions.dtype).scatter_add_(
                1, m[..., None].expand(B, n, 2), wp) / new_s[..., None].to(positions.dtype)
            remap = m
        if step.fuse is not None:
            fw = self.as_tensor(step.fuse).reshape(B, n)
            members = fw != 0
            fused = (fw[..., None].to(x.dtype) * x_pat).sum(1, keepdim=True)
            f_index = new_x.shape[1]
            new_x = torch.cat([new_x, fused], 1)
            new_s = torch.cat([new_s, (s_pat * members).sum(1, keepdim=True)], 1)
            mf = members[..., None].to(positions.dtype)
            new_pos = torch.cat([new_pos, (positions * mf).sum(1, keepdim=True) / mf.sum(1, keepdim=True)], 1)
            remap = torch.where((remap < 0) & members, torch.full_like(remap, f_index), remap)
        assign = torch.where(assign >= 0, remap.gather(1, assign.clamp(min=0)), torch.full_like(assign, -1))
        x = torch.cat([x[:, :p], new_x], 1)
        sizes = torch.cat([sizes[:, :p], new_s], 1)
        return x, sizes, assign, new_pos

    def _apply_step(self, x: torch.Tensor, sizes: torch.Tensor, state: TokenState, step: ReductionStep):
        """One unbatched step: ``x (1, N, D)``, ``sizes (N,)`` with the bookkeeping of ``state``
        (numpy); returns ``(x, sizes, assign, positions)`` (tests compare it with
        :func:`explorer.core.reduction.apply_step`)."""
        dev = x.device
        assign = torch.as_tensor(np.asarray(state.assign), device=dev)[None]
        pos = torch.as_tensor(np.asarray(state.positions, dtype=np.float64), device=dev)[None]
        x2, s2, a2, p2 = self._apply_batched(x, torch.as_tensor(sizes, device=dev).float()[None], assign, pos,
                                             _batch_step(step), state.n_prefix)
        return x2, s2[0], a2[0].cpu().numpy(), p2[0].cpu().numpy()

    def token_state(self, trace: Trace, layer: int, n_stages: int = 1, attention: str = "full") -> TokenState:
        """The :class:`TokenState` of block ``layer`` of the unreduced model, from a trace holding
        the hidden state entering that block: one block's attention branch is computed (cheap; the
        probabilities only as far as ``attention`` asks, or taken from the trace when captured).
        Used to compute a first-stage selection without running the tower. The state's arrays
        are in the trace's namespace (numpy on the CPU, device tensors otherwise), read-only and
        shared by the methods deciding at the same block."""
        if layer not in trace.hidden_states:
            raise ValueError(f"the trace does not hold the hidden state entering block {layer}")
        key = (trace.image_sha256, trace.capture.key(), layer, n_stages, attention, trace.on_device)
        with self._prepared_lock:
            hit = self._states.get(key)
        if hit is not None:  # several methods deciding at the same block share one state
            return replace(hit, extras={})
        rows, cols = trace.layout.segments[0].rows, trace.layout.segments[0].cols
        n_img = rows * cols
        host = not trace.on_device
        captured = trace.attentions.get(layer) if trace.attention_rows is None else None
        with self.lock, torch.inference_mode():
            x = self.to_tensor(trace.hidden(layer))
            adapter, q, k, v = self._qkv(layer, x)
            probs = cls_row = None
            if attention == "full" and captured is None:
                probs = torch.softmax(adapter.logits(q, k), dim=-1)
                o = probs @ v
            else:
                o = adapter.fused(q, k, v)
                if attention == "cls" and captured is None:
                    cls_row = torch.softmax(adapter.logits(q[:, :, :1], k), dim=-1)[:, :, 0]
            x = x + self._attention_output(layer, o)

            def out(t):
                if t is None:
                    return None
                t = t[0]
                if host:
                    t = t.float().cpu().numpy() if t.dtype != torch.float32 else t.cpu().numpy()
                    t.setflags(write=False)  # shared between methods: read-only
                return t

            if captured is not None and attention != "none":
                attn = captured
                if attention == "cls":
                    cls_row, attn = (captured[:, 0, :], None)
                else:
                    cls_row = None
            else:
                attn, cls_row = out(probs), out(cls_row)
            dev = x.device
            grid = np.arange(n_img)
            positions = np.stack(np.divmod(grid, cols), 1).astype(np.float64)
            if host:
                sizes = np.ones(x.shape[1], dtype=np.float32)
                assign = np.arange(n_img, dtype=np.int64)
                for arr in (sizes, assign, positions):
                    arr.setflags(write=False)
            else:
                sizes = torch.ones(x.shape[1], device=dev, dtype=torch.float32)
                assign = torch.arange(n_img, device=dev)
                positions = torch.as_tensor(positions, device=dev, dtype=torch.float32 if dev.type != "cpu" else torch.float64)
            state = TokenState(layer=layer, stage=0, x=out(x), keys=out(k), attention=attn, sizes=sizes, n_prefix=1,
                               assign=assign, positions=positions, grid=(rows, cols), n_stages=n_stages, cls_row=cls_row)
        with self._prepared_lock:
            self._states[key] = state
            while len(self._states) > 16:
                self._states.pop(next(iter(self._states)))
        return replace(state, extras={})

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
        keep = self._keep
        return GradientPass(
            score=float(score.detach()),
            attentions={l: keep(p[0]) for l, p in probe.probs.items()},
            attention_grads={l: keep(p.grad[0]) for l, p in probe.probs.items()},
            hidden={l: keep(h[0]) for l, h in hidden.items()},
            hidden_grads={l: keep(h.grad[0]) for l, h in hidden.items()},
            input_grad=keep(pixels.grad[0]),
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

    def encode_text(self, prompts: Sequence[str], templates: str | None = None, allow_empty: bool = False) -> TextEncoding:
        """Encode prompts with the text tower: ``(T, E)`` L2-normalised embeddings and tokens.

        ``templates``: ``None`` encodes each prompt as typed; ``"imagenet-80"`` (CLIP's 80 ImageNet
        prompt templates from open_clip), ``"maskclip-85"`` (those and MaskCLIP's five scene
        templates), ``"single"`` (``"a photo of a {}."``) or any format
        string containing ``{}`` encode every template, L2-normalise, average and normalise again
        (the prompt-ensembling of CLIP and of the dense-map methods). Results are cached.
        ``allow_empty`` encodes empty prompts too (CLIP Surgery's redundant feature is the
        embedding of the empty string).
        """
        prompts = tuple(p.strip() for p in prompts if p.strip() or allow_empty)
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

    # -- blocks (the internal, unlocked versions are used inside locked passes) ----------------------
    def _qkv(self, layer: int, x: torch.Tensor):
        adapter = self.adapters[layer]
        q, k, v = adapter.qkv(self.blocks[layer].ln_1(x))
        return adapter, q, k, v

    def _attention_output(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        a = self.adapters[layer].output(o)
        if hasattr(block, "ln_attn"):
            a = block.ln_attn(a)
        return getattr(block, "ls_1", torch.nn.Identity())(a)

    def _mlp(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        return getattr(block, "ls_2", torch.nn.Identity())(block.mlp(block.ln_2(y)))

    def _block_fused(self, layer: int, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Block ``layer`` with the fused kernel and an additive attention mask (ToMe's
        ``log(size)``): the block's own computation otherwise."""
        adapter, q, k, v = self._qkv(layer, x)
        x = x + self._attention_output(layer, adapter.fused(q, k, v, attn_mask=attn_mask))
        return x + self._mlp(layer, x)

    # -- blocks for methods (each call holds the model's lock and runs in inference mode) ----------
    @torch.inference_mode()
    def block_qkv(self, layer: int, x: torch.Tensor) -> tuple[AttentionAdapter, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ln_1`` then the in-projection of block ``layer``: ``(adapter, q, k, v)``, each
        ``(B, H, N, dh)``; ``adapter.logits(q, k)`` gives the block's own attention scores."""
        with self.lock:
            return self._qkv(layer, self.to_tensor(x))

    @torch.inference_mode()
    def block_values(self, layer: int, x) -> torch.Tensor:
        """``ln_1`` then the value part of block ``layer``'s in-projection alone: ``v (B, H, N, dh)``
        (a third of :meth:`block_qkv`'s work)."""
        with self.lock:
            return self.adapters[layer].values(self.blocks[layer].ln_1(self.to_tensor(x)))

    @torch.inference_mode()
    def block_input_norm(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``ln_1(x)`` of block ``layer``: what its in-projection reads, ``(B, N, D)``."""
        with self.lock:
            return self.blocks[layer].ln_1(self.to_tensor(x))

    @torch.inference_mode()
    def block_attention_output(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        """Heads ``o (B, H, N, dh)`` -> the attention branch's output ``(B, N, D)`` (output
        projection, then the block's optional post-attention norm and layer scale)."""
        with self.lock:
            return self._attention_output(layer, o)

    @torch.inference_mode()
    def block_mlp(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """The MLP branch of block ``layer`` on ``y (B, N, D)`` (``ls_2(mlp(ln_2(y)))``)."""
        with self.lock:
            return self._mlp(layer, y)

    @torch.inference_mode()
    def run_block(
        self,
        layer: int,
        x,
        attention: Callable[[AttentionAdapter, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        residual: bool = True,
        ffn: bool = True,
        values_only: bool = False,
    ) -> torch.Tensor:
        """Run block ``layer`` on ``x (B, N, D)`` (or a trace array ``(N, D)``) with an optional
        replacement attention.

        ``attention(adapter, q, k, v) -> o (B, H, N, dh)`` replaces softmax(qk^T)v (the fused
        kernel when ``None``). Without ``residual`` the attention output is not added to ``x``;
        without ``ffn`` the MLP branch is skipped (ClearCLIP-style variants). With
        ``values_only`` the attention reads only ``v`` (MaskCLIP): ``q`` and ``k`` are not
        computed and are passed as ``None``.
        """
        with self.lock:
            x = self.to_tensor(x)
            if values_only:
                adapter = self.adapters[layer]
                q = k = None
                v = adapter.values(self.blocks[layer].ln_1(x))
            else:
                adapter, q, k, v = self._qkv(layer, x)
            o = adapter.fused(q, k, v) if attention is None else attention(adapter, q, k, v)
            a = self._attention_output(layer, o)
            y = x + a if residual else a
            if ffn:
                y = y + self._mlp(layer, y)
            return y

    @torch.inference_mode()
    def project_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj`` on every token: ``(B, N, D) -> (B, N, E)`` (not normalised)."""
        with self.lock:
            y = self.visual.ln_post(self.to_tensor(x))
            if self.visual.proj is not None:
                y = y @ self.visual.proj
            return y

    def projection(self) -> torch.Tensor | None:
        """The tower's output projection ``(D, E)`` (read-only), or ``None`` when it has none."""
        return None if self.visual.proj is None else self.visual.proj.detach()

    def attention_output_parts(self, layer: int) -> "OutputParts":
        """The linear pieces of block ``layer`` between its heads and its MLP, read-only, for
        decomposition methods (GlobEnc): ``ValueError`` naming what cannot be decomposed (a
        post-attention or inner norm, an unknown layer scale, a non-affine ``ln_2``)."""
        block = self.blocks[layer]
        attn = self.adapters[layer].module
        if not _is_identity(getattr(block, "ln_attn", None)):
            raise ValueError(f"block {layer} normalises the attention output (scale_attn); it cannot be decomposed")
        if not _is_identity(getattr(attn, "ln_inner", None)):
            raise ValueError(f"block {layer} normalises the merged heads (scale_attn_inner); it cannot be decomposed")
        ls = getattr(block, "ls_1", None)
        if _is_identity(ls):
            gamma = None
        elif type(ls).__name__ == "LayerScale" and isinstance(getattr(ls, "gamma", None), torch.Tensor):
            gamma = ls.gamma.detach()
        else:
            raise ValueError(f"block {layer} has an unsupported layer scale {type(ls).__name__}")
        head_scale = getattr(attn, "head_scale", None)
        ln2 = block.ln_2
        if not isinstance(ln2, torch.nn.LayerNorm) or ln2.weight is None:
            raise ValueError(f"block {layer}'s ln_2 is {type(ln2).__name__}, not an affine LayerNorm")
        out = attn.out_proj
        return OutputParts(
            out_weight=out.weight.detach(), out_bias=None if out.bias is None else out.bias.detach(), layer_scale=gamma,
            head_scale=None if head_scale is None else head_scale.detach().reshape(-1), ln2_weight=ln2.weight.detach(),
            ln2_eps=float(ln2.eps), n_heads=self.adapters[layer].num_heads)

    def as_tensor(self, array, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An array of either namespace as a tensor on the model's device (``dtype`` when given;
        shares memory with a CPU numpy array, which it never writes to)."""
        if isinstance(array, np.ndarray) and not array.flags.writeable:
            with warnings.catch_warnings():  # trace arrays are read-only; nothing here writes to them
                warnings.simplefilter("ignore", UserWarning)
                t = torch.as_tensor(array, device=self.device)
        else:
            t = torch.as_tensor(array, device=self.device)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def to_tensor(self, array) -> torch.Tensor:
        """A trace array ``(N, D)`` (numpy or tensor) as a ``(1, N, D)`` tensor on the model's device
        and dtype; a ``(B, N, D)`` tensor is only moved/cast (no copy when already there)."""
        t = self.as_tensor(array, self.dtype)
        return t.unsqueeze(0) if t.dim() == 2 else t

    def device_memory_total(self) -> int | None:
        """Total memory of the model's CUDA device in bytes (``None`` on the CPU and MPS)."""
        mem = device_memory(self.device)
        return None if mem is None else mem[1]

    def device_text(self, memory: bool = True) -> str:
        """The device in words (``memory``: with the memory it holds now)."""
        return device_report(self.device).text(memory)
