"""gScoreCAM for CLIP (Chen, Li, Biaz, Bui & Nguyen, ACCV 2022).

Official code: ``anguyen8/gScoreCAM``, ``pytorch_grad_cam/gscore_cam.py::GScoreCAM.get_cam_weights``
and ``base_cam.py``; for a ViT the target layer is ``visual.transformer.resblocks[-1]`` with
``model_loader/clip_loader.py::reshape_transform`` (drop [CLS], tokens to a grid).

1. One forward and backward pass of the CLIP logit ``y = logit_scale * cos(image, text)``.
   Activations ``A`` at the output of the last residual block (trace hidden state ``L``), [CLS]
   dropped, as ``(C = D, rows, cols)`` on the patch grid, and the gradient ``G`` there.
2. Channel importance ``g_c`` = spatial mean of the signed gradient. Which tokens' gradient:
   CLIP's ViT pools only the [CLS] token after the last block, so the gradient of every *patch*
   token at the last block's output is exactly zero and the patch mean (the reshape transform
   applied to the gradient, the ResNet path) would rank nothing: every channel ties and the top-k
   choice is arbitrary. The official code has a ViT path for this, ``is_transformer``
   ("use the gradient of CLS token": ``utils/image.py::cls_reshpae``, a 1x1 grid, so the mean is
   the [CLS] gradient itself), which ``evaluate_cam.py`` turns on for ViTs
   (``is_transformer = "ViT" in model_name``); ``tools/cam.py::load_cam`` does not forward it to
   ``CAMWrapper``, so the published scripts fall back to the zero patch gradients. The default
   here, ``gradient='auto'``, is the intended ViT path (the [CLS] gradient), or the patch mean
   when the [CLS] gradient is all zero (a tower that pools the patch tokens instead);
   ``'cls'`` and ``'patches'`` force one.
3. The top ``k`` channels by ``g_c`` (``torch.topk``, default 300, clamped to ``C``).
4. Each chosen ``A_c`` is upsampled bilinearly to the model input size with aligned corners
   (``torch.nn.UpsamplingBilinear2d``), min-max normalised ``(A - min) / (max - min + 1e-6)`` and
   multiplies the **normalised** input tensor (``img_tensor[:, None] * upsampled``: the official
   code masks the preprocessed tensor, so a masked-out pixel becomes the normalisation mean, 0).
   CLIP scores the masked inputs in batches (default 128); NaN scores become 0.
5. ``w = softmax(S)`` over all ``C`` channels with the unscored channels at score 0 (the official
   quirk: each gets ``e^0 / Z``).
6. ``cam = ReLU(Σ_c w_c A_c)`` on the token grid, then min-max normalised
   (``(cam - min) / (max + 1e-8)`` after subtracting the min, ``normalize2D``). The official code
   resizes to the image afterwards; here the canvas stretches the token grid.

Invariants: ``Σ w = 1``, ``cam ≥ 0``, permuting channels (activations and gradients together)
leaves the cam unchanged, ``k = C`` is ScoreCAM with softmax weights, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import namespace, to_host
from explorer.core.jobs import CancelToken, Job, Progress, sub_job
from explorer.core.layout import TokenLayout
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError
from explorer_plugins.common.gradients import prompt_inputs

__all__ = ["GScoreCamOutput", "grid_channels", "channel_importance", "token_importance", "auto_source", "top_channels", "channel_masks",
           "softmax_weights", "combine", "normalize_cam", "gscorecam_job", "GScoreCam"]

MASK_EPS = 1e-6  # gscore_cam.py: (upsampled - mins) / (maxs - mins + 1e-6)
CAM_EPS = 1e-8  # utils/image.py::normalize2D


@dataclass(frozen=True)
class GScoreCamOutput:
    """``cam (h, w)`` = ReLU(Σ w A) before normalisation; ``weights (C,)``; ``channels (k,)`` the
    scored channels by decreasing importance; ``scores (k,)`` their logits; ``importance (C,)``."""

    cam: np.ndarray
    weights: np.ndarray
    channels: np.ndarray
    scores: np.ndarray
    importance: np.ndarray


def grid_channels(layout: TokenLayout, tokens):
    """The ViT reshape transform: per-sequence ``(N, D)`` -> ``(D, rows, cols)`` of the image tokens
    (in the array's namespace: a device tensor stays on its device)."""
    if len(layout.segments) != 1:
        raise ParamError("gScoreCAM needs a single token grid")
    seg = layout.segments[0]
    if not hasattr(tokens, "dtype"):
        tokens = np.asarray(tokens, dtype=np.float32)
    xp = namespace(tokens)
    x = layout.gather(tokens if tokens.dtype == xp.float32 else xp.astype(tokens, xp.float32))
    return xp.permute_dims(xp.reshape(x, (seg.rows, seg.cols, -1)), (2, 0, 1))


def channel_importance(gradients):
    """``(C, h, w)`` -> ``(C,)``: the spatial mean of the signed gradient."""
    if not hasattr(gradients, "dtype"):
        gradients = np.asarray(gradients, dtype=np.float32)
    xp = namespace(gradients)
    return xp.mean(xp.astype(gradients, xp.float32), axis=(1, 2))


def token_importance(layout: TokenLayout, gradient, source: str):
    """Channel importance ``(D,)`` from the per-sequence gradient ``(N, D)`` at the target layer:
    the [CLS] token's gradient (``'cls'``, the official ``is_transformer`` path) or the spatial
    mean over the patch grid (``'patches'``)."""
    if source == "cls":
        if layout.cls_index is None:
            raise ParamError("gradient='cls' needs a [CLS] token; use gradient='patches'")
        xp = namespace(gradient)
        return xp.astype(gradient[layout.cls_index], xp.float32)
    if source == "patches":
        return channel_importance(grid_channels(layout, gradient))
    raise ParamError(f"unknown gradient source {source!r}; use auto, cls or patches")


def auto_source(layout: TokenLayout, gradient) -> str:
    """``'cls'`` when there is a [CLS] token with a non-zero gradient, else ``'patches'``."""
    if layout.cls_index is not None and bool(to_host(namespace(gradient).any(gradient[layout.cls_index] != 0))):
        return "cls"
    return "patches"


def top_channels(importance: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most important channels (``torch.topk``, largest first)."""
    imp = torch.from_numpy(np.asarray(importance, dtype=np.float32))
    k = max(1, min(int(k), imp.numel()))
    return imp.topk(k).indices.numpy()


def channel_masks(activations: torch.Tensor, size: tuple[int, int], eps: float = MASK_EPS) -> torch.Tensor:
    """``(K, h, w)`` -> ``(K, H, W)``: bilinear upsampling with aligned corners, min-max to [0, 1]."""
    up = F.interpolate(activations.float()[None], size=tuple(size), mode="bilinear", align_corners=True)[0]
    flat = up.reshape(up.shape[0], -1)
    lo = flat.min(-1).values[:, None, None]
    hi = flat.max(-1).values[:, None, None]
    return (up - lo) / (hi - lo + eps)


def softmax_weights(scores: np.ndarray, channels: np.ndarray, n_channels: int) -> np.ndarray:
    """Softmax over all ``n_channels`` with the scored ``channels`` at ``scores`` and the rest at 0."""
    full = np.zeros(n_channels, dtype=np.float64)
    full[np.asarray(channels)] = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    z = np.exp(full - full.max())
    return z / z.sum()


def combine(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``ReLU(Σ_c w_c A_c)``: ``(C, h, w)``, ``(C,)`` -> ``(h, w)``."""
    return np.maximum(np.tensordot(np.asarray(weights, dtype=np.float64),
                                   np.asarray(activations, dtype=np.float64), axes=1), 0.0)


def normalize_cam(cam: np.ndarray) -> np.ndarray:
    """The official ``normalize2D``: subtract the min, divide by ``max + 1e-8``."""
    cam = np.asarray(cam, dtype=np.float64) - np.min(cam)
    return cam / (CAM_EPS + cam.max())


def gscorecam_job(activations: np.ndarray, importance: np.ndarray, pixels: torch.Tensor,
                  score: Callable[[torch.Tensor], np.ndarray], topk: int = 300, batch_size: int = 128,
                  cancel: CancelToken | None = None) -> Job:
    """Job: gScoreCAM from ``activations (C, h, w)`` at the target layer and the channel
    ``importance (C,)`` (see :func:`channel_importance`, :func:`token_importance`).

    ``pixels (1, 3, H, W)`` is the (normalised) model input; ``score(batch (B, 3, H, W)) -> (B,)``
    returns the target logit of each masked input. Yields progress and checks ``cancel`` between
    batches. Returns a :class:`GScoreCamOutput`.
    """
    # the activations stay on (or go once to) the input's device: masks are made there
    acts_t = activations if torch.is_tensor(activations) else torch.from_numpy(np.asarray(activations, np.float32))
    acts_t = acts_t.to(pixels.device, torch.float32)
    C = acts_t.shape[0]
    importance = to_host(importance, np.float32).reshape(-1)  # (C,): small
    if importance.shape[0] != C:
        raise ValueError(f"{importance.shape[0]} channel importances for {C} channels")
    channels = top_channels(importance, topk)
    size = tuple(pixels.shape[-2:])
    scores: list[np.ndarray] = []
    for start in range(0, len(channels), batch_size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        chosen = torch.as_tensor(channels[start:start + batch_size], device=acts_t.device)
        masks = channel_masks(acts_t.index_select(0, chosen), size).to(pixels.device, pixels.dtype)
        scores.append(np.asarray(score(pixels * masks[:, None]), dtype=np.float64).reshape(-1))
        done = min(start + batch_size, len(channels))
        yield Progress(done / len(channels), f"scored {done}/{len(channels)} channels")
    s = np.concatenate(scores)
    weights = softmax_weights(s, channels, C)
    return GScoreCamOutput(cam=combine(to_host(acts_t), weights), weights=weights, channels=channels, scores=s,
                           importance=importance)


class GScoreCam(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt_index: int = Field(0, ge=0, description="Which prompt's logit is explained.")
        topk: int = Field(300, ge=1, description="Channels scored, most important first (clamped to the model width).")
        batch_size: int = Field(128, ge=1, description="Masked images scored per CLIP forward pass.")
        gradient: Literal["auto", "cls", "patches"] = Field(
            "auto", description="Channel importance from the [CLS] token's gradient (the official ViT path; "
            "patch gradients are zero at CLIP's last block) or the mean over the patch tokens; auto = "
            "[CLS] unless its gradient is zero.")
        normalize: bool = Field(True, description="Min-max normalise the cam to [0, 1] (the official output).")

    def capture(self, params, model, target):
        return CaptureSpec()  # activations and gradients come from the backend's gradient pass

    def run(self, trace, params, *, target, cancel, backend=None):
        prepared, emb, prompt = prompt_inputs(trace, params, backend, "gScoreCAM")
        L = trace.model.n_layers
        yield Progress(0.0, "forward and backward pass")
        cancel.raise_if_cancelled()
        gp = backend.gradient_pass(prepared, emb, hidden_layers=[L], cancel=cancel)
        acts = grid_channels(trace.layout, gp.hidden[L])
        source = auto_source(trace.layout, gp.hidden_grads[L]) if params.gradient == "auto" else params.gradient
        importance = token_importance(trace.layout, gp.hidden_grads[L], source)
        yield Progress(0.1, "scoring channels")

        def score(batch):
            return backend.score_inputs(batch, text_embedding=emb, batch_size=batch.shape[0], cancel=cancel)

        job = gscorecam_job(acts, importance, prepared.pixels, score, params.topk, params.batch_size, cancel)
        out = yield from sub_job(job, 0.1, 1.0)
        cam = normalize_cam(out.cam) if params.normalize else out.cam
        unscored = len(out.weights) - len(out.channels)
        return Heatmap(
            layout=trace.layout,
            token_values=cam.reshape(-1),
            label=f"gScoreCAM for {prompt!r} (top {len(out.channels)} of {len(out.weights)} channels)",
            meta={
                "prompt": prompt,
                "score": gp.score,
                "gradient": source,
                "channels": [int(c) for c in out.channels],
                "weight_sum": float(out.weights.sum()),
                "unscored_weight": float(np.delete(out.weights, out.channels).sum()) if unscored else 0.0,
            },
        )
