"""The transformers vision-language-model backend: generation with per-token grounding, and
visual-token pruning executed inside the language model.

Loading: ``AutoProcessor`` and ``AutoModelForImageTextToText.from_pretrained`` (hub id or local
folder; ``trust_remote_code`` only when the spec says so, which the UI asks the user for). A hub id
that is neither in the Hugging Face cache nor reachable fails at once with one line
(:mod:`explorer.backends.network`) instead of the hub client's retries. Before the loaders run,
the model's ``config.json`` is read (the folder's, or the hub's cached copy): a model that needs
its repository's own code (:func:`remote_code_modules`) raises
:class:`~explorer.backends.errors.RemoteCodeRequired` unless the spec allows it, with nothing of
that code imported. A damaged safetensors file or a pickle that ``weights_only`` refuses is named
in one line.

The token layout of the LLM input comes from what the processor returned for this image
(:func:`explorer.backends.vlm_layout.vlm_layout`). The model's own code merges the image features
into the input embeddings (and computes the position ids, e.g. Qwen2-VL's M-RoPE): a pre-hook
on the language model takes them and stops the pass. The language model's decoder layers then
run in an explicit loop (:meth:`VlmBackend._layers`), which is what lets a pruning method remove
visual tokens between layers (the survivors keep their original position ids) and lets decoding
proceed token by token with a cancel check and streamed text. Attention is captured by the probe
of :mod:`explorer.backends.vlm_probe`: only the asked layers and query rows, image columns only,
kept on the device during decoding and copied to the host once at the end; a generation asked
for no layers keeps nothing. The data types (:class:`Generation`, :class:`PruneState`,
:class:`PruneDecision`) live in :mod:`explorer.core.generation`, free of torch.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from explorer.core.arrays import to_host
from explorer.core.generation import EncoderStage, Generation, PruneDecision, PrunePlan, PruneState
from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Progress
from explorer.core.layout import TokenLayout
from explorer.core.trace import ModelInfo

from . import network
from .clip import _first_line
from .errors import ModelLoadError, RemoteCodeRequired, find_bad_weights_file, weights_file_reason
from .devices import host_view, dtype_of, resolve_device, synchronize
from .specs import VlmSpec
from .vlm_layout import family_of, vlm_layout
from .vlm_probe import PROBE_NAME, ProbeRequest, capture, ensure_registered

__all__ = ["VlmBackend", "VlmInputs", "Generation", "PruneDecision", "PruneState"]  # the data types: explorer.core.generation


LOCAL_VLM_FORMS = "vlm:/path/to/model-folder"  # the spec form that loads local files

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(source: str) -> bool:
    """Whether ``from_pretrained(source)`` would go to the hub: ``org/name`` (or ``name``) that is
    not an existing local folder or a path."""
    if source.startswith(("/", ".", "~")) or Path(source).expanduser().exists():
        return False
    return _HUB_ID.fullmatch(source) is not None


#: Files whose ``auto_map`` names classes a processor or model would import from the repository.
_CODE_CONFIGS = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def _read_json(path: Path | str | None) -> dict:
    import json

    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_config_files(source: str) -> tuple[Path | None, dict[str, dict]]:
    """The folder and the configs (by file name, of :data:`_CODE_CONFIGS`) of a VLM source without
    loading it: a local folder's files, or a hub id's cached files (``config.json`` fetched alone
    first when the hub can be reached and it is not cached). Missing files are left out."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder, {name: _read_json(folder / name) for name in _CODE_CONFIGS if (folder / name).is_file()}
    if not is_hub_id(source):
        return None, {}
    cached = {name: network.cached_hub_file(source, (name,)) for name in _CODE_CONFIGS}
    if cached["config.json"] is None and network.hub_reachable():
        try:
            from huggingface_hub import hf_hub_download

            cached["config.json"] = hf_hub_download(source, "config.json")
        except Exception:  # noqa: BLE001 - no config to check: the loader reports why it cannot load
            cached["config.json"] = None
    found = {name: _read_json(path) for name, path in cached.items() if path is not None}
    snapshot = Path(cached["config.json"]).parent if cached["config.json"] else None
    return snapshot, found


def remote_code_modules(configs: dict[str, dict]) -> list[str]:
    """The repository code files (``modeling_x.py``, ...) a load of these configs would import:
    named by ``auto_map`` entries when this transformers lacks the classes itself (the config's
    ``model_type`` is unknown, or the image-text-to-text model class for a known type is). With
    its own classes transformers ignores ``auto_map`` unless code is trusted. Empty when the model
    needs no code of its own. Reads the JSON only; nothing is imported from the repository."""
    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = configs.get("config.json", {})
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        known = CONFIG_MAPPING[model_type] in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        if known or "AutoModelForImageTextToText" not in auto_map:
            return []
        refs = [auto_map["AutoModelForImageTextToText"]]
    else:
        refs = [ref for name in _CODE_CONFIGS for ref in (configs.get(name, {}).get("auto_map") or {}).values()
                if isinstance(configs.get(name, {}).get("auto_map"), dict)]
    modules: list[str] = []
    for ref in refs:
        for one in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(one, str) and "." in one:
                module = one.split("--")[-1].rsplit(".", 1)[0] + ".py"
                if module not in modules:
                    modules.append(module)
    return modules


