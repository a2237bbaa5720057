"""The offline demo tokenizers, trained from scratch on synthetic scenes.

* ``demo-tok``: a 1D TiTok-style tokenizer (:class:`explorer.backends.titok.TiTok`, Yu et al.,
  NeurIPS 2024): a ViT encoder reads the 8x8 patches of a 64x64 image with K = 32 latent tokens,
  each quantised against a 256-entry cosine codebook, and a ViT decoder paints the patches from
  them. Trained with *nested dropout* (FlexTok, Bachmann et al. 2025; One-D-Piece's tail-token
  drop, Miwa et al. 2025): each image keeps a random prefix of k tokens, the rest replaced by the
  learned ``tail_token``, so the first tokens carry the coarse content and every prefix decodes.
* ``demo-tok-grid``: the grid VQ baseline of the same size (:class:`~explorer.backends.titok.
  GridTokenizer`): one token per patch (64), same encoder, quantiser and decoder widths.

Recipe: scenes of 1-3 objects rendered at 64x64, batches of 32, loss = MSE of the reconstruction
+ the VQ codebook and commitment terms (weight 0.25, straight-through gradients), AdamW with a
linear warm-up and cosine decay over the time budget; codes unused for 200 steps are restarted at
random encoder outputs of the current batch (dead-code restarts). The k of nested dropout is
uniform over 1..K for 3/4 of the images and K for the rest. Seeded and resumable
(:class:`~explorer.demo.training.ResumableRun`); the data stream is indexed by step.

Exported as ``<out>/demo-tok/`` and ``<out>/demo-tok-grid/`` (``config.json`` +
``model.safetensors``), which :func:`explorer.backends.titok.load_tokenizer` loads like any
tokenizer folder. Images are ``(B, 3, 64, 64)`` in [0, 1].
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from explorer.backends.titok import TokenizerConfig, build_tokenizer, save_tokenizer

from .scenes import make_scene, scene_seed
from .training import ResumableRun, TrainSettings, cosine_lr, seed_everything

log = logging.getLogger(__name__)

__all__ = ["demo_config", "train_1d", "train_grid", "scene_batch", "EVAL_SEED"]

SIZE = 64
EVAL_SEED = 8_000_009  # fresh scenes for the figures (disjoint from training seeds)


def demo_config(kind: str) -> TokenizerConfig:
    """The demo tokenizers' architecture (``kind``: ``titok`` or ``grid``)."""
    return TokenizerConfig(kind=kind, image_size=SIZE, patch_size=8, enc_width=128, enc_layers=4, enc_heads=4,
                           dec_width=128, dec_layers=4, dec_heads=4, num_latent_tokens=32, codebook_size=256,
                           token_size=16, use_l2_norm=True, quantize_mode="vq", is_legacy=False,
                           finetune_decoder=False, tail_token=kind == "titok",
                           enc_window=1 if kind == "grid" else -1, dec_window=0 if kind == "grid" else -1,
                           name="demo 1D tokenizer" if kind == "titok" else "demo grid tokenizer")


def scene_batch(seed: int, start: int, n: int) -> torch.Tensor:
    """Scenes ``start .. start + n - 1`` of stream ``seed`` as ``(n, 3, 64, 64)`` in [0, 1]."""
    imgs = [make_scene(scene_seed(seed, start + i), size=(SIZE, SIZE), n_objects=(1, 3)).image for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


def _vq_loss(model, pixels: torch.Tensor, keep: torch.Tensor | None, beta: float = 0.25):
    z = model.encode_latents(pixels)  # (B, N, C)
    zn = F.normalize(z, dim=-1)
    ids = model.quantize.nearest(z)
    q = model.quantize.lookup(ids)
    codebook = F.mse_loss(q, zn.detach())
    commit = F.mse_loss(zn, q.detach())
    q_st = zn + (q - zn).detach()  # straight-through
    recon = model.decode_vectors(q_st, keep)
    mse = F.mse_loss(recon, pixels)
    return mse + codebook + beta * commit, mse, ids


def _train(kind: str, settings: TrainSettings, name: str) -> Path:
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    seed_everything(settings.seed)
    cfg = demo_config(kind)
    model = build_tokenizer(cfg)
    lr, batch = float(settings.extra.get("lr", 1e-3)), int(settings.extra.get("batch", 32))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    run = ResumableRun(settings, name, total_steps=10**12)
    run.restore(model, opt)
    last_used = torch.zeros(cfg.codebook_size, dtype=torch.long)
    model.train()
    N = cfg.n_tokens
    window: list[float] = []
    while not run.should_stop():
        budget = settings.max_steps if settings.max_steps else None
        progress = run.step / budget if budget else run.elapsed / (settings.minutes * 60.0)
        step_lr = cosine_lr(int(progress * 10_000), 10_000, lr, warmup=0, floor=0.05)
        step_lr *= min(1.0, (run.step + 1) / 300)
        for g in opt.param_groups:
            g["lr"] = step_lr
        pixels = scene_batch(settings.seed, run.step * batch, batch)
        keep = None
        if kind == "titok":
            rng = np.random.default_rng(np.random.SeedSequence([settings.seed, run.step, 7]))
            k = np.where(rng.random(batch) < 0.75, rng.integers(1, N + 1, batch), N)
            keep = torch.arange(N)[None] < torch.from_numpy(k)[:, None]
        loss, mse, ids = _vq_loss(model, pixels, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # dead-code restarts at this batch's encoder outputs
            last_used[ids.unique()] = run.step
            dead = (run.step - last_used > 200).nonzero().flatten()
            if len(dead):
                z = F.normalize(model.encode_latents(pixels).reshape(-1, cfg.token_size), dim=-1)
                pick = torch.randint(0, z.shape[0], (len(dead),))
                model.quantize.embedding.weight[dead] = z[pick]
                last_used[dead] = run.step
        window.append(float(mse.detach()))
        run.step += 1
        if run.step % settings.log_every == 0:
            psnr = -10 * np.log10(max(np.mean(window), 1e-12))
            run.log(loss=float(loss), psnr=psnr, lr=step_lr, codes_used=float((run.step - last_used < 200).sum()))
            window = []
        if run.step % settings.save_every == 0:
            run.save(model, opt)
    run.save(model, opt, finished=True)
    out = Path(settings.out_dir) / ("demo-tok" if kind == "titok" else "demo-tok-grid")
    model.eval()
    save_tokenizer(model, out)
    return out


def train_1d(settings: TrainSettings) -> Path:
    """Train and export ``demo-tok`` (see the module docstring)."""
    return _train("titok", settings, "tok")


def train_grid(settings: TrainSettings) -> Path:
    """Train and export ``demo-tok-grid`` (see the module docstring)."""
    return _train("grid", settings, "tok-grid")
