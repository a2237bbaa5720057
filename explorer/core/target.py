"""What a method explains: text prompts, a query token, a region of the image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Target"]


@dataclass(frozen=True)
class Target:
    """The explanation target handed to every method.

    Parameters
    ----------
    prompts
        Text prompts (similarity maps, text-conditioned attributions). Order is kept.
    query
        Sequence index of the query token for attention maps (``None``: the [CLS] token).
    region
        ``(H, W)`` bool mask on the original image (region statistics), or ``None``.
    tokens
        Generated tokens (their indices in the answer) a VLM map explains; several = a word.
    """

    prompts: tuple[str, ...] = ()
    query: int | None = None
    region: np.ndarray | None = None
    tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        prompts = tuple(p.strip() for p in self.prompts if p and p.strip())
        object.__setattr__(self, "prompts", prompts)

    def key(self) -> str:
        region = "" if self.region is None else str(hash(np.asarray(self.region, dtype=bool).tobytes()))
        return f"{self.prompts!r}|{self.query}|{region}|{self.tokens}"