def _load_failure(spec: VlmSpec, folder: Path | None, exc: BaseException) -> ModelLoadError:
    """The one-line error for a failed ``from_pretrained``: a damaged or refused weights file
    (named, as found in ``folder`` or the hub snapshot), code the config check could not see, or
    the library's first line."""
    src = spec.model
    cause = exc.__cause__ or exc.__context__
    reason = weights_file_reason(exc) or (weights_file_reason(cause) if cause is not None else None)
    if reason is not None:
        if folder is None:  # a hub id first downloaded by this load
            folder, _ = model_config_files(src)
        bad = find_bad_weights_file(folder, reason) if folder is not None else None
        return ModelLoadError(f"vlm:{src}: {bad.name if bad is not None else 'a weights file'} {reason}")
    if not spec.trust_remote_code and isinstance(exc, ValueError) and (
            "trust_remote_code" in str(exc) or "custom code" in str(exc)):
        return RemoteCodeRequired(spec.canonical())
    msg = _first_line(exc)
    if not isinstance(exc, (OSError, ValueError, KeyError, RuntimeError)):
        msg = f"{type(exc).__name__}: {msg}"
    hint = " - train the demo models with `python -m explorer.demo.train`" if spec.is_demo else ""
    return ModelLoadError(f"could not load the VLM {src}: {msg}{hint}")


class _Captured(Exception):
    """Internal: stops the model's own forward once the LLM inputs are known."""


@dataclass
class VlmInputs:
    """A prepared prompt: processor outputs, the layout of the LLM input sequence, the prompt."""

    inputs: Any
    layout: TokenLayout
    prompt: str
    image_positions: np.ndarray  # sequence indices of the image grid tokens, image-token order (newlines excluded)
    image_sha256: str


