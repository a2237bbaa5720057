"""Backend specs: one typed spec per backend, parsed from and printed to one string.

String form (used by the CLI ``--model`` flag, settings and cache keys)::

    [KIND:]MODEL[@WEIGHTS][?key=value&key=value]

* ``KIND`` is ``clip`` (default), ``sam`` or ``vlm``.
* CLIP: ``ViT-B-16@openai`` (architecture and pretrained tag), ``ViT-B-16@/path/ckpt.pt`` (local
  checkpoint), ``hf-hub:org/repo``, ``local-dir:/path/folder``; ``?config=/path/cfg.json``
  registers a custom architecture first.
* ``demo`` is the offline demo CLIP shipped in ``resources/models``.
* Common options: ``device=auto|cpu|cuda|mps``, ``precision=fp32|fp16|bf16``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from explorer.core.resources import demo_model_dir
from explorer.core.validation import first_error

__all__ = ["ClipSpec", "BackendSpec", "parse_model_spec", "DEMO_CLIP", "DEFAULT_MODEL", "default_model"]

_KINDS = ("clip", "sam", "vlm")


class _SpecBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    model: str
    weights: str | None = None
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"

    def options(self) -> dict[str, str]:
        opts = {}
        if self.device != "auto":
            opts["device"] = self.device
        if self.precision != "fp32":
            opts["precision"] = self.precision
        return opts

    def canonical(self) -> str:
        text = f"{self.kind}:{self.model}"
        if self.weights:
            text += f"@{self.weights}"
        opts = self.options()
        if opts:
            text += "?" + urlencode(sorted(opts.items()))
        return text

    def __str__(self) -> str:
        return self.canonical()

    @property
    def is_demo(self) -> bool:
        return False


class ClipSpec(_SpecBase):
    """An open_clip model: architecture or ``hf-hub:``/``local-dir:`` name, and weights."""

    kind: Literal["clip"] = "clip"
    config: str | None = None  # model config JSON to register (custom architectures)

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty CLIP model name")
        return v.strip()

    def options(self) -> dict[str, str]:
        opts = super().options()
        if self.config:
            opts["config"] = self.config
        return opts

    @property
    def is_demo(self) -> bool:
        demo = demo_model_dir("clip")
        return self.model == f"local-dir:{demo}"

    @property
    def display_name(self) -> str:
        if self.is_demo:
            return "demo CLIP (trained on synthetic shapes)"
        name = self.model
        if self.weights:
            name += f" ({Path(self.weights).name if '/' in self.weights else self.weights})"
        return name


BackendSpec = ClipSpec


DEMO_CLIP = "demo"
DEFAULT_MODEL = DEMO_CLIP


def default_model() -> str:
    """The model used when none is configured: ``$EXPLORER_MODEL``, else the demo CLIP."""
    import os

    return os.environ.get("EXPLORER_MODEL") or DEFAULT_MODEL


def parse_model_spec(text: str) -> BackendSpec:
    """Parse a model spec string (see module docstring). Raises ``ValueError`` with a clear line."""
    raw = (text or "").strip()
    if not raw:
        raise ValueError("empty model spec")
    if raw == DEMO_CLIP or raw == "clip:demo":
        return ClipSpec(model=f"local-dir:{demo_model_dir('clip')}")
    body, _, query = raw.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=False, strict_parsing=False)) if query else {}
    kind = "clip"
    head, sep, rest = body.partition(":")
    if sep and head in _KINDS:
        kind, body = head, rest
    if kind != "clip":
        raise ValueError(f"model kind {kind!r} is not available yet; use a CLIP model")
    model, _, weights = body.partition("@")
    allowed = {"device", "precision", "config"}
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in model spec; allowed: {sorted(allowed)}")
    try:
        return ClipSpec(model=model, weights=weights or None, **opts)
    except ValidationError as exc:
        raise ValueError(f"invalid model spec {raw!r}: {first_error(exc)[1]}") from None
