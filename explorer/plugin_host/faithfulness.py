"""Deletion and insertion curves: is the map faithful to what the model uses?

Patches are removed (deletion: start from the image, replace patches by the baseline in the
order of the map, most important first) or revealed (insertion: start from the baseline, reveal
in that order), and the model's score is recomputed at ``steps + 1`` fractions
``0, 1/steps, ..., 1`` (Petsiuk et al., RISE, BMVC 2018; for transformers, Chefer et al. 2021).
The score is the CLIP logit of the target prompt, or without a prompt the cosine similarity to the
unmasked image embedding. The same curves for ``n_random`` random orders are the baseline. Lower
deletion AUC and higher insertion AUC mean a more faithful map. AUCs are over fractions in [0, 1]
of the score normalised in one of two ways (``normalise``):

* ``"full"``: divided by the unmasked score (1.0 = the full image's score). CLIP logits have no
  fixed sign: when the unmasked score is negative the division flips the curves;
* ``"range"``: ``(score - blank) / (full - blank)`` with ``blank`` the score of the image with every
  patch replaced (the end of the deletion curve, the start of insertion): 1 = the full image,
  0 = nothing of it left, whatever the logits' sign. Only when the blank image scores *higher*
  than the full one (the prompt matches the mean colour better than the image) are the curves
  flipped; ``metrics['blank_score']`` says so.

Patches are masked in the model's input (the grid cells of its token layout), so exactly the
tokens the map ranks are removed; tokens with NaN map values rank last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explorer.core.jobs import CancelToken, Job, Progress
from explorer.core.metrics import curve_auc
from explorer.core.results import Curve, Metrics, Series

__all__ = ["FaithfulnessResult", "deletion_insertion_job", "ranking"]


@dataclass(frozen=True)
class FaithfulnessResult:
    curve: Curve
    metrics: Metrics


def ranking(values: np.ndarray) -> np.ndarray:
    """Image-token numbers from most to least important (NaN last, ties by index)."""
    v = np.asarray(values, dtype=np.float64)
    key = np.where(np.isfinite(v), -v, np.inf)
    return np.argsort(key, kind="stable")


def _masks(order: np.ndarray, n: int, steps: int, deletion: bool) -> np.ndarray:
    """``(steps + 1, n)`` masks, True = replaced by the baseline."""
    out = np.zeros((steps + 1, n), dtype=bool)
    for s in range(steps + 1):
        k = int(round(n * s / steps))
        chosen = np.zeros(n, dtype=bool)
        chosen[order[:k]] = True
        out[s] = chosen if deletion else ~chosen
    return out


def deletion_insertion_job(
    backend,
    image,
    values: np.ndarray,
    text_embedding: np.ndarray | None = None,
    steps: int = 16,
    baseline: str = "mean",
    n_random: int = 1,
    seed: int = 0,
    cancel: CancelToken | None = None,
    batch_size: int = 32,
    insertion: bool = True,
    normalise: str = "full",
) -> Job:
    """Job: deletion/insertion curves of a per-image-token map, and the random baseline.

    Returns a :class:`FaithfulnessResult`: a :class:`Curve` with series 'deletion', 'insertion',
    'deletion (random)', 'insertion (random)' and :class:`Metrics` with their AUCs
    ('deletion_auc', 'insertion_auc', 'random_deletion_auc', 'random_insertion_auc') and the
    unmasked score ('score'). ``insertion=False`` computes the deletion curves only (half the
    forwards; the 'insertion' series and AUCs are then absent).
    """
    if steps < 2:
        raise ValueError("steps must be at least 2")
    if normalise not in ("full", "range"):
        raise ValueError(f"normalise must be 'full' or 'range', not {normalise!r}")
    cancel = cancel or CancelToken()
    prepared = backend.prepare(image) if not hasattr(image, "pixels") else image
    n = prepared.layout.n_image_tokens
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != n:
        raise ValueError(f"map has {values.shape[0]} values, the model's layout has {n} image tokens")
    if text_embedding is None:
        reference = backend.encode_image_tensor(prepared.pixels)[0]
        score_kw = {"reference": reference}
    else:
        score_kw = {"text_embedding": text_embedding}
    rng = np.random.default_rng(seed)
    orders = {"": ranking(values)}
    for r in range(n_random):
        orders[f" (random {r})"] = rng.permutation(n)
    x = np.linspace(0.0, 1.0, steps + 1)
    raw: dict[str, np.ndarray] = {}
    kinds = ("deletion", "insertion") if insertion else ("deletion",)
    jobs = [(name, kind) for name in orders for kind in kinds]
    full = None
    for i, (name, kind) in enumerate(jobs):
        cancel.raise_if_cancelled()
        yield Progress(i / len(jobs), f"{kind}{name}")
        masks = _masks(orders[name], n, steps, deletion=kind == "deletion")
        pixels = backend.masked_inputs(prepared, masks, baseline)
        scores = backend.score_inputs(pixels, batch_size=batch_size, cancel=cancel, **score_kw)
        raw[f"{kind}{name}"] = scores
        if kind == "deletion" and full is None:
            full = float(scores[0])  # nothing removed yet: the unmasked score
    blank = float(raw["deletion"][-1])  # every patch replaced
    offset, norm = 0.0, (full if full not in (None, 0.0) else 1.0)
    if normalise == "range" and abs(full - blank) > 1e-6 * max(1.0, abs(full)):
        offset, norm = blank, full - blank
    series, metrics = [], {"score": float(full), "blank_score": blank}
    for kind in kinds:
        y = (raw[kind] - offset) / norm
        series.append(Series(kind, x, y))
        metrics[f"{kind}_auc"] = curve_auc(x, y)
        rand = [(raw[f"{kind}{name}"] - offset) / norm for name in orders if name]
        if rand:
            mean = np.mean(rand, axis=0)
            series.append(Series(f"{kind} (random)", x, mean))
            metrics[f"random_{kind}_auc"] = curve_auc(x, mean)
    yield Progress(1.0, "faithfulness done")
    curve = Curve(title="Deletion and insertion", x_label="fraction of patches removed / revealed",
                  y_label=("share of the full image's score above the blank image's" if offset or normalise == "range"
                           else "score / unmasked score"), series=tuple(series),
                  meta={"steps": steps, "baseline": baseline, "n_random": n_random, "seed": seed,
                        "normalise": normalise if (offset or normalise == "full") else "full"})
    return FaithfulnessResult(curve=curve, metrics=Metrics(values=metrics, label="faithfulness"))
