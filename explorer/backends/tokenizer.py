"""The image-tokenizer backend: encode an image to discrete token ids, decode ids back to pixels.

A tokenizer here is :mod:`explorer.backends.titok` (TiTok's 1D latent tokens, or a grid VQ
tokenizer), loaded from a folder with ``config.json`` + ``model.safetensors`` (the layout of the
official TiTok releases, or the project's own for the demo tokenizers) or a Hugging Face hub id of
such a folder (downloaded once into the hub cache; offline it fails at once with one line).

Geometry: the image is resized (bicubic, short side to the model's size) and centre-cropped to a
``S x S`` frame in [0, 1] (TiTok's evaluation preprocessing), recorded as a
:class:`~explorer.core.layout.Geometry`. The trace's layout is the encoder's sequence: ``[cls,
P patches, N latent tokens]`` for a 1D tokenizer (the latents are special tokens of kind
``latent``: they have no box), ``[cls, P patches]`` for a grid tokenizer (token i is patch i).
Pixel-level maps (a token's influence, gradients, reconstruction errors) are drawn through
:meth:`TokenizerBackend.pixel_layout`, a layout with one cell per frame pixel.

Trace ``extras``: ``ids`` ``(N,)`` int64 and ``latents`` ``(N, C)`` (pre-quantisation) on the
model's device, ``reconstruction`` ``(3, S, S)`` in [0, 1], ``pixels`` ``(1, 3, S, S)``,
``psnr``; ``attentions`` hold the encoder blocks' attention when asked, ``(H, rows, L)``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Job, Progress
from explorer.core.layout import Geometry, GridSegment, SpecialToken, TokenLayout
from explorer.core.trace import CaptureSpec, ModelInfo, Trace

from .devices import resolve_device
from .specs import TokenizerSpec
from .titok import load_tokenizer

__all__ = ["TokenizerBackend", "TokenizerInput"]


@dataclass
class TokenizerInput:
    """An image ready for the tokenizer: ``pixels (1, 3, S, S)`` in [0, 1] on the device, the
    encoder's layout and the image's hash."""

    pixels: torch.Tensor
    layout: TokenLayout
    sha256: str


def _resolve_folder(spec: TokenizerSpec) -> Path:
    """A local folder, or the hub snapshot of ``org/name`` (cached; offline: one line, at once)."""
    path = Path(spec.model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or spec.model.startswith(("/", ".", "~")):
        raise ValueError(f"{spec.model}: not a tokenizer folder (config.json + model.safetensors)")
    if spec.model.count("/") != 1:
        raise ValueError(f"tokenizer {spec.model!r}: give a folder or a Hugging Face hub id (org/name)")
    from .network import cached_hub_file, hub_reachable, offline_message

    cached = cached_hub_file(spec.model, ["config.json"])
    if cached is None and not hub_reachable():
        raise ValueError(offline_message(f"tokenizer {spec.model}", "tok:/path/to/folder with config.json and "
                                         "model.safetensors"))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.model, allow_patterns=["config.json", "*.safetensors", "*.bin"],
                                      local_files_only=cached is not None and not hub_reachable()))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types; one line for the user
        raise ValueError(f"tokenizer {spec.model}: {str(exc).splitlines()[0]}") from None


class TokenizerBackend:
    """A loaded tokenizer (see the module docstring)."""

    kind = "tokenizer"

    def __init__(self, spec: TokenizerSpec, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        self.dtype = dtype
        cfg = model.cfg
        self.cfg = cfg
        self.forward_count = 0
        self.lock = threading.RLock()  # one model call at a time (the protocol's calls take it)
        self.info = ModelInfo(kind="tokenizer", spec=spec.canonical(), name=spec.display_name if spec.is_demo else
                              (cfg.name or Path(spec.model).name or spec.model),
                              n_layers=cfg.enc_layers, n_heads=cfg.enc_heads, width=cfg.enc_width,
                              embed_dim=cfg.token_size, patch_size=(cfg.patch_size, cfg.patch_size),
                              input_size=(cfg.image_size, cfg.image_size), device=str(device),
                              dtype=str(dtype).replace("torch.", ""), demo=spec.is_demo,
                              extra={"tokens": cfg.n_tokens, "codebook_size": cfg.codebook_size,
                                     "layout": cfg.kind, "ordered": bool(cfg.tail_token)})

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: TokenizerSpec) -> "TokenizerBackend":
        folder = _resolve_folder(spec)
        model = load_tokenizer(folder, spec.weights)
        device = resolve_device(spec.device)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        if dtype != torch.float32 and device.type == "cpu":
            raise ValueError(f"precision {spec.precision} needs a GPU; use fp32 on the CPU")
        model = model.to(device=device, dtype=dtype).eval()
        return cls(spec, model, device, dtype)

    # -- facts ------------------------------------------------------------------------------------
    @property
    def token_count(self) -> int:
        """Tokens per image (N)."""
        return self.cfg.n_tokens

    def n_tokens(self, image_size: tuple[int, int]) -> int:
        """Length of the encoder's sequence (any image: it is resized to the model's size)."""
        return 1 + self.cfg.grid ** 2 + (0 if self.is_grid else self.cfg.num_latent_tokens)

    @property
    def is_grid(self) -> bool:
        return self.cfg.kind == "grid"

    @property
    def ordered(self) -> bool:
        """Whether the tokens were trained as ordered prefixes (a tail token stands for the rest)."""
        return bool(self.cfg.tail_token)

    def token_sequence_indices(self, layout: TokenLayout) -> np.ndarray:
        """Sequence positions of the tokenizer's tokens in the encoder (latents, or patches)."""
        if self.is_grid:
            return layout.image_token_indices()
        return np.array([s.index for s in layout.special if s.kind == "latent"], dtype=np.int64)

    # -- preprocessing ----------------------------------------------------------------------------
    def prepare(self, image: LoadedImage) -> TokenizerInput:
        from PIL import Image

        S = self.cfg.image_size
        h, w = image.size
        scale = S / min(h, w)
        nh, nw = max(S, round(h * scale)), max(S, round(w * scale))
        geo = Geometry.identity((h, w)).resize((nh, nw), "bicubic resize, short side to %d" % S)
        top, left = (nh - S) // 2, (nw - S) // 2
        geo = geo.crop(top, left, S, S, f"centre crop {S}x{S}")
        pil = Image.fromarray(image.rgb).resize((nw, nh), Image.BICUBIC).crop((left, top, left + S, top + S))
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        g, P = self.cfg.grid, self.cfg.grid ** 2
        special = [SpecialToken(0, "cls")]
        n_tokens = 1 + P
        if not self.is_grid:
            special += [SpecialToken(1 + P + i, "latent") for i in range(self.cfg.num_latent_tokens)]
            n_tokens += self.cfg.num_latent_tokens
        seg = GridSegment(name="patches", rows=g, cols=g, seq_start=1, geometry=geo)
        layout = TokenLayout(n_tokens=n_tokens, original_size=(h, w), segments=(seg,), special=tuple(special),
                             description=f"{self.info.name}: " + "; ".join(geo.describe()))
        return TokenizerInput(pixels.to(self.device, self.dtype), layout, image.sha256)

    def pixel_layout(self, layout: TokenLayout) -> TokenLayout:
        """One cell per pixel of the model's frame (for pixel-level maps), same geometry."""
        S = self.cfg.image_size
        return TokenLayout.single_grid(layout.segments[0].geometry, S, S, n_prefix=0, name="pixels")

    # -- running ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, N), latents (B, N, C))``."""
        with self.lock:
            self.forward_count += 1
            return self.model.encode(pixels)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``ids (B, N)`` -> ``(B, 3, S, S)`` in [0, 1]; ``keep (B, N)``: False tokens stand aside
        (the tail token of an ordered tokenizer, else the codebook's mean vector)."""
        return self.decode_vectors(self.model.token_vectors(ids), keep)

    @torch.no_grad()
    def decode_vectors(self, vectors: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is not None and not self.ordered:
            mean = self.codebook().mean(0)
            vectors = torch.where(keep[..., None], vectors, mean.to(vectors.dtype))
            keep = None
        with self.lock:
            return self.model.decode_vectors(vectors.to(self.dtype), keep).float().clamp(0.0, 1.0)

    def codebook(self) -> torch.Tensor:
        """``(K, C)`` code vectors as the decoder sees them."""
        return self.model.quantize.codes()

    def token_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_vectors(ids)

    def latent_gradient(self, pixels: torch.Tensor, token: int) -> torch.Tensor:
        """``(S, S)`` on the model's device: |d (z_t . q_t) / d pixels| summed over the colour
        channels, where ``z_t`` is token ``t``'s pre-quantisation embedding and ``q_t`` its code
        vector (a constant)."""
        with self.lock:
            x = pixels.detach().clone().to(self.dtype).requires_grad_(True)
            with torch.enable_grad():
                z = self.model.encode_latents(x)[0, token]
                q = self.model.quantize.lookup(self.model.quantize.nearest(z.detach()[None]))[0]
                (z.float() @ q.float()).backward()
            return x.grad[0].float().abs().sum(0)

    def trace(self, image: LoadedImage, capture: CaptureSpec, cancel: CancelToken | None = None) -> Job:
        """Job: encode and decode ``image`` once; the attention of the blocks in
        ``capture.attention_layers`` is kept, every row or ``capture.attention_rows`` (host numpy on
        the CPU, device tensors otherwise)."""
        cancel = cancel or CancelToken()
        t0 = time.perf_counter()
        yield Progress(0.0, "encoding")
        prep = self.prepare(image)
        rows = capture.attention_rows
        blocks = self.model.encoder.transformer
        layers = sorted(i for i in capture.attention_layers if 0 <= i < len(blocks))
        for i in layers:
            blocks[i].keep_attention = True
        try:
            ids, latents = self.encode(prep.pixels)
            cancel.raise_if_cancelled()
            attentions = {}
            for i in layers:
                a = blocks[i].last_attention[0]
                if rows is not None:
                    a = a[:, torch.as_tensor(rows, device=self.device)]
                attentions[i] = a.float().cpu().numpy() if self.device.type == "cpu" else a
        finally:
            for b in blocks:
                b.keep_attention, b.last_attention = False, None
        yield Progress(0.6, "decoding")
        recon = self.decode_ids(ids)[0]
        mse = float(((recon - prep.pixels[0].float()) ** 2).mean())
        psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
        return Trace(layout=prep.layout, model=self.info, image_sha256=image.sha256,
                     capture=CaptureSpec(attention_layers=frozenset(layers), attention_rows=rows),
                     attentions=attentions, attention_rows=rows,
                     extras={"ids": ids[0], "latents": latents[0], "reconstruction": recon, "pixels": prep.pixels,
                             "psnr": psnr},
                     seconds=time.perf_counter() - t0)

    def device_text(self, memory: bool = True) -> str:
        from .devices import device_report

        return device_report(self.device).text(memory)