class VlmBackend:
    """A loaded transformers VLM (see module docstring)."""

    kind = "vlm"

    def __init__(self, spec: VlmSpec, model, processor, device: torch.device) -> None:
        ensure_registered()
        self.spec = spec
        self.model = model
        self.processor = processor
        self.device = device
        self.lock = threading.RLock()
        self.family = family_of(model.config)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.lm = self._language_model()
        self.layers = list(self.lm.layers)
        text_cfg = model.config.get_text_config()
        text_cfg._attn_implementation = PROBE_NAME  # our probe passes through to SDPA unless asked
        self.image_token_id = int(getattr(model.config, "image_token_id", None) or model.config.image_token_index)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.forward_count = 0
        self.trace_arrays = "auto"  # where pruning states keep arrays; see host_arrays()
        self.info = ModelInfo(kind="vlm", spec=spec.canonical(), name=spec.display_name,
                              n_layers=len(self.layers), n_heads=int(text_cfg.num_attention_heads),
                              width=int(text_cfg.hidden_size), device=str(device), dtype=spec.precision,
                              demo=spec.is_demo, extra={"family": self.family})

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: VlmSpec) -> "VlmBackend":
        src = spec.model
        if is_hub_id(src) and network.cached_hub_file(src, ("config.json",)) is None and not network.hub_reachable():
            raise ModelLoadError(network.offline_message(src, LOCAL_VLM_FORMS))
        folder, configs = model_config_files(src)
        if not spec.trust_remote_code:
            modules = remote_code_modules(configs)
            if modules:
                raise RemoteCodeRequired(spec.canonical(), modules)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = resolve_device(spec.device)
        kw: dict[str, Any] = {"trust_remote_code": bool(spec.trust_remote_code)}
        try:
            processor = AutoProcessor.from_pretrained(src, **kw)
            if spec.max_pixels and hasattr(processor, "image_processor"):
                processor.image_processor.max_pixels = int(spec.max_pixels)
                if hasattr(processor.image_processor, "size") and isinstance(processor.image_processor.size, dict):
                    processor.image_processor.size["longest_edge"] = int(spec.max_pixels)
            model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype_of(spec.precision), **kw)
        except Exception as exc:  # noqa: BLE001 - the loaders and weight readers raise their own types
            raise _load_failure(spec, folder, exc) from None
        model.to(device).eval()
        return cls(spec, model, processor, device)

    def _language_model(self):
        m = self.model
        for path in ("model.language_model", "language_model.model", "model.text_model", "language_model"):
            obj = m
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if hasattr(obj, "layers") and hasattr(obj, "norm"):
                return obj
        raise ModelLoadError(f"cannot find the language model's decoder layers in {type(m).__name__}")

    # -- inputs ---------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        """The full prompt for one image: the processor's chat template, or the image token
        followed by the text."""
        proc = self.processor
        if "<image>" in prompt or getattr(proc, "image_token", "\0") in prompt:
            return prompt
        if getattr(proc, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return proc.apply_chat_template(messages, add_generation_prompt=True)
        return f"{getattr(proc, 'image_token', '<image>')}\n{prompt}"

    def prepare(self, image: LoadedImage, prompt: str) -> VlmInputs:
        from PIL import Image

        text = self.prompt_text(prompt)
        inputs = self.processor(images=Image.fromarray(image.rgb), text=text, return_tensors="pt")
        layout = vlm_layout(self.family, self.processor, self.model.config, inputs, image.size)
        return VlmInputs(inputs=inputs, layout=layout, prompt=prompt,
                         image_positions=layout.image_token_indices(), image_sha256=image.sha256)

    @torch.inference_mode()
    def llm_inputs(self, prepared: VlmInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds (1, N, D), position_ids)`` exactly as the model builds them."""
        got: dict[str, Any] = {}

        def hook(module, args, kwargs):
            got["embeds"] = kwargs.get("inputs_embeds")
            got["positions"] = kwargs.get("position_ids")
            raise _Captured

        handle = self.lm.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            batch = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in prepared.inputs.items()}
            if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
                batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
            with self.lock:
                self.model(**batch, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "embeds" not in got or got["embeds"] is None:
            raise ValueError("the model did not reach its language model with input embeddings")
        embeds = got["embeds"]
        positions = got["positions"]
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        return embeds, positions

    # -- the language model loop --------------------------------------------------------------------
    def _run_layers(self, hidden, positions, cache, start: int = 0, stop: int | None = None):
        """Decoder layers ``start..stop-1`` on ``hidden (1, n, D)`` at ``positions``."""
        emb = self.lm.rotary_emb(hidden, position_ids=positions)
        for i in range(start, len(self.layers) if stop is None else stop):
            hidden = self.layers[i](hidden, attention_mask=None, position_embeddings=emb, position_ids=positions,
                                    cache=cache, use_cache=True)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.lm.norm(hidden))

    @staticmethod
    def _take(positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return positions.index_select(-1, keep)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config())

    def host_arrays(self) -> bool:
        """True when a pruning method's state holds numpy arrays: a model on the CPU, unless
        :attr:`trace_arrays` is ``'torch'`` (tensors on the CPU too, for the array-API tests)."""
        if self.trace_arrays in ("numpy", "torch"):
            return self.trace_arrays == "numpy"
        return self.device.type == "cpu"

    def generate_job(
        self,
        prepared: VlmInputs,
        max_new_tokens: int = 32,
        attention_layers: Sequence[int] | None = None,
        prune: PrunePlan | tuple[int, Callable[[PruneState], PruneDecision], bool] | None = None,
        cancel: CancelToken | None = None,
        force: Sequence[int] | None = None,
    ):
        """Job: greedy generation; yields :class:`Progress` with the text so far; returns a
        :class:`Generation`.

        ``attention_layers``: LLM layers whose rows (each generated token over the image tokens)
        are kept (``None``: all; ``()``: none, nothing is kept). The rows stay on the device while
        decoding and are copied to the host once at the end. ``prune``: a
        :class:`~explorer.core.generation.PrunePlan` (or ``(layer, method, needs_keys)``, one
        decision): before each of its layers the method decides which image tokens stay (0 = at the
        LLM input); they are removed from the sequence for every later layer and every decoding
        step, and with the plan's ``cache = "final"`` also from the KV cache of the layers that saw
        them. With an encoder stage the vision tower runs with the method's changes and the LLM
        gets fewer image tokens (``Generation.kept``/``groups`` stay in the prepared image tokens'
        numbering). ``force``: teacher-forced token ids instead of greedy choices (for the
        log-likelihood of a given answer). Prefill and decoding are timed separately, the device
        synchronised.
        """
        L = len(self.layers)
        plan = PrunePlan.of(prune)
        stages = [int(k) for k in plan.layers] if plan is not None else []
        if any(not 0 <= k < L for k in stages):
            raise ValueError(f"pruning layer {[k for k in stages if not 0 <= k < L][0]} outside 0..{L - 1}")
        if stages != sorted(set(stages)):
            raise ValueError(f"pruning layers {stages} must be distinct and ascending")
        encoder = plan.encoder if plan is not None else None
        layers = list(range(L)) if attention_layers is None else sorted(set(int(l) for l in attention_layers))
        if encoder is not None and layers:
            raise ValueError("attention rows are not kept when the vision tower changes the image tokens")
        n_patches = len(prepared.image_positions)
        req = ProbeRequest()
        synchronize(self.device)
        t0 = time.perf_counter()
        assign = None  # encoder stage: LLM image token of every prepared image token
        vision_cls: dict[int, Any] = {}
        with self.lock:
            if encoder is not None:
                embeds, positions, image_pos, assign, vision_cls = self._encoder_inputs(prepared, encoder)
            else:
                embeds, positions = self.llm_inputs(prepared)
                image_pos = np.asarray(prepared.image_positions, dtype=np.int64)
        n_img = len(image_pos)
        N = embeds.shape[1]
        cur_img = image_pos.copy()  # host mirror: sequence indices of the image tokens still present
        original = np.arange(n_img)
        before = torch.as_tensor(image_pos, device=self.device)  # image columns before any pruning
        for l in layers:
            req.watch(self.layers[l].self_attn, f"llm.{l}", rows=[-1], columns=before)
        if encoder is None:
            ids0 = np.asarray(prepared.inputs["input_ids"][0])
            last_image = int(np.nonzero(ids0 == self.image_token_id)[0].max())
        else:
            last_image = int(image_pos.max())
        text_after = np.arange(last_image + 1, N)  # the question and the assistant prompt
        t_rows = len(text_after)
        if plan is not None and plan.text_rows and t_rows == 0:
            raise ValueError("no text after the image: there are no text-to-image attention rows")
        decision_rows = list(range(-t_rows, 0)) if plan is not None and plan.text_rows else [-1]
        if plan is not None and plan.positions == "renumber" and positions.dim() != 2:
            raise ValueError("position ids of this model are not one sequence of numbers (M-RoPE): "
                             "they cannot be renumbered")
        merge_labels = None  # group id per LLM image token after a merge decision (-1: dropped)
        owner = np.arange(n_img)  # index into the current image tokens per LLM image token (-1: dropped)
        cache = self._new_cache()
        ids: list[int] = []
        logprob = None
        reads = 0  # passes whose logits were read: their rows belong to the answer
        present: dict[int, np.ndarray] = {}  # LLM image tokens entering each layer
        seq_of_layer: dict[int, np.ndarray] = {}  # prefill sequence indices each layer saw
        seq_ids = np.arange(N)
        with self.lock, torch.inference_mode(), capture(req):
            hidden = embeds
            pos = positions
            # -- prefill (with pruning) --------------------------------------------------------
            start = 0
            for stage, K in enumerate(stages):
                name = f"llm.{K - 1}"
                if K > 0:
                    req.watch(self.layers[K - 1].self_attn, name, rows=decision_rows,
                              columns=torch.as_tensor(cur_img, device=self.device), keys=plan.needs_keys)
                if K > start:
                    hidden = self._run_layers(hidden, pos, cache, start, K)
                    for l in range(start, K):
                        present[l], seq_of_layer[l] = original, seq_ids
                start = K
                state = self._prune_state(K, hidden, cur_img, original, text_after, req, prepared,
                                          text_rows=plan.text_rows, stage=stage)
                state.extras["vision_cls"] = vision_cls
                decision = plan.decide(state)
                if K > 0:
                    if K - 1 in layers:  # back to the answer's rows only
                        req.watch(self.layers[K - 1].self_attn, name, rows=[-1], columns=req.columns[name])
                        last = req.rows_out[name][-1]
                        req.rows_out[name][-1] = last[:, :, -1:, :]
                    else:
                        req.unwatch(self.layers[K - 1].self_attn)
                means = None
                if decision.merge is not None:
                    groups = to_host(decision.merge).astype(np.int64).reshape(-1)
                    if groups.shape != (len(cur_img),):
                        raise ValueError("a merge needs one group id per image token")
                    G = int(groups.max()) + 1
                    keep_img = np.array([int(np.nonzero(groups == g)[0][0]) for g in range(G)], dtype=np.int64)
                    g_t = torch.as_tensor(groups, device=self.device)
                    img_h = hidden[0].index_select(0, torch.as_tensor(cur_img, device=self.device))
                    sums = torch.zeros(G, img_h.shape[1], dtype=img_h.dtype, device=self.device).index_add_(0, g_t, img_h)
                    counts = torch.bincount(g_t, minlength=G).to(img_h.dtype)[:, None]
                    means = sums / counts
                    alive = owner >= 0
                    merge_labels = np.full(n_img, -1, dtype=np.int64)
                    merge_labels[alive] = groups[owner[alive]]
                else:
                    keep_img = to_host(decision.keep).astype(np.int64).reshape(-1)
                order = np.argsort(keep_img, kind="stable")
                keep_img = keep_img[order]
                if keep_img.size and (keep_img.min() < 0 or keep_img.max() >= len(cur_img)):
                    raise ValueError("a pruning method kept an image token that is not there")
                if np.unique(keep_img).size != keep_img.size:
                    raise ValueError("a pruning method kept an image token twice")
                dropped = np.zeros(hidden.shape[1], dtype=bool)
                dropped[cur_img[np.setdiff1d(np.arange(len(cur_img)), keep_img)]] = True
                keep_seq = np.nonzero(~dropped)[0]
                keep_seq_t = torch.as_tensor(keep_seq, device=self.device)
                if means is not None:
                    hidden = hidden.clone()
                    hidden[0, torch.as_tensor(cur_img[keep_img], device=self.device)] = means[
                        torch.as_tensor(order, device=self.device)]
                    rank = np.argsort(order)  # group id -> its token's index in the new image tokens
                    owner = np.where(owner >= 0, rank[groups[np.maximum(owner, 0)]], -1)
                else:
                    remap = np.full(len(cur_img), -1, dtype=np.int64)
                    remap[keep_img] = np.arange(keep_img.size)
                    owner = np.where(owner >= 0, remap[np.maximum(owner, 0)], -1)
                    if merge_labels is not None:
                        merge_labels = np.where(owner >= 0, merge_labels, -1)
                hidden = hidden.index_select(1, keep_seq_t)
                seq_ids = seq_ids[keep_seq]
                if plan.positions == "renumber":
                    pos = torch.arange(hidden.shape[1], device=pos.device, dtype=pos.dtype)[None]
                else:
                    pos = self._take(pos, keep_seq_t)
                cur_img = np.searchsorted(keep_seq, cur_img[keep_img]) if keep_img.size else cur_img[:0]
                original = original[keep_img]
                # the cache of the layers before the pruning point keeps every token; later layers
                # get the survivors, whose image columns move in the shorter sequence
                after = torch.as_tensor(cur_img, device=self.device)
                for l in layers:
                    if l >= K:
                        req.columns[f"llm.{l}"] = after
            hidden = self._run_layers(hidden, pos, cache, start, None)
            for l in range(start, L):
                present[l], seq_of_layer[l] = original, seq_ids
            if plan is not None and plan.cache == "final" and stages:
                self._cut_cache(cache, seq_of_layer, seq_ids, max(stages[0] - 1, 0))
            cache_lengths = [int(cache.get_seq_length(l)) for l in range(L)]
            synchronize(self.device)
            prefill = time.perf_counter() - t0
            self.forward_count += 1
            per_layer = plan is not None and plan.positions == "renumber"
            last_pos = pos[..., -1:]
            step = 0
            while step < max_new_tokens:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                logits = self._logits(hidden[:, -1:])[0, -1].float()
                reads += 1
                nxt = int(force[step]) if force is not None else int(logits.argmax())
                lp = torch.log_softmax(logits, -1)[nxt]  # stays on the device: read once at the end
                logprob = lp if logprob is None else logprob + lp
                if force is None and nxt in self.eos_ids:
                    break
                ids.append(nxt)
                step += 1
                if force is not None and step >= len(force):
                    break
                yield Progress(step / max_new_tokens, self.decode(ids))
                tok = torch.tensor([[nxt]], device=self.device)
                if per_layer:
                    # as the layer's cache length (MustDrop's get_usable_length): each layer numbers
                    # the new token after what it holds
                    hidden = self._run_decode_per_layer(self.lm.embed_tokens(tok), cache, pos)
                else:
                    last_pos = last_pos + 1
                    hidden = self._run_layers(self.lm.embed_tokens(tok), last_pos, cache)
            synchronize(self.device)
            total = time.perf_counter() - t0
            attention, mass = self._collect(req, layers, reads, present, n_img)
        groups_llm = merge_labels if merge_labels is not None else (owner if encoder is not None else None)
        if assign is not None:
            kept_per_layer = {l: np.nonzero(np.isin(assign, present[l]))[0] for l in range(L)}
            groups = None if groups_llm is None else groups_llm[assign]
            if groups is not None and merge_labels is None and np.bincount(assign).max() == 1:
                groups = None  # nothing was merged: a plain kept set
        else:
            kept_per_layer = present
            groups = groups_llm
        return Generation(
            ids=ids, tokens=[self.token_string(i) for i in ids], text=self.decode(ids), attention=attention,
            image_mass=mass, kept=kept_per_layer, prefill_seconds=prefill, seconds=total, prompt_length=N,
            logprob=float(logprob) if logprob is not None else 0.0, groups=groups,
            decode_seconds=total - prefill, device=str(self.device),
            tokens_per_layer=[int(len(present[l])) for l in range(L)], cache_lengths=cache_lengths,
            vision_tokens=int(n_img) if encoder is not None else int(n_patches))

    @staticmethod
    def _cut_cache(cache, seq_of_layer: dict[int, np.ndarray], final: np.ndarray, first: int) -> None:
        """Cut the KV cache of layers ``first..`` to the prefill tokens in ``final`` (sequence
        indices of the LLM input; every layer saw a superset of them, in order)."""
        for l in range(first, len(seq_of_layer)):
            seen = seq_of_layer[l]
            if len(seen) == len(final):
                continue
            idx = torch.as_tensor(np.searchsorted(seen, final), device=cache.layers[l].keys.device)
            cache.layers[l].keys = cache.layers[l].keys.index_select(2, idx)
            cache.layers[l].values = cache.layers[l].values.index_select(2, idx)

    def _run_decode_per_layer(self, hidden, cache, like: torch.Tensor):
        """One decoding step where the new token's position at each layer is that layer's cache
        length (layers whose caches were cut number it after what they hold)."""
        emb_of: dict[int, Any] = {}
        for i, layer in enumerate(self.layers):
            p = int(cache.get_seq_length(i))
            if p not in emb_of:
                pos = torch.full((1, 1), p, device=like.device, dtype=like.dtype)
                emb_of[p] = (self.lm.rotary_emb(hidden, position_ids=pos), pos)
            emb, pos = emb_of[p]
            hidden = layer(hidden, attention_mask=None, position_embeddings=emb, position_ids=pos, cache=cache,
                           use_cache=True)
        return hidden

    def _encoder_inputs(self, prepared: VlmInputs, stage: EncoderStage):
        """The LLM input with the vision tower changed by ``stage`` (LLaVA-style models: one view, a
        CLIP tower with a [CLS] token). Returns ``(embeds (1, N', D), positions (1, N'),
        image_positions (n',), assign (n_patches,), vision_cls {layer: (H, n_current)})``: the
        prepared prompt with the image block shortened to the tower's ``n'`` output tokens (the
        image placeholders beyond ``n'`` leave the sequence), ``assign`` the output token of every
        prepared image token."""
        inner = getattr(self.model, "model", self.model)
        tower = getattr(inner, "vision_tower", None)
        body = getattr(tower, "vision_model", tower)
        embeddings = getattr(body, "embeddings", None)
        if (self.family != "llava" or tower is None or not hasattr(inner, "get_image_features")
                or getattr(embeddings, "class_embedding", None) is None):
            raise ValueError(f"the vision-tower stage needs a LLaVA model with a CLIP tower ([CLS] token); "
                             f"this is {self.family} ({type(tower).__name__})")
        blocks = list(body.encoder.layers)
        n = len(prepared.image_positions)
        state = {"assign": np.arange(n)}

        def make_hook(fn):
            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                new, assign = fn(h)
                state["assign"] = np.asarray(assign, dtype=np.int64)[state["assign"]]
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return hook

        handles = []
        req = ProbeRequest()
        for j, fn in stage.after_layer.items():
            handles.append(blocks[int(j)].register_forward_hook(make_hook(fn)))
        for j in stage.cls_layers:
            req.watch(blocks[int(j)].self_attn, f"vit.{int(j) % len(blocks)}", rows=[0])
        vcfg = self.model.config.vision_config
        old = vcfg._attn_implementation
        batch = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in prepared.inputs.items()}
        pixels = batch["pixel_values"].to(self.model.dtype)
        try:
            vcfg._attn_implementation = PROBE_NAME
            with torch.inference_mode(), capture(req):
                out = inner.get_image_features(pixel_values=pixels)
        finally:
            vcfg._attn_implementation = old
            for h in handles:
                h.remove()
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = feats[0]  # (n', D): one view
        n_new = int(feats.shape[0])
        groups = int(state["assign"].max()) + 1
        if n_new != groups:  # e.g. vision_feature_select_strategy="full": [CLS] is an image token too
            raise ValueError(f"the vision-tower stage needs the patch tokens alone as image features; this model "
                             f"gives {n_new} features for {groups} patch tokens")
        ids = prepared.inputs["input_ids"][0].to(self.device)
        img = torch.nonzero(ids == self.image_token_id).flatten()
        if img.numel() < n_new:
            raise ValueError(f"{n_new} image features for {img.numel()} image placeholders")
        keep = torch.ones(ids.shape[0], dtype=torch.bool, device=self.device)
        keep[img[n_new:]] = False
        ids = ids[keep]
        with torch.inference_mode():
            embeds = self.lm.embed_tokens(ids[None]).clone()
            slots = torch.nonzero(ids == self.image_token_id).flatten()
            embeds[0, slots] = feats.to(embeds.dtype)
        positions = torch.arange(embeds.shape[1], device=self.device)[None]
        vision_cls = {}
        for j in stage.cls_layers:
            rows = req.rows_out.get(f"vit.{int(j) % len(blocks)}")
            if not rows:
                raise ValueError(f"the vision tower did not run its layer {j}")
            vision_cls[int(j)] = host_view(rows[-1][0, :, 0, 1:].float(), self.host_arrays())
        return embeds, positions, slots.cpu().numpy().astype(np.int64), state["assign"], vision_cls

    def _prune_state(self, layer, hidden, cur_img, original, text_after, req, prepared, text_rows: bool = False,
                     stage: int = 0) -> PruneState:
        """The state a pruning method decides on: device arrays (numpy for a CPU model)."""
        last_row = keys = rows = None
        name = f"llm.{layer - 1}"
        host = self.host_arrays()
        if layer > 0 and req.rows_out.get(name):
            block = req.rows_out[name][-1][0]  # (H, r, n_img): the watched query rows over the image columns
            last_row = host_view(block[:, -1, :].float().mean(0), host)
            if text_rows:
                rows = host_view(block.float(), host)
        if layer > 0 and name in req.keys_out:
            keys = host_view(req.keys_out[name][0], host)
        return PruneState(layer=layer, hidden=host_view(hidden[0], host), image=cur_img.copy(), original=original.copy(),
                          text=text_after, last_row=last_row, keys=keys, layout=prepared.layout, text_rows=rows,
                          stage=stage)

    def _collect(self, req, layers, reads: int, kept: dict, n_img: int) -> tuple[dict, np.ndarray]:
        """The rows kept on the device during the generation, copied to the host once: per layer
        ``(T, H, n_img)`` (NaN for pruned tokens) and the image mass ``(T, len(layers))``."""
        H = self.info.n_heads
        attention: dict[int, np.ndarray] = {}
        mass = np.full((reads, len(layers)), np.nan, np.float32)
        for i, l in enumerate(layers):
            rows = req.rows_out.get(f"llm.{l}", [])[:reads]
            full = np.full((reads, H, n_img), np.nan, np.float32)
            if rows:
                vals = torch.stack([r[0, :, -1, :] for r in rows]).float().cpu().numpy()  # (T, H, n_present)
                full[: len(rows)][:, :, kept[l]] = vals
                mass[: len(rows), i] = vals.sum(-1).mean(-1)
            attention[l] = full
        return attention, mass

    # -- what pruning methods may read ------------------------------------------------------------
    def final_norm(self):
        """``(weight (D,) or None, eps)`` of the language model's final norm (DART's ``norm``), the
        weight where the model runs (numpy for a CPU model)."""
        norm = self.lm.norm
        weight = getattr(norm, "weight", None)
        eps = getattr(norm, "variance_epsilon", None)
        eps = getattr(norm, "eps", 1e-6) if eps is None else eps
        return (None if weight is None else host_view(weight, self.host_arrays())), float(eps)

    def vision_feature_layer(self):
        """The vision layer(s) whose output the model uses as image features (LLaVA's
        ``vision_feature_layer``, -2 when the config does not say)."""
        return getattr(self.model.config, "vision_feature_layer", -2)

    def input_embeddings(self, prepared: VlmInputs):
        """``(N, D)`` the LLM's input embeddings for the prompt (image features merged), where the
        model runs (numpy for a CPU model)."""
        embeds, _ = self.llm_inputs(prepared)
        return host_view(embeds[0], self.host_arrays())

    # -- probes for pruning methods -----------------------------------------------------------------
    def vision_cls_attention(self, prepared: VlmInputs, layers: Sequence[int]) -> dict[int, np.ndarray]:
        """The vision tower's [CLS] attention row over its patch tokens (HiRED: Arif et al., arXiv 2408.10945,
        https://github.com/hasanar1f/HiRED).

        Runs the vision tower on the prepared views with the probe on the attention modules of
        ``layers`` (indices into the tower's encoder layers; negative counts from the end, so
        ``-2`` is the layer whose output LLaVA's ``vision_feature_layer = -2`` uses), keeping only
        query row 0 (the [CLS] token). Returns ``{layer (as given): (views, H, n_patches)}``
        float32 post-softmax rows (the [CLS] column itself left out, so a row sums to at most 1),
        one per view the tower processed, in the model's order (LLaVA-NeXT: the base view, then
        the tiles in raster order of the tile grid). ``ValueError`` for towers without a [CLS]
        token (SigLIP, Qwen2-VL, Idefics3).
        """
        inner = getattr(self.model, "model", self.model)
        tower = next((t for t in (getattr(m, a, None) for m in (inner, self.model)
                                  for a in ("vision_tower", "visual", "vision_model")) if t is not None), None)
        body = getattr(tower, "vision_model", tower)
        embeddings = getattr(body, "embeddings", None)
        if tower is None or getattr(embeddings, "class_embedding", None) is None or not hasattr(body, "encoder"):
            raise ValueError(f"the {self.family} vision tower ({type(tower).__name__}) has no [CLS] token: "
                             "its [CLS] attention does not exist")
        blocks = list(body.encoder.layers)
        req = ProbeRequest()
        names: dict[int, str] = {}
        for layer in layers:
            j = int(layer) + len(blocks) if int(layer) < 0 else int(layer)
            if not 0 <= j < len(blocks):
                raise ValueError(f"vision layer {layer} outside the tower's {len(blocks)} layers")
            names[int(layer)] = f"vit.{j}"
            req.watch(blocks[j].self_attn, f"vit.{j}", rows=[0])
        vcfg = self.model.config.vision_config
        old = vcfg._attn_implementation
        with self.lock:
            vcfg._attn_implementation = PROBE_NAME
            try:
                with capture(req):
                    self.llm_inputs(prepared)  # the tower runs on every view; the pass stops at the LLM
            finally:
                vcfg._attn_implementation = old
        out = {}
        for layer, name in names.items():
            rows = req.rows_out.get(name)
            if not rows:
                raise ValueError(f"the vision tower did not run its layer {layer}")
            out[layer] = rows[-1][:, :, 0, 1:].float().cpu().numpy()  # (views, H, patches)
        return out

    def attention_rows(self, prepared: VlmInputs, layer: int, rows: Sequence[int]) -> np.ndarray:
        """Post-softmax attention ``(H, len(rows), N)`` of the query positions ``rows`` (sequence
        indices of the LLM input) over every key at LLM layer ``layer`` of the *unpruned* prompt.

        For methods that score image tokens by the attention of several query rows (SparseVLM's
        rater text tokens: Zhang et al., ICML 2025, https://github.com/Gumpest/SparseVLMs): the layers before a single pruning point see the whole
        sequence, so these rows equal those of a pruned run's prefill there.
        """
        L = len(self.layers)
        if not 0 <= layer < L:
            raise ValueError(f"LLM layer {layer} outside 0..{L - 1}")
        rows = [int(r) for r in rows]
        if not rows:
            raise ValueError("no query rows asked for")
        req = ProbeRequest()
        req.watch(self.layers[layer].self_attn, "rows", rows=rows)
        with self.lock:
            embeds, positions = self.llm_inputs(prepared)
            N = embeds.shape[1]
            if min(rows) < 0 or max(rows) >= N:
                raise ValueError(f"query rows outside the prompt of {N} tokens")
            with torch.inference_mode(), capture(req):
                self._run_layers(embeds, positions, None, 0, layer + 1)
            self.forward_count += 1
        return req.rows_out["rows"][-1][0].float().cpu().numpy()

    # -- relevancy ------------------------------------------------------------------------------
    def relevancy(self, prepared: VlmInputs, generated: Sequence[int], t: int,
                  cancel: CancelToken | None = None, gradients: str = "target",
                  normalize: bool = False) -> tuple[np.ndarray, float]:
        """Chefer's rule 6 over the decoder layers for generated token ``t`` (Chefer et al., ICCV 2021,
        https://github.com/hila-chefer/Transformer-MM-Explainability; for LVLMs as in LVLM-Interpret,
        Ben Melech Stan et al., CVPR Workshops 2024, https://github.com/IntelLabs/lvlm-interpret).

        Teacher-forces the prompt and ``generated[:t]`` (one pass, the causal attention of every
        position), and with ``Ā_l = mean_h (∇A_l ⊙ A_l)^+`` updates ``R ← R + Ā_l R`` from ``R = I``
        over every layer. Returns ``(R[-1, image tokens] (n_img,), logit of generated[t])``; the
        values are in image-token order.

        ``gradients``: whose gradient weights each query row of ``A_l``.
        ``"target"``: the logit ``y_t`` of the explained token for every row (the rule as written).
        ``"steps"``: as LVLM-Interpret's ``construct_relevancy_map`` (``utils_relevancy.py``), which
        builds the maps while generating with a KV cache and keeps the rule-5 matrices of earlier
        steps (``handle_self_attention_image``'s ``privious_cam``): the prompt rows are weighted by
        the gradient of ``y_0`` and the row of the position that produced token ``k`` by that of
        ``y_k`` (one backward pass per token ``0..t``; equal to ``"target"`` for ``t = 0``).
        ``normalize``: LVLM-Interpret's ``handle_residual`` (``apply_normalization=True``, Chefer's
        eq. 8-9): ``R - I`` divided by its row sums (rows summing to 0 left as they are), plus ``I``;
        for the last row this divides the image values by the sum of ``(R - I)[-1]``.
        """
        if not 0 <= t < len(generated):
            raise ValueError(f"token {t} outside the {len(generated)} generated tokens")
        if gradients not in ("target", "steps"):
            raise ValueError(f"gradients must be 'target' or 'steps', not {gradients!r}")
        with self.lock:
            embeds, positions = self.llm_inputs(prepared)
            prev = torch.as_tensor(list(generated[:t]), device=self.device, dtype=torch.long)[None]
            if prev.shape[1]:
                with torch.inference_mode():
                    extra = self.lm.embed_tokens(prev)
                embeds = torch.cat([embeds, extra], 1)
                last = positions[..., -1:]
                steps = torch.arange(1, prev.shape[1] + 1, device=self.device)
                positions = torch.cat([positions, last + steps.view(*([1] * (positions.dim() - 1)), -1)], -1)
            embeds = embeds.detach().clone().requires_grad_(True)
            n = embeds.shape[1]
            first = n - 1 - t  # the position whose logits give token 0 (the prompt's last)
            req = ProbeRequest(keep_graph=True)
            for l, layer in enumerate(self.layers):
                req.watch(layer.self_attn, f"llm.{l}", rows=None)
            flags = [p.requires_grad for p in self.model.parameters()]
            L = len(self.layers)
            # rule-5 matrices, where the model runs (float32: (n, n) per layer)
            cams = [torch.zeros(n, n, dtype=torch.float32, device=self.device) for _ in range(L)]

            def add_rows(target, lo: int, hi: int, retain: bool) -> None:
                """Rule 5 for query rows ``lo..hi-1`` with the gradient of ``target``."""
                probs = [req.probs_out[f"llm.{l}"] for l in range(L)]
                grads = torch.autograd.grad(target, probs, retain_graph=retain)
                for l, (A, g) in enumerate(zip(probs, grads)):
                    rows = (g[:, :, lo:hi] * A[:, :, lo:hi]).clamp(min=0).mean(1)[0]
                    cams[l][lo:hi] = rows.detach().float()

            try:
                for p in self.model.parameters():
                    p.requires_grad_(False)
                with torch.enable_grad(), capture(req):
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    emb = self.lm.rotary_emb(embeds, position_ids=positions)
                    h = embeds
                    for layer in self.layers:
                        h = layer(h, attention_mask=None, position_embeddings=emb, position_ids=positions, cache=None,
                                  use_cache=False)
                    ids = torch.as_tensor([int(g) for g in generated[: t + 1]], device=self.device)
                    if gradients == "target":
                        logit = self._logits(h[:, -1:])[0, -1, ids[t]]
                        add_rows(logit, 0, n, False)
                    else:
                        logits = self._logits(h[:, first:])[0]  # (t + 1, V): y_0 .. y_t
                        targets = logits[torch.arange(t + 1, device=self.device), ids]
                        logit = targets[t]
                        add_rows(targets[0], 0, first + 1, t > 0)
                        for k in range(1, t + 1):
                            if cancel is not None:
                                cancel.raise_if_cancelled()
                            add_rows(targets[k], first + k, first + k + 1, k < t)
            finally:
                for p, f in zip(self.model.parameters(), flags):
                    p.requires_grad_(f)
            self.forward_count += 1
        # R = (I + C_{L-1}) ... (I + C_0) from R ← R + C_l R, R = I; only its last row is drawn:
        # e^T (I + C_{L-1}) ... (I + C_0), a row vector through the layers from the last one down
        # (O(L·n²) on the device, not the O(L·n³) of the full product)
        row = torch.zeros(n, dtype=torch.float64, device=self.device)
        row[-1] = 1.0
        for cam in reversed(cams):
            row = row + row @ cam.double()
        row = row.cpu()
        if normalize:  # LVLM-Interpret's handle_residual, last row
            row[-1] -= 1.0
            total = row.sum()
            row = row / (total if total != 0 else 1.0)
            row[-1] += 1.0
        image = torch.as_tensor(prepared.image_positions)
        return row[image].numpy().astype(np.float32), float(logit.detach())

    # -- tokens -----------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def token_string(self, token_id: int) -> str:
        s = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return str(s).replace("▁", " ").replace("Ġ", " ")

    def encode_answer(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
