"""TiTok, the 1D image tokenizer, implemented in the project, and a grid VQ tokenizer built from the
same parts.

TiTok: Yu et al., "An Image is Worth 32 Tokens for Reconstruction and Generation", NeurIPS 2024;
official code https://github.com/bytedance/1d-tokenizer (``modeling/titok.py``,
``modeling/modules/blocks.py``, ``modeling/quantizer/quantizer.py``,
``modeling/modules/maskgit_vqgan.py``). The modules below follow the paper and the official
configuration so that the released checkpoints load with their own key layout:

* encoder: patch embedding (a conv with stride = patch size), ``[cls, patches, latents]`` with
  learned positional embeddings (the latent tokens have their own), pre-norm transformer blocks
  (``nn.MultiheadAttention``, GELU MLP of ratio 4), ``ln_post`` on the latent tokens, a 1x1 conv to
  ``token_size`` channels; the *legacy* layout (the L-32/B-64/S-128 releases) reinterprets the
  ``(B, N, W)`` latents as ``(B, W, N, 1)`` by a reshape, not a transpose, as the official code does;
* quantiser: nearest codebook entry, by cosine similarity when ``use_l2_norm`` (both sides
  normalised; looked-up entries normalised again);
* decoder: the tokens projected to the decoder width, ``[cls, one mask token per patch,
  latents]``, a transformer, ``ln_post`` on the patch positions, then either (legacy) a 1x1-conv
  head to MaskGIT-VQGAN code logits whose softmax-weighted code vectors the VQGAN pixel decoder
  turns into pixels, or a 1x1-conv head to ``patch x patch x 3`` values per patch and a 3x3 conv;
* the MaskGIT-VQGAN pixel decoder (Chang et al., "MaskGIT", CVPR 2022), with its residual-block
  quirk kept: when channels change the shortcut is added to the block's *output*; ``num_res_blocks``
  blocks in the middle and per level, as the official ``Decoder``.

``tests/plugins/test_golden_titok.py`` compares encode (ids, latents), decode and the encoder
attention with the official code run on tiny weights in this layout.

Images are ``(B, 3, H, W)`` in [0, 1] without normalisation; reconstructions are clamped to
[0, 1] by the callers. Token ids are ``(B, N)`` int64.

Project extensions, used by the demo tokenizers and absent from the official configs: explicit
widths/depths/heads (``vit_enc_width`` …), a smaller pixel decoder (``pixel_channels``,
``pixel_mult``, ``pixel_res_blocks``), a learned ``decoder.tail_token`` that stands for dropped
tail tokens (nested dropout: FlexTok, Bachmann et al. 2025; One-D-Piece, Miwa et al. 2025), and
:class:`GridTokenizer`, a grid VQ tokenizer (one token per patch; van den Oord et al., "Neural
Discrete Representation Learning", 2017) with the same blocks and quantiser.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenizerConfig", "TiTok", "GridTokenizer", "build_tokenizer", "config_from_official", "SIZES"]

SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}  # width, layers, heads


@dataclass
class TokenizerConfig:
    """Everything that decides the architecture (see the module docstring for the extensions)."""

    kind: str = "titok"  # "titok" (1D latent tokens) or "grid" (one token per patch)
    image_size: int = 256
    patch_size: int = 16
    enc_width: int = 1024
    enc_layers: int = 24
    enc_heads: int = 16
    dec_width: int = 1024
    dec_layers: int = 24
    dec_heads: int = 16
    num_latent_tokens: int = 32
    codebook_size: int = 4096
    token_size: int = 12
    use_l2_norm: bool = True
    quantize_mode: str = "vq"  # "vq" or "vae"
    is_legacy: bool = True
    finetune_decoder: bool = True  # legacy: the MaskGIT-VQGAN pixel decoder is part of the model
    pixel_codebook_size: int = 1024
    pixel_token_size: int = 256
    pixel_channels: int = 128
    pixel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    pixel_res_blocks: int = 2
    tail_token: bool = False  # nested dropout: a learned stand-in for dropped tail tokens
    # grid tokenizers only: -1 global attention; k >= 0: the first block mixes each patch with the
    # patches within Chebyshev distance k, the later blocks keep each patch to itself
    enc_window: int = -1
    dec_window: int = -1
    name: str = ""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid if self.kind == "grid" else self.num_latent_tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_mult"] = list(self.pixel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenizerConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "pixel_mult" in values:
            values["pixel_mult"] = tuple(values["pixel_mult"])
        return cls(**values)


def config_from_official(cfg: dict[str, Any], name: str = "") -> TokenizerConfig:
    """A :class:`TokenizerConfig` from an official TiTok ``config.json`` (the OmegaConf dict with
    ``model.vq_model`` and ``dataset.preprocessing``), or from the project's own flat config.
    Besides the official keys, ``model.vq_model`` may give explicit shapes (``vit_enc_width``,
    ``vit_enc_layers``, ``vit_enc_heads``, the same for ``dec``, ``pixel_channels``,
    ``pixel_mult``, ``pixel_res_blocks``): small models in the official layout (tests)."""
    if "model" not in cfg:
        return TokenizerConfig.from_dict({**cfg, "name": cfg.get("name", name)})
    vq = dict(cfg["model"].get("vq_model", {}))
    crop = int(cfg.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256))
    enc = SIZES[vq.get("vit_enc_model_size", "large")]
    dec = SIZES[vq.get("vit_dec_model_size", "large")]
    patch = int(vq.get("vit_enc_patch_size", 16))
    if int(vq.get("vit_dec_patch_size", patch)) != patch:
        raise ValueError("encoder and decoder patch sizes differ: not a TiTok layout the project reads")
    # project extension (tests, small models): explicit shapes instead of the size names
    enc = (int(vq.get("vit_enc_width", enc[0])), int(vq.get("vit_enc_layers", enc[1])), int(vq.get("vit_enc_heads", enc[2])))
    dec = (int(vq.get("vit_dec_width", dec[0])), int(vq.get("vit_dec_layers", dec[1])), int(vq.get("vit_dec_heads", dec[2])))
    pixel = {k: vq[k] for k in ("pixel_channels", "pixel_mult", "pixel_res_blocks", "pixel_codebook_size",
                                 "pixel_token_size") if k in vq}
    if "pixel_mult" in pixel:
        pixel["pixel_mult"] = tuple(pixel["pixel_mult"])
    return TokenizerConfig(
        kind="titok", image_size=crop, patch_size=patch, enc_width=enc[0], enc_layers=enc[1], enc_heads=enc[2],
        dec_width=dec[0], dec_layers=dec[1], dec_heads=dec[2], num_latent_tokens=int(vq.get("num_latent_tokens", 32)),
        codebook_size=int(vq.get("codebook_size", 4096)), token_size=int(vq.get("token_size", 12)),
        use_l2_norm=bool(vq.get("use_l2_norm", True)), quantize_mode=str(vq.get("quantize_mode", "vq")),
        is_legacy=bool(vq.get("is_legacy", True)), finetune_decoder=bool(vq.get("finetune_decoder", True)),
        name=name, **pixel)


# -- blocks -----------------------------------------------------------------------------------------
class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)`` (official names). Sequences
    are batch-first here; the attention probabilities are recomputed from the block's own
    projections when ``keep_attention`` is set (``(B, heads, L, L)`` in :attr:`last_attention`)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None
        self.register_buffer("attn_mask", None, persistent=False)  # (L, L) bool, True: may attend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        B, L, W = h.shape
        heads = self.attn.num_heads
        q, k, v = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, heads, W // heads).transpose(1, 2) for t in (q, k, v))
        mask = self.attn_mask
        if self.keep_attention:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(W // heads)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            self.last_attention = probs.detach()
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = F.linear(out.transpose(1, 2).reshape(B, L, W), self.attn.out_proj.weight, self.attn.out_proj.bias)
        x = x + out
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Sequential):
    """``transformer.{i}`` blocks (official names)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])


def _scale(width: int) -> float:
    return width ** -0.5


def local_masks(grid: int, window: int, layers: int) -> list[torch.Tensor]:
    """Attention masks ``(1 + g*g, 1 + g*g)`` bool (True: may attend) over ``[cls, patches]`` for a
    grid tokenizer whose token must stay local: in the first block a patch attends to the patches
    within Chebyshev distance ``window`` (and to the class token, which attends only to itself and
    so carries nothing of the image); in the later blocks each patch attends to itself and the class
    token. A token then depends on the pixels of its ``(2 window + 1)``-patch neighbourhood only."""
    idx = torch.arange(grid * grid)
    r, c = idx // grid, idx % grid
    cheb = torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs())
    masks = []
    for i in range(layers):
        m = torch.zeros(1 + grid * grid, 1 + grid * grid, dtype=torch.bool)
        m[0, 0] = True
        m[1:, 0] = True
        m[1:, 1:] = cheb <= (window if i == 0 else 0)
        masks.append(m)
    return masks


def _set_masks(transformer: nn.Sequential, grid: int, window: int) -> None:
    if window < 0:
        return
    for block, m in zip(transformer, local_masks(grid, window, len(transformer))):
        block.attn_mask = m


class Encoder(nn.Module):
    """TiTokEncoder (``grid=True``: the patch tokens are the output, one per patch)."""

    def __init__(self, cfg: TokenizerConfig, grid_output: bool = False) -> None:
        super().__init__()
        W, g = cfg.enc_width, cfg.grid
        self.cfg, self.grid_output = cfg, grid_output
        self.patch_embed = nn.Conv2d(3, W, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True)
        self.class_embedding = nn.Parameter(_scale(W) * torch.randn(1, W))
        self.positional_embedding = nn.Parameter(_scale(W) * torch.randn(g * g + 1, W))
        if not grid_output:
            self.latent_token_positional_embedding = nn.Parameter(_scale(W) * torch.randn(cfg.num_latent_tokens, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Transformer(W, cfg.enc_layers, cfg.enc_heads)
        if grid_output:
            _set_masks(self.transformer, g, cfg.enc_window)
        self.ln_post = nn.LayerNorm(W)
        out = cfg.token_size * (2 if cfg.quantize_mode == "vae" else 1)
        self.conv_out = nn.Conv2d(W, out, kernel_size=1, bias=True)

    def forward(self, pixels: torch.Tensor, latent_tokens: torch.Tensor | None) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, token_size, 1, N)`` (N latents, or the patches of a grid)."""
        B = pixels.shape[0]
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, P, W)
        P = x.shape[1]
        x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, -1), x], dim=1) + self.positional_embedding
        if not self.grid_output:
            lat = (latent_tokens + self.latent_token_positional_embedding).to(x.dtype)
            x = torch.cat([x, lat.expand(B, -1, -1)], dim=1)
        x = self.transformer(self.ln_pre(x))
        out = x[:, 1:1 + P] if self.grid_output else x[:, 1 + P:]
        out = self.ln_post(out)
        N, W = out.shape[1], out.shape[2]
        if self.cfg.is_legacy and not self.grid_output:
            out = out.reshape(B, W, N, 1)  # the official legacy layout: a reshape, not a transpose
        else:
            out = out.reshape(B, N, W, 1).permute(0, 2, 1, 3)
        return self.conv_out(out).reshape(B, -1, 1, N)


class VectorQuantizer(nn.Module):
    """``quantize.embedding`` (official name); cosine nearest neighbour when ``use_l2_norm``."""

    def __init__(self, codebook_size: int, token_size: int, use_l2_norm: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.use_l2_norm = use_l2_norm

    def codes(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.use_l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """``z (..., C)`` -> indices ``(...)``."""
        flat = z.reshape(-1, z.shape[-1]).float()
        if self.use_l2_norm:
            flat = F.normalize(flat, dim=-1)
        w = self.codes()
        d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1)[None] - 2 * flat @ w.T
        return d.argmin(1).reshape(z.shape[:-1])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """indices ``(...)`` -> code vectors ``(..., C)`` (normalised when ``use_l2_norm``)."""
        return self.codes()[ids]


class Decoder(nn.Module):
    """TiTokDecoder (``grid=True``: the tokens sit on the patch positions themselves)."""

    def __init__(self, cfg: TokenizerConfig, grid_input: bool = False) -> None:
        super().__init__()
        W, g = cfg.dec_width, cfg.grid
        self.cfg, self.grid_input = cfg, grid_input
        self.decoder_embed = nn.Linear(cfg.token_size, W, bias=True)
        self.class_embedding = nn.Parameter(_scale(W) * torch.randn(1, W))
        self.positional_embedding = nn.Parameter(_scale(W) * torch.randn(g * g + 1, W))
        if not grid_input:
            self.mask_token = nn.Parameter(_scale(W) * torch.randn(1, 1, W))
            self.latent_token_positional_embedding = nn.Parameter(_scale(W) * torch.randn(cfg.num_latent_tokens, W))
        if cfg.tail_token:
            self.tail_token = nn.Parameter(torch.zeros(1, 1, cfg.token_size))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Transformer(W, cfg.dec_layers, cfg.dec_heads)
        if grid_input:
            _set_masks(self.transformer, g, cfg.dec_window)
        self.ln_post = nn.LayerNorm(W)
        if cfg.is_legacy and not grid_input:
            self.ffn = nn.Sequential(nn.Conv2d(W, 2 * W, 1, padding=0, bias=True), nn.Tanh(),
                                     nn.Conv2d(2 * W, cfg.pixel_codebook_size, 1, padding=0, bias=True))
            self.conv_out = nn.Identity()
        else:
            self.ffn = nn.Sequential(nn.Conv2d(W, cfg.patch_size * cfg.patch_size * 3, 1, padding=0, bias=True))
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1, bias=True)

    def forward(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``z (B, token_size, 1, N)`` -> legacy: logits ``(B, pixel_codebook, g, g)``; else pixels
        ``(B, 3, S, S)``. ``keep (B, N) bool``: tokens marked False are replaced by ``tail_token``."""
        B, C, _, N = z.shape
        tokens = z.reshape(B, C, N).permute(0, 2, 1)
        if keep is not None:
            if not hasattr(self, "tail_token"):
                raise ValueError("this tokenizer has no tail token to stand for dropped tokens")
            tokens = torch.where(keep[..., None], tokens, self.tail_token.to(tokens.dtype))
        x = self.decoder_embed(tokens)
        g = self.cfg.grid
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        if self.grid_input:
            seq = torch.cat([cls, x], dim=1) + self.positional_embedding
        else:
            masks = self.mask_token.to(x.dtype).expand(B, g * g, -1)
            head = torch.cat([cls, masks], dim=1) + self.positional_embedding
            seq = torch.cat([head, x + self.latent_token_positional_embedding[:N]], dim=1)
        seq = self.transformer(self.ln_pre(seq))
        out = self.ln_post(seq[:, 1:1 + g * g])
        out = out.transpose(1, 2).reshape(B, -1, g, g).contiguous()  # as the official code (same conv rounding)
        out = self.ffn(out)
        if self.cfg.is_legacy and not self.grid_input:
            return self.conv_out(out)
        p = self.cfg.patch_size
        out = out.reshape(B, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(B, 3, g * p, g * p)
        return self.conv_out(out)


# -- the MaskGIT-VQGAN pixel decoder ----------------------------------------------------------------
class _ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            return h + self.nin_shortcut(h)  # the official quirk: the shortcut of the output, not of x
        return x + h


class _UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList([_ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_blocks)])
        if upsample:
            self.upsample_conv = nn.Conv2d(cout, cout, 3, padding=1)


class PixelDecoder(nn.Module):
    """MaskGIT-VQGAN decoder: ``(B, z, g, g)`` code vectors -> ``(B, 3, g * 2**(levels-1), …)``."""

    def __init__(self, z: int, ch: int, mult: tuple[int, ...], n_blocks: int) -> None:
        super().__init__()
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, top, 3, padding=1)
        # ``num_res_blocks`` middle blocks, as the official ``Decoder`` (2 in the released configs)
        self.mid = nn.ModuleList([_ResnetBlock(top, top) for _ in range(n_blocks)])
        ups, cin = [], top
        for i in reversed(range(len(mult))):
            cout = ch * mult[i]
            ups.append(_UpLevel(cin, cout, n_blocks, upsample=i != 0))
            cin = cout
        self.up = nn.ModuleList(list(reversed(ups)))  # up.0 is the last (full-resolution) level
        self.norm_out = nn.GroupNorm(32, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.mid:
            h = block(h)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample_conv"):
                h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


# -- the tokenizers ---------------------------------------------------------------------------------
class _Tokenizer(nn.Module):
    cfg: TokenizerConfig

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation token embeddings ``(B, N, token_size)`` (VAE: the means)."""
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, N), pre-quantisation embeddings (B, N, C))``."""
        z = self.encode_latents(pixels)
        return self.quantize.nearest(z), z

    def token_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantize.lookup(ids)

    def decode_vectors(self, vectors: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Code vectors ``(B, N, C)`` -> image ``(B, 3, S, S)`` (not clamped)."""
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode_vectors(self.token_vectors(ids), keep)


class TiTok(_Tokenizer):
    """TiTok with the official module names (``encoder``, ``decoder``, ``latent_tokens``,
    ``quantize``, and for the legacy releases ``pixel_quantize``/``pixel_decoder``)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.latent_tokens = nn.Parameter(_scale(cfg.enc_width) * torch.randn(cfg.num_latent_tokens, cfg.enc_width))
        if cfg.quantize_mode == "vq":
            self.quantize = VectorQuantizer(cfg.codebook_size, cfg.token_size, cfg.use_l2_norm)
        if cfg.is_legacy and cfg.finetune_decoder:
            self.pixel_quantize = VectorQuantizer(cfg.pixel_codebook_size, cfg.pixel_token_size, False)
            self.pixel_decoder = PixelDecoder(cfg.pixel_token_size, cfg.pixel_channels, tuple(cfg.pixel_mult),
                                              cfg.pixel_res_blocks)

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.encoder(pixels, self.latent_tokens)  # (B, C', 1, N)
        if self.cfg.quantize_mode == "vae":
            z = z.chunk(2, dim=1)[0]  # the posterior's mean
        return z.squeeze(2).transpose(1, 2)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.quantize_mode != "vq":
            raise ValueError("a VAE TiTok has continuous tokens, no ids")
        return super().encode(pixels)

    def decode_vectors(self, vectors: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        z = vectors.transpose(1, 2).unsqueeze(2).to(self.decoder.decoder_embed.weight.dtype)  # (B, C, 1, N)
        out = self.decoder(z, keep)
        if self.cfg.is_legacy:
            if not hasattr(self, "pixel_decoder"):
                raise ValueError("this legacy TiTok has no pixel decoder (finetune_decoder is false)")
            codes = torch.einsum("nchw,cd->ndhw", out.softmax(1), self.pixel_quantize.embedding.weight.to(out.dtype))
            return self.pixel_decoder(codes)
        return out


class GridTokenizer(_Tokenizer):
    """A grid VQ tokenizer: one token per patch (encoder patch outputs quantised, decoded in place)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, grid_output=True)
        self.decoder = Decoder(cfg, grid_input=True)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.token_size, cfg.use_l2_norm)

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels, None).squeeze(2).transpose(1, 2)

    def decode_vectors(self, vectors: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        z = vectors.transpose(1, 2).unsqueeze(2).to(self.decoder.decoder_embed.weight.dtype)
        return self.decoder(z, keep)


def build_tokenizer(cfg: TokenizerConfig) -> _Tokenizer:
    if cfg.kind == "grid":
        return GridTokenizer(cfg)
    if cfg.kind == "titok":
        return TiTok(cfg)
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r} (titok or grid)")


# -- files ------------------------------------------------------------------------------------------
CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_OPTIONAL_KEYS = ("quantize.embed_prob",)  # clustering-VQ bookkeeping of some training configs


def save_tokenizer(model: _Tokenizer, folder) -> None:
    """``folder/config.json`` (the project's flat config) and ``folder/model.safetensors``."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(model.cfg.to_dict(), indent=1))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHT_NAMES[0]))


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (read with ``weights_only=True``)."""
    from pathlib import Path

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_tokenizer(folder, weights=None, name: str = "") -> _Tokenizer:
    """Build from ``folder/config.json`` (an official TiTok config or the project's) and load the
    weights (``weights``, else ``model.safetensors`` or ``pytorch_model.bin`` in the folder). Every
    key must match: ``ValueError`` names the missing and unexpected ones."""
    import json
    from pathlib import Path

    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_NAME} (a tokenizer folder has config.json and model.safetensors)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not a readable config ({exc})") from None
    try:
        cfg = config_from_official(raw, name=name or folder.name)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: not a tokenizer config the project reads ({exc})") from None
    if cfg.quantize_mode != "vq":
        raise ValueError(f"{folder.name}: a TiTok with quantize_mode={cfg.quantize_mode!r} has continuous tokens and no "
                         "ids; the tokenizer views need discrete tokens (the VQ releases load)")
    path = Path(weights) if weights else next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if path is None or not path.is_file():
        raise ValueError(f"{folder}: no weights ({' or '.join(WEIGHT_NAMES)})")
    model = build_tokenizer(cfg)
    state = {k: v for k, v in read_state_dict(path).items() if k not in _OPTIONAL_KEYS}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise ValueError(f"{path.name} does not fit the {cfg.kind} architecture of {cfg_path.name}: {'; '.join(parts)}")
    return model.eval()
